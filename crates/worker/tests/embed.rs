//! The widget (`/embed`, `/embed.js`, `/oembed`, `/badge.svg`) and its live
//! stream (`/api/counts`) against the real worker: headers, caching, the
//! oEmbed answer, a well-formed badge, counts (not boxes) on the stream, the
//! bytes a live widget costs at 1,000 toggles/s, and in fleet mode no Redis
//! command per impression.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use omcb_testkit::RedisServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const SMALL: &str = "--board-size 1000 --batch-ms 20";

/// Asserts a response of a widget route can be cached: a max-age, a
/// stale-while-revalidate, an ETag; and that the ETag gets a bodiless 304.
async fn assert_cacheable(addr: SocketAddr, path: &str) -> HttpResponse {
    let r = http_get(addr, path, &[]).await;
    assert_eq!(r.status, 200, "{path}: {}", String::from_utf8_lossy(&r.body));
    let cache = r.header("cache-control").unwrap_or_default();
    assert!(cache.contains("public") && cache.contains("max-age="), "{path}: {cache}");
    assert!(cache.contains("stale-while-revalidate="), "{path}: {cache}");
    let etag = r.header("etag").unwrap_or_else(|| panic!("{path}: no ETag")).to_owned();
    let again = http_get(addr, path, &[("If-None-Match", &etag)]).await;
    assert_eq!(again.status, 304, "{path} with its ETag");
    assert!(again.body.is_empty());
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    assert_eq!(again.header("cache-control"), Some(cache));
    r
}

