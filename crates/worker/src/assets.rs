//! The web client's static files: built into the binary, or read from
//! `--web-dir` (for working on the client without rebuilding).

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;

mod bundle;
mod minify;

/// The page's module: served with the modules it imports (`bundle`).
const ENTRY: &str = "app.js";

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
    /// The file gzipped, for clients that take it (text files only, and only
    /// when smaller): the page's files are 42 KB plain and 14 KB gzipped.
    pub gzip: Option<Gzipped>,
}

/// A gzipped representation of an [`Asset`], with its own validator.
#[derive(Debug, Clone)]
pub struct Gzipped {
    /// The gzipped bytes.
    pub body: Bytes,
    /// The plain ETag with `-gz` before its closing quote.
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
            None => {
                let read = |name: &str| {
                    let path = format!("/{name}");
                    let file = EMBEDDED.iter().find(|(p, _, _)| *p == path)?;
                    String::from_utf8(file.2.to_vec()).ok()
                };
                Assets::Embedded(
                    EMBEDDED
                        .iter()
                        .map(|&(path, content_type, body)| {
                            let asset = match entry(path, &read) {
                                Some(page) => stripped_asset(content_type, page),
                                None => asset(content_type, Bytes::from_static(body)),
                            };
                            (path, asset)
                        })
                        .collect(),
                )
            }
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
                let dir = dir.clone();
                let path = path.to_owned();
                let bundled = tokio::task::spawn_blocking(move || {
                    entry(&path, &|name: &str| std::fs::read_to_string(dir.join(name)).ok())
                })
                .await
                .ok()
                .flatten();
                Some(match bundled {
                    Some(page) => stripped_asset(content_type, page),
                    None => asset(content_type, Bytes::from(body)),
                })
            }
        }
    }
}

/// The page's own two files as served, stripped (`minify`): `/app.js` as the
/// bundle of it and its imports, and `/index.html` with that bundle inline in
/// place of its `<script type="module" src="/app.js">`, so that a first visit
/// is one response for the whole page (docs/BENCHMARKS.md, "Bytes per page
/// load"). `None` for any other path, or (logged) when the page cannot be
/// bundled: then the files are served as they are, and the browser fetches
/// the modules one by one.
fn entry(path: &str, read: &dyn Fn(&str) -> Option<String>) -> Option<Bytes> {
    let page = path == "/index.html";
    if !page && path.strip_prefix('/') != Some(ENTRY) {
        return None;
    }
    let js = match bundle::bundle(ENTRY, read) {
        Ok(js) => minify::js(&js),
        Err(e) => {
            tracing::warn!(error = %e, "cannot bundle {ENTRY}: serving it unbundled");
            return None;
        }
    };
    if !page {
        return Some(Bytes::from(js));
    }
    let html = minify::html(&read("index.html")?);
    let tag = format!("<script type=\"module\" src=\"/{ENTRY}\"></script>");
    // The script's text must not end the element early.
    if !html.contains(&tag) || js.to_ascii_lowercase().contains("</script") {
        tracing::warn!("cannot inline {ENTRY} in index.html: serving it on its own");
        return None;
    }
    Some(Bytes::from(html.replace(&tag, &format!("<script type=\"module\">{}</script>", js.trim_end()))))
}

/// An asset of `body` stripped by its type.
fn asset(content_type: &'static str, body: Bytes) -> Asset {
    stripped_asset(content_type, stripped(content_type, body))
}

/// An asset of `body` as it is.
fn stripped_asset(content_type: &'static str, body: Bytes) -> Asset {
    let h = content_hash(&body);
    let gzip = is_text(content_type)
        .then(|| gzip(&body))
        .flatten()
        .map(|gz| Gzipped { body: gz, etag: format!("\"{h:016x}-gz\"") });
    Asset { content_type, body, etag: format!("\"{h:016x}\""), gzip }
}

/// FNV-1a of `body`: a content hash for validators, not for security.
fn content_hash(body: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, body);
    std::hash::Hasher::finish(&h)
}

/// A strong ETag for `body`: its content hash, quoted.
pub fn etag(body: &[u8]) -> String {
    format!("\"{:016x}\"", content_hash(body))
}

/// The page's JavaScript, CSS and HTML without comments and needless
/// whitespace (`minify`); other files, and any that is not UTF-8, as they are.
fn stripped(content_type: &str, body: Bytes) -> Bytes {
    let Ok(text) = std::str::from_utf8(&body) else {
        return body;
    };
    let kind = content_type.split(';').next().unwrap_or_default();
    match kind {
        "text/javascript" => Bytes::from(minify::js(text)),
        "text/css" => Bytes::from(minify::css(text)),
        "text/html" => Bytes::from(minify::html(text)),
        _ => body,
    }
}

fn is_text(content_type: &str) -> bool {
    content_type.starts_with("text/") || content_type.starts_with("image/svg")
}

/// `body` gzipped at the best level (embedded files are compressed once, at
/// start), or `None` when that is not smaller.
fn gzip(body: &[u8]) -> Option<Bytes> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(body).expect("writing to a Vec cannot fail");
    let gz = enc.finish().expect("writing to a Vec cannot fail");
    (gz.len() < body.len()).then(|| Bytes::from(gz))
}

include!("mime.rs");
