//! HTTP routes of PROTOCOL.md. Every route answers from memory: page loads and
//! `/api/state` never touch the store. The widget's routes are in [`embed`];
//! the time-lapse's (`/replay`), which read the change archive's files, in
//! [`replay`].

mod embed;
mod replay;

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use omcb_proto::view::SubscribeError;

use crate::app::App;
use crate::conn::{self, SocketSlot};
use crate::limits::Refused;

/// The body of a whole response.
pub type Body = Full<Bytes>;

/// What [`handle`] answers: a whole body, or the widget's live stream.
pub type Reply = Either<Body, embed::Events>;

/// Routes one request.
///
/// Not an `async fn`: one that hands its arguments on to `route` would keep
/// them in its own state as well as in route's (a request is ~250 bytes),
/// and every connection's task holds this future until its upgrade.
pub fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
    peer: IpAddr,
) -> impl Future<Output = Result<Response<Reply>, Infallible>> {
    use futures_util::future::{self, Either as OneOf, FutureExt as _};
    if req.uri().path() == "/api/counts" {
        return OneOf::Left(future::ready(Ok(embed::counts(&app, &req))));
    }
    OneOf::Right(route(app, req, peer).map(|r| r.map(|r| r.map(Either::Left))))
}

/// Routes a request that gets a whole body.
async fn route(
    app: Arc<App>,
    mut req: Request<Incoming>,
    peer: IpAddr,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let method = req.method();
    if path == "/ws" {
        let client = client_ip(&app.config.trusted_proxy, peer, &req);
        return Ok(websocket(app, &mut req, client));
    }
    if method != Method::GET && method != Method::HEAD {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n"));
    }
    let head = method == Method::HEAD;
    let mut resp = match path {
        "/api/state" => state(&app, &req).await,
        "/api/stats" => stats(&app),
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/readyz" if !app.hub.is_ready() => {
            plain(StatusCode::SERVICE_UNAVAILABLE, "not ready: store unreachable or catching up\n")
        }
        "/readyz" if !app.store.is_writable() => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the board cannot be persisted (data dir full or read-only?)\n",
        ),
        "/readyz" => plain(StatusCode::OK, "ready\n"),
        "/embed" => embed::page(&app, &req).await,
        "/embed.js" => embed::script(&app, &req).await,
        "/oembed" => embed::oembed(&app, &req, peer),
        "/badge.svg" => embed::badge(&app, &req),
        p if p == "/replay" || p.starts_with("/replay/") => replay::serve(&app, &req).await,
        _ => static_file(&app, &req).await,
    };
    if head {
        *resp.body_mut() = Full::default();
    }
    Ok(resp)
}

fn plain(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(text.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn if_none_match(req: &Request<Incoming>, etag: &str) -> bool {
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t == etag || t.strip_prefix("W/") == Some(etag)
        })
}

/// `GET /api/state`: the bare Snapshot, encoded once per seq (and gzipped once
/// per seq for clients that accept it), with `ETag: "<epoch>-<seq>"`.
/// Encoding and gzip run on the blocking pool: a milliseconds-long gzip of a
/// million boxes must not hold up the sockets served by this runtime thread.
async fn state(app: &Arc<App>, req: &Request<Incoming>) -> Response<Body> {
    let (epoch, seq) = app.hub.position();
    let current = format!("\"{epoch}-{seq}\"");
    let mut resp = if if_none_match(req, &current) {
        app.metrics.api_state_not_modified.increment(1);
        let mut r = Response::new(Full::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r.headers_mut().insert(header::ETAG, header_value(&current));
        r
    } else {
        app.metrics.api_state_full.increment(1);
        let gzip = accepts_gzip(req);
        let hub = app.hub.clone();
        let work = move || {
            let snapshot = hub.snapshot();
            let body = if gzip { snapshot.gzip().clone() } else { snapshot.bare.clone() };
            (snapshot, body)
        };
        let Ok((snapshot, body)) = tokio::task::spawn_blocking(work).await else {
            // Only when the runtime shuts down.
            return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
        };
        let mut r = Response::new(Full::new(body));
        let headers = r.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        if gzip {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        // The snapshot may be newer than the position read above: the ETag
        // describes the body actually sent.
        headers.insert(
            header::ETAG,
            header_value(&format!("\"{}-{}\"", snapshot.epoch, snapshot.seq)),
        );
        r
    };
    let headers = resp.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    resp
}

/// Whether the request accepts a gzip body (and does not refuse it with q=0).
fn accepts_gzip(req: &Request<Incoming>) -> bool {
    accepts(req, "gzip")
}

/// Whether the request accepts content coding `name` (and does not refuse it
/// with q=0).
fn accepts(req: &Request<Incoming>, wanted: &str) -> bool {
    req.headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim().strip_prefix("q=").and_then(|q| q.parse::<f32>().ok()) == Some(0.0)
            });
            name.eq_ignore_ascii_case(wanted) && !refused
        })
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("\"invalid\""))
}

