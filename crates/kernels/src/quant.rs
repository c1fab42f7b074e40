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
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 3) as f32 - 1.0
            })
            .map(|c| c * scale)
            .collect()
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
