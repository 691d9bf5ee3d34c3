//! A tiny deterministic generator (xorshift64) for benches, examples, tests
//! and the load generator: reproducible runs from a seed. Not for anything
//! that needs unpredictability.

/// xorshift64: fast, full period over non-zero states.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator from `seed` (0 is replaced, it is a fixed point).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
