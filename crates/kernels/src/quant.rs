//! Quantizers for the ternary formats, used by writers (the model generator, the converter) and tests.
//! Each follows its reference implementation: I2_S as bitnet.cpp's `quantize_i2_s`, TQ1_0 / TQ2_0 as llama.cpp's
//! `quantize_row_tq{1,2}_0_ref`.

use half::f16;

/// bitnet.cpp's I2_S: one scale for the whole tensor (its max |w|), codes by sign, |w| < 1e-6 → 0.
/// Layout: 128-weight/32-byte blocks (`byte[i] = c[i]<<6 | c[i+32]<<4 | c[i+64]<<2 | c[i+96]`, c = w+1), then a
/// 32-byte tail whose first 4 bytes are the f32 scale (the rest is zero here; bitnet.cpp leaves it uninitialised).
pub fn quantize_i2s(src: &[f32]) -> Vec<u8> {
    assert!(src.len().is_multiple_of(128), "I2_S needs a multiple of 128 weights");
    let max = src.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let code = |v: f32| -> u8 {
        if (v as f64).abs() < 1e-6 {
            1
        } else if (v as f64) * max > 0.0 {
            2
        } else {
            0
        }
    };
    let mut out = Vec::with_capacity(src.len() / 4 + 32);
    for blk in src.chunks_exact(128) {
        for i in 0..32 {
            out.push(code(blk[i]) << 6 | code(blk[i + 32]) << 4 | code(blk[i + 64]) << 2 | code(blk[i + 96]));
        }
    }
    let mut tail = [0u8; 32];
    tail[..4].copy_from_slice(&(max as f32).to_le_bytes());
    out.extend_from_slice(&tail);
    out
}

/// llama.cpp's TQ2_0: per 256-block, d = max |x| (stored f16), trit = round(x/d) + 1, 2 bits each.
pub fn quantize_tq2_0(src: &[f32]) -> Vec<u8> {
    assert!(src.len().is_multiple_of(256), "TQ2_0 needs a multiple of 256 weights");
    let mut out = Vec::with_capacity(src.len() / 256 * 66);
    for x in src.chunks_exact(256) {
        let d = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let t = |v: f32| ((v * id).round() as i32 + 1) as u8;
        for j in 0..2 {
            for m in 0..32 {
                let mut q = 0u8;
                for l in 0..4 {
                    q |= t(x[j * 128 + l * 32 + m]) << (2 * l);
                }
                out.push(q);
            }
        }
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    }
    out
}

