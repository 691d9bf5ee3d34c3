//! Where the board's Redis is and how this worker trusts it.
//!
//! A [`RedisTarget`] is the URL (`redis://` or `rediss://`, with
//! `USER:PASSWORD@` for an ACL user or `:PASSWORD@` for `requirepass`) and,
//! for `rediss://`, the roots the server's certificate must chain to: the
//! system's CA store (a managed Redis with a public certificate), or only the
//! certificates of a CA file (`--redis-ca-file`, a private CA such as the one
//! a managed Redis offers for download). It is checked when made, so a bad
//! URL or CA file is refused at start, never retried.
//!
//! The password never leaves this file: logs, error messages and `Debug`
//! show [`RedisTarget::redacted`], the URL with the password replaced by
//! `***` (fred's own `Config` prints it in its `Debug`, so no `Builder` is
//! kept where a `Debug` could reach it).
//!
//! TLS is rustls with the ring provider: no OpenSSL and no cmake to build.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fred::prelude::*;
use fred::types::config::TlsConnector;
use rustls::pki_types::{CertificateDer, pem::PemObject};

use super::COMMAND_TIMEOUT;
use crate::StoreError;

/// A checked Redis URL and, for TLS, the roots its certificate must chain to.
#[derive(Clone)]
pub struct RedisTarget {
    url: String,
    redacted: String,
    /// The roots for `rediss://` (`None`: plain TCP).
    tls: Option<Arc<rustls::ClientConfig>>,
    ca_file: Option<PathBuf>,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.redacted)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `url` with the password of its user info (what follows the first `:`
/// before the last `@`) replaced by `***`. The last `@` rather than the
/// authority's end, so that a password with a raw `/`, `?` or `@` in a URL
/// that does not parse is hidden too.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL at all: it may be a password pasted in the wrong place.
        return "(not a URL)".into();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}")
        }
        None => url.to_string(),
    }
}

impl RedisTarget {
    /// Checks `url` (and reads `ca_file`, which only a `rediss://` URL may
    /// have); [`StoreError::Config`] with a message that names what is wrong.
    pub fn new(url: &str, ca_file: Option<&Path>) -> Result<Self, StoreError> {
        let redacted = redact(url);
        // `rediss://` (and `valkeys://`, `rediss-cluster://`): fred would
        // build its default TLS setup while parsing, and fail on any
        // unreadable file in the system store; parse the plain URL and set
        // the roots ourselves.
        let plain = [("rediss", "redis"), ("valkeys", "valkey")]
            .iter()
            .find_map(|(tls, plain)| url.strip_prefix(tls).map(|rest| format!("{plain}{rest}")));
        let (tls, plain) = match plain {
            Some(plain) => (true, plain),
            None => (false, url.to_string()),
        };
        Config::from_url(&plain).map_err(|e| {
            StoreError::Config(format!(
                "bad Redis URL {redacted}: {}; expected redis://[USER:PASSWORD@]HOST:PORT, or \
                 rediss://... for TLS",
                e.details()
            ))
        })?;
        let tls = match (tls, ca_file) {
            (true, ca_file) => Some(Arc::new(client_config(ca_file)?)),
            (false, Some(path)) => {
                return Err(StoreError::Config(format!(
                    "a Redis CA file ({}) is given, but the Redis URL {redacted} is not TLS: \
                     use rediss://",
                    path.display()
                )));
            }
            (false, None) => None,
        };
        Ok(Self { url: plain, redacted, tls, ca_file: ca_file.map(Path::to_path_buf) })
    }

