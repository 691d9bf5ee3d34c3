//! The widget: the board's live count on other sites.
//!
//! - `GET /embed`: a small page for an iframe (checked, frozen, percent, a
//!   link to the board, and an empty `#sunset` line kept for the sunset
//!   countdown). Rendered from `web/embed.html` with the counts of the
//!   moment, so it shows them before (and without) its script,
//!   `web/widget.js`, which keeps them live from `/api/counts`.
//! - `GET /embed.js`: `web/embed.js`, a script tag that inserts the iframe
//!   after itself and sizes it from the iframe's `postMessage`.
//! - `GET /oembed`: oEmbed 1.0 JSON, type `rich`, whose HTML is the iframe.
//! - `GET /badge.svg`: the checked count as a shields-style badge.
//! - `GET /api/counts`: the counts as Server-Sent Events, at most one event
//!   per second.
//!
//! Everything is made from the hub's replica: an impression costs the store
//! nothing. The whole answers carry `Cache-Control` with `max-age` and
//! `stale-while-revalidate` and an ETag (304 on a match), so nginx and
//! browsers serve repeat impressions without reaching a worker.
//!
//! The live count is a stream, not polling: at 1,000 toggles/s the counts
//! change on every poll, so each poll would cost a full request and answer
//! (some 500 bytes of headers) instead of the ~30-byte event a stream sends
//! once a second. Server-Sent Events rather than a counts-only `/ws`: the
//! browser's `EventSource` reconnects by itself, the events are text that
//! needs no protobuf decoder in the widget, and the stream is a plain HTTP
//! response. Each open stream takes one of the worker's `--max-connections`
//! (a stream is held as long as a socket): past them a stream is refused
//! with 503 and `Retry-After`, and the widget tries again a few seconds later.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, watch};

use super::{Body, Reply, header_value, if_none_match, plain};
use crate::app::App;
use crate::assets;
use crate::counts::Counts;
use crate::metrics::Limiter;
use crate::shutdown::until_set;

/// `/embed` and `/badge.svg` show live numbers: a cache may keep them a few
/// seconds (the iframe's stream corrects them at once).
const LIVE: &str = "public, max-age=10, stale-while-revalidate=60";
/// `/embed.js` is linked without a version by other sites: an hour fresh,
/// then a day of revalidating in the background.
const SCRIPT: &str = "public, max-age=3600, stale-while-revalidate=86400";
/// `/oembed` changes only with a release.
const OEMBED: &str = "public, max-age=86400, stale-while-revalidate=604800";

/// The widget's size when the consumer sets no bound.
const WIDTH: u32 = 320;
const HEIGHT: u32 = 140;

/// A comment line on an idle stream, so that proxies (nginx drops an upstream
/// silent for 60 s) and browsers keep it open.
const HEARTBEAT: Duration = Duration::from_secs(25);

/// Bumped when the badge's drawing changes, so old ETags stop matching.
const BADGE_VERSION: u32 = 1;

/// A response with `body`, or a 304 when the request already holds `etag`.
fn cacheable(
    req: &Request<Incoming>,
    etag: &str,
    cache: &'static str,
    content_type: &'static str,
    body: impl FnOnce() -> Bytes,
) -> Response<Body> {
    let mut r = if if_none_match(req, etag) {
        let mut r = Response::new(Full::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(body()));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    };
    let headers = r.headers_mut();
    headers.insert(header::ETAG, header_value(etag));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    // Public numbers: any page may read them (a custom widget, a badge tool).
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    r
}

/// `GET /embed`.
pub(super) async fn page(app: &App, req: &Request<Incoming>) -> Response<Body> {
    let (Some(template), Some(script)) =
        (app.assets.get("/embed.html").await, app.assets.get("/widget.js").await)
    else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    let c = Counts::of(&app.hub);
    let (t, s) = (template.etag.trim_matches('"'), script.etag.trim_matches('"'));
    let etag = format!("\"{}-{}-{}-{t}-{s}\"", c.epoch, c.checked, c.frozen);
    cacheable(req, &etag, LIVE, "text/html; charset=utf-8", || {
        let html = String::from_utf8_lossy(&template.body)
            .replace("{{checked}}", &grouped(c.checked))
            .replace("{{frozen}}", &grouped(c.frozen))
            .replace("{{percent}}", &escape(&percent(c.checked, c.size)))
            .replace("{{size}}", &grouped(c.size))
            // Versioned by content: nginx's `?v=` rule keeps it for a year.
            .replace("{{widget.js}}", &format!("/widget.js?v={s}"));
        Bytes::from(html)
    })
}