fn json(r: &HttpResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

fn text(r: &HttpResponse) -> &str {
    std::str::from_utf8(&r.body).unwrap()
}

/// Sets a box through a socket and waits until the worker's replica has it.
async fn set_box(w: &Worker, index: u32) {
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    let r = c.set(index, true).await;
    assert!(r.accepted, "{r:?}");
    w.stats_at(r.seq).await;
}

#[tokio::test]
async fn the_embed_page_shows_the_counts_and_is_cacheable() {
    let w = Worker::start(&flags(SMALL));
    set_box(&w, 5).await;
    let r = assert_cacheable(w.addr, "/embed").await;
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let html = text(&r);
    assert!(html.contains("<span id=\"checked\">1</span>"), "{html}");
    assert!(html.contains("<span id=\"frozen\">0</span>"), "{html}");
    assert!(html.contains("<span id=\"percent\">0.10%</span>"), "{html}");
    assert!(html.contains("href=\"/\""), "a link to the board");
    assert!(html.contains("id=\"sunset\""), "the place for the sunset countdown");
    assert!(!html.contains("{{"), "every mark is filled in");
    // The script is versioned by its content, so caches may keep it for good.
    let js = html.split("src=\"").nth(1).unwrap().split('"').next().unwrap();
    assert!(js.starts_with("/widget.js?v="), "{js}");
    assert_eq!(http_get(w.addr, js, &[]).await.status, 200);
    // A change of the counts is a new ETag.
    let etag = r.header("etag").unwrap();
    set_box(&w, 6).await;
    let after = http_get(w.addr, "/embed", &[("If-None-Match", etag)]).await;
    assert_eq!(after.status, 200);
    assert!(text(&after).contains("<span id=\"checked\">2</span>"));

    let r = assert_cacheable(w.addr, "/embed.js").await;
    assert_eq!(r.header("content-type"), Some("text/javascript; charset=utf-8"));
    assert!(text(&r).contains("postMessage") || text(&r).contains("message"));
}

#[tokio::test]
async fn the_badge_is_a_well_formed_svg_of_the_live_count() {
    let w = Worker::start(&flags(SMALL));
    for i in 0..3 {
        set_box(&w, i).await;
    }
    let r = assert_cacheable(w.addr, "/badge.svg").await;
    assert_eq!(r.header("content-type"), Some("image/svg+xml"));
    let svg = text(&r);
    let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("{e}: {svg}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(root.tag_name().namespace(), Some("http://www.w3.org/2000/svg"));
    let width: u32 = root.attribute("width").unwrap().parse().unwrap();
    assert!((60..400).contains(&width), "{width}");
    assert_eq!(root.attribute("height"), Some("20"));
    assert_eq!(root.attribute("aria-label"), Some("checkboxes: 3 checked"));
    let texts: Vec<_> = doc.descendants().filter_map(|n| n.text()).collect();
    assert!(texts.contains(&"3 checked"), "{texts:?}");
    // HEAD: the headers, no body.
    let head = http_head(w.addr, "/badge.svg").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: image/svg+xml"), "{head}");
}

/// A HEAD request's raw answer (`http_get` reads a GET).
async fn http_head(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("HEAD {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw
}

#[tokio::test]
async fn oembed_answers_by_the_spec() {
    let w = Worker::start(&flags(SMALL));
    let base = format!("http://{}", w.addr);
    let url = |u: &str| format!("/oembed?url={}", u.replace(':', "%3A").replace('/', "%2F"));

    let r = assert_cacheable(w.addr, &url(&format!("{base}/"))).await;
    assert_eq!(r.header("content-type"), Some("application/json"));
    let o = json(&r);
    assert_eq!(o["version"], "1.0");
    assert_eq!(o["type"], "rich");
    assert_eq!(o["provider_url"], format!("{base}/"));
    assert_eq!((o["width"].as_u64(), o["height"].as_u64()), (Some(320), Some(140)));
    let html = o["html"].as_str().unwrap();
    assert!(html.starts_with(&format!("<iframe src=\"{base}/embed\"")), "{html}");
    assert!(html.contains("width=\"320\" height=\"140\""), "{html}");

    // maxwidth and maxheight bound the size; the iframe follows.
    let o =
        json(&http_get(w.addr, &format!("{}&maxwidth=200&maxheight=90", url(&base)), &[]).await);
    assert_eq!((o["width"].as_u64(), o["height"].as_u64()), (Some(200), Some(90)));
    assert!(o["html"].as_str().unwrap().contains("width=\"200\" height=\"90\""));
    // A bound above the widget's size leaves it as it is.
    let o = json(&http_get(w.addr, &format!("{}&maxwidth=2000", url(&base)), &[]).await);
    assert_eq!(o["width"].as_u64(), Some(320));
    // The widget's own URL is ours too; format=json is the default.
    let r = http_get(w.addr, &format!("{}&format=json", url(&format!("{base}/embed"))), &[]).await;
    assert_eq!(r.status, 200);

    let addr = w.addr;
    let status = |path: String| async move { http_get(addr, &path, &[]).await.status };
    assert_eq!(status(format!("{}&format=xml", url(&base))).await, 501, "xml is not served");
    assert_eq!(status(url("http://elsewhere.example/")).await, 404, "not our url");
    assert_eq!(status(url(&format!("{base}/api/state"))).await, 404, "not the board");
    assert_eq!(status("/oembed".into()).await, 400, "no url");
    assert_eq!(status(format!("{}&maxwidth=wide", url(&base))).await, 400);
    assert_eq!(status(format!("{}&maxheight=0", url(&base))).await, 400);
    assert_eq!(status("/oembed?url=%zz".into()).await, 400);
}

#[tokio::test]
async fn oembed_uses_the_public_url_and_ignores_an_untrusted_proxy_header() {
    let w = Worker::start(&flags(&format!("{SMALL} --public-url https://board.example")));
    let r = http_get(w.addr, "/oembed?url=https%3A%2F%2Fboard.example%2F", &[]).await;
    let o = json(&r);
    assert_eq!(o["provider_url"], "https://board.example/");
    assert!(o["html"].as_str().unwrap().contains("src=\"https://board.example/embed\""));
    let local = format!("/oembed?url=http%3A%2F%2F{}%2F", w.addr);
    assert_eq!(http_get(w.addr, &local, &[]).await.status, 404, "only the public URL is ours");

    // Without --public-url, the request's Host; X-Forwarded-Proto only from a trusted proxy.
    let w = Worker::start(&flags(SMALL));
    let local = format!("/oembed?url=http%3A%2F%2F{}%2F", w.addr);
    let r = http_get(w.addr, &local, &[("X-Forwarded-Proto", "https")]).await;
    assert_eq!(json(&r)["provider_url"], format!("http://{}/", w.addr));
    let w = Worker::start(&flags(&format!("{SMALL} --trusted-proxy 127.0.0.1")));
    let local = format!("/oembed?url=https%3A%2F%2F{}%2F", w.addr);
    let r = http_get(w.addr, &local, &[("X-Forwarded-Proto", "https")]).await;
    assert_eq!(json(&r)["provider_url"], format!("https://{}/", w.addr));
}

/// A raw `/api/counts` stream. Every byte after the response head is
/// counted, HTTP chunk framing included: it is what the wire carries.
struct Stream {
    tcp: TcpStream,
    head: String,
    /// Bytes after the head not yet taken as events.
    pending: Vec<u8>,
    /// Every byte after the head.
    pub body_bytes: usize,
}

impl Stream {
    async fn open(addr: SocketAddr) -> Stream {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /api/counts HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed before the head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8(raw[..end].to_vec()).unwrap();
        let pending = raw[end + 4..].to_vec();
        Stream { tcp, head, body_bytes: pending.len(), pending }
    }

    /// Reads more of the stream; false at its end.
    async fn read_more(&mut self, within: Duration) -> bool {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(within, self.tcp.read(&mut buf))
            .await
            .expect("the stream went silent")
            .unwrap();
        self.pending.extend_from_slice(&buf[..n]);
        self.body_bytes += n;
        n > 0
    }

    /// The next event's `data:` JSON (each event is one chunk of the
    /// server's chunked body, so it is found whole in the raw bytes).
    async fn event(&mut self, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let text = String::from_utf8_lossy(&self.pending).into_owned();
            if let Some(start) = text.find("data:")
                && let Some(len) = text[start..].find("\n\n")
            {
                let data = &text[start + 5..start + len];
                let value = serde_json::from_str(data).unwrap();
                self.pending.drain(..start + len + 2);
                return value;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(self.read_more(left).await, "the stream ended");
        }
    }
}

#[tokio::test]
async fn the_counts_stream_sends_counts_within_a_second_and_ends_at_shutdown() {
    let mut w = Worker::start(&flags(SMALL));
    let mut s = Stream::open(w.addr).await;
    let head = s.head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert!(head.contains("x-accel-buffering: no"), "{head}");
    let first = s.event(WAIT).await;
    assert_eq!(first, serde_json::json!({"checked": 0, "frozen": 0, "size": 1000}));

    // A toggle shows in the next event, within the 1 s period and a tick;
    // later events carry only what changed.
    let started = Instant::now();
    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    assert!(c.set(7, true).await.accepted);
    let next = s.event(Duration::from_secs(3)).await;
    assert_eq!(next, serde_json::json!({"checked": 1}));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    // On shutdown the stream ends (its client reconnects elsewhere) and the
    // worker exits cleanly instead of waiting for it.
    let status = w.terminate();
    assert!(status.success(), "{status:?}");
    while s.read_more(WAIT).await {}
}

/// The promise of docs/PROTOCOL.md: a live widget costs at most 50 bytes/s
/// at 1,000 toggles/s. `omcb-loadgen` drives the toggles; the stream's
/// bytes on the wire (after its head) are counted over the same seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_widget_costs_at_most_50_bytes_a_second_at_1000_toggles_a_second() {
    let loadgen = Path::new(env!("CARGO_BIN_EXE_omcb")).with_file_name("omcb-loadgen");
    assert!(
        loadgen.exists(),
        "{} is missing: build it (cargo build -p omcb-loadgen)",
        loadgen.display()
    );
    let w = Worker::start(&flags(
        "--toggle-rate 1000 --toggle-burst 1000 --ip-toggle-rate 100000 --ip-toggle-burst 100000",
    ));
    let mut s = Stream::open(w.addr).await;
    s.event(WAIT).await;
    let toggles = || async {
        let changed = w.metric("omcb_toggles_total{outcome=\"changed\"}").await;
        (changed, changed + w.metric("omcb_toggles_total{outcome=\"unchanged\"}").await)
    };
    let url = w.ws_url("");
    // The load runs longer than the measuring window, so the window sees
    // only steady traffic.
    let run = tokio::task::spawn_blocking(move || {
        Command::new(loadgen)
            .args(["--url", &url, "--clients", "10", "--rate", "1000", "--duration", "12"])
            .args(["--verify-clients", "1", "--converge-timeout", "10"])
            .output()
            .unwrap()
    });
    // From the first event the load causes, for WINDOW.
    const WINDOW: Duration = Duration::from_secs(8);
    s.event(WAIT).await;
    let (bytes0, toggles0, t0) = (s.body_bytes, toggles().await, Instant::now());
    let mut events = 0;
    while let Some(left) = WINDOW.checked_sub(t0.elapsed()) {
        match tokio::time::timeout(left, s.event(Duration::from_secs(5))).await {
            Ok(_) => events += 1,
            Err(_) => break,
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (bytes, toggles1) = (s.body_bytes - bytes0, toggles().await);
    let out = run.await.unwrap();
    assert!(out.status.success(), "loadgen: {}", String::from_utf8_lossy(&out.stderr));
    // Toggles answered: loadgen sets random boxes to random values, so about
    // half of them change a box.
    let rate = (toggles1.1 - toggles0.1) / elapsed;
    let changing = (toggles1.0 - toggles0.0) / elapsed;
    let cost = bytes as f64 / elapsed;
    println!(
        "widget stream: {bytes} bytes in {elapsed:.1} s = {cost:.1} B/s over {events} events, \
         at {rate:.0} toggles/s ({changing:.0}/s changing a box)"
    );
    assert!(rate >= 800.0, "the load did not reach 1,000 toggles/s: {rate:.0}/s");
    assert!(events >= 6, "one event a second while the count moves: {events} in {elapsed:.1} s");
    assert!(cost <= 50.0, "a live widget cost {cost:.1} B/s");
}

/// In fleet mode, 100 widget impressions (the page, its scripts, the badge,
/// the oEmbed answer, and a live stream's first event) issue no Redis
/// command: everything comes from the worker's replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_impressions_cost_redis_nothing() {
    let redis = RedisServer::start().unwrap();
    let w = Worker::start(&flags(&format!("--redis {} {SMALL}", redis.url())));
    set_box(&w, 1).await;
    let series = |p: &str| format!("omcb_store_commands_total{{purpose=\"{p}\"}}");
    poll("toggle counted", || async { (w.metric(&series("toggle")).await >= 1.0).then_some(()) })
        .await;
    let counters = || async {
        let mut v = Vec::new();
        for p in ["toggle", "snapshot", "sweep"] {
            v.push(w.metric(&series(p)).await);
        }
        v
    };
    let before = counters().await;
    let oembed = format!("/oembed?url=http%3A%2F%2F{}%2F", w.addr);
    for _ in 0..100 {
        let page = http_get(w.addr, "/embed", &[]).await;
        assert_eq!(page.status, 200);
        let js = text(&page).split("src=\"/widget.js").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(http_get(w.addr, &format!("/widget.js{js}"), &[]).await.status, 200);
        for path in ["/embed.js", "/badge.svg", oembed.as_str()] {
            assert_eq!(http_get(w.addr, path, &[]).await.status, 200, "{path}");
        }
        Stream::open(w.addr).await.event(WAIT).await;
    }
    // Two hub ticks, so the counters are current.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(before, counters().await, "widget impressions issued Redis commands");
}

/// Through nginx (deploy/nginx, rendered by scripts/fleet): the widget's
/// answers are cached (a second impression is a cache hit, no worker asked),
/// oEmbed names the board by the Host nginx was asked with, and the counts
/// stream passes event by event, not buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_the_widget_is_cached_and_its_stream_is_not_buffered() {
    let fleet = common::fleet::Fleet::up(2, &[]);
    let addr = fleet.addr();
    let oembed = format!("/oembed?url=http%3A%2F%2F{addr}%2F");
    for path in ["/embed", "/embed.js", "/badge.svg", oembed.as_str()] {
        let first = http_get(addr, path, &[]).await;
        assert_eq!(first.status, 200, "{path}");
        assert!(first.header("cache-control").unwrap().contains("stale-while-revalidate"));
        let again = http_get(addr, path, &[]).await;
        assert_eq!(again.header("x-cache"), Some("HIT"), "{path} the second time");
        assert_eq!(again.body, first.body);
    }
    let o = json(&http_get(addr, &oembed, &[]).await);
    assert_eq!(o["provider_url"], format!("http://{addr}/"));

    let mut s = Stream::open(addr).await;
    assert!(s.head.starts_with("HTTP/1.1 200"), "{}", s.head);
    assert_eq!(s.event(WAIT).await["checked"], 0);
    let mut c = connect(&fleet.ws("")).await;
    c.recv().await;
    let started = Instant::now();
    assert!(c.set(3, true).await.accepted);
    assert_eq!(s.event(Duration::from_secs(3)).await, serde_json::json!({"checked": 1}));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

/// Each `/api/counts` stream holds one of `--max-connections`, shared with
/// the board's sockets: past them a stream is refused with 503 and
/// `Retry-After` (EventSource gives up on it; widget.js tries again), and a
/// closed stream gives its place back.
#[tokio::test]
async fn counts_streams_count_against_max_connections() {
    let w = Worker::start(&flags(&format!("{SMALL} --max-connections 2")));
    let first = Stream::open(w.addr).await;
    let second = Stream::open(w.addr).await;
    for s in [&first, &second] {
        assert!(s.head.to_ascii_lowercase().starts_with("http/1.1 200"), "{}", s.head);
    }
    let refused = Stream::open(w.addr).await;
    let head = refused.head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after: 5"), "{head}");
    // A board socket finds no place either.
    let mut c = connect(&w.ws_url("")).await;
    assert_eq!(c.until_closed().await, Ended::Closed(Some(1013)));

    // A closed stream gives its place back.
    drop(first);
    poll("a closed stream's place", || async {
        let again = Stream::open(w.addr).await;
        again.head.to_ascii_lowercase().starts_with("http/1.1 200").then_some(())
    })
    .await;
}