    /// The URL with its password replaced by `***`: for logs and messages.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// Whether the connection is TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A client builder for this target: reconnects forever with backoff (a
    /// worker outlives Redis restarts), commands time out after
    /// [`COMMAND_TIMEOUT`].
    pub(super) fn builder(&self) -> Result<Builder, StoreError> {
        let mut config = Config::from_url(&self.url)
            .map_err(|e| StoreError::Config(format!("bad Redis URL {}: {e}", self.redacted)))?;
        config.tls = self.tls.as_ref().map(|c| TlsConnector::from((**c).clone()).into());
        let mut b = Builder::from_config(config);
        b.set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
        b.with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT);
        b.with_connection_config(|c| {
            c.connection_timeout = std::time::Duration::from_secs(2);
            c.internal_command_timeout = std::time::Duration::from_secs(2);
        });
        Ok(b)
    }

    /// The message for `error`, seen while connecting for the first time,
    /// when it is a configuration error that waiting will not fix: Redis
    /// refused the user or password, or the TLS handshake failed (a
    /// certificate this worker does not trust, or a port that does not speak
    /// TLS). `None` for anything else (Redis down or unreachable).
    pub(super) fn fatal(&self, error: &Error) -> Option<String> {
        if *error.kind() == ErrorKind::Auth {
            return Some(format!(
                "Redis at {} refused the login (check the user and password in the \
                 URL): {}",
                self.redacted,
                error.details()
            ));
        }
        // tokio-rustls reports a failed handshake as an I/O error of kind
        // InvalidData (a rustls error inside); fred's own TLS errors have
        // kind Tls.
        let tls_failed = *error.kind() == ErrorKind::Tls
            || (*error.kind() == ErrorKind::IO && error.details().contains("InvalidData"));
        if self.is_tls() && tls_failed {
            let roots = match &self.ca_file {
                Some(path) => format!("the CA in {}", path.display()),
                None => "the system's CA store (a private CA needs --redis-ca-file)".into(),
            };
            return Some(format!(
                "TLS handshake with Redis at {} failed: {}. The server's certificate must be \
                 valid for the URL's host and chain to {roots}, and the port must be Redis' TLS port",
                self.redacted,
                error.details()
            ));
        }
        if self.is_tls() && *error.kind() == ErrorKind::Timeout {
            // A plain Redis port reads the TLS hello as the start of a
            // command and never answers it.
            return Some(format!(
                "connecting to Redis at {} over TLS timed out: Redis is unreachable, or the port \
                 is not its TLS port (a plain port never answers a TLS handshake)",
                self.redacted
            ));
        }
        None
    }
}

/// rustls with the ring provider, trusting `ca_file`'s certificates only, or
/// the system's store without one.
fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                StoreError::Config(format!("cannot read the Redis CA file {shown}: {e}"))
            })?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    StoreError::Config(format!("the Redis CA file {shown} is not PEM: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    StoreError::Config(format!(
                        "the Redis CA file {shown} has a bad certificate: {e}"
                    ))
                })?;
            }
            if roots.is_empty() {
                return Err(StoreError::Config(format!(
                    "the Redis CA file {shown} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(StoreError::Config(format!(
                    "no CA certificate in the system's store to check Redis' TLS certificate \
                     ({:?}): install ca-certificates, or give --redis-ca-file",
                    found.errors
                )));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_the_password_and_only_the_password() {
        assert_eq!(redact("redis://10.0.0.2:6379"), "redis://10.0.0.2:6379");
        assert_eq!(redact("rediss://omcb:s3cret@db:25061"), "rediss://omcb:***@db:25061");
        assert_eq!(redact("redis://:s3cret@db:6379/0"), "redis://:***@db:6379/0");
        assert_eq!(redact("redis://omcb@db"), "redis://omcb@db");
        // Raw characters a URL parser would stop at.
        assert_eq!(redact("redis://u:p@ss/w?rd#x@db:1"), "redis://u:***@db:1");
        assert_eq!(redact("s3cret"), "(not a URL)");
    }

    #[test]
    fn bad_urls_and_ca_files_are_refused_without_the_password() {
        let msg = |r: Result<RedisTarget, StoreError>| r.unwrap_err().to_string();
        let bad = msg(RedisTarget::new("redis://u:s3cret@db:notaport", None));
        assert!(bad.contains("bad Redis URL redis://u:***@db:notaport"), "{bad}");
        assert!(!bad.contains("s3cret"), "{bad}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.crt");
        let e = msg(RedisTarget::new("rediss://u:s3cret@db:1", Some(&missing)));
        assert!(e.contains("cannot read the Redis CA file") && !e.contains("s3cret"), "{e}");
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = msg(RedisTarget::new("rediss://db:1", Some(&empty)));
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = msg(RedisTarget::new("redis://u:s3cret@db:1", Some(&empty)));
        assert!(e.contains("is not TLS: use rediss://") && !e.contains("s3cret"), "{e}");
        let e = msg(RedisTarget::new("valkeys://db:1", Some(&empty)));
        assert!(e.contains("holds no PEM certificate"), "valkeys:// is TLS too: {e}");
        let target = RedisTarget::new("redis://u:s3cret@db:1", None).unwrap();
        assert!(!format!("{target:?}").contains("s3cret"));
        assert!(!target.is_tls());
    }
}
