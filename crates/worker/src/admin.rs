//! Operator actions on the board: the sunset (`freeze_after`), both ends.
//!
//! - The worker's side: `GET /admin/settings` and `POST /admin/sunset` on the
//!   **private** listener only (`--metrics-listen`, beside `/metrics`; the
//!   public listener answers 404 for them, `admin_routes_are_not_on_the_public_listener`
//!   checks it). A change goes to the store, which keeps it with the board
//!   (the Redis config hash, the embedded board file) before it answers.
//! - The command line's side: `omcb admin [--worker URL | --redis URL]
//!   sunset start|set|stop` and `omcb admin settings`, talking to a worker's
//!   private listener, or in a fleet straight to Redis (no worker needed).
//!
//! How the change spreads: each worker reads the board's settings every tick
//! (`server::settings_loop`: free for the embedded store, one `HGET` per tick
//! in a fleet), so every worker's replica, `/api/stats`,
//! `omcb_freeze_after_seconds` and sweep follow within a tick; the hub then
//! sends every socket a `Settings` message. A read per tick was chosen over a
//! special entry in the change stream: entries are box changes with a seq
//! each, and every reader of the stream (replicas, clients' seq rule, the
//! restore of a lost board) would have to learn a change that is no box's,
//! for a setting that changes a few times in a board's life. The read costs
//! one small command per worker per tick, whatever the number of clients.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use omcb_store::{BoardConfig, Store, StoreError};

use crate::app::App;

/// The longest sunset: as long as `--freeze-after` allows.
pub const MAX_FREEZE_AFTER: Duration = crate::config::YEARS_100;

/// The JSON an admin route answers: the board's settings.
pub fn settings_json(board: &str, config: &BoardConfig) -> serde_json::Value {
    serde_json::json!({
        "board": board,
        "size": config.size,
        "max_checked": config.max_checked,
        "freeze_after_ms": config.freeze_after_ms,
    })
}

/// Applies the board's `freeze_after_ms` as the store holds it to this
/// worker: the replica (and so `/api/stats` and every socket) and the gauge.
pub fn apply(app: &App, freeze_after_ms: u64) {
    if app.hub.set_freeze_after(freeze_after_ms) {
        app.metrics.freeze_after(freeze_after_ms);
    }
}

/// Answers a request to the private listener under `/admin/`.
pub async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/admin/settings") => match app.store.current_config().await {
            Ok(config) => {
                apply(app, config.freeze_after_ms);
                json(StatusCode::OK, &settings_json(&app.config.board, &config))
            }
            Err(e) => store_error(&e),
        },
        (&Method::POST, "/admin/sunset") => {
            let freeze_after_ms = match read_sunset(req).await {
                Ok(ms) => ms,
                Err(why) => return error(StatusCode::BAD_REQUEST, &why),
            };
            match app.store.set_freeze_after(freeze_after_ms).await {
                Ok(config) => {
                    tracing::info!(freeze_after_ms, "omcb admin: the board's sunset was set");
                    apply(app, config.freeze_after_ms);
                    json(StatusCode::OK, &settings_json(&app.config.board, &config))
                }
                Err(e) => store_error(&e),
            }
        }
        (_, "/admin/settings" | "/admin/sunset") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "GET /admin/settings, POST /admin/sunset")
        }
        _ => error(StatusCode::NOT_FOUND, "no such admin route"),
    }
}

/// The body of `POST /admin/sunset`: `{"freeze_after_ms": N}`, 0 to stop.
async fn read_sunset(req: Request<Incoming>) -> Result<u64, String> {
    let body = Limited::new(req.into_body(), 4096)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| format!("the body is not JSON like {{\"freeze_after_ms\": 600000}}: {e}"))?;
    let ms = value
        .get("freeze_after_ms")
        .and_then(serde_json::Value::as_u64)
        .ok_or("the body needs \"freeze_after_ms\": a whole number of milliseconds, 0 to stop")?;
    if ms > MAX_FREEZE_AFTER.as_millis() as u64 {
        return Err(format!(
            "freeze_after_ms {ms} is out of range: at most {}",
            MAX_FREEZE_AFTER.as_millis()
        ));
    }
    Ok(ms)
}