/// llama.cpp's TQ1_0: 5 trits per byte as a base-3 number scaled to 0..255 (ceiling division by 243), then 4
/// trits per byte for the last 16 weights; d = max |x| in f16.
pub fn quantize_tq1_0(src: &[f32]) -> Vec<u8> {
    assert!(src.len().is_multiple_of(256), "TQ1_0 needs a multiple of 256 weights");
    let mut out = Vec::with_capacity(src.len() / 256 * 54);
    for x in src.chunks_exact(256) {
        let d = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let t = |v: f32| ((v * id).round() as i32 + 1) as u16;
        let pack = |q: u16| (q * 256).div_ceil(243) as u8;
        for m in 0..32 {
            let q = (0..5).fold(0u16, |q, n| q * 3 + t(x[m + n * 32]));
            out.push(pack(q));
        }
        for m in 0..16 {
            let q = (0..5).fold(0u16, |q, n| q * 3 + t(x[160 + m + n * 16]));
            out.push(pack(q));
        }
        for j in 0..4 {
            let q = (0..4).fold(0u16, |q, m| q * 3 + t(x[240 + j + m * 4]));
            out.push(pack(q * 3));
        }
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar::dequantize_row;
    use crate::GgmlType;

    /// Ternary weights with an f16-exact scale, as real BitNet exports have.
    fn ternary(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut rnd = crate::xorshift32(seed);
        (0..n).map(|_| ((rnd() % 3) as f32 - 1.0) * scale).collect()
    }

    #[test]
    fn round_trips_are_exact() {
        let scale = f16::from_f32(0.0123).to_f32();
        let w = ternary(256 * 6, 7, scale);
        let mut back = vec![0f32; w.len()];
        let i2 = quantize_i2s(&w);
        assert_eq!(i2.len(), w.len() / 4 + 32);
        let s = crate::scalar::i2s_tensor_scale(&i2);
        assert_eq!(s, scale);
        dequantize_row(GgmlType::I2_S, &i2[..w.len() / 4], &mut back, s).unwrap();
        assert_eq!(back, w);
        for (ty, q) in [(GgmlType::TQ2_0, quantize_tq2_0(&w)), (GgmlType::TQ1_0, quantize_tq1_0(&w))] {
            assert_eq!(q.len(), w.len() / 256 * ty.block_bytes());
            dequantize_row(ty, &q, &mut back, 1.0).unwrap();
            assert_eq!(back, w, "{ty}");
        }
    }

    /// Hand-computed TQ1_0 bytes: five trits (2,0,1,2,2) are 2·81+0+9+6+2 = 179 → ceil(179·256/243) = 189.
    #[test]
    fn tq1_0_byte_encoding_matches_llama_cpp() {
        let mut w = vec![0f32; 256];
        for (n, t) in [2, 0, 1, 2, 2].into_iter().enumerate() {
            w[n * 32] = t as f32 - 1.0;
        }
        let q = quantize_tq1_0(&w);
        assert_eq!(q[0], 189);
        // All-zero weights (trit 1 everywhere): 121 → ceil(121·256/243) = 128; qh: 40·3 = 120 → 127.
        assert_eq!(q[1], 128);
        assert_eq!(q[48], 127);
    }

    #[test]
    fn zero_weights_are_code_one() {
        let q = quantize_i2s(&[0f32; 128]);
        assert!(q[..32].iter().all(|&b| b == 0b0101_0101));
    }
}

/// ggml's `quantize_row_q8_0_ref`: per 32-block, d = max |x| / 127 (f16), q = round(x / d) (half away from zero).
pub fn quantize_q8_0(src: &[f32]) -> Vec<u8> {
    assert!(src.len().is_multiple_of(32), "Q8_0 needs a multiple of 32 values");
    let mut out = Vec::with_capacity(src.len() / 32 * 34);
    for x in src.chunks_exact(32) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

#[cfg(test)]
mod q8_tests {
    #[test]
    fn q8_0_round_trip_is_close() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37) % 23) as f32 / 7.0 - 1.5).collect();
        let q = super::quantize_q8_0(&x);
        let mut back = vec![0f32; 64];
        crate::scalar::dequantize_row(crate::GgmlType::Q8_0, &q, &mut back, 1.0).unwrap();
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 1.6 / 127.0 / 2.0 + 1e-3, "{a} vs {b}");
        }
    }
}

