//! Reference implementation of every block format: dequantization, per-block integer dot products and the
//! float epilogues that turn them into a row dot. This is the definition the SIMD paths are tested against.
//!
//! Block layouts follow ggml (`ggml-common.h`) and bitnet.cpp (I2_S); see `../shared/docs/FORMATS.md`.

use crate::{f16_at, f32_at, GgmlType, UnsupportedType};

// ---------------------------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------------------------

/// Dequantizes a whole tensor of `rows` × `cols`. Unlike [`dequantize_row`] this is right for I2_S tensors whose
/// rows are not whole 128-weight blocks (the blocks run over the flattened tensor).
pub fn dequantize_tensor(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Result<Vec<f32>, UnsupportedType> {
    let mut out = vec![0f32; rows * cols];
    if ty == GgmlType::I2_S {
        let s = i2s_tensor_scale(data);
        let mut c = [0i8; 128];
        for (blk, o) in data[..rows * cols / 4].chunks_exact(32).zip(out.chunks_exact_mut(128)) {
            i2s_codes(blk, &mut c);
            o.iter_mut().zip(&c).for_each(|(o, &c)| *o = (c - 1) as f32 * s);
        }
        return Ok(out);
    }
    let rb = ty.row_bytes(cols);
    for (r, o) in out.chunks_exact_mut(cols.max(1)).enumerate() {
        dequantize_row(ty, &data[r * rb..(r + 1) * rb], o, 1.0)?;
    }
    Ok(out)
}

/// I2_S with rows that are not whole blocks, repacked so every row is `padded` (a multiple of 128) weights: each
/// row's codes, then zero weights; the same 32-byte tail. The kernels then see an ordinary I2_S matrix.
pub fn i2s_pad_rows(data: &[u8], rows: usize, cols: usize, padded: usize) -> Vec<u8> {
    let mut codes = vec![1u8; rows * padded];
    let mut c = [0i8; 128];
    for (b, blk) in data[..rows * cols / 4].chunks_exact(32).enumerate() {
        i2s_codes(blk, &mut c);
        for (j, &v) in c.iter().enumerate() {
            let w = b * 128 + j;
            codes[(w / cols) * padded + w % cols] = v as u8;
        }
    }
    let mut out = Vec::with_capacity(rows * padded / 4 + 32);
    for blk in codes.chunks_exact(128) {
        for i in 0..32 {
            out.push(blk[i] << 6 | blk[i + 32] << 4 | blk[i + 64] << 2 | blk[i + 96]);
        }
    }
    out.extend_from_slice(&data[rows * cols / 4..]);
    out
}

/// Dequantizes one row of `out.len()` weights. For I2_S, `i2s_scale` is the tensor's scale (from its tail).
pub fn dequantize_row(ty: GgmlType, w: &[u8], out: &mut [f32], i2s_scale: f32) -> Result<(), UnsupportedType> {
    use GgmlType::*;
    let bs = ty.block_size();
    let bb = ty.block_bytes();
    match ty {
        F32 => out.iter_mut().enumerate().for_each(|(i, o)| *o = f32_at(w, 4 * i)),
        F16 => out.iter_mut().enumerate().for_each(|(i, o)| *o = f16_at(w, 2 * i)),
        BF16 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = f32::from_bits((u16::from_le_bytes([w[2 * i], w[2 * i + 1]]) as u32) << 16)),
        _ => {
            for (b, y) in w.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
                match ty {
                    Q4_0 => dq_q4_0(b, y),
                    Q4_1 => dq_q4_1(b, y),
                    Q5_0 => dq_q5_0(b, y),
                    Q5_1 => dq_q5_1(b, y),
                    Q8_0 => dq_q8_0(b, y),
                    Q4_K => dq_q4_k(b, y),
                    Q5_K => dq_q5_k(b, y),
                    Q6_K => dq_q6_k(b, y),
                    TQ1_0 => dq_tq1_0(b, y),
                    TQ2_0 => dq_tq2_0(b, y),
                    I2_S => {
                        let mut c = [0i8; 128];
                        i2s_codes(b, &mut c);
                        for (o, &c) in y.iter_mut().zip(&c) {
                            *o = i2s_scale * (c as f32 - 1.0);
                        }
                    }
                    other => return Err(UnsupportedType(other)),
                }
            }
        }
    }
    Ok(())
}

