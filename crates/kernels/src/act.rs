//! Activation quantization: each weight type is dotted with activations in a matching format, as ggml does
//! (`vec_dot_type`), so that results agree with llama.cpp and the inner loops are integer.

use crate::GgmlType;
use half::{bf16, f16};

/// The format activations are converted to before a dot with a given weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ActType {
    F32,
    F16,
    BF16,
    /// 32-blocks: f16 d, 32 × i8.
    Q8_0,
    /// 32-blocks: f16 d, f16 s = d·Σq, 32 × i8.
    Q8_1,
    /// 256-blocks: f32 d, 256 × i8, 16 × i16 sums of 16.
    Q8_K,
    /// BitNet per-token int8: K × i8, then f32 scale s (x ≈ q/s) and i32 Σq.
    I8PerToken,
}

impl ActType {
    pub fn for_weight(ty: GgmlType) -> Option<ActType> {
        use GgmlType::*;
        Some(match ty {
            F32 => ActType::F32,
            F16 => ActType::F16,
            BF16 => ActType::BF16,
            Q4_0 | Q5_0 | Q8_0 => ActType::Q8_0,
            Q4_1 | Q5_1 => ActType::Q8_1,
            Q4_K | Q5_K | Q6_K | TQ1_0 | TQ2_0 => ActType::Q8_K,
            I2_S => ActType::I8PerToken,
            _ => return None,
        })
    }

    /// Required multiple of the row length.
    pub fn block(self) -> usize {
        match self {
            ActType::Q8_0 | ActType::Q8_1 => 32,
            ActType::Q8_K => 256,
            _ => 1,
        }
    }

    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            ActType::F32 => 4 * k,
            ActType::F16 | ActType::BF16 => 2 * k,
            ActType::Q8_0 => k / 32 * 34,
            ActType::Q8_1 => k / 32 * 36,
            ActType::Q8_K => k / 256 * 292,
            ActType::I8PerToken => k + 8,
        }
    }
}

/// A batch of activation rows in one [`ActType`], rows contiguous.
#[derive(Clone, Debug)]
pub struct QuantizedActs {
    pub ty: ActType,
    pub k: usize,
    pub n_rows: usize,
    pub data: Vec<u8>,
}

impl QuantizedActs {
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.k)
    }
    pub fn row(&self, i: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[i * rb..(i + 1) * rb]
    }

    /// Quantizes `n_rows` rows of length `k` from `x` (row-major).
    pub fn quantize(ty: ActType, x: &[f32], k: usize) -> QuantizedActs {
        assert!(k.is_multiple_of(ty.block()) && x.len().is_multiple_of(k), "activation rows of {k} do not fit {ty:?}");
        let n_rows = x.len() / k;
        let rb = ty.row_bytes(k);
        let mut data = vec![0u8; rb * n_rows];
        for (src, dst) in x.chunks_exact(k).zip(data.chunks_exact_mut(rb)) {
            quantize_row(ty, src, dst);
        }
        QuantizedActs { ty, k, n_rows, data }
    }
}

/// Round half to even, as `_mm256_round_ps(_MM_ROUND_NEAREST)` and ggml's `nearest_int` do.
///
/// `f32::round_ties_even` is a libm call (`rintf`) on baseline x86-64, which showed up at ~4% of a batched decode
/// profile. For |x| < 2^23, |x| + 2^23 lies in [2^23, 2^24) where f32 spacing is 1, so adding and subtracting
/// 2^23 rounds |x| to an integer in the default rounding mode (half to even) without a call; larger magnitudes
/// are integers already. The sign is restored so -0.3 gives -0.0 as `rintf` does.
#[inline(always)]
pub fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 8_388_608.0; // 2^23
    if x.abs() < MAGIC {
        ((x.abs() + MAGIC) - MAGIC).copysign(x)
    } else {
        x
    }
}

