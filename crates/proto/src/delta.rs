//! Delta coding of strictly ascending index lists (PROTOCOL.md, "Index lists in a
//! Batch are delta-coded"): the first value is the index itself, each next value
//! the difference to the previous index, so every later value is at least 1.

/// Why a delta-coded list was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A difference after the first value was 0: the list was not strictly ascending.
    #[error("delta list entry {position} is 0: indices must be strictly ascending")]
    NotAscending {
        /// Position of the offending entry.
        position: usize,
    },
    /// The running sum passed `u32::MAX`.
    #[error("delta list overflows u32 at entry {position}")]
    Overflow {
        /// Position of the offending entry.
        position: usize,
    },
}

/// Appends the delta coding of `sorted` (strictly ascending) to `out`.
///
/// # Panics
/// In debug builds, when `sorted` is not strictly ascending.
pub fn encode_into(sorted: &[u32], out: &mut Vec<u32>) {
    out.reserve(sorted.len());
    let mut prev = 0u32;
    for (i, &index) in sorted.iter().enumerate() {
        debug_assert!(i == 0 || index > prev, "delta::encode_into needs ascending input");
        out.push(index - prev);
        prev = index;
    }
}

/// The delta coding of `sorted` (strictly ascending).
pub fn encode(sorted: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(sorted.len());
    encode_into(sorted, &mut out);
    out
}

/// Iterates the absolute indices of a delta-coded list, failing on the first bad entry.
pub fn decode_iter(deltas: &[u32]) -> impl Iterator<Item = Result<u32, DeltaError>> + '_ {
    let mut prev: Option<u32> = None;
    deltas.iter().enumerate().map(move |(position, &d)| {
        let index = match prev {
            None => d,
            Some(_) if d == 0 => return Err(DeltaError::NotAscending { position }),
            Some(p) => p.checked_add(d).ok_or(DeltaError::Overflow { position })?,
        };
        prev = Some(index);
        Ok(index)
    })
}

/// Decodes a delta-coded list into absolute, strictly ascending indices.
pub fn decode(deltas: &[u32]) -> Result<Vec<u32>, DeltaError> {
    decode_iter(deltas).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(encode(&[3, 4, 10, 999_999]), vec![3, 1, 6, 999_989]);
        assert_eq!(decode(&[3, 1, 6, 999_989]).unwrap(), vec![3, 4, 10, 999_999]);
        assert_eq!(encode(&[]), Vec::<u32>::new());
        assert_eq!(decode(&[0, 1]).unwrap(), vec![0, 1]);
    }

    #[test]
    fn rejects_zero_delta_and_overflow() {
        assert_eq!(decode(&[5, 0]), Err(DeltaError::NotAscending { position: 1 }));
        assert_eq!(decode(&[u32::MAX, 1]), Err(DeltaError::Overflow { position: 1 }));
    }

    proptest! {
        #[test]
        fn round_trip(set in proptest::collection::btree_set(any::<u32>(), 0..500)) {
            let sorted: Vec<u32> = set.into_iter().collect();
            let coded = encode(&sorted);
            prop_assert!(coded.iter().skip(1).all(|&d| d >= 1));
            prop_assert_eq!(decode(&coded).unwrap(), sorted);
        }
    }
}
