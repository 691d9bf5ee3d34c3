//! HTTP routes of PROTOCOL.md, persistence across restarts, metrics.

mod common;

use common::*;
use omcb_proto::v1::server_message::Msg;

#[tokio::test]
async fn api_state_is_a_bare_snapshot_with_etag_and_304() {
    let w = Worker::start(&[]);
    let (s, r) = api_state(w.addr).await;
    assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(s.size, 1_000_000);
    assert_eq!((s.checked.len(), s.frozen.len()), (125_000, 125_000));
    assert_ne!(s.epoch, 0);
    let etag0 = r.header("etag").unwrap().to_string();
    assert_eq!(etag0, format!("\"{}-{}\"", s.epoch, s.seq));

    let not_modified = http_get(w.addr, "/api/state", &[("If-None-Match", &etag0)]).await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());

    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    let mut etags = vec![etag0.clone()];
    for i in 0..3 {
        let seq = c.set(i * 1000, true).await.seq;
        // The replica publishes on its tick: poll until the state shows the change.
        let etag = poll("the new state", || async {
            let (s, r) = api_state(w.addr).await;
            (s.seq >= seq).then(|| r.header("etag").unwrap().to_string())
        })
        .await;
        assert!(!etags.contains(&etag), "ETag changes with each change");
        etags.push(etag);
    }
    // The old ETag no longer matches.
    assert_eq!(http_get(w.addr, "/api/state", &[("If-None-Match", &etag0)]).await.status, 200);
    let (s, _) = api_state(w.addr).await;
    assert_eq!(s.checked_count, 3);
    assert_eq!(s.checked[0], 0x80, "box 0 is the top bit of byte 0 (Redis bit order)");
}

