//! The omcb wire contract and the pure logic every side of it shares.
//!
//! # Layout
//! - [`v1`]: the prost types generated from `proto/omcb.proto` (package `omcb.v1`).
//! - [`client`]: [`decode_client`], the strict decoder for what clients send (a
//!   `Toggle` index too wide for 32 bits is out of range, never truncated).
//! - [`delta`]: the delta codec for the ascending index lists of a `Batch`.
//! - [`bits`]: bitsets in Redis bit order (`bitvec` `Msb0` over bytes).
//! - [`change`]: one accepted change to the board, as the store's feed carries it.
//! - [`batch`]: [`batch::BatchBuilder`], which coalesces a run of changes into one `Batch`.
//! - [`board`]: [`board::Board`], a board at a seq: the worker's replica, the
//!   convergence rule a client follows, and the conversions to and from `Snapshot`.
//! - [`view`]: viewport subscriptions: the board's regions, the split of a
//!   Batch into region frames, and [`view::View`], a subscribed client's state.
//!
//! **Invariant:** this crate does no I/O and knows nothing of tokio or Redis, so
//! the worker, the load generator and the tests all agree on one definition of
//! the protocol's semantics.
#![forbid(unsafe_code)]

pub mod batch;
pub mod bits;
pub mod board;
pub mod change;
pub mod client;
pub mod delta;
pub mod view;

/// Generated from `proto/omcb.proto`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/omcb.v1.rs"));
}

pub use batch::BatchBuilder;
pub use board::{Applied, Board};
pub use change::{Change, Op};
pub use client::decode_client;

/// Encodes a server message into a fresh buffer (used once per batch, not per client).
pub fn encode_server(msg: v1::server_message::Msg) -> Vec<u8> {
    use prost::Message;
    v1::ServerMessage { msg: Some(msg) }.encode_to_vec()
}
