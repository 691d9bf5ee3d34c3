//! Strict decoding of what a client sends.
//!
//! prost reads a `uint32` field by decoding a 64-bit varint and casting it
//! (`decode_varint(buf)? as u32` in prost's `encoding.rs`), so a `Toggle` whose
//! `index` is sent as the varint 2^32 + 5 would read as box 5: a box the client
//! never named. [`decode_client`] decodes through a private, wire-compatible
//! copy of `ClientMessage` whose 32-bit fields are 64 bits wide (`uint32` and
//! `uint64` share the varint wire type, so both copies accept exactly the same
//! bytes) and saturates a value that does not fit to `u32::MAX`. An index of
//! `u32::MAX` is outside every board (`index < size <= u32::MAX` fails), so the
//! worker answers `REASON_OUT_OF_RANGE`; a `request_id` of `u32::MAX` echoes
//! back as an id the client cannot mistake for one it sent.
//!
//! Everything else is prost's: varints longer than 10 bytes or past 2^64 - 1
//! are errors, unknown fields are skipped, a repeated field or oneof member
//! merges as protobuf says, and a `bool` is true for any non-zero varint.

use prost::Message as _;

use crate::v1::{ClientMessage, Resync, Subscribe, Toggle, client_message};

/// Decodes a client's frame like `ClientMessage::decode`, except that a
/// `Toggle` field too wide for 32 bits reads as `u32::MAX` instead of its low
/// 32 bits (see the module docs). Use it for every frame a client sends.
pub fn decode_client(bytes: &[u8]) -> Result<ClientMessage, prost::DecodeError> {
    let wide = WideClientMessage::decode(bytes)?;
    let msg = wide.msg.map(|m| match m {
        // An exhaustive struct literal: a field added to `Toggle` in the
        // .proto fails to compile here until the wide copy has it too.
        WideMsg::Toggle(t) => client_message::Msg::Toggle(Toggle {
            index: saturate(t.index),
            checked: t.checked,
            request_id: saturate(t.request_id),
        }),
        WideMsg::Resync(r) => client_message::Msg::Resync(r),
        WideMsg::Subscribe(s) => client_message::Msg::Subscribe(Subscribe {
            first: saturate(s.first),
            count: saturate(s.count),
        }),
    });
    Ok(ClientMessage { msg })
}

