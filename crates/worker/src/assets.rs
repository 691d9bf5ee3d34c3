//! The web client's static files: built into the binary, or read from
//! `--web-dir` (for working on the client without rebuilding).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

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
    /// when smaller; zopfli, see `compressed`).
    pub gzip: Option<Encoded>,
    /// The file in brotli, which browsers prefer (text files only, and only
    /// when smaller): 10% smaller than the gzip for the page.
    pub br: Option<Encoded>,
}

/// A compressed representation of an [`Asset`], with its own validator.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The compressed bytes.
    pub body: Bytes,
    /// The plain ETag with `-gz` (or `-br`) before its closing quote.
    pub etag: String,
}

/// A file built into the binary, and once asked for, its [`Asset`].
#[derive(Debug)]
pub struct Embedded {
    content_type: &'static str,
    body: &'static [u8],
    ready: Arc<OnceLock<Asset>>,
}

/// The static files, by URL path.
#[derive(Debug)]
pub enum Assets {
    /// Built into the binary: each file is made ready to serve (stripped,
    /// bundled, gzipped) on its first request, not at start, so a worker
    /// starts at once.
    Embedded(HashMap<&'static str, Embedded>),
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
                        (path, Embedded { content_type, body, ready: Arc::default() })
                    })
                    .collect(),
            ),
        }
    }

    /// The file for a URL path (`/` is `/index.html`).
    pub async fn get(&self, path: &str) -> Option<Asset> {
        let path = if path == "/" { "/index.html" } else { path };
        match self {
            Assets::Embedded(map) => {
                let file = map.get(path)?;
                if let Some(ready) = file.ready.get() {
                    return Some(ready.clone());
                }
                // Compressing takes a moment (zopfli): off the runtime thread.
                let (content_type, body, ready) =
                    (file.content_type, file.body, file.ready.clone());
                let path = path.to_owned();
                // Made once: the first visitors after a start wait for it
                // rather than each compressing the page again.
                let make = move || {
                    let read = |name: &str| {
                        let path = format!("/{name}");
                        let file = EMBEDDED.iter().find(|(p, _, _)| *p == path)?;
                        String::from_utf8(file.2.to_vec()).ok()
                    };
                    let made = ready.get_or_init(|| match entry(&path, &read) {
                        Some(page) => stripped_asset(content_type, page),
                        None => asset(content_type, Bytes::from_static(body)),
                    });
                    made.clone()
                };
                tokio::task::spawn_blocking(make).await.ok()
            }
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
    Some(Bytes::from(
        html.replace(&tag, &format!("<script type=\"module\">{}</script>", js.trim_end())),
    ))
}

/// An asset of `body` stripped by its type.
fn asset(content_type: &'static str, body: Bytes) -> Asset {
    stripped_asset(content_type, stripped(content_type, body))
}

/// An asset of `body` as it is.
fn stripped_asset(content_type: &'static str, body: Bytes) -> Asset {
    let h = content_hash(&body);
    let (gz, br) = if is_text(content_type) { compressed(&body) } else { (None, None) };
    let gzip = gz.map(|body| Encoded { body, etag: format!("\"{h:016x}-gz\"") });
    let br = br.map(|body| Encoded { body, etag: format!("\"{h:016x}-br\"") });
    Asset { content_type, body, etag: format!("\"{h:016x}\""), gzip, br }
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

/// `body` gzipped by zopfli (about 3% smaller than zlib's best level) and in
/// brotli at its best quality (another 10% smaller: Chromium asks for it, over
/// plain HTTP too), each `None` when not smaller. A first visit's page shrinks
/// from 9.4 KB (zlib) to 8.2 KB. Embedded files are compressed on their first
/// request; files of `--web-dir` once per content (`CACHE`). About 0.3 s for
/// the page (index.html with its bundle).
fn compressed(body: &[u8]) -> (Option<Bytes>, Option<Bytes>) {
    type Pair = (Option<Bytes>, Option<Bytes>);
    static CACHE: LazyLock<Mutex<HashMap<u64, Pair>>> = LazyLock::new(Default::default);
    let h = content_hash(body);
    if let Some(pair) = CACHE.lock().expect("compression cache lock").get(&h) {
        return pair.clone();
    }
    let options = zopfli::Options {
        iteration_count: std::num::NonZeroU64::new(15).expect("not zero"),
        ..Default::default()
    };
    let mut gz = Vec::new();
    zopfli::compress(options, zopfli::Format::Gzip, body, &mut gz)
        .expect("writing to a Vec cannot fail");
    let mut br = Vec::new();
    let params = brotli::enc::BrotliEncoderParams { quality: 11, lgwin: 22, ..Default::default() };
    brotli::BrotliCompress(&mut &body[..], &mut br, &params).expect("writing to a Vec cannot fail");
    let smaller = |c: Vec<u8>| (c.len() < body.len()).then(|| Bytes::from(c));
    let pair = (smaller(gz), smaller(br));
    let mut cache = CACHE.lock().expect("compression cache lock");
    // Bounded: the files of one directory, a few versions each while editing.
    if cache.len() > 256 {
        cache.clear();
    }
    cache.insert(h, pair.clone());
    pair
}

include!("mime.rs");