#[tokio::test]
async fn stats_health_ready_page_and_metrics() {
    let w = Worker::start(&["--board-size", "5000", "--freeze-after", "10m"]);
    let stats = w.stats().await;
    assert_eq!(stats["size"], 5000);
    assert_eq!(stats["freeze_after_ms"], 600_000);
    assert_eq!(stats["seq"], 0);
    assert!(stats["epoch"].as_u64().unwrap() > 0);
    assert_eq!(http_get(w.addr, "/healthz", &[]).await.status, 200);
    assert_eq!(http_get(w.addr, "/readyz", &[]).await.status, 200);
    let page = http_get(w.addr, "/", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    let etag = page.header("etag").unwrap().to_string();
    assert_eq!(http_get(w.addr, "/", &[("If-None-Match", &etag)]).await.status, 304);
    assert_eq!(http_get(w.addr, "/no-such-file.js", &[]).await.status, 404);
    assert_eq!(http_get(w.addr, "/../Cargo.toml", &[]).await.status, 404);
    assert_eq!(http_get(w.addr, "/ws", &[]).await.status, 426);

    let mut c = connect(&w.ws_url("")).await;
    c.recv().await;
    c.set(1, true).await;
    c.set(1, true).await;
    c.set(7000, true).await;
    let page_loads_before = w.metric("omcb_api_state_total{status=\"200\"}").await;
    api_state(w.addr).await;
    let text = w.metrics_text().await;
    for name in [
        "omcb_connections ",
        "omcb_toggles_total{outcome=\"changed\"} 1",
        "omcb_toggles_total{outcome=\"unchanged\"} 1",
        "omcb_toggles_total{outcome=\"out_of_range\"} 1",
        "omcb_snapshots_sent_total{reason=\"connect\"} 1",
        "# TYPE omcb_toggle_to_send_seconds histogram",
        "omcb_bytes_sent_total",
        "omcb_batches_published_total",
    ] {
        assert!(text.contains(name), "metrics lack `{name}`:\n{text}");
    }
    assert_eq!(w.metric("omcb_api_state_total{status=\"200\"}").await, page_loads_before + 1.0);
    // The embedded store times its board file writes (one within a second of
    // a change) and its changes carry their commit time, as Redis' do.
    poll("a timed write of the board file", || async {
        let persists = "omcb_store_command_seconds_count{script=\"persist\"}";
        (w.metric(persists).await >= 1.0).then_some(())
    })
    .await;
    poll("the feed lag of the change", || async {
        (w.metric("omcb_feed_lag_seconds_count").await >= 1.0).then_some(())
    })
    .await;
    // The metrics listener is separate: the public one has no /metrics.
    assert_eq!(http_get(w.addr, "/metrics", &[]).await.status, 404);
}

#[tokio::test]
async fn sigterm_closes_with_1012_persists_and_restarts_with_the_same_board() {
    let mut w = Worker::start(&["--board-size", "2000"]);
    let mut c = connect(&w.ws_url("")).await;
    let Msg::Snapshot(first) = c.recv().await else { panic!() };
    let mut seq = 0;
    for i in [0, 5, 1999] {
        seq = c.set(i, true).await.seq;
    }
    c.set(5, false).await;
    let status = w.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    assert_eq!(c.until_closed().await, Ended::Closed(Some(1012)));

    let dir = w.data_dir.clone();
    let w2 = Worker::start_in(&dir, &["--board-size", "2000"]);
    let (s, _) = api_state(w2.addr).await;
    assert_eq!(s.epoch, first.epoch, "a clean restart keeps the epoch");
    assert_eq!(s.seq, seq + 1);
    let board = omcb_proto::Board::from_snapshot(&s).unwrap();
    assert!(board.is_checked(0) && !board.is_checked(5) && board.is_checked(1999));
    assert_eq!(s.checked_count, 2);
    drop(w);
}

#[tokio::test]
async fn kill_9_loses_at_most_the_last_second_and_changes_the_epoch() {
    let mut w = Worker::start(&["--board-size", "2000"]);
    let mut c = connect(&w.ws_url("")).await;
    let Msg::Snapshot(first) = c.recv().await else { panic!() };
    // The worker writes the board at start (marked unclean); wait for the
    // periodic persist (at least every second) to rewrite it with the change.
    let file = w.data_dir.join("board.omcb");
    let at_start = std::fs::read(&file).unwrap();
    assert!(c.set(42, true).await.accepted);
    poll("the board file to be rewritten", || {
        let changed = std::fs::read(&file).is_ok_and(|now| now != at_start);
        async move { changed.then_some(()) }
    })
    .await;
    w.kill9();
    let w2 = Worker::start_in(&w.data_dir, &["--board-size", "2000"]);
    let (s, _) = api_state(w2.addr).await;
    assert!(omcb_proto::Board::from_snapshot(&s).unwrap().is_checked(42));
    assert_ne!(s.epoch, first.epoch, "acknowledged changes may be lost: a new epoch");
    drop(w);
}

#[tokio::test]
async fn refuses_to_resize_a_persisted_board() {
    let mut w = Worker::start(&["--board-size", "2000"]);
    assert!(w.terminate().success());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_omcb"))
        .args(["serve", "--listen", "127.0.0.1:0", "--board-size", "3000", "--data-dir"])
        .arg(&w.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2000") && err.contains("3000"), "clear error, got: {err}");
}

#[tokio::test]
async fn api_state_is_gzipped_when_asked() {
    let w = Worker::start(&[]);
    let plain = http_get(w.addr, "/api/state", &[]).await;
    let gz = http_get(w.addr, "/api/state", &[("Accept-Encoding", "br, gzip")]).await;
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert!(plain.header("content-encoding").is_none());
    assert!(
        gz.body.len() * 20 < plain.body.len(),
        "an empty board compresses well: {} bytes",
        gz.body.len()
    );
    let mut unzipped = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(gz.body.as_slice()),
        &mut unzipped,
    )
    .unwrap();
    assert_eq!(unzipped, plain.body);
    let refused = http_get(w.addr, "/api/state", &[("Accept-Encoding", "gzip;q=0")]).await;
    assert!(refused.header("content-encoding").is_none());
}

#[tokio::test]
async fn page_files_are_gzipped_when_asked_with_their_own_etag() {
    let w = Worker::start(&[]);
    for path in ["/", "/app.js", "/grid.js"] {
        let plain = http_get(w.addr, path, &[]).await;
        let gz = http_get(w.addr, path, &[("Accept-Encoding", "gzip, deflate")]).await;
        assert!(plain.header("content-encoding").is_none(), "{path}");
        assert_eq!(gz.header("content-encoding"), Some("gzip"), "{path}");
        assert_eq!(gz.header("vary"), Some("Accept-Encoding"), "{path}");
        assert!(
            gz.body.len() * 3 < plain.body.len() * 2,
            "{path}: {} of {}",
            gz.body.len(),
            plain.body.len()
        );
        let mut unzipped = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(gz.body.as_slice()),
            &mut unzipped,
        )
        .unwrap();
        assert_eq!(unzipped, plain.body, "{path}");
        // Each representation has its own validator, and revalidates with it.
        let (etag, etag_gz) = (plain.header("etag").unwrap(), gz.header("etag").unwrap());
        assert_ne!(etag, etag_gz);
        let headers = [("Accept-Encoding", "gzip"), ("If-None-Match", etag_gz)];
        assert_eq!(http_get(w.addr, path, &headers).await.status, 304, "{path}");
    }
    // Brotli, which browsers ask for first, is smaller again, with its own
    // validator; the page (index.html with its style and module bundle
    // inline) is then about 9 KB (docs/BENCHMARKS.md, "Bytes per page load").
    for path in ["/", "/app.js", "/sunset.js"] {
        let plain = http_get(w.addr, path, &[]).await;
        let gz = http_get(w.addr, path, &[("Accept-Encoding", "gzip")]).await;
        let br = http_get(w.addr, path, &[("Accept-Encoding", "gzip, deflate, br, zstd")]).await;
        assert_eq!(br.header("content-encoding"), Some("br"), "{path}");
        assert_eq!(br.header("vary"), Some("Accept-Encoding"), "{path}");
        assert!(br.body.len() < gz.body.len(), "{path}: br {} gz {}", br.body.len(), gz.body.len());
        let mut unpacked = Vec::new();
        brotli::BrotliDecompress(&mut br.body.as_slice(), &mut unpacked).unwrap();
        assert_eq!(unpacked, plain.body, "{path}");
        let etag = br.header("etag").unwrap();
        assert!(etag.ends_with("-br\""), "{etag}");
        let headers = [("Accept-Encoding", "br"), ("If-None-Match", etag)];
        assert_eq!(http_get(w.addr, path, &headers).await.status, 304, "{path}");
        let refused = http_get(w.addr, path, &[("Accept-Encoding", "br;q=0, gzip")]).await;
        assert_eq!(refused.header("content-encoding"), Some("gzip"), "{path}");
    }
    let page = http_get(w.addr, "/", &[("Accept-Encoding", "br")]).await;
    assert!(page.body.len() < 9_000, "the page in brotli: {} B", page.body.len());
    // An icon is not text: served as it is.
    let icon = http_get(w.addr, "/favicon.ico", &[("Accept-Encoding", "gzip")]).await;
    assert_eq!((icon.status, icon.header("content-type")), (200, Some("image/x-icon")));
    assert!(icon.header("content-encoding").is_none());
}
