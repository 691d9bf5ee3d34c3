//! The web client's static files: built into the binary, or read from
//! `--web-dir` (for working on the client without rebuilding).

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;

/// `(path, content type, bytes)` of every file under `web/` at build time.
const EMBEDDED: &[(&str, &str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// One static file, ready to serve.
#[derive(Debug, Clone)]
pub struct Asset {
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The file.
    pub body: Bytes,
    /// A strong validator: a hash of the bytes.
    pub etag: String,
}

/// The static files, by URL path.
#[derive(Debug)]
pub enum Assets {
    /// Built into the binary.
    Embedded(HashMap<&'static str, Asset>),
    /// Read from a directory on every request.
    Dir(PathBuf),
}

impl Assets {
    /// The built-in files, or a directory's when `dir` is given.
    pub fn new(dir: Option<PathBuf>) -> Self {
        match dir {
            Some(d) => Assets::Dir(d),
            None => Assets::Embedded(
                EMBEDDED
                    .iter()
                    .map(|&(path, content_type, body)| {
                        (path, asset(content_type, Bytes::from_static(body)))
                    })
                    .collect(),
            ),
        }
    }

    /// The file for a URL path (`/` is `/index.html`).
    pub async fn get(&self, path: &str) -> Option<Asset> {
        let path = if path == "/" { "/index.html" } else { path };
        match self {
            Assets::Embedded(map) => map.get(path).cloned(),
            Assets::Dir(dir) => {
                let name = path.strip_prefix('/')?;
                // Flat directory only: no traversal, no hidden files.
                if name.is_empty()
                    || name.contains('/')
                    || name.contains('\\')
                    || name.starts_with('.')
                {
                    return None;
                }
                let content_type = content_type(name)?;
                let body = tokio::fs::read(dir.join(name)).await.ok()?;
                Some(asset(content_type, Bytes::from(body)))
            }
        }
    }
}

fn asset(content_type: &'static str, body: Bytes) -> Asset {
    Asset { content_type, etag: etag(&body), body }
}

/// A strong ETag for `body`: its FNV-1a hash, quoted (a content hash for
/// validators, not for security).
pub fn etag(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in body {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}\"")
}

include!("mime.rs");