fn dq_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        y[j] = ((b[2 + j] & 15) as i32 - 8) as f32 * d;
        y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn dq_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..16 {
        y[j] = (b[4 + j] & 15) as f32 * d + m;
        y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
    }
}

/// The 32 five-bit values of a Q5_0/Q5_1 block (0..31, before any offset).
#[inline(always)]
pub fn q5_values(qh: u32, qs: &[u8]) -> [i32; 32] {
    let mut v = [0i32; 32];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        v[j] = ((qs[j] & 15) as u32 | h0) as i32;
        v[j + 16] = ((qs[j] >> 4) as u32 | h1) as i32;
    }
    v
}

fn dq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let v = q5_values(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22]);
    for j in 0..32 {
        y[j] = (v[j] - 16) as f32 * d;
    }
}

fn dq_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let v = q5_values(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &b[8..24]);
    for j in 0..32 {
        y[j] = v[j] as f32 * d + m;
    }
}

fn dq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn dq_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * g..32 * g + 32];
        for l in 0..32 {
            y[64 * g + l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[64 * g + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn dq_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
        let q = &qs[32 * g..32 * g + 32];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * g + l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
            y[64 * g + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// The 256 signed six-bit values (-32..31) of a Q6_K block, in weight order.
#[inline(always)]
pub fn q6_k_values(b: &[u8]) -> [i8; 256] {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let mut v = [0i8; 256];
    for h in 0..2 {
        let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
        let y = &mut v[128 * h..];
        for l in 0..32 {
            y[l] = ((ql[l] & 0xF) | (qh[l] & 3) << 4) as i8 - 32;
            y[l + 32] = ((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) as i8 - 32;
            y[l + 64] = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i8 - 32;
            y[l + 96] = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i8 - 32;
        }
    }
    v
}

fn dq_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    let v = q6_k_values(b);
    for (i, o) in y.iter_mut().enumerate() {
        *o = d * (b[192 + i / 16] as i8) as f32 * v[i] as f32;
    }
}

/// The 256 trits (0, 1, 2) of a TQ1_0 block in weight order (llama.cpp's base-3 fixed-point decoding).
#[inline(always)]
pub fn tq1_0_trits(b: &[u8]) -> [u8; 256] {
    const POW3: [u8; 6] = [1, 3, 9, 27, 81, 243];
    let trit = |q: u8, n: usize| ((q.wrapping_mul(POW3[n]) as u16 * 3) >> 8) as u8;
    let mut t = [0u8; 256];
    for n in 0..5 {
        for m in 0..32 {
            t[n * 32 + m] = trit(b[m], n);
        }
        for m in 0..16 {
            t[160 + n * 16 + m] = trit(b[32 + m], n);
        }
    }
    for n in 0..4 {
        for j in 0..4 {
            t[240 + n * 4 + j] = trit(b[48 + j], n);
        }
    }
    t
}

fn dq_tq1_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 52);
    for (o, t) in y.iter_mut().zip(tq1_0_trits(b)) {
        *o = (t as f32 - 1.0) * d;
    }
}

/// The 256 trits (0, 1, 2) of a TQ2_0 block in weight order.
#[inline(always)]
pub fn tq2_0_trits(b: &[u8]) -> [u8; 256] {
    let mut t = [0u8; 256];
    for j in 0..2 {
        for l in 0..4 {
            for m in 0..32 {
                t[j * 128 + l * 32 + m] = (b[j * 32 + m] >> (2 * l)) & 3;
            }
        }
    }
    t
}

fn dq_tq2_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 64);
    for (o, t) in y.iter_mut().zip(tq2_0_trits(b)) {
        *o = (t as f32 - 1.0) * d;
    }
}