/// `GET /embed.js`.
pub(super) async fn script(app: &App, req: &Request<Incoming>) -> Response<Body> {
    let Some(js) = app.assets.get("/embed.js").await else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    cacheable(req, &js.etag, SCRIPT, js.content_type, || js.body)
}

/// `GET /oembed` (oEmbed 1.0, section 2.2): `url` must be the board or its
/// widget on this site (404 otherwise), `format` only `json` (501 for any
/// other, as the spec asks), and the size fits `maxwidth` and `maxheight`.
pub(super) fn oembed(app: &App, req: &Request<Incoming>, peer: IpAddr) -> Response<Body> {
    let (mut url, mut max_width, mut max_height, mut format) = (None, None, None, None);
    for pair in req.uri().query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(value) = decode(value) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "a query value is not valid percent-encoded UTF-8\n",
            );
        };
        match key {
            "url" => url = Some(value),
            "maxwidth" => max_width = Some(value),
            "maxheight" => max_height = Some(value),
            "format" => format = Some(value),
            _ => {}
        }
    }
    if format.as_deref().is_some_and(|f| f != "json") {
        return plain(StatusCode::NOT_IMPLEMENTED, "only format=json is served\n");
    }
    let Some(url) = url else {
        return plain(StatusCode::BAD_REQUEST, "the url parameter is required\n");
    };
    let bound = |v: Option<String>, default: u32| match v {
        None => Some(default),
        Some(v) => v.parse::<u32>().ok().filter(|n| *n > 0).map(|n| n.min(default)),
    };
    let (Some(width), Some(height)) = (bound(max_width, WIDTH), bound(max_height, HEIGHT)) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "maxwidth and maxheight must be whole numbers above 0\n",
        );
    };
    let base = base_url(app, req, peer);
    if !is_ours(&base, &url) {
        return plain(StatusCode::NOT_FOUND, "that url is not this board\n");
    }
    let title = "One Million Checkboxes: live count";
    let html = format!(
        "<iframe src=\"{}/embed\" width=\"{width}\" height=\"{height}\" title=\"{title}\" \
         style=\"border:0;max-width:100%\" loading=\"lazy\"></iframe>",
        escape(&base)
    );
    let body = serde_json::json!({
        "version": "1.0",
        "type": "rich",
        "title": title,
        "provider_name": "One Million Checkboxes",
        "provider_url": format!("{base}/"),
        "cache_age": 86_400,
        "html": html,
        "width": width,
        "height": height,
    })
    .to_string();
    let etag = assets::etag(body.as_bytes());
    cacheable(req, &etag, OEMBED, "application/json", || Bytes::from(body))
}

/// `GET /badge.svg`.
pub(super) fn badge(app: &App, req: &Request<Incoming>) -> Response<Body> {
    let c = Counts::of(&app.hub);
    let etag = format!("\"{}-{}-{BADGE_VERSION}\"", c.epoch, c.checked);
    cacheable(req, &etag, LIVE, "image/svg+xml", || {
        Bytes::from(badge_svg("checkboxes", &format!("{} checked", grouped(c.checked))))
    })
}

/// `GET /api/counts`: `text/event-stream`. The first event carries
/// `checked`, `frozen` and `size` (and a jittered `retry:`, so a worker's
/// widgets do not all come back in the same millisecond); each later event
/// only the fields that changed, at most once per [`crate::counts::PERIOD`].
pub(super) fn counts(app: &Arc<App>, req: &Request<Incoming>) -> Response<Reply> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n").map(Either::Left);
    }
    let body = if head {
        Either::Left(Full::default())
    } else {
        let Some(slot) = StreamSlot::take(app) else {
            app.metrics.limited(Limiter::MaxConnections);
            let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "too many connections; try again\n");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return r.map(Either::Left);
        };
        let (tx, rx) = mpsc::channel(1);
        let retry = 1000 + u64::from(jitter() % 2000);
        let feed = app.counts.subscribe();
        tokio::spawn(async move {
            stream(feed, slot.0.shutdown.clone(), tx, retry).await;
            drop(slot);
        });
        Either::Right(Events { rx })
    };
    let mut r = Response::new(body);
    let headers = r.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    // nginx passes each event on at once instead of buffering the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// An open `/api/counts` stream's place among the worker's
/// `--max-connections`, shared with the board's sockets (`App::sockets`,
/// which shutdown waits to drain); given back when the stream's task ends.
struct StreamSlot(Arc<App>);

