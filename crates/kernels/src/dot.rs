//! Run-time choice of kernel backend: AVX2 where the CPU has it, the scalar reference elsewhere.

use crate::{scalar, ActType, GgmlType, UnsupportedType};

/// A row dot: weight row bytes, activation row bytes (in the weight type's [`ActType`]), row length, and the
/// per-tensor scale (used by I2_S only).
pub type RowDot = fn(&[u8], &[u8], usize, f32) -> f32;

/// One weight row against four activation rows at once (same results as four [`RowDot`] calls).
pub type RowDot4 = fn(&[u8], [&[u8]; 4], usize, f32) -> [f32; 4];

/// Four consecutive weight rows (the first at the slice's start, `row_bytes` apart) against one activation row
/// (same results as four [`RowDot`] calls).
pub type RowsDot4 = fn(&[u8], usize, &[u8], usize, f32) -> [f32; 4];

/// An even number of consecutive weight rows (`row_bytes` apart), taken two at a time, against four activation rows:
/// `out[r][j]` = row r · token j for r < `out.len()` (same results as [`RowDot`] calls).
pub type RowsDot2x4 = fn(&[u8], usize, [&[u8]; 4], usize, f32, &mut [[f32; 4]]);

/// A per-block integer kernel: (weight block, activation block) → (main sum, secondary sum such as Σ min·bsum).
pub type BlockIsum = fn(&[u8], &[u8]) -> (i32, i32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Scalar,
    /// x86-64 with AVX2, FMA and F16C: every integer format has a SIMD kernel.
    Avx2,
    /// AArch64: I2_S has a NEON kernel (`sdot` where available); other formats run on the scalar reference.
    Neon,
}

impl Backend {
    /// The best backend this CPU supports (`TERNLM_BACKEND=scalar` forces the reference).
    pub fn detect() -> Backend {
        if std::env::var("TERNLM_BACKEND").is_ok_and(|v| v == "scalar") {
            return Backend::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            return Backend::Avx2;
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Backend::Neon;
        }
        Backend::Scalar
    }
}

/// The dot kernel for one weight type on one backend.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    pub ty: GgmlType,
    pub act: ActType,
    pub backend: Backend,
    pub dot: RowDot,
    /// Multi-token kernel for batched products, where one exists.
    pub dot4: Option<RowDot4>,
    /// Single-token kernel over four rows at once (decode), where one exists.
    pub rows4: Option<RowsDot4>,
    /// Two rows × four tokens (prompts), where one exists; preferred over `dot4`.
    pub tile2x4: Option<RowsDot2x4>,
}

impl Kernels {
    pub fn new(ty: GgmlType, backend: Backend) -> Result<Kernels, UnsupportedType> {
        let act = ActType::for_weight(ty).ok_or(UnsupportedType(ty))?;
        let (dot, dot4) = match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => (crate::avx2::row_dot(ty).unwrap_or(scalar_dot(ty)?), crate::avx2::row_dot4(ty)),
            #[cfg(target_arch = "aarch64")]
            Backend::Neon if ty == GgmlType::I2_S => (crate::neon::i2s_row_dot(), None),
            _ => (scalar_dot(ty)?, None),
        };
        // Four rows per call only for the compute-bound ternary types. Q6_K has a four-row kernel in its history
        // (90487c6, faster in cache), but streamed from DRAM it read 11–16% slower than the one-row kernel
        // (a 2B4T-sized Q6_K head, 2 threads, medians of 30 alternating passes in one process: 22.3–26.3 vs
        // 25.7–29.1 GB/s, probe 24–30), and a head is always streamed.
        let rows4 = match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => crate::avx2::tq_rows4(ty),
            _ => None,
        };
        Ok(Kernels { ty, act, backend, dot, dot4, rows4, tile2x4: None })
    }

    /// F16 weights dotted with f32 activations (bitnet.cpp's choice for its F16 output head), instead of ggml's
    /// default of converting the activations to f16.
    pub fn f16_with_f32_acts(backend: Backend) -> Kernels {
        fn scalar(w: &[u8], a: &[u8], k: usize, _s: f32) -> f32 {
            (0..k).map(|i| crate::f16_at(w, 2 * i) * crate::f32_at(a, 4 * i)).fold(0f32, |s, v| s + v)
        }
        let dot: RowDot = match backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => crate::avx2::f16_f32_row_dot(),
            _ => scalar,
        };
        Kernels { ty: GgmlType::F16, act: ActType::F32, backend, dot, dot4: None, rows4: None, tile2x4: None }
    }

    /// TQ1_0 / TQ2_0 with BitNet's per-token int8 activations (the default for TQ types is llama.cpp's per-block
    /// Q8_K, which is what llama.cpp and bitnet.cpp compute).
    pub fn tq_per_token(ty: GgmlType, backend: Backend) -> Result<Kernels, UnsupportedType> {
        fn s1(w: &[u8], a: &[u8], k: usize, _s: f32) -> f32 {
            scalar::dot_row_tq_per_token(GgmlType::TQ1_0, w, a, k)
        }
        fn s2(w: &[u8], a: &[u8], k: usize, _s: f32) -> f32 {
            scalar::dot_row_tq_per_token(GgmlType::TQ2_0, w, a, k)
        }
        let scalar_fn: RowDot = match ty {
            GgmlType::TQ1_0 => s1,
            GgmlType::TQ2_0 => s2,
            other => return Err(UnsupportedType(other)),
        };
        let (dot, dot4) = match backend {
            #[cfg(target_arch = "x86_64")]
            // The four-token kernel pays for TQ1_0, whose trits are dear to decode; for TQ2_0 (shifts and masks)
            // it measured slower than four single-token calls (2,650 vs 2,890 tok/s, pp128 in the kernel bench).
            Backend::Avx2 => (
                crate::avx2::tq_per_token_row_dot(ty),
                (ty == GgmlType::TQ1_0).then(crate::avx2::tq1_0_per_token_row_dot4),
            ),
            _ => (scalar_fn, None),
        };
        Ok(Kernels { ty, act: ActType::I8PerToken, backend, dot, dot4, rows4: None, tile2x4: None })
    }
}

fn scalar_dot(ty: GgmlType) -> Result<RowDot, UnsupportedType> {
    macro_rules! f {
        ($t:ident) => {{
            fn f(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
                scalar::dot_row(GgmlType::$t, w, a, k, s).expect("type checked at selection")
            }
            f as RowDot
        }};
    }
    use GgmlType::*;
    Ok(match ty {
        F32 => f!(F32),
        F16 => f!(F16),
        BF16 => f!(BF16),
        Q4_0 => f!(Q4_0),
        Q4_1 => f!(Q4_1),
        Q5_0 => f!(Q5_0),
        Q5_1 => f!(Q5_1),
        Q8_0 => f!(Q8_0),
        Q4_K => f!(Q4_K),
        Q5_K => f!(Q5_K),
        Q6_K => f!(Q6_K),
        TQ1_0 => f!(TQ1_0),
        TQ2_0 => f!(TQ2_0),
        I2_S => f!(I2_S),
        other => return Err(UnsupportedType(other)),
    })
}

/// AVX2 per-block integer sums, for tests that hold them equal to the scalar ones. `None` without AVX2.
#[doc(hidden)]
pub fn simd_block_isum(ty: GgmlType) -> Option<BlockIsum> {
    #[cfg(target_arch = "x86_64")]
    if Backend::detect() == Backend::Avx2 {
        return crate::avx2::block_isum(ty);
    }
    let _ = ty;
    None
}
