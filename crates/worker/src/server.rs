//! [`Server`]: binds the listeners, runs the accept loop, the hub, the
//! settings loop, the sweeper and the private listener (`/metrics` and the
//! `/admin/` routes), and on shutdown closes every socket with 1012, waits up
//! to `--shutdown-grace` and persists the board.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use omcb_store::redis::{RedisStore, RedisTarget};
use omcb_store::{ChangeFeed, Store, StoreError, memory::MemoryStore};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tracing::Instrument as _;

use crate::app::App;
use crate::config::Config;
use crate::hub::Hub;
use crate::shutdown::until_set;
use crate::{admin, assets, counts, deadline, http, limits, metrics};

/// Why the worker could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store failed to open, load or persist.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration cannot work (the origin key file, say): the message
    /// says what to fix.
    #[error("{0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A bound, ready-to-run worker.
#[derive(Debug)]
pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    prometheus: Option<PrometheusHandle>,
    shutdown_tx: watch::Sender<bool>,
    feed: ChangeFeed,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })
}

impl Server {
    /// Opens the store, loads the replica and binds the listeners.
    /// `prometheus` renders `/metrics` (see [`metrics::install`]).
    pub async fn bind(
        config: Config,
        prometheus: Option<PrometheusHandle>,
    ) -> Result<Self, ServeError> {
        // A key the operator gave (or must give) is checked before anything
        // else happens; the embedded one is made in the data dir once the
        // store has checked that dir (its messages say more about a bad one).
        let key = |data_dir: Option<&std::path::Path>| {
            crate::origin::OriginKey::for_worker(
                config.origin_key_file.as_deref(),
                config.redis.is_some(),
                data_dir,
                config.archive_dir.is_some(),
            )
        };
        let given = (config.origin_key_file.is_some() || config.redis.is_some())
            .then(|| key(None))
            .transpose()
            .map_err(ServeError::Config)?;
        let store = match &config.redis {
            Some(url) => {
                let target = RedisTarget::new(url, config.redis_ca_file.as_deref())?;
                tracing::info!(
                    url = target.redacted(),
                    tls = target.is_tls(),
                    board = config.board,
                    "fleet mode: connecting to Redis"
                );
                let store = RedisStore::connect_to(&target, &config.board, config.board()).await?;
                store.set_toggle_gather(config.toggle_gather);
                Store::Redis(store)
            }
            None => {
                Store::Memory(MemoryStore::open(config.board(), config.data_dir.clone()).await?)
            }
        };
        let origin_key = match given.map_or_else(|| key(config.data_dir.as_deref()), Ok) {
            Ok(k) => k,
            Err(e) => {
                let _ = store.close().await;
                return Err(ServeError::Config(e));
            }
        };
        let board = store.snapshot().await?;
        tracing::info!(epoch = board.epoch, seq = board.seq, size = board.size, "board loaded");
        let feed = store.feed_from(&board);
        let metrics = metrics::Metrics::new();
        metrics.configured(&config, &store.config());
        // One fan-out shard per core: each batch is written to the sockets of
        // all shards in parallel.
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        let hub = Arc::new(Hub::new(board, shards, config.resume_batches, metrics.clone()));
        hub.set_max_checked(store.config().max_checked.unwrap_or(0));
        let listener = bind(config.listen).await?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let (shutdown_tx, shutdown) = watch::channel(false);
        let addresses = limits::Addresses::new(&config);
        let app = Arc::new(App {
            assets: assets::Assets::new(config.web_dir.clone()),
            config,
            store,
            counts: counts::CountsFeed::new(&hub),
            hub,
            metrics,
            shutdown,
            sockets: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            sockets_gone: Notify::new(),
            addresses,
            origin_key,
        });
        Ok(Self { app, listener, metrics_listener, prometheus, shutdown_tx, feed })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// The metrics listener's address, when there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves; then closes every socket with 1012,
    /// waits up to `--shutdown-grace` for them, and persists the board.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let Server { app, listener, metrics_listener, prometheus, shutdown_tx, feed } = self;
        let (hub_stop_tx, hub_stop) = watch::channel(false);
        let hub_task = tokio::spawn(app.hub.clone().run(
            app.store.clone(),
            feed,
            app.config.tick_budgets(),
            hub_stop,
        ));
        // Every worker runs the sweep loop: the board's live setting says
        // whether to sweep, and in a fleet the lease says who.
        let mut background = vec![
            tokio::spawn(settings_loop(app.clone())),
            tokio::spawn(sweep_loop(app.store.clone(), app.metrics.clone())),
        ];
        // The change archiver stops after the sockets and the hub, before the
        // store closes, so it writes every change the store accepted.
        let (archiver_stop_tx, archiver_stop) = watch::channel(false);
        let archiver = app.config.archive_dir.clone().map(|dir| {
            let archiver =
                crate::archiver::Archiver::new(app.store.clone(), dir, app.config.archive_keep);
            tokio::spawn(archiver.run(archiver_stop))
        });
        // One read of the counts a second for every widget stream (counts.rs).
        let widget = app.clone();
        background.push(tokio::spawn(async move { widget.counts.run(&widget.hub).await }));
        if let (Some(l), Some(p)) = (metrics_listener, prometheus) {
            background.push(tokio::spawn(serve_private(l, p, app.clone())));
        }

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        if app.config.socket_send_buffer > 0 {
                            let sock = socket2::SockRef::from(&stream);
                            let _ = sock.set_send_buffer_size(app.config.socket_send_buffer);
                        }
                        let span = crate::logging::connection_span(peer);
                        tokio::spawn(serve_http(app.clone(), stream, peer).instrument(span));
                    }
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        tracing::info!(sockets = app.sockets.load(Ordering::SeqCst), "shutting down");
        drop(listener);
        let _ = shutdown_tx.send(true);
        let drained = async {
            loop {
                let gone = app.sockets_gone.notified();
                let open = app.sockets.load(Ordering::SeqCst) + app.refusing.load(Ordering::SeqCst);
                if open == 0 {
                    break;
                }
                gone.await;
            }
        };
        if tokio::time::timeout(app.config.shutdown_grace, drained).await.is_err() {
            tracing::warn!(
                left = app.sockets.load(Ordering::SeqCst),
                "sockets still open after the grace period"
            );
        }
        let _ = hub_stop_tx.send(true);
        let _ = hub_task.await;
        for task in background {
            task.abort();
        }
        if let Some(task) = archiver {
            let _ = archiver_stop_tx.send(true);
            if tokio::time::timeout(Duration::from_secs(10), task).await.is_err() {
                tracing::warn!("the change archiver did not finish within 10 s");
            }
        }
        app.store.close().await?;
        tracing::info!("board persisted; bye");
        Ok(())
    }
}