/// `GET /api/stats`: the board's numbers as JSON.
fn stats(app: &App) -> Response<Body> {
    let body = app.hub.with_board(|b| {
        serde_json::json!({
            "epoch": b.epoch,
            "seq": b.seq,
            "size": b.size,
            "checked_count": b.checked_count,
            "frozen_count": b.frozen_count,
            "freeze_after_ms": b.freeze_after_ms,
        })
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn static_file(app: &App, req: &Request<Incoming>) -> Response<Body> {
    static_file_at(app, req, req.uri().path()).await
}

/// The static file at `path`, answering `req` (its validators and codings).
async fn static_file_at(app: &App, req: &Request<Incoming>, path: &str) -> Response<Body> {
    let Some(asset) = app.assets.get(path).await else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    // The brotli or gzipped file when the client takes it (brotli first: it
    // is smaller); each has its own ETag.
    let encoded = match (&asset.br, &asset.gzip) {
        (Some(br), _) if accepts(req, "br") => Some((br, "br")),
        (_, Some(gz)) if accepts_gzip(req) => Some((gz, "gzip")),
        _ => None,
    };
    let etag = encoded.map_or(&asset.etag, |(e, _)| &e.etag);
    let mut r = if if_none_match(req, etag) {
        let mut r = Response::new(Full::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let body = encoded.map_or_else(|| asset.body.clone(), |(e, _)| e.body.clone());
        let mut r = Response::new(Full::new(body));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        if let Some((_, coding)) = encoded {
            r.headers_mut().insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
        }
        r
    };
    r.headers_mut().insert(header::ETAG, header_value(etag));
    if asset.gzip.is_some() || asset.br.is_some() {
        r.headers_mut().insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    // Revalidate every time: the files are small and an ETag hit costs a 304.
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /ws`: upgrades and hands the socket to [`conn::serve`]. RFC 6455 4.1:
/// the handshake is a GET of HTTP/1.1 or later, version 13. Refused before
/// the upgrade: a page of another origin (403), and an address over its
/// connect or snapshot budget (429).
fn websocket(app: Arc<App>, req: &mut Request<Incoming>, client: IpAddr) -> Response<Body> {
    if req.method() != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "WebSocket upgrade is a GET\n");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    if req.version() < hyper::Version::HTTP_11 {
        return plain(StatusCode::BAD_REQUEST, "WebSocket upgrade needs HTTP/1.1\n");
    }
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        return plain(StatusCode::UPGRADE_REQUIRED, "WebSocket upgrade required\n");
    }
    if !origin_allowed(&app.config.allow_origin, req) {
        metrics::counter!("omcb_connections_refused_total", "reason" => "origin").increment(1);
        app.metrics.limited(crate::metrics::Limiter::Origin);
        return plain(
            StatusCode::FORBIDDEN,
            "this page's origin may not open the board's socket\n",
        );
    }
    let resume = conn::parse_resume(req.uri().query());
    let coding = conn::parse_snapshot_coding(req.uri().query());
    // A subscription at connect (`?first=&count=`) is refused as a
    // `Subscribe` with those fields would be, but before the upgrade: the
    // socket would start with what it did not ask for.
    let size = app.hub.size();
    let view = match conn::parse_view(req.uri().query(), size) {
        Ok(view) => view,
        Err(e) => {
            match e {
                conn::BadView::Subscribe(SubscribeError::TooLarge(_)) => {
                    app.metrics.subscribes_too_large.increment(1);
                }
                conn::BadView::Subscribe(SubscribeError::OutOfRange { .. }) => {
                    app.metrics.subscribes_out_of_range.increment(1);
                }
                conn::BadView::Half | conn::BadView::NotANumber(..) => {}
            }
            return plain(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    // What the socket's start costs the address's snapshot budget: a range
    // Snapshot when subscribed (whatever `since` says), nothing for a resume.
    let snapshot = match (&view, resume) {
        (Some(regions), _) => Some(conn::range_snapshot_bytes(regions, size)),
        (None, Some(_)) => None,
        (None, None) => Some(crate::limits::snapshot_bytes(size)),
    };
    // Our own handle on the upgrade, taken before fastwebsockets', which
    // would build a `WebSocket` (and allocate its 8 KiB read buffer) that
    // `conn::serve` only takes apart again; fastwebsockets checks the request
    // and writes the 101.
    let upgrade = hyper::upgrade::on(&mut *req);
    let (resp, _) = match fastwebsockets::upgrade::upgrade(&mut *req) {
        Ok(x) => x,
        Err(fastwebsockets::WebSocketError::InvalidSecWebsocketVersion) => {
            // RFC 6455 4.4: say which version we speak.
            let mut r = plain(StatusCode::UPGRADE_REQUIRED, "Sec-WebSocket-Version must be 13\n");
            r.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
            return r;
        }
        Err(e) => {
            tracing::debug!(error = %e, "bad upgrade request");
            return plain(StatusCode::BAD_REQUEST, "bad WebSocket upgrade request\n");
        }
    };
    let slot = match SocketSlot::take(app.clone(), client, snapshot) {
        Ok(slot) => slot,
        Err(why) => {
            let reason = match why {
                Refused::Connects => "connect_rate",
                Refused::Snapshots => "snapshot_rate",
                Refused::HttpConnections | Refused::TableFull => "address_table_full",
                Refused::Busy => "refusals_full",
            };
            metrics::counter!("omcb_connections_refused_total", "reason" => reason).increment(1);
            app.metrics.limited_address(why);
            let mut r = plain(StatusCode::TOO_MANY_REQUESTS, "too many connections; slow down\n");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    };
    let serve = async move {
        match upgrade.await {
            Ok(upgraded) => conn::serve(app, slot, upgraded, resume, view, coding).await,
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    };
    // In the connection's span (see `logging`): the socket's lines carry its id.
    tokio::spawn(tracing::Instrument::in_current_span(serve));
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, Full::default())
}

/// Whether `/ws` may be opened by the page that asks. Browsers send `Origin`
/// with every WebSocket; without this check any page on the internet could
/// make its visitors toggle the board. Allowed: no `Origin` (not a browser:
/// the load generator, scripts), an origin whose host and port are the
/// request's `Host` (the board's own page, whatever the scheme a proxy
/// terminated), and the `--allow-origin` list (`*` for any).
fn origin_allowed(allowed: &[String], req: &Request<Incoming>) -> bool {
    origin_allowed_parts(allowed, req.headers())
}

fn origin_allowed_parts(allowed: &[String], headers: &hyper::HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim();
    if allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let authority = origin.split_once("://").map(|(_, rest)| rest);
    match (host, authority) {
        (Some(host), Some(authority)) => {
            let scheme_port = if origin.starts_with("https://") { ":443" } else { ":80" };
            let strip = |a: &str| a.strip_suffix(scheme_port).unwrap_or(a).to_ascii_lowercase();
            strip(host.trim()) == strip(authority)
        }
        _ => false,
    }
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the
/// last address in `X-Forwarded-For` that is not itself a trusted proxy.
/// An untrusted peer's header is ignored: anyone can write one.
pub fn client_ip(trusted: &[IpAddr], peer: IpAddr, req: &Request<Incoming>) -> IpAddr {
    forwarded_client(
        trusted,
        peer,
        req.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()),
    )
}

fn forwarded_client<'a>(
    trusted: &[IpAddr],
    peer: IpAddr,
    headers: impl Iterator<Item = &'a str>,
) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let hops: Vec<IpAddr> =
        headers.flat_map(|v| v.split(',')).filter_map(|h| h.trim().parse().ok()).collect();
    hops.into_iter().rev().find(|ip| !trusted.contains(ip)).unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin_ok(allowed: &[&str], host: &str, origin: Option<&str>) -> bool {
        let mut b = Request::builder().uri("/ws").header(header::HOST, host);
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        // The body type does not matter to the check; build one with no body.
        let req = b.body(()).unwrap();
        let (parts, ()) = req.into_parts();
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        origin_allowed_parts(&allowed, &parts.headers)
    }

    #[test]
    fn origins() {
        assert!(origin_ok(&[], "board.example", None), "no Origin: not a browser");
        assert!(origin_ok(&[], "board.example", Some("https://board.example")));
        assert!(origin_ok(&[], "Board.Example:8080", Some("http://board.example:8080")));
        assert!(origin_ok(&[], "board.example:443", Some("https://board.example")));
        assert!(!origin_ok(&[], "board.example", Some("https://evil.example")));
        assert!(!origin_ok(&[], "board.example", Some("https://board.example:8443")));
        assert!(!origin_ok(&[], "board.example", Some("null")));
        assert!(!origin_ok(&[], "board.example", Some("https://board.example.evil.example")));
        let more = ["https://mirror.example", "http://localhost:5173"];
        assert!(origin_ok(&more, "board.example", Some("https://mirror.example")));
        assert!(origin_ok(&more, "board.example", Some("http://localhost:5173")));
        assert!(!origin_ok(&more, "board.example", Some("http://mirror.example")));
        assert!(origin_ok(&["*"], "board.example", Some("https://evil.example")));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        let trusted = [proxy];
        // From the proxy: the last untrusted hop (a client can prepend lies, not append).
        let h = ["198.51.100.1, 203.0.113.7"];
        assert_eq!(forwarded_client(&trusted, proxy, h.into_iter()), client);
        let h = ["203.0.113.7, 10.0.0.1"];
        assert_eq!(forwarded_client(&trusted, proxy, h.into_iter()), client);
        // From anyone else: the header is ignored.
        let h = ["198.51.100.1"];
        assert_eq!(forwarded_client(&trusted, client, h.into_iter()), client);
        // No usable header: the peer.
        assert_eq!(forwarded_client(&trusted, proxy, ["garbage"].into_iter()), proxy);
    }
}