/// The 128 codes (0, 1, 2; 3 is read as 1, i.e. weight 0) of an I2_S block in weight order.
#[inline(always)]
pub fn i2s_codes(b: &[u8], c: &mut [i8; 128]) {
    for i in 0..32 {
        let byte = b[i];
        for (g, shift) in [6, 4, 2, 0].into_iter().enumerate() {
            let code = (byte >> shift) & 3;
            c[i + 32 * g] = if code == 3 { 1 } else { code as i8 };
        }
    }
}

/// Whether packed I2_S bytes contain the unused code 3 (which readers treat as weight 0).
pub fn i2s_has_code3(packed: &[u8]) -> bool {
    packed.iter().fold(0u8, |acc, &b| acc | (b & (b >> 1) & 0x55)) != 0
}

/// The per-tensor scale in an I2_S tensor's 32-byte tail.
pub fn i2s_tensor_scale(tensor: &[u8]) -> f32 {
    f32_at(tensor, tensor.len() - 32)
}

// ---------------------------------------------------------------------------------------------------------------
// Per-block integer dot products (exact) and their float epilogues. SIMD paths reimplement the integer parts only.
// ---------------------------------------------------------------------------------------------------------------

#[inline(always)]
fn a8(a: &[u8], i: usize) -> i32 {
    a[i] as i8 as i32
}

pub fn isum_q4_0(w: &[u8], a: &[u8]) -> i32 {
    (0..16).map(|j| ((w[2 + j] & 15) as i32 - 8) * a8(a, 2 + j) + ((w[2 + j] >> 4) as i32 - 8) * a8(a, 18 + j)).sum()
}
pub fn isum_q4_1(w: &[u8], a: &[u8]) -> i32 {
    (0..16).map(|j| (w[4 + j] & 15) as i32 * a8(a, 4 + j) + (w[4 + j] >> 4) as i32 * a8(a, 20 + j)).sum()
}
pub fn isum_q5_0(w: &[u8], a: &[u8]) -> i32 {
    let v = q5_values(u32::from_le_bytes([w[2], w[3], w[4], w[5]]), &w[6..22]);
    (0..32).map(|j| (v[j] - 16) * a8(a, 2 + j)).sum()
}
pub fn isum_q5_1(w: &[u8], a: &[u8]) -> i32 {
    let v = q5_values(u32::from_le_bytes([w[4], w[5], w[6], w[7]]), &w[8..24]);
    (0..32).map(|j| v[j] * a8(a, 4 + j)).sum()
}
pub fn isum_q8_0(w: &[u8], a: &[u8]) -> i32 {
    (0..32).map(|j| a8(w, 2 + j) * a8(a, 2 + j)).sum()
}

/// Q4_K × Q8_K: (Σ_j scale_j · Σ q·a over sub-block j, Σ_j min_j · Σ a over sub-block j).
pub fn isum_q4_k(w: &[u8], a: &[u8]) -> (i32, i32) {
    let scales = &w[4..16];
    let (mut s, mut m) = (0i32, 0i32);
    for g in 0..4 {
        let q = &w[16 + 32 * g..48 + 32 * g];
        for h in 0..2 {
            let (sc, mn) = scale_min_k4(2 * g + h, scales);
            let base = 4 + 64 * g + 32 * h;
            let dot: i32 =
                (0..32).map(|l| (if h == 0 { q[l] & 0xF } else { q[l] >> 4 }) as i32 * a8(a, base + l)).sum();
            s += sc as i32 * dot;
            m += mn as i32 * q8k_bsum32(a, 2 * g + h);
        }
    }
    (s, m)
}

pub fn isum_q5_k(w: &[u8], a: &[u8]) -> (i32, i32) {
    let scales = &w[4..16];
    let qh = &w[16..48];
    let (mut s, mut m) = (0i32, 0i32);
    for g in 0..4 {
        let q = &w[48 + 32 * g..80 + 32 * g];
        for h in 0..2 {
            let (sc, mn) = scale_min_k4(2 * g + h, scales);
            let bit = 1u8 << (2 * g + h);
            let base = 4 + 64 * g + 32 * h;
            let dot: i32 = (0..32)
                .map(|l| {
                    let lo = if h == 0 { q[l] & 0xF } else { q[l] >> 4 };
                    let v = lo as i32 + if qh[l] & bit != 0 { 16 } else { 0 };
                    v * a8(a, base + l)
                })
                .sum();
            s += sc as i32 * dot;
            m += mn as i32 * q8k_bsum32(a, 2 * g + h);
        }
    }
    (s, m)
}

