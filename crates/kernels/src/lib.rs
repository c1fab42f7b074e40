//! Numeric kernels: quantized block formats, activation quantizers, dequantize-and-dot for every supported GGML
//! type, and threaded matrix-vector / matrix-matrix products.
//!
//! Layout of the code:
//! - [`scalar`]: the reference implementation of every block format (dequantize, integer block dots). It is the
//!   definition of correctness; SIMD paths must match it (bit-exactly where the math is integer).
//! - [`act`]: quantization of activations into the type each weight format is dotted with (ggml's `vec_dot_type`).
//! - `avx2`: x86-64 AVX2 paths, chosen at run time.
//! - [`matmul`]: `QMatrix` (a weight matrix in any format) times a batch of activation rows, on a [`pool::ThreadPool`].

pub mod act;
pub mod attn;
#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod dot;
pub mod matmul;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod pool;
pub mod quant;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod vnni;

pub use act::{ActType, QuantizedActs};
pub use dot::{Backend, Kernels};
pub use matmul::QMatrix;
pub use pool::{Disjoint, ThreadPool};
pub use ternlm_gguf::GgmlType;

/// Little-endian f16 at `b[i..i+2]`.
#[inline(always)]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[inline(always)]
pub fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Error for a weight type that ternlm can read but has no kernel for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedType(pub GgmlType);

impl std::fmt::Display for UnsupportedType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tensor type {} has no compute kernel in ternlm (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, TQ1_0, TQ2_0, I2_S)", self.0)
    }
}
impl std::error::Error for UnsupportedType {}

/// Wrapping sum of `s`: the memory-bandwidth probe's reader (`ternlm bench`). On AVX2 it reads 128 bytes per step
/// with four vector loads, which measured ~8% more bandwidth than the compiler's code for the plain loop here
/// (22.4–24.7 vs 20.2–22.7 GB/s, medians of 20 alternating passes over 256 MiB, two threads), so the roofline the
/// bench reports is the stricter one. Software prefetching made it slower.
pub fn sum_u64(s: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if Backend::detect() == Backend::Avx2 {
        // SAFETY: AVX2 was detected just above.
        return unsafe { avx2::sum_u64_avx2(s) };
    }
    s.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// The unit tests' deterministic number stream: xorshift32 from `seed` (non-zero).
#[cfg(test)]
pub(crate) fn xorshift32(mut seed: u32) -> impl FnMut() -> u32 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    }
}

#[cfg(test)]
mod sum_tests {
    #[test]
    fn sum_u64_equals_the_plain_sum() {
        for n in [0usize, 1, 15, 16, 17, 1000, 4099] {
            let v: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
            assert_eq!(super::sum_u64(&v), v.iter().fold(0u64, |a, &b| a.wrapping_add(b)), "n={n}");
        }
    }
}