fn store_error(e: &StoreError) -> Response<Full<Bytes>> {
    let status = match e {
        StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `omcb admin`: change or read the board's settings.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// A worker's private listener (its `--metrics-listen`), e.g.
    /// `http://10.0.0.5:9478`.
    #[arg(long, env = "OMCB_ADMIN_WORKER")]
    pub worker: Option<String>,
    /// Fleet mode: the board's Redis (`redis://HOST:PORT`), read and written
    /// directly; used when no `--worker` is given.
    #[arg(long, env = "OMCB_REDIS")]
    pub redis: Option<String>,
    /// Name of the board in Redis.
    #[arg(long, env = "OMCB_BOARD", default_value = "main")]
    pub board: String,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The `omcb admin` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// The sunset: boxes checked for a while can no longer be unchecked and
    /// freeze, until the whole board stands still.
    Sunset {
        /// Start, change or stop it.
        #[command(subcommand)]
        action: SunsetAction,
    },
    /// Print the board's settings (JSON).
    Settings,
}

/// `omcb admin sunset ...`.
#[derive(Debug, clap::Subcommand)]
pub enum SunsetAction {
    /// Start a sunset: from now on a box checked for AFTER (e.g. `10m`)
    /// freezes; boxes already checked longer than that freeze at once.
    /// Refused while one runs (use `set`).
    Start {
        /// How long a box stays uncheckable after it was checked.
        #[arg(value_parser = after)]
        after: Duration,
    },
    /// Change the running sunset's time. Refused when none runs (use `start`).
    Set {
        /// How long a box stays uncheckable after it was checked.
        #[arg(value_parser = after)]
        after: Duration,
    },
    /// Stop the sunset: boxes frozen so far stay frozen, no more freeze.
    Stop,
}

fn after(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s, Duration::from_millis(1), MAX_FREEZE_AFTER)
}

/// Where `omcb admin` sends its reads and writes.
enum Target {
    Worker(String),
    Redis(omcb_store::redis::RedisStore),
}

impl Target {
    async fn read(&self, board: &str) -> anyhow::Result<serde_json::Value> {
        match self {
            Target::Worker(url) => request(url, "GET", "/admin/settings", None).await,
            Target::Redis(store) => {
                Ok(settings_json(board, &Store::Redis(store.clone()).current_config().await?))
            }
        }
    }

    async fn write(&self, board: &str, freeze_after_ms: u64) -> anyhow::Result<serde_json::Value> {
        match self {
            Target::Worker(url) => {
                let body = serde_json::json!({ "freeze_after_ms": freeze_after_ms }).to_string();
                request(url, "POST", "/admin/sunset", Some(&body)).await
            }
            Target::Redis(store) => {
                Ok(settings_json(board, &store.set_freeze_after(freeze_after_ms).await?))
            }
        }
    }
}

/// Runs `omcb admin`; prints the board's settings after the action as JSON.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    const PATIENCE: Duration = Duration::from_secs(10);
    let target = match (&args.worker, &args.redis) {
        (Some(url), _) => Target::Worker(url.clone()),
        (None, Some(url)) => Target::Redis(
            tokio::time::timeout(
                PATIENCE,
                omcb_store::redis::RedisStore::open_existing(url, &args.board),
            )
            .await
            .with_context(|| format!("Redis at {url} did not answer within {PATIENCE:?}"))??,
        ),
        (None, None) => anyhow::bail!(
            "say where the board is: --worker http://HOST:PORT (a worker's --metrics-listen) \
             or --redis redis://HOST:PORT (OMCB_ADMIN_WORKER, OMCB_REDIS)"
        ),
    };
    let board = args.board.as_str();
    let running = |s: &serde_json::Value| s["freeze_after_ms"].as_u64().unwrap_or(0);
    let settings = match args.command {
        AdminCommand::Settings => target.read(board).await?,
        AdminCommand::Sunset { action: SunsetAction::Start { after } } => {
            let now = running(&target.read(board).await?);
            if now > 0 {
                anyhow::bail!(
                    "a sunset is already running (boxes freeze {} after they are checked); \
                     change it with `omcb admin sunset set`",
                    humantime::format_duration(Duration::from_millis(now))
                );
            }
            target.write(board, after.as_millis() as u64).await?
        }
        AdminCommand::Sunset { action: SunsetAction::Set { after } } => {
            if running(&target.read(board).await?) == 0 {
                anyhow::bail!("no sunset is running; start one with `omcb admin sunset start`");
            }
            target.write(board, after.as_millis() as u64).await?
        }
        AdminCommand::Sunset { action: SunsetAction::Stop } => target.write(board, 0).await?,
    };
    println!("{settings}");
    Ok(())
}

/// One request to a worker's private listener, over hyper's HTTP/1.1 client:
/// the JSON it answers, or its error message.
async fn request(
    url: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    let host = url
        .strip_prefix("http://")
        .with_context(|| format!("--worker {url}: expected http://HOST:PORT"))?
        .trim_end_matches('/');
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(host).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("{url} did not answer within 10 s"))?
        .with_context(|| format!("talking to {url}"))?;
    let body = String::from_utf8_lossy(&body);
    let value: serde_json::Value = serde_json::from_str(body.trim())
        .with_context(|| format!("{url}{path} answered {status}: {body}"))?;
    if status != StatusCode::OK {
        anyhow::bail!(
            "{url}{path} answered {}: {}",
            status.as_u16(),
            value["error"].as_str().unwrap_or(body.trim())
        );
    }
    Ok(value)
}