/// The 1.5·2²³ trick of ggml's `nearest_int`: adding it leaves round-half-to-even(v) in the low mantissa bits
/// (|v| < 2²²). Takes the sum, so callers can form it with a fused multiply-add as ggml's FMA builds do.
#[inline(always)]
fn nearest_int_of_biased(v_plus_magic: f32) -> i32 {
    (v_plus_magic.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

const NEAREST_MAGIC: f32 = 12582912.0;

/// ggml's `make_qx_quants(16, 32, x, L, rmse_type = 1, NULL)` for the sixteen 16-value sub-blocks of a Q6_K block:
/// each sub-block's scale, searched over 19 candidate inverse scales for the least x²-weighted squared error.
///
/// Bit-exact with llama.cpp as built with FMA (`-march=native`, GCC's default contraction), which fuses the code
/// rounding (`iscale*x + magic`) and the two running sums here but not the sub-scale rounding in the caller
/// (tests/q6_k_quantizer.rs holds us to llama.cpp's bytes); each sub-block's sums run in index order. The
/// sub-blocks are the vector lanes (values transposed), so the search vectorizes without changing any sub-block's
/// arithmetic.
#[inline(always)]
fn q6_k_sub_scales(x: &[f32]) -> [f32; 16] {
    const NMAX: f32 = 32.0;
    let xt: [[f32; 16]; 16] = std::array::from_fn(|i| std::array::from_fn(|sb| x[16 * sb + i]));
    let mut max = [0f32; 16];
    let mut amax = [0f32; 16];
    for row in &xt {
        for sb in 0..16 {
            if row[sb].abs() > amax[sb] {
                amax[sb] = row[sb].abs();
                max[sb] = row[sb];
            }
        }
    }
    let sums = |iscale: &[f32; 16]| {
        let (mut lx, mut l2) = ([0f32; 16], [0f32; 16]);
        for row in &xt {
            for sb in 0..16 {
                let v = row[sb];
                let q = nearest_int_of_biased(iscale[sb].mul_add(v, NEAREST_MAGIC)).clamp(-32, 31) as f32;
                let w = v * v;
                lx[sb] = (w * v).mul_add(q, lx[sb]);
                l2[sb] = (w * q).mul_add(q, l2[sb]);
            }
        }
        (lx, l2)
    };
    let (sumlx, suml2) = sums(&std::array::from_fn(|sb| -NMAX / max[sb]));
    let mut scale: [f32; 16] = std::array::from_fn(|sb| if suml2[sb] != 0.0 { sumlx[sb] / suml2[sb] } else { 0.0 });
    let mut best: [f32; 16] = std::array::from_fn(|sb| scale[sb] * sumlx[sb]);
    for is in (-9..=9).filter(|&i| i != 0) {
        let num = NMAX + 0.1 * is as f32;
        let (sumlx, suml2) = sums(&std::array::from_fn(|sb| -num / max[sb]));
        for sb in 0..16 {
            if suml2[sb] > 0.0 && sumlx[sb] * sumlx[sb] > best[sb] * suml2[sb] {
                scale[sb] = sumlx[sb] / suml2[sb];
                best[sb] = scale[sb] * sumlx[sb];
            }
        }
    }
    std::array::from_fn(|sb| if amax[sb] < 1e-15 { 0.0 } else { scale[sb] })
}

/// ggml's `quantize_row_q6_K_ref`: per 256-block an f16 scale d and sixteen int8 sub-block scales, six-bit codes
/// (value + 32) split into low nibbles (`ql`, 128 bytes) and high bit pairs (`qh`, 64 bytes). Layout:
/// ql[128] qh[64] scales[16] d(f16) = 210 bytes.
pub fn quantize_q6_k(src: &[f32]) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        /// The same code compiled for AVX2 and FMA (8-wide candidate search, `mul_add` in one instruction):
        /// the same results as the portable build, where `mul_add` is libm's correctly rounded `fmaf`.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(src: &[f32]) -> Vec<u8> {
            quantize_q6_k_impl(src)
        }
        // SAFETY: AVX2 and FMA were detected just above.
        return unsafe { avx2(src) };
    }
    quantize_q6_k_impl(src)
}

