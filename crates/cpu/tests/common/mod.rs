//! Test inputs: random weights in every encoding, built with `moestream_quant`'s encoders, and their f32
//! reference decode.

use moestream_cpu::WeightView;
use moestream_quant::{Encoding, FloatType, GgmlType, MlxAffine, decode_floats, encode_floats, ggml, mlx};

/// xorshift64*: tests must not depend on a crate whose stream may change.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// An owned weight matrix plus its reference decode.
pub struct Weight {
    pub encoding: Encoding,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    pub scales: Vec<u8>,
    pub biases: Vec<u8>,
    /// `rows × cols` decoded by `moestream_quant`.
    pub dense: Vec<f32>,
    /// `rows × cols` magnitude of the per-group offset each element carries (MLX bias, K-quant / Q*_1 min), 0
    /// for symmetric formats. Kernels fold offsets as `offset·Σx`, so their rounding error scales with it.
    pub offset: Vec<f32>,
}

impl Weight {
    pub fn view(&self) -> WeightView<'_> {
        WeightView {
            encoding: self.encoding,
            rows: self.rows,
            cols: self.cols,
            data: &self.data,
            scales: &self.scales,
            biases: &self.biases,
        }
    }

    /// f64 reference `W·x` and the error scale `Σ_c (|W[r,c]| + |offset[r,c]|)·|x[c]|` per row.
    pub fn reference(&self, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; self.rows];
        let mut scale = vec![0f64; self.rows];
        for r in 0..self.rows {
            let (dense, offset) = (&self.dense[r * self.cols..], &self.offset[r * self.cols..]);
            for ((&w, &o), &xv) in dense.iter().zip(offset).zip(&x[..self.cols]) {
                y[r] += f64::from(w) * f64::from(xv);
                scale[r] += (f64::from(w.abs()) + f64::from(o.abs())) * f64::from(xv.abs());
            }
        }
        (y, scale)
    }
}

fn f16_bits(x: f32) -> [u8; 2] {
    let mut b = [0u8; 2];
    encode_floats(FloatType::F16, &[x], &mut b).expect("one f16");
    b
}

pub fn make_weight(encoding: Encoding, rows: usize, cols: usize, rng: &mut Rng) -> Weight {
    let n = rows * cols;
    let src = rng.vec(n);
    let mut dense = vec![0f32; n];
    let mut offset = vec![0f32; n];
    let mut data: Vec<u8>;
    let (mut scales, mut biases) = (Vec::new(), Vec::new());
    match encoding {
        Encoding::Q4_0x16 | Encoding::Q4Kx16 | Encoding::Q6Kx16 => {
            // The same values as a Q4_0 / Q4_K / Q6_K matrix, regrouped: the reference decode is the row-major one.
            let source = Encoding::Ggml(match encoding {
                Encoding::Q4Kx16 => GgmlType::Q4K,
                Encoding::Q6Kx16 => GgmlType::Q6K,
                _ => GgmlType::Q4_0,
            });
            let mut w = make_weight(source, rows, cols, rng);
            let mut packed = vec![0u8; w.data.len()];
            moestream_quant::packed::pack(source, &w.data, &mut packed, rows, cols).expect("16-row groups");
            (w.encoding, w.data) = (encoding, packed);
            return w;
        }
        Encoding::Float(ft) => {
            data = vec![0u8; n * ft.size()];
            encode_floats(ft, &src, &mut data).expect("encode floats");
            decode_floats(ft, &data, &mut dense).expect("decode floats");
        }
        Encoding::Ggml(t) => {
            let rb = t.row_bytes(cols).expect("cols fit blocks");
            data = vec![0u8; rows * rb];
            if matches!(t, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) {
                // No K-quant encoder exists in Rust: random codes and scales, with sane f16 super-block scales.
                data.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
                for block in data.chunks_exact_mut(t.block_bytes()) {
                    let d = f16_bits(0.002 + 0.01 * rng.f32().abs());
                    if t == GgmlType::Q6K {
                        block[208..210].copy_from_slice(&d);
                    } else {
                        block[0..2].copy_from_slice(&d);
                        block[2..4].copy_from_slice(&f16_bits(0.002 + 0.01 * rng.f32().abs()));
                    }
                }
            } else {
                ggml::quantize(t, &src, &mut data).expect("quantize");
            }
            ggml::dequantize(t, &data, &mut dense).expect("dequantize");
            if matches!(t, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q4_1 | GgmlType::Q5_1) {
                // Zeroing d leaves only the offset term: -dmin·m (K-quants) or m (Q4_1/Q5_1).
                let mut only_offset = data.clone();
                only_offset.chunks_exact_mut(t.block_bytes()).for_each(|b| b[0..2].fill(0));
                ggml::dequantize(t, &only_offset, &mut offset).expect("dequantize offsets");
            }
        }
        Encoding::MlxAffine { params, scale_type } => {
            let groups = n / params.group_size;
            data = vec![0u8; params.packed_bytes(n)];
            let (mut s, mut b) = (vec![0f32; groups], vec![0f32; groups]);
            mlx::quantize(params, &src, cols, &mut data, &mut s, &mut b).expect("mlx quantize");
            scales = vec![0u8; groups * scale_type.size()];
            biases = vec![0u8; groups * scale_type.size()];
            encode_floats(scale_type, &s, &mut scales).expect("scales");
            encode_floats(scale_type, &b, &mut biases).expect("biases");
            // The kernels see the rounded scales, so the reference must too.
            decode_floats(scale_type, &scales, &mut s).expect("scales");
            decode_floats(scale_type, &biases, &mut b).expect("biases");
            mlx::dequantize(params, &data, &s, &b, cols, &mut dense).expect("mlx dequantize");
            for (o, g) in offset.iter_mut().zip((0..n).map(|i| i / params.group_size)) {
                *o = b[g];
            }
        }
    }
    Weight { encoding, rows, cols, data, scales, biases, dense, offset }
}

pub fn mlx(bits: u8, group_size: usize, scale_type: FloatType) -> Encoding {
    Encoding::MlxAffine { params: MlxAffine { bits, group_size }, scale_type }
}

/// Every encoding the kernels accept, with the column counts to test it at: odd float widths, odd block and
/// group counts.
pub fn encodings_and_cols() -> Vec<(Encoding, Vec<usize>)> {
    let mut v = Vec::new();
    for ft in [FloatType::F32, FloatType::F16, FloatType::BF16] {
        v.push((Encoding::Float(ft), vec![1, 7, 33, 100, 256]));
    }
    for t in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::MXFP4] {
        v.push((Encoding::Ggml(t), vec![32, 96, 224, 512]));
    }
    for t in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
        v.push((Encoding::Ggml(t), vec![256, 768]));
    }
    for bits in [2, 4, 8] {
        for gs in [32, 64, 128] {
            for st in [FloatType::BF16, FloatType::F16, FloatType::F32] {
                v.push((mlx(bits, gs, st), vec![gs, 3 * gs]));
            }
        }
    }
    v
}
