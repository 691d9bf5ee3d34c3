//! Operator actions on the board: the sunset (`freeze_after`), audit and
//! revert (`audit.rs`), both ends.
//!
//! - The worker's side: `GET /admin/settings`, `POST /admin/sunset` and
//!   `POST /admin/revert` (body `{"origin": "ADDR", "since_ms": N,
//!   "dry_run": BOOL}`, answered with the revert's JSON) on the
//!   **private** listener only (`--metrics-listen`, beside `/metrics`; the
//!   public listener answers 404 for them, `admin_routes_are_not_on_the_public_listener`
//!   checks it). A change goes to the store, which keeps it with the board
//!   (the Redis config hash, the embedded board file) before it answers.
//! - The command line's side: `omcb admin [--worker URL | --redis URL]
//!   sunset start|set|stop`, `omcb admin settings` and `omcb admin revert`,
//!   talking to a worker's private listener, or in a fleet straight to Redis
//!   (no worker needed); `omcb admin audit` reads the archive directory
//!   itself.
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
use omcb_store::redis::{RedisStore, RedisTarget};
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
        (&Method::POST, "/admin/revert") => revert(app, req).await,
        (_, "/admin/settings" | "/admin/sunset" | "/admin/revert") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /admin/settings, POST /admin/sunset, POST /admin/revert",
        ),
        _ => error(StatusCode::NOT_FOUND, "no such admin route"),
    }
}

/// `POST /admin/revert`: plans the revert from this worker's archive and
/// store, applies it unless `dry_run`, answers the plan.
async fn revert(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const LIKE: &str = r#"{"origin": "203.0.113.7", "since_ms": 1795582800000, "dry_run": true}"#;
    let value = match read_json(req, LIKE).await {
        Ok(v) => v,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let who = value["origin"].as_str().map(str::parse::<crate::audit::Who>);
    let (Some(Ok(who)), Some(since_ms)) = (who, value["since_ms"].as_u64()) else {
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "the body needs \"origin\" (an IP address or 16 hex digits) and \"since_ms\", \
                 like {LIKE}"
            ),
        );
    };
    let dry_run = value["dry_run"].as_bool().unwrap_or(false);
    let Some(dir) = &app.config.archive_dir else {
        return error(
            StatusCode::CONFLICT,
            "this worker keeps no change archive (start it with --archive-dir): nothing to revert from",
        );
    };
    let mut plan =
        match crate::audit::plan(&app.store, dir, Some(&app.origin_key), who, since_ms).await {
            Ok(p) => p,
            Err(why) => return error(StatusCode::INTERNAL_SERVER_ERROR, &why),
        };
    if !dry_run {
        let done = crate::audit::apply(&app.store, &mut plan).await;
        let report = plan.to_json(false);
        tracing::info!(
            who = ?who,
            since_ms,
            restored = report["applied"].as_array().map_or(0, Vec::len),
            "omcb admin: reverted an address's changes"
        );
        if let Err(why) = done {
            return error(StatusCode::SERVICE_UNAVAILABLE, &why);
        }
        return json(StatusCode::OK, &report);
    }
    json(StatusCode::OK, &plan.to_json(true))
}

/// A JSON request body (at most 4 KiB); `like` shows what one looks like.
async fn read_json(req: Request<Incoming>, like: &str) -> Result<serde_json::Value, String> {
    let body = Limited::new(req.into_body(), 4096)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("the body is not JSON like {like}: {e}"))
}