#[inline(always)]
fn quantize_q6_k_impl(src: &[f32]) -> Vec<u8> {
    assert!(src.len().is_multiple_of(256), "Q6_K needs a multiple of 256 values");
    let mut out = Vec::with_capacity(src.len() / 256 * 210);
    for x in src.chunks_exact(256) {
        // Codes of sub-blocks whose int8 scale rounds to zero stay at 0 (ggml leaves its search's codes there;
        // either way they decode to 0).
        let mut l = [0i8; 256];
        let scales = q6_k_sub_scales(x);
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for &s in &scales {
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        let mut block = [0u8; 210];
        if max_abs_scale >= 1e-15 {
            let iscale = -128.0 / max_scale;
            let d = f16::from_f32(1.0 / iscale);
            block[208..].copy_from_slice(&d.to_le_bytes());
            for (ib, &s) in scales.iter().enumerate() {
                block[192 + ib] = nearest_int_of_biased(iscale * s + NEAREST_MAGIC).min(127) as i8 as u8;
            }
            for j in 0..16 {
                let dj = d.to_f32() * block[192 + j] as i8 as f32;
                if dj == 0.0 {
                    continue;
                }
                for i in 16 * j..16 * j + 16 {
                    l[i] = (nearest_int_of_biased(x[i] / dj + NEAREST_MAGIC).clamp(-32, 31) + 32) as i8;
                }
            }
            for h in 0..2 {
                let (ql, l) = (&mut block[64 * h..64 * h + 64], &l[128 * h..]);
                for i in 0..32 {
                    ql[i] = (l[i] as u8 & 0xF) | (l[i + 64] as u8 & 0xF) << 4;
                    ql[i + 32] = (l[i + 32] as u8 & 0xF) | (l[i + 96] as u8 & 0xF) << 4;
                }
                for i in 0..32 {
                    block[128 + 32 * h + i] = (l[i] as u8 >> 4)
                        | (l[i + 32] as u8 >> 4) << 2
                        | (l[i + 64] as u8 >> 4) << 4
                        | (l[i + 96] as u8 >> 4) << 6;
                }
            }
        }
        out.extend_from_slice(&block);
    }
    out
}

#[cfg(test)]
mod q6_k_tests {
    use crate::GgmlType;

    /// The values back, and each 256-block's super-scale d.
    fn round_trip(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let q = super::quantize_q6_k(x);
        assert_eq!(q.len(), x.len() / 256 * 210);
        let mut back = vec![0f32; x.len()];
        crate::scalar::dequantize_row(GgmlType::Q6_K, &q, &mut back, 1.0).unwrap();
        let d = q.chunks(210).map(|b| half::f16::from_le_bytes([b[208], b[209]]).to_f32().abs()).collect();
        (back, d)
    }

    /// Every value comes back within half a code step of its sub-block (amax/31 allows for the rmse search's
    /// wider scales) plus what rounding the sub-block scale to an int8 multiple of d costs at the largest code
    /// (32·d/2), and the whole is far closer than a 4-bit code could be.
    #[test]
    fn q6_k_round_trip_is_close() {
        let mut s = 0x1234_5678u32;
        let x: Vec<f32> = (0..1024)
            .map(|i| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                let v = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                // Sub-blocks of very different magnitudes, and an outlier per block.
                v * (1 + (i / 16) % 5) as f32 + if i % 256 == 7 { 6.0 } else { 0.0 }
            })
            .collect();
        let (back, d) = round_trip(&x);
        for (blk, (xb, bb)) in x.chunks(16).zip(back.chunks(16)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let bound = amax / 31.0 + 16.0 * d[blk / 16] + 1e-6;
            for (a, b) in xb.iter().zip(bb) {
                assert!((a - b).abs() <= bound, "sub-block {blk}: {a} vs {b} (bound {bound})");
            }
        }
        let rmse = (x.iter().zip(&back).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / x.len() as f32).sqrt();
        let rms = (x.iter().map(|a| a * a).sum::<f32>() / x.len() as f32).sqrt();
        assert!(rmse < rms / 40.0, "rmse {rmse} vs rms {rms}");
    }

    /// The AVX2+FMA build of the quantizer and the portable one (libm's fused `fmaf`) give the same bytes.
    #[test]
    fn q6_k_portable_equals_dispatched() {
        let x: Vec<f32> =
            (0..2048).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5 + (i % 97) as f32 * 1e-3).collect();
        assert_eq!(super::quantize_q6_k_impl(&x), super::quantize_q6_k(&x));
    }

    #[test]
    fn q6_k_zero_block_and_codes() {
        assert!(round_trip(&[0f32; 256]).0.iter().all(|&v| v == 0.0));
        // One sub-block at a time non-zero: the others stay exactly zero.
        let x: Vec<f32> = (0..256).map(|i| if i / 16 == 5 { i as f32 - 88.0 } else { 0.0 }).collect();
        let (back, d) = round_trip(&x);
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            assert!((a - b).abs() <= 8.0 / 31.0 + 16.0 * d[0], "{i}: {a} vs {b}");
            if i / 16 != 5 {
                assert_eq!(*b, 0.0);
            }
        }
    }
}
