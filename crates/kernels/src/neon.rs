//! AArch64 NEON kernels, so ternlm runs its ternary format natively on ARM (Graviton, Ampere, Apple silicon under
//! Linux, Raspberry Pi 5). I2_S row dots with the `sdot` instruction where the CPU has the dot-product extension
//! (ARMv8.2+, nearly every core since 2018), and `smull` + pairwise accumulation on plain ARMv8.0. Like the AVX2
//! kernels they compute each row's exact integer sum and share the scalar epilogue, so results equal
//! [`crate::scalar`] bit for bit; every other weight type runs on the scalar reference on ARM.
//!
//! `sdot` is written as inline assembly: its intrinsic (`vdotq_s32`) is still unstable in Rust 1.95. Tests run the
//! kernels under an emulator on x86 CI (`.ci/run` cross-builds the kernel tests for aarch64 when it can).

use crate::scalar::epi_i2s;
use std::arch::aarch64::*;

/// I2_S code → weight code as the scalar reference reads it (0, 1, 2, and the unused 3 as 1, weight 0), indexed by
/// any four bits whose low two are the code: a `tbl` lookup both masks and fixes.
const CODE_TABLE: [u8; 16] = [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1];

/// `acc + Σ` of four-byte products of `a` and `b` per i32 lane (the `sdot` instruction).
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: a register-only instruction; callers enable the `dotprod` feature after detecting it.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// `acc + Σ` of pairwise products of `a` and `b` per i32 lane, without the dot-product extension. Products of a code
/// (0..2) and an int8 fit in int16; the pairwise accumulate widens them to int32.
#[inline(always)]
unsafe fn mul_acc(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    vpadalq_s16(vpadalq_s16(acc, lo), hi)
}

/// The four code planes of 16 bytes of an I2_S block (weights i, 32+i, 64+i, 96+i of byte i).
#[inline(always)]
unsafe fn i2s_planes(q: uint8x16_t, table: uint8x16_t) -> [int8x16_t; 4] {
    let m15 = vdupq_n_u8(15);
    [
        vreinterpretq_s8_u8(vqtbl1q_u8(table, vshrq_n_u8::<6>(q))),
        vreinterpretq_s8_u8(vqtbl1q_u8(table, vshrq_n_u8::<4>(q))),
        vreinterpretq_s8_u8(vqtbl1q_u8(table, vandq_u8(vshrq_n_u8::<2>(q), m15))),
        vreinterpretq_s8_u8(vqtbl1q_u8(table, vandq_u8(q, m15))),
    ]
}

/// Σ code·q over a row of `k` I2_S weights (whole 128-weight blocks) and `k` int8 activations, with `mac` as the
/// multiply-accumulate. Integer sums, so any order gives the scalar reference's value.
#[inline(always)]
unsafe fn i2s_row_isum(
    w: &[u8],
    a: &[u8],
    k: usize,
    mac: impl Fn(int32x4_t, int8x16_t, int8x16_t) -> int32x4_t,
) -> i32 {
    assert!(k.is_multiple_of(128) && w.len() >= k / 4 && a.len() >= k, "I2_S row or activation too short");
    let table = unsafe { vld1q_u8(CODE_TABLE.as_ptr()) };
    let (wp, ap) = (w.as_ptr(), a.as_ptr() as *const i8);
    let mut acc = [vdupq_n_s32(0); 4];
    for b in 0..k / 128 {
        for h in 0..2 {
            // SAFETY: block b reads w[32b..32b+32] and a[128b..128b+128], within the lengths asserted above.
            let planes = i2s_planes(unsafe { vld1q_u8(wp.add(32 * b + 16 * h)) }, table);
            for (g, c) in planes.into_iter().enumerate() {
                let av = unsafe { vld1q_s8(ap.add(128 * b + 32 * g + 16 * h)) };
                acc[g] = mac(acc[g], c, av);
            }
        }
    }
    vaddvq_s32(vaddq_s32(vaddq_s32(acc[0], acc[1]), vaddq_s32(acc[2], acc[3])))
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_i2s_sdot(w: &[u8], a: &[u8], k: usize, scale: f32) -> f32 {
    // Closures inherit the target features of the function that defines them, so `sdot` assembles and inlines.
    let isum = unsafe { i2s_row_isum(w, a, k, |acc, x, y| sdot(acc, x, y)) };
    epi_i2s(a, k, isum, scale)
}

#[target_feature(enable = "neon")]
unsafe fn dot_i2s_neon(w: &[u8], a: &[u8], k: usize, scale: f32) -> f32 {
    let isum = unsafe { i2s_row_isum(w, a, k, |acc, x, y| mul_acc(acc, x, y)) };
    epi_i2s(a, k, isum, scale)
}

fn f_sdot(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
    // SAFETY: handed out by `i2s_row_dot` only after the dot-product extension was detected.
    unsafe { dot_i2s_sdot(w, a, k, s) }
}

fn f_neon(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
    // SAFETY: NEON is part of every AArch64 CPU.
    unsafe { dot_i2s_neon(w, a, k, s) }
}

/// The best I2_S row dot on this CPU: `sdot` where the dot-product extension exists, else `smull`.
pub(crate) fn i2s_row_dot() -> crate::dot::RowDot {
    if std::arch::is_aarch64_feature_detected!("dotprod") {
        f_sdot
    } else {
        f_neon
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::{ActType, QuantizedActs};
    use crate::quant::quantize_i2s;
    use crate::scalar::dot_row;
    use crate::GgmlType;

    /// Both kernels equal the scalar reference bit for bit: random rows, rows with the unused code 3, and
    /// activations at the int8 extremes (sums far past int16).
    #[test]
    fn neon_i2s_kernels_equal_scalar() {
        let mut rnd = crate::xorshift32(0x2545_f491);
        let have_sdot = std::arch::is_aarch64_feature_detected!("dotprod");
        for k in [128usize, 256, 640, 2560, 6912] {
            for case in 0..3 {
                let w: Vec<f32> = (0..k).map(|_| (rnd() % 3) as f32 - 1.0).collect();
                let mut packed = quantize_i2s(&w);
                if case == 1 {
                    // Code 3 (weight 0 to every reader) in a few places.
                    for i in (0..k / 4).step_by(7) {
                        packed[i] |= 0b11 << (2 * (rnd() % 4));
                    }
                }
                let x: Vec<f32> = (0..k)
                    .map(|i| {
                        if case == 2 {
                            if i % 2 == 0 {
                                1.0
                            } else {
                                -1.0
                            }
                        } else {
                            (rnd() % 2001) as f32 - 1000.0
                        }
                    })
                    .collect();
                let q = QuantizedActs::quantize(ActType::I8PerToken, &x, k);
                let scale = crate::scalar::i2s_tensor_scale(&packed);
                // The packed tensor ends with its 32-byte scale tail; a row is the k/4 bytes before it.
                let row = &packed[..k / 4];
                let want = dot_row(GgmlType::I2_S, row, q.row(0), k, scale).unwrap();
                let got = f_neon(row, q.row(0), k, scale);
                assert_eq!(got.to_bits(), want.to_bits(), "smull k={k} case={case}: {got} vs {want}");
                if have_sdot {
                    let got = f_sdot(row, q.row(0), k, scale);
                    assert_eq!(got.to_bits(), want.to_bits(), "sdot k={k} case={case}: {got} vs {want}");
                }
            }
        }
        assert!(have_sdot || std::env::var("TERNLM_EXPECT_SDOT").is_err(), "this CPU (or emulator) lacks dotprod");
    }
}
