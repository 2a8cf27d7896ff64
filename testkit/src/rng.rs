// SPDX-License-Identifier: GPL-2.0-or-later

//! The one pseudo-random generator of the tests, benchmarks and fuzz helpers.

/// SplitMix64: small, fast and good enough to drive random operation sequences.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator for the `index`-th sub-stream of `seed`, independent of the others.
    pub fn derive(seed: u64, index: u64) -> Rng {
        let mut rng = Rng(seed ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `0..n` for `n` up to 2^64 (and a little beyond); 0 when `n` is 0.
    pub fn below128(&mut self, n: u128) -> u128 {
        if n <= u128::from(u64::MAX) {
            u128::from(self.below(n as u64))
        } else {
            let wide = (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64());
            wide % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below128(u128::from(hi - lo) + 1) as u64
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// Index chosen with the given weights.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut roll = self.below(total);
        for (index, &weight) in weights.iter().enumerate() {
            if roll < weight {
                return index;
            }
            roll -= weight;
        }
        unreachable!("weights sum to {total}")
    }

    /// A 64-bit word with a random density of set bits (all clear, all set, sparse, dense, or
    /// uniform).
    pub fn word(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => u64::MAX,
            2 => self.next_u64() & self.next_u64() & self.next_u64(),
            3 => self.next_u64() | self.next_u64() | self.next_u64(),
            4 => 1 << self.below(64),
            _ => self.next_u64(),
        }
    }
}
