//! I2_S kernels for CPUs with AVX-VNNI (256-bit) or AVX-512 VNNI: `vpdpbusd` multiplies unsigned 2-bit codes by
//! signed int8 activations and adds each group of four straight into int32 lanes, with no int16 stage.
//!
//! Neither instruction set exists on the machines that build and test ternlm, so the kernel is written once, over
//! the small [`Lanes`] trait, and instantiated three ways: with the real AVX-VNNI and AVX-512 VNNI instructions
//! (chosen by runtime detection), and with [`Emu32`] / [`Emu64`], byte-exact emulations of the same instructions
//! that the tests run on every shape against the scalar reference. Only the one-line trait methods differ between
//! the real and emulated instances.

use crate::scalar::{epi_i2s, isum_i2s};

/// The vector operations the kernel needs. `BLOCKS` I2_S blocks (32 packed bytes each) fit one vector.
pub(crate) trait Lanes: Copy {
    const BLOCKS: usize;
    /// Packed bytes of `BLOCKS` consecutive blocks.
    unsafe fn load_weights(w: &[u8]) -> Self;
    /// Activations of code plane `g` (weights 32g..32g+32) of `BLOCKS` consecutive blocks starting at `a`.
    unsafe fn load_acts(a: &[u8], g: usize) -> Self;
    unsafe fn zero() -> Self;
    /// `(x >> shift) & 3` in every byte.
    unsafe fn codes(self, shift: u32) -> Self;
    /// `vpdpbusd`: each i32 lane += Σ of four (unsigned byte of `u`) × (signed byte of `s`).
    unsafe fn dpbusd(acc: Self, u: Self, s: Self) -> Self;
    unsafe fn hsum(self) -> i32;
}

/// Row dot for I2_S tensors without code 3 (the caller checks at load, as for the AVX2 clean kernel).
#[inline(always)]
pub(crate) unsafe fn i2s_dot<L: Lanes>(w: &[u8], a: &[u8], k: usize, scale: f32) -> f32 {
    let nb = k / 128;
    let mut acc = L::zero();
    let mut b = 0;
    while b + L::BLOCKS <= nb {
        let q = L::load_weights(&w[32 * b..]);
        for (g, shift) in [6u32, 4, 2, 0].into_iter().enumerate() {
            acc = L::dpbusd(acc, q.codes(shift), L::load_acts(&a[128 * b..], g));
        }
        b += L::BLOCKS;
    }
    let mut sum = acc.hsum();
    for b in b..nb {
        sum += isum_i2s(&w[32 * b..], &a[128 * b..]);
    }
    epi_i2s(a, k, sum, scale)
}

/// Four-token twin of [`i2s_dot`] for prompts: each block's codes are extracted once and multiplied into four
/// activation rows. Per token, the same exact integer sum and the shared epilogue, so the same bits.
#[inline(always)]
pub(crate) unsafe fn i2s_dot4<L: Lanes>(w: &[u8], a: [&[u8]; 4], k: usize, scale: f32) -> [f32; 4] {
    let nb = k / 128;
    let mut acc = [L::zero(); 4];
    let mut b = 0;
    while b + L::BLOCKS <= nb {
        let q = L::load_weights(&w[32 * b..]);
        for (g, shift) in [6u32, 4, 2, 0].into_iter().enumerate() {
            let c = q.codes(shift);
            for (acc, a) in acc.iter_mut().zip(a) {
                *acc = L::dpbusd(*acc, c, L::load_acts(&a[128 * b..], g));
            }
        }
        b += L::BLOCKS;
    }
    let mut out = [0f32; 4];
    for ((out, acc), a) in out.iter_mut().zip(acc).zip(a) {
        let mut sum = acc.hsum();
        for b in b..nb {
            sum += isum_i2s(&w[32 * b..], &a[128 * b..]);
        }
        *out = epi_i2s(a, k, sum, scale);
    }
    out
}

/// Byte-exact emulation of a 256-bit register (one I2_S block per vector).
#[cfg(test)]
#[derive(Clone, Copy)]
pub(crate) struct Emu32([u8; 32]);
/// Byte-exact emulation of a 512-bit register (two I2_S blocks per vector).
#[cfg(test)]
#[derive(Clone, Copy)]
pub(crate) struct Emu64([u8; 64]);

