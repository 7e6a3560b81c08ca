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
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512dq") {
            // SAFETY: the CPU has AVX-512 DQ (checked just above).
            unsafe { fill_pairs_avx512(self.0, out, a) };
        } else {
            fill_pairs(self.0, out, a);
        }
        #[cfg(not(target_arch = "x86_64"))]
        fill_pairs(self.0, out, a);
        let pairs = (out.len() / 2) as u64;
        self.0 = self.0.wrapping_add(pairs.wrapping_mul(GAMMA));
        let tail = out.len() / 2 * 2;
        for x in &mut out[tail..] {
            let r = self.next_u64();
            *x = (((r >> 40) as i32) as f32 * SCALE - 1.0) * a;
        }
    }
}

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
const SCALE: f32 = 1.0 / (1u32 << 23) as f32;

/// Draw k is the mix of `base + (k+1)·γ`: computing each from k instead of from the previous state breaks the
/// serial dependency, so draws vectorise. The values are exactly those of successive `next_u64` calls.
#[inline(always)]
fn fill_pairs(base: u64, out: &mut [f32], a: f32) {
    for (k, pair) in out.chunks_exact_mut(2).enumerate() {
        let r = mix(base.wrapping_add((k as u64 + 1).wrapping_mul(GAMMA)));
        // Through i32: both values are below 2^24, and baseline x86-64 has no unsigned-to-float conversion.
        pair[0] = (((r >> 40) as i32) as f32 * SCALE - 1.0) * a;
        pair[1] = ((((r >> 8) & 0xff_ffff) as i32) as f32 * SCALE - 1.0) * a;
    }
}

/// The same loop compiled with 64-bit vector multiplies (baseline x86-64 emulates them with three 32-bit ones).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn fill_pairs_avx512(base: u64, out: &mut [f32], a: f32) {
    fill_pairs(base, out, a)
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