fn saturate(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// `omcb.v1.ClientMessage` with the same field numbers and wire types.
#[derive(Clone, PartialEq, prost::Message)]
struct WideClientMessage {
    #[prost(oneof = "WideMsg", tags = "1, 2, 3")]
    msg: Option<WideMsg>,
}

/// `ClientMessage.msg`. A member added to the .proto must be added here too:
/// the `every_variant_decodes_the_same` test lists the members exhaustively.
#[derive(Clone, PartialEq, prost::Oneof)]
enum WideMsg {
    #[prost(message, tag = "1")]
    Toggle(WideToggle),
    #[prost(message, tag = "2")]
    Resync(Resync),
    #[prost(message, tag = "3")]
    Subscribe(WideSubscribe),
}

/// `omcb.v1.Subscribe` with `uint64` where the contract says `uint32`: a
/// `first` or `count` too wide reads as `u32::MAX` (out of range, too large),
/// never as its low 32 bits.
#[derive(Clone, Copy, PartialEq, prost::Message)]
struct WideSubscribe {
    #[prost(uint64, tag = "1")]
    first: u64,
    #[prost(uint64, tag = "2")]
    count: u64,
}

/// `omcb.v1.Toggle` with `uint64` where the contract says `uint32`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
struct WideToggle {
    #[prost(uint64, tag = "1")]
    index: u64,
    #[prost(bool, tag = "2")]
    checked: bool,
    #[prost(uint64, tag = "3")]
    request_id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The varint encoding of `v` (LEB128, as protobuf writes it).
    fn varint(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_varint(v, &mut out);
        out
    }

    /// A `ClientMessage` holding a Toggle whose body is `toggle` (raw bytes).
    fn wrap_toggle(toggle: &[u8]) -> Vec<u8> {
        let mut out = vec![0x0a]; // field 1 (toggle), wire type 2
        out.extend(varint(toggle.len() as u64));
        out.extend_from_slice(toggle);
        out
    }

    /// A Toggle body with the given raw index and request id varints.
    fn toggle_bytes(index: &[u8], checked: &[u8], request_id: &[u8]) -> Vec<u8> {
        let mut t = vec![0x08]; // field 1 (index), varint
        t.extend_from_slice(index);
        t.push(0x10); // field 2 (checked), varint
        t.extend_from_slice(checked);
        t.push(0x18); // field 3 (request_id), varint
        t.extend_from_slice(request_id);
        wrap_toggle(&t)
    }

    fn toggle_of(m: ClientMessage) -> Toggle {
        match m.msg {
            Some(client_message::Msg::Toggle(t)) => t,
            other => panic!("expected a Toggle, got {other:?}"),
        }
    }

    #[test]
    fn index_past_32_bits_is_out_of_range_not_truncated() {
        let bytes = toggle_bytes(&varint((1 << 32) + 5), &[1], &varint(7));
        // What prost alone does, and why this module exists.
        assert_eq!(toggle_of(ClientMessage::decode(bytes.as_slice()).unwrap()).index, 5);
        let t = toggle_of(decode_client(&bytes).unwrap());
        assert_eq!((t.index, t.checked, t.request_id), (u32::MAX, true, 7));
    }

    #[test]
    fn every_width_of_index() {
        let cases: &[(u64, u32)] = &[
            (0, 0),
            (5, 5),
            (999_999, 999_999),
            (u64::from(u32::MAX) - 1, u32::MAX - 1),
            (u64::from(u32::MAX), u32::MAX),
            (1 << 32, u32::MAX),
            ((1 << 32) + 5, u32::MAX),
            (1 << 63, u32::MAX),
            (u64::MAX, u32::MAX),
        ];
        for &(sent, read) in cases {
            let bytes = toggle_bytes(&varint(sent), &[0], &[1]);
            assert_eq!(toggle_of(decode_client(&bytes).unwrap()).index, read, "index {sent}");
        }
        // 2^64 - 1 is the longest varint there is: ten bytes.
        assert_eq!(varint(u64::MAX).len(), 10);
    }

    #[test]
    fn request_id_past_32_bits_saturates() {
        let bytes = toggle_bytes(&[3], &[1], &varint((1 << 32) + 7));
        let t = toggle_of(decode_client(&bytes).unwrap());
        assert_eq!((t.index, t.request_id), (3, u32::MAX));
    }

    #[test]
    fn ten_byte_varints() {
        // A padded (non-minimal) 10-byte encoding of 5 is still 5: protobuf allows it.
        let padded_five = [0x85, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00];
        let t = toggle_of(decode_client(&toggle_bytes(&padded_five, &[1], &[9])).unwrap());
        assert_eq!((t.index, t.request_id), (5, 9));
        // A tenth byte above 1 overflows 64 bits; an eleventh byte is too long.
        // Both are errors, as in prost, never a wrapped value.
        let overflow = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(decode_client(&toggle_bytes(&overflow, &[1], &[9])).is_err());
        let eleven = [0x85, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00];
        assert!(decode_client(&toggle_bytes(&eleven, &[1], &[9])).is_err());
        // A varint cut off by the end of the message.
        assert!(decode_client(&wrap_toggle(&[0x08, 0xff, 0xff])).is_err());
    }

    #[test]
    fn checked_is_any_non_zero_varint() {
        for (raw, want) in [(varint(0), false), (varint(1), true), (varint(2), true)] {
            let t = toggle_of(decode_client(&toggle_bytes(&[1], &raw, &[1])).unwrap());
            assert_eq!(t.checked, want);
        }
        let t = toggle_of(decode_client(&toggle_bytes(&[1], &varint(1 << 40), &[1])).unwrap());
        assert!(t.checked);
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut toggle = vec![0x08, 0x07]; // index 7
        toggle.extend([0x78, 0x01]); // field 15, varint
        toggle.extend([0x82, 0x01, 0x02, 0xaa, 0xbb]); // field 16, 2 bytes
        toggle.extend([0x18, 0x03]); // request_id 3
        let mut bytes = vec![0x28, 0x2a]; // ClientMessage field 5, varint
        bytes.extend(wrap_toggle(&toggle));
        bytes.extend([0x35, 1, 2, 3, 4]); // field 6, fixed32
        let t = toggle_of(decode_client(&bytes).unwrap());
        assert_eq!((t.index, t.checked, t.request_id), (7, false, 3));
        assert_eq!(
            decode_client(&bytes).unwrap(),
            ClientMessage::decode(bytes.as_slice()).unwrap()
        );
    }

    #[test]
    fn empty_and_resync() {
        assert_eq!(decode_client(&[]).unwrap(), ClientMessage { msg: None });
        // An empty Toggle is box 0, unchecked, request 0.
        assert_eq!(toggle_of(decode_client(&[0x0a, 0x00]).unwrap()), Toggle::default());
        assert_eq!(
            decode_client(&[0x12, 0x00]).unwrap().msg,
            Some(client_message::Msg::Resync(Resync {}))
        );
    }

    #[test]
    fn wrong_wire_type_is_an_error() {
        // index as a length-delimited field.
        assert!(decode_client(&wrap_toggle(&[0x0a, 0x01, 0x05])).is_err());
        assert!(ClientMessage::decode(wrap_toggle(&[0x0a, 0x01, 0x05]).as_slice()).is_err());
    }

    #[test]
    fn repeated_members_merge_like_prost() {
        // Toggle{index 2^32+5}, then Toggle{request_id 4}: the Toggles merge,
        // so the wide index survives, and saturates.
        let mut bytes = toggle_bytes(&varint((1 << 32) + 5), &[1], &[1]);
        bytes.extend(wrap_toggle(&[0x18, 0x04]));
        let t = toggle_of(decode_client(&bytes).unwrap());
        assert_eq!((t.index, t.checked, t.request_id), (u32::MAX, true, 4));
        // Toggle, then Resync, then Toggle{request_id 4}: the Resync replaced
        // the first Toggle, so the last one starts from defaults.
        let mut bytes = toggle_bytes(&varint((1 << 32) + 5), &[1], &[1]);
        bytes.extend([0x12, 0x00]);
        bytes.extend(wrap_toggle(&[0x18, 0x04]));
        let t = toggle_of(decode_client(&bytes).unwrap());
        assert_eq!(t, toggle_of(ClientMessage::decode(bytes.as_slice()).unwrap()));
        assert_eq!((t.index, t.request_id), (0, 4));
    }

    #[test]
    fn every_variant_decodes_the_same() {
        let all = [
            client_message::Msg::Toggle(Toggle { index: 999_999, checked: true, request_id: 42 }),
            client_message::Msg::Resync(Resync {}),
            client_message::Msg::Subscribe(Subscribe { first: 997_952, count: 2_000 }),
        ];
        for msg in all {
            // Exhaustive: a new member of ClientMessage.msg fails to compile
            // here, a reminder to add it to `WideMsg`.
            match &msg {
                client_message::Msg::Toggle(_)
                | client_message::Msg::Resync(_)
                | client_message::Msg::Subscribe(_) => {}
            }
            let m = ClientMessage { msg: Some(msg) };
            assert_eq!(decode_client(&m.encode_to_vec()).unwrap(), m);
        }
    }

    proptest! {
        #[test]
        fn agrees_with_prost_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let ours = decode_client(&bytes);
            let theirs = ClientMessage::decode(bytes.as_slice());
            prop_assert_eq!(ours.is_ok(), theirs.is_ok());
            if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
                match (ours.msg, theirs.msg) {
                    (Some(client_message::Msg::Toggle(a)), Some(client_message::Msg::Toggle(b))) => {
                        prop_assert_eq!(a.checked, b.checked);
                        // Equal, or saturated where prost truncated.
                        prop_assert!(a.index == b.index || a.index == u32::MAX);
                        prop_assert!(a.request_id == b.request_id || a.request_id == u32::MAX);
                    }
                    (Some(client_message::Msg::Subscribe(a)), Some(client_message::Msg::Subscribe(b))) => {
                        prop_assert!(a.first == b.first || a.first == u32::MAX);
                        prop_assert!(a.count == b.count || a.count == u32::MAX);
                    }
                    (a, b) => prop_assert_eq!(a, b),
                }
            }
        }

        #[test]
        fn any_toggle_round_trips(index: u32, checked: bool, request_id: u32) {
            let m = ClientMessage {
                msg: Some(client_message::Msg::Toggle(Toggle { index, checked, request_id })),
            };
            prop_assert_eq!(decode_client(&m.encode_to_vec()).unwrap(), m);
        }
    }
}