/// Σ of the Q8_K block's quants over 32-wide sub-block `j`, from its stored 16-wide sums.
#[inline(always)]
pub fn q8k_bsum32(a: &[u8], j: usize) -> i32 {
    let bs = |i: usize| i16::from_le_bytes([a[260 + 2 * i], a[261 + 2 * i]]) as i32;
    bs(2 * j) + bs(2 * j + 1)
}

/// Σ of all 256 quants of a Q8_K block.
#[inline(always)]
pub fn q8k_bsum_all(a: &[u8]) -> i32 {
    (0..16).map(|i| i16::from_le_bytes([a[260 + 2 * i], a[261 + 2 * i]]) as i32).sum()
}

pub fn isum_q6_k(w: &[u8], a: &[u8]) -> i32 {
    let v = q6_k_values(w);
    (0..16)
        .map(|s| (w[192 + s] as i8 as i32) * (0..16).map(|l| v[16 * s + l] as i32 * a8(a, 4 + 16 * s + l)).sum::<i32>())
        .sum()
}

pub fn isum_tq1_0(w: &[u8], a: &[u8]) -> i32 {
    let t = tq1_0_trits(w);
    (0..256).map(|i| t[i] as i32 * a8(a, 4 + i)).sum::<i32>() - q8k_bsum_all(a)
}

pub fn isum_tq2_0(w: &[u8], a: &[u8]) -> i32 {
    let t = tq2_0_trits(w);
    (0..256).map(|i| t[i] as i32 * a8(a, 4 + i)).sum::<i32>() - q8k_bsum_all(a)
}

/// Σ c·q over one 128-weight I2_S block (codes 0..2, before subtracting Σq).
pub fn isum_i2s(w: &[u8], a: &[u8]) -> i32 {
    let mut c = [0i8; 128];
    i2s_codes(w, &mut c);
    (0..128).map(|i| c[i] as i32 * a8(a, i)).sum()
}

// Float epilogues, shared verbatim by the scalar and SIMD row loops so that their results are bit-identical. They
// are generic over the f16 loader (`h`): f16 → f32 conversion is exact, so the SIMD path may use the F16C
// instruction while the reference uses the portable conversion.

/// An exact little-endian f16 load: `h(bytes, offset)`.
pub trait F16Load: Fn(&[u8], usize) -> f32 + Copy {}
impl<T: Fn(&[u8], usize) -> f32 + Copy> F16Load for T {}

#[inline(always)]
pub fn epi_q8_0_with(w: &[u8], a: &[u8], isum: i32, h: impl F16Load) -> f32 {
    h(w, 0) * h(a, 0) * isum as f32
}
#[inline(always)]
pub fn epi_q8_1_with(w: &[u8], a: &[u8], isum: i32, h: impl F16Load) -> f32 {
    h(w, 0) * h(a, 0) * isum as f32 + h(w, 2) * h(a, 2)
}
#[inline(always)]
pub fn epi_k_min_with(w: &[u8], a: &[u8], (s, m): (i32, i32), h: impl F16Load) -> f32 {
    let da = f32_at(a, 0);
    h(w, 0) * da * s as f32 - h(w, 2) * da * m as f32
}
#[inline(always)]
pub fn epi_q8_0(w: &[u8], a: &[u8], isum: i32) -> f32 {
    epi_q8_0_with(w, a, isum, f16_at)
}
#[inline(always)]
pub fn epi_q8_1(w: &[u8], a: &[u8], isum: i32) -> f32 {
    epi_q8_1_with(w, a, isum, f16_at)
}
#[inline(always)]
pub fn epi_k_min(w: &[u8], a: &[u8], sums: (i32, i32)) -> f32 {
    epi_k_min_with(w, a, sums, f16_at)
}
#[inline(always)]
pub fn epi_k(d_w: f32, a: &[u8], isum: i32) -> f32 {
    d_w * f32_at(a, 0) * isum as f32
}
/// I2_S row epilogue: `(Σ c·q − Σq) / s · w_scale`.
#[inline(always)]
pub fn epi_i2s(a_row: &[u8], k: usize, sum_cq: i32, w_scale: f32) -> f32 {
    let s = f32_at(a_row, k);
    let sum_q = i32::from_le_bytes([a_row[k + 4], a_row[k + 5], a_row[k + 6], a_row[k + 7]]);
    (sum_cq - sum_q) as f32 / s * w_scale
}

