//! The origin of a change: a keyed hash of the client address that made it
//! ([`omcb_store::Change::origin`]), so the change archive can tell one
//! client's changes from another's (audit, revert) without holding any
//! address. The key is the operator's secret: without it nobody can test an
//! address against the archive, and with it `omcb admin` hashes an address
//! the way the workers did.
//!
//! **The hash:** SipHash-2-4 with a 128-bit key, over the address's bytes
//! (4 for IPv4, 16 for IPv6; an IPv4-mapped IPv6 address counts as its IPv4
//! one). SipHash is a keyed PRF made for exactly this (short inputs, 64-bit
//! output, which is what a change carries) and costs tens of nanoseconds;
//! HMAC-SHA256 would be as safe here but slower, and truncated to the same
//! 64 bits. 0 is reserved for "no client" and `u64::MAX` for the operator
//! ([`OPERATOR`], the changes `omcb admin revert` makes), so a hash of 0 is
//! taken as 1 and one of `u64::MAX` as `u64::MAX - 1` (two addresses in
//! 2^64 share their origin with another).
//!
//! **The address hashed** is the client's as `http.rs` `client_ip` finds it
//! (the peer, or behind a `--trusted-proxy` its `X-Forwarded-For` client),
//! the full address, not the limits' IPv6 /64 key: an audit names the one
//! address it asks about.
//!
//! **Where the key comes from** ([`OriginKey::for_worker`]):
//! - `--origin-key-file PATH` (`OMCB_ORIGIN_KEY_FILE`): 32 hex digits (128
//!   bits; `openssl rand -hex 16 > PATH`). A file that cannot be read or
//!   holds anything else is refused at start. Every worker of a fleet and
//!   `omcb admin` must be given the same file.
//! - Embedded, without the flag: a key made once at random and kept in the
//!   data dir as [`KEY_FILE`] (mode 0600), so the board runs with no setup
//!   and its origins stay comparable across restarts; without a data dir, a
//!   random key for this run (the board itself is gone at exit too).
//! - A fleet worker without the flag cannot make a key its peers share, so it
//!   records no origins (every change's origin is 0) and says so at start;
//!   with `--archive-dir` it refuses to start, as an archive without origins
//!   could not be audited or reverted.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use siphasher::sip::SipHasher24;

/// The origin of the operator's own changes (`omcb admin revert`, see
/// `audit.rs`): no client's hash is ever this value.
pub const OPERATOR: u64 = u64::MAX;

/// The key file the embedded worker makes in its data dir.
pub const KEY_FILE: &str = "origin.key";

/// The operator's secret for origin hashes; `None` records no origins.
#[derive(Clone)]
pub struct OriginKey(Option<[u8; 16]>);

impl std::fmt::Debug for OriginKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself: it ends up in logs.
        f.write_str(if self.0.is_some() { "OriginKey(set)" } else { "OriginKey(none)" })
    }
}

impl OriginKey {
    /// A key that records no origins (every [`origin`](Self::origin) is 0).
    pub fn none() -> Self {
        Self(None)
    }

    /// A key from its 16 bytes.
    pub fn from_bytes(key: [u8; 16]) -> Self {
        Self(Some(key))
    }

    /// Whether origins are recorded.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// The origin of a change made by `ip`: never 0 with a key, 0 without.
    pub fn origin(&self, ip: IpAddr) -> u64 {
        use std::hash::Hasher as _;
        let Some(key) = &self.0 else { return 0 };
        let mut h = SipHasher24::new_with_key(key);
        match ip.to_canonical() {
            IpAddr::V4(v4) => h.write(&v4.octets()),
            IpAddr::V6(v6) => h.write(&v6.octets()),
        }
        h.finish().clamp(1, OPERATOR - 1)
    }

    /// Reads a key file: 32 hex digits (surrounding whitespace allowed).
    /// The message says what is wrong and how to make one.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the origin key file {}: {e}", path.display()))?;
        parse(text.trim()).map(Self::from_bytes).ok_or_else(|| {
            format!(
                "the origin key file {} must hold 32 hex digits (128 bits), e.g. made with \
                 `openssl rand -hex 16 > {}`",
                path.display(),
                path.display()
            )
        })
    }

    /// The key a worker uses (see the module docs): `file` when given,
    /// else embedded the data dir's (made once), else for a fleet none.
    /// `archives` says whether this worker may write an archive (a fleet
    /// worker with one refuses to run without a key).
    pub fn for_worker(
        file: Option<&Path>,
        fleet: bool,
        data_dir: Option<&Path>,
        archives: bool,
    ) -> Result<Self, String> {
        if let Some(file) = file {
            return Self::read(file);
        }
        if fleet {
            if archives {
                return Err(
                    "--archive-dir in a fleet needs --origin-key-file (OMCB_ORIGIN_KEY_FILE), \
                     the same file on every worker and for `omcb admin`: without it the workers \
                     cannot agree on the changes' origins"
                        .into(),
                );
            }
            tracing::warn!(
                "no --origin-key-file: this worker records no origins of changes \
                 (the archive cannot audit or revert what it accepts)"
            );
            return Ok(Self::none());
        }
        match data_dir {
            Some(dir) => Self::in_data_dir(dir),
            None => Ok(Self::from_bytes(rand::random())),
        }
    }

    /// The data dir's key, made at random (mode 0600) when there is none yet.
    fn in_data_dir(dir: &Path) -> Result<Self, String> {
        let path: PathBuf = dir.join(KEY_FILE);
        if path.exists() {
            return Self::read(&path);
        }
        let key: [u8; 16] = rand::random();
        let text: String = key.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n";
        let made = (|| {
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!("{KEY_FILE}.tmp"));
            let mut f = open_private(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        made.map_err(|e| format!("cannot write the origin key {}: {e}", path.display()))?;
        tracing::info!(path = %path.display(), "made a new origin key");
        Ok(Self::from_bytes(key))
    }
}

/// Creates (truncating) a file only its owner can read.
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// 32 hex digits as 16 bytes.
fn parse(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_stable_and_never_zero() {
        let a = OriginKey::from_bytes([1; 16]);
        let b = OriginKey::from_bytes([2; 16]);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(a.origin(ip), a.origin(ip));
        assert_ne!(a.origin(ip), b.origin(ip), "another key, another hash");
        assert_ne!(a.origin(ip), a.origin("203.0.113.8".parse().unwrap()));
        assert_ne!(a.origin(ip), 0);
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(a.origin(mapped), a.origin(ip), "an IPv4-mapped address is its IPv4 one");
        assert_eq!(OriginKey::none().origin(ip), 0);
    }

    #[test]
    fn key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "00112233445566778899aabbccddeeff\n").unwrap();
        assert!(OriginKey::read(&good).unwrap().is_set());
        let short = dir.path().join("short");
        std::fs::write(&short, "0011223344556677").unwrap();
        let e = OriginKey::read(&short).unwrap_err();
        assert!(e.contains("32 hex digits") && e.contains("short"), "{e}");
        let e = OriginKey::read(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn the_embedded_key_is_made_once_private_and_reused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let first = OriginKey::for_worker(None, false, Some(dir.path()), true).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = OriginKey::for_worker(None, false, Some(dir.path()), true).unwrap();
        assert_eq!(first.origin(ip), again.origin(ip));
    }

    #[test]
    fn a_fleet_without_a_key_records_none_and_will_not_archive() {
        assert!(!OriginKey::for_worker(None, true, None, false).unwrap().is_set());
        let e = OriginKey::for_worker(None, true, None, true).unwrap_err();
        assert!(e.contains("--origin-key-file"), "{e}");
    }
}