impl StreamSlot {
    fn take(app: &Arc<App>) -> Option<Self> {
        let max = app.config.max_connections;
        app.sockets
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .ok()?;
        Some(Self(app.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.sockets.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.sockets_gone.notify_waiters();
        }
    }
}

/// The body of `/api/counts`: the events its task sends.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|event| event.map(|e| Ok(Frame::data(e))))
    }
}

/// Feeds one stream until its client leaves or the worker shuts down (the
/// client then reconnects, to another worker behind nginx). The channel
/// holds one event: a client that does not read holds up only its own
/// stream, which skips to the newest counts when it moves again (and
/// `--http-write-timeout` closes it if it never does).
async fn stream(
    mut feed: watch::Receiver<Counts>,
    mut shutdown: watch::Receiver<bool>,
    tx: mpsc::Sender<Bytes>,
    retry_ms: u64,
) {
    let mut sent = *feed.borrow_and_update();
    let mut next =
        Some(Bytes::from(format!("retry: {retry_ms}\n{}", event(None, &sent).unwrap_or_default())));
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    loop {
        if let Some(bytes) = next.take() {
            tokio::select! {
                sent = tx.send(bytes) => if sent.is_err() { return },
                () = until_set(&mut shutdown) => return,
            }
            heartbeat.reset();
        }
        next = tokio::select! {
            changed = feed.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *feed.borrow_and_update();
                let e = event(Some(&sent), &now);
                sent = now;
                e.map(Bytes::from)
            }
            _ = heartbeat.tick() => Some(Bytes::from_static(b":\n")),
            () = until_set(&mut shutdown) => return,
            () = tx.closed() => return,
        };
    }
}

/// One event: `data:` and a JSON object of the counts that differ from
/// `prev` (all of them without one); `None` when none does.
fn event(prev: Option<&Counts>, now: &Counts) -> Option<String> {
    let mut fields = Vec::new();
    let mut field = |name: &str, value: fn(&Counts) -> u32| {
        if prev.is_none_or(|p| value(p) != value(now)) {
            fields.push(format!("\"{name}\":{}", value(now)));
        }
    };
    field("checked", |c| c.checked);
    field("frozen", |c| c.frozen);
    field("size", |c| c.size);
    (!fields.is_empty()).then(|| format!("data:{{{}}}\n\n", fields.join(",")))
}

/// A few bits that differ between streams.
fn jitter() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_micros())
}

/// The board's address as other sites must use it: `--public-url`, else
/// the request's `Host` with `https` when a trusted proxy says so.
fn base_url(app: &App, req: &Request<Incoming>, peer: IpAddr) -> String {
    if let Some(url) = &app.config.public_url {
        return url.clone();
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::trim)
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        })
        .map_or_else(|| app.config.listen.to_string(), str::to_ascii_lowercase);
    let https = app.config.trusted_proxy.contains(&peer)
        && req
            .headers()
            .get("x-forwarded-proto")
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    format!("{}://{host}", if https { "https" } else { "http" })
}

/// Whether `url` is this board (`/`) or its widget (`/embed`) at `base`
/// (either scheme: a consumer may have the other one).
fn is_ours(base: &str, url: &str) -> bool {
    let authority = |u: &str| -> Option<(String, String)> {
        let (scheme, rest) = u.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => ":80",
            "https" => ":443",
            _ => return None,
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let authority = authority.strip_suffix(default_port).unwrap_or(authority);
        let path = tail.split(['?', '#']).next().unwrap_or("");
        Some((authority.to_ascii_lowercase(), path.to_owned()))
    };
    match (authority(base), authority(url)) {
        (Some((ours, _)), Some((theirs, path))) => {
            ours == theirs && matches!(path.as_str(), "" | "/" | "/index.html" | "/embed")
        }
        _ => false,
    }
}

/// Percent-decodes a query value (`+` is a space); `None` when it is not
/// valid percent-encoding of UTF-8.
fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex =
                    bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `1234567` as `1,234,567`.