/// TQ1_0 / TQ2_0 with BitNet's per-token int8 activations (instead of llama.cpp's per-block Q8_K):
/// `y = (Σ_blocks d_b · Σ_{i∈b} (t_i − 1)·q_i) / s`, the block sums exact in int32.
pub fn dot_row_tq_per_token(ty: GgmlType, w: &[u8], a: &[u8], k: usize) -> f32 {
    let bb = ty.block_bytes();
    let mut acc = 0f32;
    for (b, wb) in w[..k / 256 * bb].chunks_exact(bb).enumerate() {
        let (t, d) = match ty {
            GgmlType::TQ1_0 => (tq1_0_trits(wb), f16_at(wb, 52)),
            _ => (tq2_0_trits(wb), f16_at(wb, 64)),
        };
        let isum: i32 = (0..256).map(|i| (t[i] as i32 - 1) * a8(a, 256 * b + i)).sum();
        acc += d * isum as f32;
    }
    acc / f32_at(a, k)
}

/// Reference row dot of a weight row `w` (type `ty`, `k` weights) with one activation row in `ActType::for_weight(ty)`.
pub fn dot_row(ty: GgmlType, w: &[u8], a: &[u8], k: usize, i2s_scale: f32) -> Result<f32, UnsupportedType> {
    use GgmlType::*;
    macro_rules! blocks {
        ($wb:expr, $ab:expr, |$x:ident, $y:ident| $e:expr) => {
            w.chunks_exact($wb).zip(a.chunks_exact($ab)).map(|($x, $y)| $e).fold(0f32, |s, v| s + v)
        };
    }
    Ok(match ty {
        F32 => (0..k).map(|i| f32_at(w, 4 * i) * f32_at(a, 4 * i)).fold(0f32, |s, v| s + v),
        F16 => (0..k).map(|i| f16_at(w, 2 * i) * f16_at(a, 2 * i)).fold(0f32, |s, v| s + v),
        BF16 => {
            let bf = |b: &[u8], i: usize| f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16);
            (0..k).map(|i| bf(w, i) * bf(a, i)).fold(0f32, |s, v| s + v)
        }
        Q4_0 => blocks!(18, 34, |x, y| epi_q8_0(x, y, isum_q4_0(x, y))),
        Q5_0 => blocks!(22, 34, |x, y| epi_q8_0(x, y, isum_q5_0(x, y))),
        Q8_0 => blocks!(34, 34, |x, y| epi_q8_0(x, y, isum_q8_0(x, y))),
        Q4_1 => blocks!(20, 36, |x, y| epi_q8_1(x, y, isum_q4_1(x, y))),
        Q5_1 => blocks!(24, 36, |x, y| epi_q8_1(x, y, isum_q5_1(x, y))),
        Q4_K => blocks!(144, 292, |x, y| epi_k_min(x, y, isum_q4_k(x, y))),
        Q5_K => blocks!(176, 292, |x, y| epi_k_min(x, y, isum_q5_k(x, y))),
        Q6_K => blocks!(210, 292, |x, y| epi_k(f16_at(x, 208), y, isum_q6_k(x, y))),
        TQ1_0 => blocks!(54, 292, |x, y| epi_k(f16_at(x, 52), y, isum_tq1_0(x, y))),
        TQ2_0 => blocks!(66, 292, |x, y| epi_k(f16_at(x, 64), y, isum_tq2_0(x, y))),
        I2_S => {
            let s: i32 = w.chunks_exact(32).enumerate().map(|(i, b)| isum_i2s(b, &a[128 * i..])).sum();
            epi_i2s(a, k, s, i2s_scale)
        }
        other => return Err(UnsupportedType(other)),
    })
}