/// The body of `POST /admin/sunset`: `{"freeze_after_ms": N}`, 0 to stop.
async fn read_sunset(req: Request<Incoming>) -> Result<u64, String> {
    let value = read_json(req, r#"{"freeze_after_ms": 600000}"#).await?;
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
    /// For `rediss://`: trust only the CA certificates in this PEM file.
    #[arg(long, env = "OMCB_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,
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
    /// List what a client address did, from the change archive: each change
    /// (time, epoch, seq, box, op, origin), then a summary; or with `--top N`
    /// the N origins with the most changes. Reads the archive directory
    /// only (no worker or Redis needed).
    Audit {
        /// The client's IP address (hashed with the origin key, as the
        /// workers do), or an origin (16 hex digits, as audit prints it).
        #[arg(long, required_unless_present_any = ["index", "top", "box_range"])]
        origin: Option<crate::audit::Who>,
        /// Only changes to this box (with no --origin: everyone's, to find
        /// who changed it).
        #[arg(long = "box", id = "index")]
        index: Option<u32>,
        /// Only changes to boxes A..B (both included; `audit --top` prints
        /// an origin's range this way).
        #[arg(long)]
        box_range: Option<crate::audit::BoxRange>,
        /// Instead of the changes, the N origins with the most changes
        /// (with their count, distinct boxes, first and last time, and the
        /// range of boxes they touched): who drew, when only the damage is
        /// known.
        #[arg(long, conflicts_with = "origin", value_parser = clap::value_parser!(u64).range(1..))]
        top: Option<u64>,
        /// From this time: RFC 3339 (`2026-11-26T05:00:00Z`) or a duration
        /// ago (`2h`).
        #[arg(long)]
        since: String,
        /// Up to (not including) this time; default now.
        #[arg(long)]
        until: Option<String>,
        /// The change archive (the archiving worker's `--archive-dir`).
        #[arg(long, env = "OMCB_ARCHIVE_DIR")]
        archive_dir: std::path::PathBuf,
        /// The workers' origin key (`--origin-key-file`; for the embedded
        /// board, `origin.key` in its data dir); needed for an address.
        #[arg(long, env = "OMCB_ORIGIN_KEY_FILE")]
        origin_key_file: Option<std::path::PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set every box a client address changed since a time back to its value
    /// before, unless someone else changed it since (listed, not touched);
    /// frozen boxes are listed, not touched. The changes are ordinary
    /// changes with the operator's origin (ffffffffffffffff).
    Revert {
        /// The client's IP address, or an origin (16 hex digits).
        #[arg(long)]
        origin: crate::audit::Who,
        /// From this time: RFC 3339 or a duration ago (`2h`).
        #[arg(long)]
        since: String,
        /// Print the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// With `--redis`: the change archive (with `--worker` the worker
        /// uses its own `--archive-dir`).
        #[arg(long, env = "OMCB_ARCHIVE_DIR")]
        archive_dir: Option<std::path::PathBuf>,
        /// With `--redis`: the workers' origin key (with `--worker` the
        /// worker uses its own).
        #[arg(long, env = "OMCB_ORIGIN_KEY_FILE")]
        origin_key_file: Option<std::path::PathBuf>,
    },
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
    Redis(RedisStore),
}

impl Target {
    async fn read(&self, board: &str) -> anyhow::Result<serde_json::Value> {
        match self {
            Target::Worker(url) => request(url, "GET", "/admin/settings", None, PATIENCE).await,
            Target::Redis(store) => {
                Ok(settings_json(board, &Store::Redis(store.clone()).current_config().await?))
            }
        }
    }

    async fn write(&self, board: &str, freeze_after_ms: u64) -> anyhow::Result<serde_json::Value> {
        match self {
            Target::Worker(url) => {
                let body = serde_json::json!({ "freeze_after_ms": freeze_after_ms }).to_string();
                request(url, "POST", "/admin/sunset", Some(&body), PATIENCE).await
            }
            Target::Redis(store) => {
                Ok(settings_json(board, &store.set_freeze_after(freeze_after_ms).await?))
            }
        }
    }
}

/// How long `omcb admin` waits for Redis or a worker.
const PATIENCE: Duration = Duration::from_secs(10);

/// How long `omcb admin revert` waits for a worker to plan and apply.
const REVERT_PATIENCE: Duration = Duration::from_secs(300);

/// Runs `omcb admin`; prints the board's settings after the action as JSON,
/// or the audit's or revert's report.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let now = crate::audit::now_ms();
    let time = |flag: &str, s: &str| {
        crate::audit::parse_time(s, now).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
    };
    let print = |v: &serde_json::Value, json: bool, text: fn(&serde_json::Value) -> String| {
        if json {
            println!("{v}");
        } else {
            print!("{}", text(v));
        }
    };
    let key = |file: &Option<std::path::PathBuf>| {
        file.as_deref().map(crate::origin::OriginKey::read).transpose().map_err(anyhow::Error::msg)
    };
    if let AdminCommand::Audit {
        origin,
        index,
        box_range,
        top,
        since,
        until,
        archive_dir,
        origin_key_file,
        json,
    } = &args.command
    {
        let since_ms = time("--since", since)?;
        let until_ms = until.as_deref().map(|u| time("--until", u)).transpose()?;
        let scope = crate::audit::Scope { since_ms, until_ms, index: *index, range: *box_range };
        if let Some(n) = top {
            let n = usize::try_from(*n).unwrap_or(usize::MAX);
            let report = crate::audit::top(archive_dir, n, &scope).map_err(anyhow::Error::msg)?;
            print(&report, *json, crate::audit::render_top);
            return Ok(());
        }
        let key = key(origin_key_file)?;
        let hash =
            origin.map(|w| w.origin(key.as_ref())).transpose().map_err(anyhow::Error::msg)?;
        let address = match origin {
            Some(crate::audit::Who::Address(ip)) => Some(ip.to_string()),
            _ => None,
        };
        let report =
            crate::audit::audit(archive_dir, address, hash, &scope).map_err(anyhow::Error::msg)?;
        print(&report, *json, crate::audit::render_audit);
        return Ok(());
    }
    let target = match (&args.worker, &args.redis) {
        (Some(url), _) => Target::Worker(url.clone()),
        (None, Some(url)) => {
            let target = RedisTarget::new(url, args.redis_ca_file.as_deref())?;
            Target::Redis(
                tokio::time::timeout(PATIENCE, RedisStore::open_existing(&target, &args.board))
                    .await
                    .with_context(|| {
                        format!("Redis at {} did not answer within {PATIENCE:?}", target.redacted())
                    })??,
            )
        }
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
        AdminCommand::Revert { origin, since, dry_run, json, archive_dir, origin_key_file } => {
            let since_ms = time("--since", &since)?;
            let report = match &target {
                Target::Worker(url) => {
                    let origin = match origin {
                        crate::audit::Who::Address(ip) => ip.to_string(),
                        crate::audit::Who::Origin(o) => crate::audit::origin_hex(o),
                    };
                    let body = serde_json::json!({
                        "origin": origin, "since_ms": since_ms, "dry_run": dry_run,
                    });
                    let body = body.to_string();
                    request(url, "POST", "/admin/revert", Some(&body), REVERT_PATIENCE).await?
                }
                Target::Redis(store) => {
                    let Some(dir) = archive_dir else {
                        anyhow::bail!(
                            "revert with --redis needs --archive-dir (OMCB_ARCHIVE_DIR), and for \
                             an address --origin-key-file (OMCB_ORIGIN_KEY_FILE)"
                        );
                    };
                    let key = key(&origin_key_file)?;
                    let store = Store::Redis(store.clone());
                    let mut plan = crate::audit::plan(&store, &dir, key.as_ref(), origin, since_ms)
                        .await
                        .map_err(anyhow::Error::msg)?;
                    if !dry_run {
                        crate::audit::apply(&store, &mut plan).await.map_err(anyhow::Error::msg)?;
                    }
                    plan.to_json(dry_run)
                }
            };
            print(&report, json, crate::audit::render_revert);
            return Ok(());
        }
        AdminCommand::Audit { .. } => unreachable!("handled above"),
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
    patience: Duration,
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
    let (status, body) = tokio::time::timeout(patience, exchange)
        .await
        .with_context(|| format!("{url} did not answer within {patience:?}"))?
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