/// One HTTP/1.1 connection (keep-alive, upgrades), closed gracefully on
/// shutdown; its writes have `--http-write-timeout`, and a client address
/// over `--max-http-connections-per-ip` gets a 429 and the door.
async fn serve_http(app: Arc<App>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    // Behind a trusted proxy the peer is the proxy, which limits per client itself.
    let _hold = if app.config.trusted_proxy.contains(&peer.ip()) {
        None
    } else {
        match app.addresses.http(peer.ip()) {
            Ok(hold) => Some(hold),
            Err(why) => {
                tracing::debug!(?why, %peer, "HTTP connection refused");
                ::metrics::counter!("omcb_http_connections_refused_total").increment(1);
                app.metrics.limited_address(why);
                refuse_http(stream, app.config.http_write_timeout).await;
                return;
            }
        }
    };
    let mut shutdown = app.shutdown.clone();
    let timeout = app.config.http_write_timeout;
    let svc = service_fn(move |req| http::handle(app.clone(), req, peer.ip()));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(deadline::WriteDeadline::new(stream, timeout)), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "http connection ended");
            }
        }
        () = until_set(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Answers a connection over its address's cap with 429 and closes it,
/// reading (and dropping) what the client sent meanwhile so the close is not
/// a reset that could eat the answer.
async fn refuse_http(mut stream: tokio::net::TcpStream, timeout: Duration) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const BODY: &str = "too many connections from your address\n";
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(timeout, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 1024];
        while stream.read(&mut buf).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Reads the board's settings every tick and applies a change to this
/// worker (replica, sockets, gauge): how an `omcb admin` change made through
/// another worker or Redis arrives (see [`admin`] for why a read per tick).
async fn settings_loop(app: Arc<App>) {
    let mut tick = tokio::time::interval(app.config.batch_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match app.store.current_config().await {
            Ok(config) => admin::apply(&app, config.freeze_after_ms),
            // The feed reports the store's trouble; this retries next tick.
            Err(e) => tracing::debug!(error = %e, "reading the board's settings failed"),
        }
    }
}

/// While the board's live setting has freezing on, freezes due boxes a few
/// times per `freeze_after` (the seed's periodic job); in a fleet only the
/// lease holder sweeps. It looks at the setting every 100 ms (no store
/// command: the setting is the one the settings loop keeps), so a change
/// takes effect within that.
async fn sweep_loop(store: Store, metrics: crate::metrics::Metrics) {
    const OFF: Duration = Duration::from_millis(100);
    loop {
        let freeze_after = Duration::from_millis(store.config().freeze_after_ms);
        if freeze_after.is_zero() {
            // Not sweeping: not the holder either.
            metrics.swept(&Ok(None));
            tokio::time::sleep(OFF).await;
            continue;
        }
        let period = (freeze_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let swept = store.sweep_leased(10_000).await;
        metrics.swept(&swept);
        match swept {
            Ok(None | Some(0)) => {}
            Ok(Some(n)) => tracing::debug!(frozen = n, "freeze sweep"),
            Err(e) => tracing::warn!(error = %e, "freeze sweep failed"),
        }
        // Until the next sweep, or sooner when the setting changes (a sunset
        // shortened from 10m must not wait out the old 5 s period).
        let next = tokio::time::Instant::now() + period;
        while tokio::time::Instant::now() < next
            && store.config().freeze_after_ms == freeze_after.as_millis() as u64
        {
            tokio::time::sleep_until(next.min(tokio::time::Instant::now() + OFF)).await;
        }
    }
}

/// The private listener (`--metrics-listen`): `GET /metrics` in Prometheus
/// text format, and the operator's `/admin/` routes ([`admin`]).
async fn serve_private(listener: TcpListener, handle: PrometheusHandle, app: Arc<App>) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                let app = app.clone();
                async move {
                    let resp = if req.uri().path().starts_with("/admin/") {
                        admin::handle(&app, req).await
                    } else if req.uri().path() == "/metrics" {
                        let mut r = hyper::Response::new(Full::new(Bytes::from(
                            crate::metrics::render(&handle),
                        )));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(
                                "text/plain; version=0.0.4; charset=utf-8",
                            ),
                        );
                        r
                    } else {
                        let mut r =
                            hyper::Response::new(Full::new(Bytes::from_static(b"see /metrics\n")));
                        *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                        r
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
