//! A throwaway certificate authority for tests of TLS to Redis (`rediss://`).
//!
//! The keys and certificates are made with the `openssl` command line tool in
//! a temp dir, so the kit needs no certificate crate; they are valid for two
//! days and for `127.0.0.1` and `localhost` only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// A CA (its key and certificate in a temp dir) that issues server certificates.
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
}

/// A server certificate and its key, issued by a [`TestCa`], in its dir.
#[derive(Debug, Clone)]
pub struct ServerCert {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `openssl req`'s arguments for a new unencrypted P-256 key.
const NEW_P256_KEY: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl TestCa {
    /// A new CA with its own P-256 key: a certificate issued by another
    /// `TestCa` is not trusted by this one.
    pub fn new() -> anyhow::Result<Self> {
        crate::require("openssl");
        let dir = tempfile::tempdir()?;
        // A name of its own: a certificate from another test CA must fail as
        // an unknown issuer, not as a bad signature from a namesake.
        let unique = dir.path().file_name().unwrap_or_default().to_string_lossy();
        let subject = format!("/CN=omcb test CA {unique}");
        openssl(
            dir.path(),
            &[
                &["req", "-x509"][..],
                &NEW_P256_KEY,
                &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", &subject],
            ]
            .concat(),
        )?;
        Ok(Self { dir })
    }

    /// The CA's certificate (PEM): what a client trusts.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Issues a server certificate for `127.0.0.1` and `localhost`, named `name`.
    pub fn issue(&self, name: &str) -> anyhow::Result<ServerCert> {
        let dir = self.dir.path();
        let (key, csr, cert, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(
            dir.join(&ext),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(
            dir,
            &[
                &["req"][..],
                &NEW_P256_KEY,
                &["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"],
            ]
            .concat(),
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        )?;
        Ok(ServerCert { cert: dir.join(cert), key: dir.join(key) })
    }

    /// A rustls client configuration that trusts this CA only (the kit's own
    /// RESP client over TLS).
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.cert())? {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth(),
        ))
    }
}
