//! One accepted change to a board, as the store's ordered feed carries it.

/// What a change did to its box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// The box was set to this value (only real changes get a seq; a repeat does not).
    Set(bool),
    /// The box became frozen (it keeps its value, which is checked).
    Freeze,
}

/// One accepted change: the store gives each its own seq, in order, with no holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The board seq of this change (the first change of an epoch is 1).
    pub seq: u64,
    /// The box changed.
    pub index: u32,
    /// What happened to it.
    pub op: Op,
    /// Checked boxes on the board right after this change: a batch's counts are
    /// those of its last change, so nobody has to recount.
    pub checked_count: u32,
    /// Frozen boxes on the board right after this change.
    pub frozen_count: u32,
    /// When the store committed it, in ms since the Unix epoch, by the store's
    /// clock (Redis' `TIME`, or the embedded store's): the worker measures its
    /// feed's lag with it. 0 when unknown (a Redis log entry written before
    /// entries carried it). Not on the wire.
    pub committed_ms: u64,
    /// Who made it: a keyed hash (the operator's secret key) of the client
    /// address that sent the toggle, so the change archive can tell one
    /// client's changes from another's without holding any address. 0 = no
    /// client (the sweep freezing a box, a board restore, a log entry written
    /// before entries carried it). Not on the wire.
    pub origin: u64,
}
