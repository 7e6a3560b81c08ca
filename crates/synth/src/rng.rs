//! A small, fixed pseudo-random generator (SplitMix64).
//!
//! Written here rather than taken from `rand` because synthetic models must stay byte-identical across crate
//! upgrades: fixtures, benchmarks and cross-format tests depend on `--seed N` meaning the same weights forever.
//! Each tensor (and each expert of a stack) gets its own stream, keyed by name, so a tensor's values do not
//! depend on the file format or on the order tensors are written: `hf-f32` and `gguf-q8_0` of one seed hold
//! the same underlying weights.

pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A stream for `name` (and `expert`) under the model seed.
    pub fn for_tensor(seed: u64, name: &str, expert: usize) -> Self {
        // FNV-1a over the name, mixed with the seed and expert through SplitMix's own finaliser.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut s = SplitMix64(seed ^ h.rotate_left(17) ^ (expert as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        s.next_u64();
        s
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Fill with uniform values in [-a, a). Two values per draw: 24 bits of mantissa each.
    pub fn fill_uniform(&mut self, out: &mut [f32], a: f32) {
        const SCALE: f32 = 1.0 / (1u32 << 23) as f32;
        const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
        // Draw k is the mix of `state + (k+1)·γ`: computing each from k instead of from the previous state breaks
        // the serial dependency, so draws overlap in the pipeline. The values are the same as `next_u64` gives.
        let base = self.0;
        let mut chunks = out.chunks_exact_mut(2);
        let mut k = 0u64;
        for pair in &mut chunks {
            k += 1;
            let r = mix(base.wrapping_add(k.wrapping_mul(GAMMA)));
            // Through i32: both values are below 2^24, and baseline x86-64 has no unsigned-to-float conversion.
            pair[0] = (((r >> 40) as i32) as f32 * SCALE - 1.0) * a;
            pair[1] = ((((r >> 8) & 0xff_ffff) as i32) as f32 * SCALE - 1.0) * a;
        }
        self.0 = base.wrapping_add(k.wrapping_mul(GAMMA));
        for x in chunks.into_remainder() {
            let r = self.next_u64();
            *x = (((r >> 40) as u32) as f32 * SCALE - 1.0) * a;
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let mut a = vec![0f32; 9];
        let mut b = vec![0f32; 9];
        SplitMix64::for_tensor(7, "blk.0.attn_q.weight", 0).fill_uniform(&mut a, 1.0);
        SplitMix64::for_tensor(7, "blk.0.attn_q.weight", 0).fill_uniform(&mut b, 1.0);
        assert_eq!(a, b);
        SplitMix64::for_tensor(7, "blk.0.attn_k.weight", 0).fill_uniform(&mut b, 1.0);
        assert_ne!(a, b);
        SplitMix64::for_tensor(8, "blk.0.attn_q.weight", 0).fill_uniform(&mut b, 1.0);
        assert_ne!(a, b);
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
        // Known first value pins the stream across refactors: fixtures depend on it.
        let mut one = [0f32; 1];
        SplitMix64::new(0).fill_uniform(&mut one, 1.0);
        let mut r = SplitMix64::new(0);
        let expect = ((r.next_u64() >> 40) as u32) as f32 / (1u32 << 23) as f32 - 1.0;
        assert_eq!(one[0], expect);
        // The batched fill draws exactly what sequential next_u64 calls draw (odd length: remainder path too).
        let mut fast = vec![0f32; 11];
        SplitMix64::new(99).fill_uniform(&mut fast, 2.0);
        let mut r = SplitMix64::new(99);
        for pair in fast.chunks(2) {
            let v = r.next_u64();
            assert_eq!(pair[0], (((v >> 40) as u32) as f32 / (1u32 << 23) as f32 - 1.0) * 2.0);
            if pair.len() == 2 {
                assert_eq!(pair[1], ((((v >> 8) & 0xff_ffff) as u32) as f32 / (1u32 << 23) as f32 - 1.0) * 2.0);
            }
        }
    }
}
