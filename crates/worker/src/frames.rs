//! The WebSocket frames the worker sends, each encoded once into one buffer
//! (header and payload) that is written as it is.
//!
//! fastwebsockets builds and encodes every frame here (`Frame::new`,
//! `Frame::close`, `Frame::write`); only the result is kept, as `Bytes`. Its
//! own writer (`WebSocketWrite::write_frame`) would frame a payload again for
//! every socket and write from one task per socket. A batch framed once here
//! is instead `try_write`n as the same bytes to every socket by the hub's
//! fan-out (see `sink.rs`), with no task woken per socket: that rework
//! cut the worker's CPU by 25% and halved delivery p50 at 5,000 clients
//! (docs/BENCHMARKS.md, "Latency and CPU").
//!
//! A leaf of the crate: it uses bytes and fastwebsockets and nothing of the
//! worker's, so the hub (which makes batches), the sinks (which write them)
//! and the connections (which make replies) all build on it.

use bytes::Bytes;
use fastwebsockets::{CloseCode, Frame, OpCode, Payload};

/// A batch encoded once as a WebSocket frame of a `ServerMessage`, shared by
/// every socket.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// Board epoch.
    pub epoch: u64,
    /// First seq the batch covers.
    pub from_seq: u64,
    /// Last seq the batch covers.
    pub to_seq: u64,
    /// The binary WebSocket frame of `ServerMessage{batch}`.
    pub frame: Bytes,
    /// The same tick's region frames (docs/PROTOCOL.md, "Viewport
    /// subscriptions"), regions ascending, each encoded once for every
    /// socket subscribed to its region.
    pub regions: std::sync::Arc<[RegionFrame]>,
}

/// One region's frame of a tick: a `ServerMessage{batch}` with `region` set.
#[derive(Debug, Clone)]
pub struct RegionFrame {
    /// The region.
    pub region: u32,
    /// The frame's `from_seq`: its region's previous frame's `to_seq` + 1
    /// (its `to_seq` is the tick's).
    pub from_seq: u64,
    /// The binary WebSocket frame.
    pub frame: Bytes,
}

/// One complete server frame (FIN set, unmasked, as RFC 6455 requires of a
/// server): header and payload in one buffer, so a socket sends it with one
/// write and every socket can share it.
pub fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    encode(Frame::new(true, opcode, None, Payload::Borrowed(payload)))
}

/// A close frame with a status code and a short reason.
pub fn close_frame(code: CloseCode, reason: &str) -> Bytes {
    encode(Frame::close(code.into(), reason.as_bytes()))
}

/// Encodes a frame fastwebsockets built (an unmasked one: we are the server).
pub fn encode(mut frame: Frame<'_>) -> Bytes {
    let mut buf = Vec::new();
    let n = frame.write(&mut buf).len();
    buf.truncate(n);
    Bytes::from(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_headers_for_every_length_class() {
        assert_eq!(&frame(OpCode::Binary, b"ab")[..], &[0x82, 2, b'a', b'b']);
        let f = frame(OpCode::Binary, &[7; 126]);
        assert_eq!(&f[..4], &[0x82, 126, 0, 126]);
        assert_eq!(f.len(), 4 + 126);
        let f = frame(OpCode::Binary, &vec![7; 70_000]);
        assert_eq!(&f[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(f.len(), 10 + 70_000);
        assert_eq!(&frame(OpCode::Ping, &[])[..], &[0x89, 0]);
        assert_eq!(&close_frame(CloseCode::Restart, "x")[..], &[0x88, 3, 0x03, 0xF4, b'x']);
    }
}
