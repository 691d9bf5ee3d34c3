//! Bitsets in Redis bit order: box `i` lives in byte `i >> 3` under mask
//! `0x80 >> (i & 7)`, which is `bitvec`'s `Msb0` order over `u8`. The raw bytes
//! of a [`Bits`] are therefore exactly what Redis `GET` returns for a `SETBIT`
//! bitset, and exactly a `Snapshot`'s `checked`/`frozen` payload.

use bitvec::prelude::{BitVec, Msb0};

/// A board-sized bitset in Redis bit order.
pub type Bits = BitVec<u8, Msb0>;

/// Bytes needed for a bitset of `size` boxes: `ceil(size / 8)`.
pub const fn byte_len(size: u32) -> usize {
    (size as usize).div_ceil(8)
}

/// A zeroed bitset of `size` boxes.
pub fn zeroed(size: u32) -> Bits {
    BitVec::repeat(false, size as usize)
}

/// Why bytes could not become a bitset of the expected size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitsError {
    /// The byte length is not `ceil(size / 8)`.
    #[error("bitset has {got} bytes, a board of {size} boxes needs {want}")]
    WrongLength {
        /// Bytes received.
        got: usize,
        /// Bytes required.
        want: usize,
        /// Board size.
        size: u32,
    },
    /// A padding bit past `size` in the last byte is set.
    #[error("bitset has a bit set past the board's size {size}")]
    PaddingSet {
        /// Board size.
        size: u32,
    },
}

/// Builds a bitset of `size` boxes from Redis-order bytes. A shorter input (Redis
/// returns only as many bytes as the highest bit ever set needs) is padded with
/// zeros; a longer one, or set padding bits, is an error: the board never grows.
pub fn from_bytes(bytes: &[u8], size: u32) -> Result<Bits, BitsError> {
    let want = byte_len(size);
    if bytes.len() > want {
        return Err(BitsError::WrongLength { got: bytes.len(), want, size });
    }
    let mut raw = Vec::with_capacity(want);
    raw.extend_from_slice(bytes);
    raw.resize(want, 0);
    let mut bits = BitVec::from_vec(raw);
    if bits[size as usize..].any() {
        return Err(BitsError::PaddingSet { size });
    }
    bits.truncate(size as usize);
    Ok(bits)
}

/// Like [`from_bytes`], but the length must be exactly `ceil(size / 8)` (a Snapshot's rule).
pub fn from_exact_bytes(bytes: &[u8], size: u32) -> Result<Bits, BitsError> {
    let want = byte_len(size);
    if bytes.len() != want {
        return Err(BitsError::WrongLength { got: bytes.len(), want, size });
    }
    from_bytes(bytes, size)
}

/// The Redis-order bytes of a bitset (padding bits zero).
pub fn as_bytes(bits: &Bits) -> &[u8] {
    bits.as_raw_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_bit_order() {
        let mut bits = zeroed(20);
        bits.set(0, true);
        bits.set(9, true);
        bits.set(19, true);
        // Box 0: byte 0 mask 0x80; box 9: byte 1 mask 0x40; box 19: byte 2 mask 0x10.
        assert_eq!(as_bytes(&bits), &[0x80, 0x40, 0x10]);
        assert_eq!(byte_len(1_000_000), 125_000);
        assert_eq!(byte_len(20), 3);
    }

    #[test]
    fn from_bytes_pads_and_refuses_growth() {
        let bits = from_bytes(&[0x80], 20).unwrap();
        assert_eq!(bits.len(), 20);
        assert!(bits[0]);
        assert_eq!(as_bytes(&bits), &[0x80, 0, 0]);
        assert!(matches!(from_bytes(&[0, 0, 0, 0], 20), Err(BitsError::WrongLength { .. })));
        // Bit 20 is past a 20-box board (byte 2, mask 0x08).
        assert_eq!(from_bytes(&[0, 0, 0x08], 20), Err(BitsError::PaddingSet { size: 20 }));
        assert!(from_exact_bytes(&[0x80], 20).is_err());
    }
}