fn grouped(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// The checked share, rounded down (a board one box short of full is not
/// "100%"); web/widget.js formats it the same way.
fn percent(checked: u32, size: u32) -> String {
    if checked == 0 || size == 0 {
        return "0%".into();
    }
    let hundredths = u64::from(checked) * 10_000 / u64::from(size);
    if hundredths == 0 {
        return "<0.01%".into();
    }
    format!("{}.{:02}%", hundredths / 100, hundredths % 100)
}

/// Escapes text for XML and HTML text and attributes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Approximate width in pixels of `s` in 11 px Verdana (the badge font, as
/// shields.io draws it): close enough that the text fits its box.
fn text_width(s: &str) -> u32 {
    let tenths: u32 = s
        .chars()
        .map(|c| match c {
            '0'..='9' => 70,
            ',' | '.' | ' ' => 40,
            'i' | 'j' | 'l' => 31,
            'f' | 'r' | 't' => 45,
            'm' | 'w' => 99,
            'a'..='z' => 64,
            _ => 75,
        })
        .sum();
    tenths.div_ceil(10)
}

/// A flat, shields-style badge: `label` on grey, `message` on blue.
fn badge_svg(label: &str, message: &str) -> String {
    let (lw, mw) = (text_width(label) + 10, text_width(message) + 10);
    let w = lw + mw;
    let (label, message) = (escape(label), escape(message));
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"20\" role=\"img\" \
         aria-label=\"{label}: {message}\"><title>{label}: {message}</title>\
         <linearGradient id=\"s\" x2=\"0\" y2=\"100%\"><stop offset=\"0\" stop-color=\"#bbb\" \
         stop-opacity=\".1\"/><stop offset=\"1\" stop-opacity=\".1\"/></linearGradient>\
         <clipPath id=\"r\"><rect width=\"{w}\" height=\"20\" rx=\"3\" fill=\"#fff\"/></clipPath>\
         <g clip-path=\"url(#r)\"><rect width=\"{lw}\" height=\"20\" fill=\"#555\"/>\
         <rect x=\"{lw}\" width=\"{mw}\" height=\"20\" fill=\"#007ec6\"/>\
         <rect width=\"{w}\" height=\"20\" fill=\"url(#s)\"/></g>\
         <g fill=\"#fff\" text-anchor=\"middle\" \
         font-family=\"Verdana,Geneva,DejaVu Sans,sans-serif\" font-size=\"110\">"
    );
    for (x, len, text) in [(lw * 5, lw - 10, &label), (lw * 10 + mw * 5, mw - 10, &message)] {
        // Drawn at ten times the size and scaled down, like shields: x, y
        // and the text's length in tenths of a pixel, for a centred text
        // that fills its box whatever the font.
        let _ = write!(
            svg,
            "<text x=\"{x}\" y=\"150\" fill=\"#010101\" fill-opacity=\".3\" \
             transform=\"scale(.1)\" textLength=\"{len}0\">{text}</text>\
             <text x=\"{x}\" y=\"140\" transform=\"scale(.1)\" textLength=\"{len}0\">{text}</text>"
        );
    }
    svg.push_str("</g></svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_000_000), "1,000,000");
        assert_eq!(percent(0, 1_000_000), "0%");
        assert_eq!(percent(1, 1_000_000), "<0.01%");
        assert_eq!(percent(12_345, 1_000_000), "1.23%");
        assert_eq!(percent(999_999, 1_000_000), "99.99%");
        assert_eq!(percent(1_000_000, 1_000_000), "100.00%");
    }

    #[test]
    fn events_carry_what_changed() {
        let a = Counts { epoch: 1, size: 1000, checked: 5, frozen: 0 };
        assert_eq!(event(None, &a).unwrap(), "data:{\"checked\":5,\"frozen\":0,\"size\":1000}\n\n");
        let b = Counts { checked: 6, ..a };
        assert_eq!(event(Some(&a), &b).unwrap(), "data:{\"checked\":6}\n\n");
        assert_eq!(event(Some(&a), &Counts { epoch: 2, ..a }), None);
    }

    #[test]
    fn oembed_urls() {
        let base = "https://board.example";
        for ours in [
            "https://board.example",
            "https://board.example/",
            "http://Board.Example/",
            "https://board.example:443/embed",
            "https://board.example/?utm=x#top",
        ] {
            assert!(is_ours(base, ours), "{ours}");
        }
        for theirs in [
            "https://evil.example/",
            "https://board.example.evil.example/",
            "https://board.example:8443/",
            "https://board.example/api/state",
            "ftp://board.example/",
            "board.example",
        ] {
            assert!(!is_ours(base, theirs), "{theirs}");
        }
        assert_eq!(decode("http%3A%2F%2Fa.example%2F").unwrap(), "http://a.example/");
        assert_eq!(decode("a+b").unwrap(), "a b");
        assert_eq!(decode("%zz"), None);
        assert_eq!(decode("%+1"), None);
        assert_eq!(decode("%ff"), None, "not UTF-8");
    }
}