pub fn quantize_row(ty: ActType, x: &[f32], out: &mut [u8]) {
    match ty {
        ActType::F32 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        ActType::F16 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        ActType::BF16 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        ActType::Q8_0 | ActType::Q8_1 => {
            let with_sum = ty == ActType::Q8_1;
            let bb = if with_sum { 36 } else { 34 };
            for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(bb)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                ob[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                let q0 = if with_sum { 4 } else { 2 };
                let mut sum = 0i32;
                for (j, v) in xb.iter().enumerate() {
                    let q = round_even(v * id) as i32;
                    sum += q;
                    ob[q0 + j] = q as i8 as u8;
                }
                if with_sum {
                    ob[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
                }
            }
        }
        ActType::Q8_K => {
            for (xb, ob) in x.chunks_exact(256).zip(out.chunks_exact_mut(292)) {
                // ggml's quantize_row_q8_K: the signed value of largest magnitude maps to -127.
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in xb {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    ob.fill(0);
                    continue;
                }
                let iscale = -127.0 / max;
                for (j, &v) in xb.iter().enumerate() {
                    let q = (round_even(iscale * v) as i32).min(127);
                    ob[4 + j] = q as i8 as u8;
                }
                for s in 0..16 {
                    let sum: i32 = (0..16).map(|j| ob[4 + s * 16 + j] as i8 as i32).sum();
                    ob[260 + 2 * s..262 + 2 * s].copy_from_slice(&(sum as i16).to_le_bytes());
                }
                ob[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
            }
        }
        ActType::I8PerToken => {
            #[cfg(target_arch = "x86_64")]
            if simd_available() {
                // SAFETY: AVX2, FMA and F16C were detected.
                return unsafe { crate::avx2::quantize_i8_per_token(x, out) };
            }
            quantize_i8_per_token_scalar(x, out)
        }
    }
}

/// Whether the AVX2 quantizer may run (decided once: `Backend::detect` reads the environment).
#[cfg(target_arch = "x86_64")]
fn simd_available() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| crate::Backend::detect() == crate::Backend::Avx2)
}

/// The reference for BitNet's per-token int8 activations: s = 127 / max|x|, q = round_half_even(x·s) clamped to
/// [-128, 127]; the row is followed by s (f32) and Σq (i32).
pub fn quantize_i8_per_token_scalar(x: &[f32], out: &mut [u8]) {
    let k = x.len();
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = 127.0 / amax.max(1e-5);
    let mut sum = 0i32;
    for (j, v) in x.iter().enumerate() {
        let q = round_even(v * s).clamp(-128.0, 127.0) as i32;
        sum += q;
        out[j] = q as i8 as u8;
    }
    out[k..k + 4].copy_from_slice(&s.to_le_bytes());
    out[k + 4..k + 8].copy_from_slice(&sum.to_le_bytes());
}

#[cfg(test)]
mod round_tests {
    #[test]
    fn round_even_equals_rintf() {
        let mut vals = vec![
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            127.5,
            -127.5,
            128.49999,
            4_194_303.5,
            8_388_607.5,
            8_388_606.5,
        ];
        vals.extend([
            4_194_304.0,
            8_388_608.0,
            16_777_217.0,
            1e10,
            -1e10,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
        ]);
        let mut rnd = crate::xorshift32(0x1234_5678);
        for _ in 0..200_000 {
            let state = rnd();
            vals.push(f32::from_bits(state) % 1000.0);
            vals.push((state % 100_000) as f32 / 200.0 - 250.0);
        }
        for v in vals {
            let (a, b) = (super::round_even(v), v.round_ties_even());
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{v}: {a} vs {b}");
        }
    }
}

#[cfg(test)]
mod i8_per_token_tests {
    /// The AVX2 quantizer writes the scalar reference's bytes: random rows of several lengths (tails included), ties
    /// at x·s = n + 0.5, an all-zero row, a row with one huge value and denormals, and values that clamp to -128.
    #[test]
    fn simd_equals_scalar() {
        let mut rnd = crate::xorshift32(0x9e37_79b9);
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for k in [1usize, 7, 31, 32, 33, 96, 2560, 6912] {
            rows.push((0..k).map(|_| (rnd() % 200_001) as f32 / 1000.0 - 100.0).collect());
        }
        // amax 127 gives s = 1, so halves are exact ties for the rounding.
        rows.push((0..64).map(|i| if i == 0 { 127.0 } else { (i as f32 - 32.0) + 0.5 }).collect());
        rows.push(vec![0.0; 64]);
        rows.push((0..64).map(|i| if i == 5 { 3e38 } else { f32::MIN_POSITIVE * i as f32 }).collect());
        // -amax·s rounds to -127; values a hair beyond amax cannot occur, so -128 needs amax from a positive value.
        rows.push((0..40).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 - f32::EPSILON }).collect());
        for x in rows {
            let k = x.len();
            let (mut a, mut b) = (vec![0u8; k + 8], vec![0u8; k + 8]);
            super::quantize_i8_per_token_scalar(&x, &mut a);
            super::quantize_row(super::ActType::I8PerToken, &x, &mut b);
            assert_eq!(a, b, "row of {k}");
        }
    }
}