#[cfg(test)]
macro_rules! emu_impl {
    ($t:ident, $n:expr, $blocks:expr) => {
        impl Lanes for $t {
            const BLOCKS: usize = $blocks;
            unsafe fn load_weights(w: &[u8]) -> Self {
                $t(w[..$n].try_into().expect("length"))
            }
            unsafe fn load_acts(a: &[u8], g: usize) -> Self {
                let mut v = [0u8; $n];
                for blk in 0..$blocks {
                    v[32 * blk..32 * blk + 32].copy_from_slice(&a[128 * blk + 32 * g..128 * blk + 32 * g + 32]);
                }
                $t(v)
            }
            unsafe fn zero() -> Self {
                $t([0; $n])
            }
            unsafe fn codes(self, shift: u32) -> Self {
                $t(self.0.map(|b| (b >> shift) & 3))
            }
            unsafe fn dpbusd(acc: Self, u: Self, s: Self) -> Self {
                let mut out = acc.0;
                for lane in 0..$n / 4 {
                    let mut x = i32::from_le_bytes(acc.0[4 * lane..4 * lane + 4].try_into().expect("4"));
                    for j in 4 * lane..4 * lane + 4 {
                        x = x.wrapping_add(u.0[j] as i32 * s.0[j] as i8 as i32);
                    }
                    out[4 * lane..4 * lane + 4].copy_from_slice(&x.to_le_bytes());
                }
                $t(out)
            }
            unsafe fn hsum(self) -> i32 {
                self.0.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4"))).fold(0, i32::wrapping_add)
            }
        }
    };
}
#[cfg(test)]
emu_impl!(Emu32, 32, 1);
#[cfg(test)]
emu_impl!(Emu64, 64, 2);

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// AVX-VNNI (VEX-encoded, 256-bit).
    #[derive(Clone, Copy)]
    pub(crate) struct AvxVnni(__m256i);

    impl Lanes for AvxVnni {
        const BLOCKS: usize = 1;
        #[inline(always)]
        unsafe fn load_weights(w: &[u8]) -> Self {
            let w = &w[..32];
            // SAFETY: 32 bytes checked by the slice above; unaligned load.
            AvxVnni(unsafe { _mm256_loadu_si256(w.as_ptr() as *const __m256i) })
        }
        #[inline(always)]
        unsafe fn load_acts(a: &[u8], g: usize) -> Self {
            Self::load_weights(&a[32 * g..])
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            AvxVnni(_mm256_setzero_si256())
        }
        #[inline(always)]
        unsafe fn codes(self, shift: u32) -> Self {
            AvxVnni(_mm256_and_si256(_mm256_srl_epi16(self.0, _mm_cvtsi32_si128(shift as i32)), _mm256_set1_epi8(3)))
        }
        #[inline(always)]
        unsafe fn dpbusd(acc: Self, u: Self, s: Self) -> Self {
            AvxVnni(_mm256_dpbusd_avx_epi32(acc.0, u.0, s.0))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(self.0), _mm256_extracti128_si256(self.0, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }
    }

    /// AVX-512 VNNI (512-bit, two blocks per vector).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512Vnni(__m512i);

    impl Lanes for Avx512Vnni {
        const BLOCKS: usize = 2;
        #[inline(always)]
        unsafe fn load_weights(w: &[u8]) -> Self {
            let w = &w[..64];
            // SAFETY: 64 bytes checked by the slice above; unaligned load.
            Avx512Vnni(unsafe { _mm512_loadu_si512(w.as_ptr() as *const __m512i) })
        }
        #[inline(always)]
        unsafe fn load_acts(a: &[u8], g: usize) -> Self {
            let (lo, hi) = (&a[32 * g..32 * g + 32], &a[128 + 32 * g..128 + 32 * g + 32]);
            // SAFETY: both halves are 32 bytes, checked by the slices above.
            let (lo, hi) = unsafe {
                (_mm256_loadu_si256(lo.as_ptr() as *const __m256i), _mm256_loadu_si256(hi.as_ptr() as *const __m256i))
            };
            Avx512Vnni(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi))
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512Vnni(_mm512_setzero_si512())
        }
        #[inline(always)]
        unsafe fn codes(self, shift: u32) -> Self {
            Avx512Vnni(_mm512_and_si512(_mm512_srl_epi16(self.0, _mm_cvtsi32_si128(shift as i32)), _mm512_set1_epi8(3)))
        }
        #[inline(always)]
        unsafe fn dpbusd(acc: Self, u: Self, s: Self) -> Self {
            Avx512Vnni(_mm512_dpbusd_epi32(acc.0, u.0, s.0))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> i32 {
            _mm512_reduce_add_epi32(self.0)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn dot_avxvnni(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
        super::i2s_dot::<AvxVnni>(w, a, k, s)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn dot_avx512vnni(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
        super::i2s_dot::<Avx512Vnni>(w, a, k, s)
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn dot4_avxvnni(w: &[u8], a: [&[u8]; 4], k: usize, s: f32) -> [f32; 4] {
        super::i2s_dot4::<AvxVnni>(w, a, k, s)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn dot4_avx512vnni(w: &[u8], a: [&[u8]; 4], k: usize, s: f32) -> [f32; 4] {
        super::i2s_dot4::<Avx512Vnni>(w, a, k, s)
    }

    /// Which VNNI flavour this CPU has (with the AVX2/FMA/F16C base the rest of the kernels need).
    fn flavour() -> Option<u32> {
        let base =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        if base
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            Some(512)
        } else if base && is_x86_feature_detected!("avxvnni") {
            Some(256)
        } else {
            None
        }
    }

    /// The best VNNI four-token dot (prompts) for clean I2_S tensors on this CPU, if it has one.
    pub(crate) fn i2s_row_dot4() -> Option<crate::dot::RowDot4> {
        fn f512(w: &[u8], a: [&[u8]; 4], k: usize, s: f32) -> [f32; 4] {
            // SAFETY: returned only after the features were detected (`flavour`).
            unsafe { dot4_avx512vnni(w, a, k, s) }
        }
        fn f256(w: &[u8], a: [&[u8]; 4], k: usize, s: f32) -> [f32; 4] {
            // SAFETY: as above.
            unsafe { dot4_avxvnni(w, a, k, s) }
        }
        match flavour()? {
            512 => Some(f512),
            _ => Some(f256),
        }
    }

    /// The best VNNI row dot for clean I2_S tensors on this CPU, if it has one.
    pub(crate) fn i2s_row_dot() -> Option<crate::dot::RowDot> {
        fn f512(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
            // SAFETY: returned only after the features were detected below.
            unsafe { dot_avx512vnni(w, a, k, s) }
        }
        fn f256(w: &[u8], a: &[u8], k: usize, s: f32) -> f32 {
            // SAFETY: as above.
            unsafe { dot_avxvnni(w, a, k, s) }
        }
        match flavour()? {
            512 => Some(f512),
            _ => Some(f256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::{ActType, QuantizedActs};
    use crate::quant::quantize_i2s;
    use crate::scalar::dot_row;
    use crate::GgmlType;

    /// The kernel, run through the instruction emulations, equals the scalar reference bit for bit on every shape
    /// (odd block counts exercise the two-block vector's tail) and on extreme activations.
    #[test]
    fn emulated_vnni_kernels_equal_scalar() {
        let mut rnd = crate::xorshift32(17);
        for k in [128usize, 256, 384, 1152, 2560, 6912] {
            for extreme in [false, true] {
                let w: Vec<f32> = (0..k).map(|_| (rnd() % 3) as f32 - 1.0).collect();
                let packed = quantize_i2s(&w);
                let x: Vec<f32> = (0..k)
                    .map(|i| {
                        if extreme {
                            if i % 3 == 0 {
                                -5.0
                            } else {
                                5.0
                            }
                        } else {
                            (rnd() % 2001) as f32 / 1000.0 - 1.0
                        }
                    })
                    .collect();
                let q = QuantizedActs::quantize(ActType::I8PerToken, &x, k);
                let a = q.row(0);
                let scale = crate::scalar::i2s_tensor_scale(&packed);
                let want = dot_row(GgmlType::I2_S, &packed[..k / 4], a, k, scale).unwrap();
                // SAFETY: the emulated lanes use no CPU features.
                let (e32, e64) =
                    unsafe { (i2s_dot::<Emu32>(&packed, a, k, scale), i2s_dot::<Emu64>(&packed, a, k, scale)) };
                assert_eq!(e32.to_bits(), want.to_bits(), "k={k} 256-bit");
                assert_eq!(e64.to_bits(), want.to_bits(), "k={k} 512-bit");
                // Four tokens: this row and three others (a reversed, a negated and a shifted copy).
                let others: Vec<Vec<f32>> = vec![
                    x.iter().rev().copied().collect(),
                    x.iter().map(|v| -v).collect(),
                    x.iter().map(|v| v * 0.5 + 0.25).collect(),
                ];
                let qs: Vec<QuantizedActs> =
                    others.iter().map(|o| QuantizedActs::quantize(ActType::I8PerToken, o, k)).collect();
                let rows = [a, qs[0].row(0), qs[1].row(0), qs[2].row(0)];
                let want4 = rows.map(|r| dot_row(GgmlType::I2_S, &packed[..k / 4], r, k, scale).unwrap().to_bits());
                // SAFETY: as above.
                let (f32s, f64s) =
                    unsafe { (i2s_dot4::<Emu32>(&packed, rows, k, scale), i2s_dot4::<Emu64>(&packed, rows, k, scale)) };
                assert_eq!(f32s.map(f32::to_bits), want4, "k={k} 256-bit, four tokens");
                assert_eq!(f64s.map(f32::to_bits), want4, "k={k} 512-bit, four tokens");
                #[cfg(target_arch = "x86_64")]
                if let Some(real) = x86::i2s_row_dot4() {
                    assert_eq!(real(&packed, rows, k, scale).map(f32::to_bits), want4, "k={k} real VNNI, four tokens");
                }
                #[cfg(target_arch = "x86_64")]
                if let Some(real) = x86::i2s_row_dot() {
                    assert_eq!(real(&packed, a, k, scale).to_bits(), want.to_bits(), "k={k} real VNNI");
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if x86::i2s_row_dot().is_none() {
            eprintln!("NOTE: this CPU has no AVX-VNNI / AVX-512 VNNI; only the emulated instances were run");
        }
    }
}
