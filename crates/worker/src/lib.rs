//! The omcb worker: serves the board to browsers over HTTP and WebSocket.
//!
//! # Layout
//! Modules from the bottom up: each uses only modules above it in this list
//! (named in brackets), so there is no circle of imports, and none imports
//! this file.
//! - [`logging`]: text or JSON logs, a span per connection.
//! - [`process`]: the process metrics (CPU, memory, file descriptors).
//! - [`ratelimit`]: the token bucket.
//! - [`deadline`]: the write deadline of HTTP connections.
//! - [`assets`]: the web client, built into the binary or read from `--web-dir`.
//! - [`frames`]: the frames the worker sends, each encoded once (a batch is
//!   the same bytes for every socket).
//! - [`shutdown`]: waiting for a stop flag.
//! - [`tick`]: the tick's length, following the latency and egress
//!   budgets (a pure control law).
//! - [`origin`]: the keyed hash of a client's address that its changes
//!   carry (for the change archive), and where its key comes from.
//! - [`config`] (logging, tick): [`Config`], every flag of `omcb serve` (with
//!   `OMCB_*` variables).
//! - [`limits`] (config, ratelimit): budgets and connection counts per client
//!   address.
//! - [`metrics`] (config, limits, process): metric handles and the Prometheus
//!   recorder.
//! - [`sink`] (frames, metrics): a socket's ordered, non-blocking output
//!   (queue, lag rule, send timeout).
//! - [`hub`] (frames, metrics, sink, shutdown, tick): the replica of the board, the
//!   one reader of the store's change feed, the tick that encodes one Batch
//!   for every socket, the fan-out shards that write it, and a socket's start
//!   (`Hub::join`).
//! - [`counts`] (hub): the board's counts for the widget's live stream,
//!   published at most once a second.
//! - [`app`] (config, assets, metrics, limits, hub, counts, origin): what every
//!   connection shares.
//! - [`conn`] (config, ratelimit, deadline, frames, shutdown, limits, sink,
//!   hub, app): one WebSocket: reader (validation, rate limit, toggles) and
//!   writer (snapshots, pings, full buffers, slow clients).
//! - [`http`] (limits, app, conn, counts): the HTTP routes (`/`, static
//!   files, `/api/state`, `/api/stats`, `/healthz`, `/readyz`), and in
//!   `http::embed` the widget's (`/embed`, `/embed.js`, `/oembed`,
//!   `/badge.svg`, `/api/counts`).
//! - [`admin`] (config, app): the operator's sunset, on the private
//!   listener's `/admin/` routes and in `omcb admin`.
//! - [`archiver`]: the change archiver (`--archive-dir`), the store's log
//!   into `omcb-archive` segments, under a lease in a fleet.
//! - [`server`] (config, archiver, deadline, assets, metrics, shutdown, limits, hub,
//!   app, http, admin): [`Server`] ties them together: bind, run until a shutdown
//!   signal, close every socket with 1012, persist, return.
//!
//! **Invariant:** page loads, `/api/state` and connect snapshots are served
//! from the hub's replica; only toggles (and the hub's one feed) reach the store.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod archiver;
pub mod assets;
pub mod config;
pub mod conn;
pub mod counts;
pub mod deadline;
pub mod frames;
pub mod http;
pub mod hub;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod origin;
pub mod process;
pub mod ratelimit;
pub mod server;
pub mod shutdown;
pub mod sink;
pub mod tick;

pub use config::Config;
pub use server::{ServeError, Server};
