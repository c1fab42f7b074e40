//! Helpers for attention over an f16 KV cache: q·k with k in f16, and v accumulation. Scalar reference plus an
//! AVX2/F16C path (chosen at run time), tested equal up to float rounding.

use half::f16;

/// Σ k[i]·q[i] with k in f16.
pub fn dot_f16_f32(k: &[f16], q: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA/F16C were detected just above.
        return unsafe { dot_f16_f32_avx2(k, q) };
    }
    dot_f16_f32_scalar(k, q)
}

/// acc[i] += w · v[i] with v in f16.
pub fn axpy_f16(acc: &mut [f32], w: f32, v: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA/F16C were detected just above.
        return unsafe { axpy_f16_avx2(acc, w, v) };
    }
    axpy_f16_scalar(acc, w, v)
}

/// acc[i] = f16(acc[i] + v[i]·w), fused multiply-add then rounding, as ggml's `ggml_vec_mad_f16`.
pub fn mad_f16(acc: &mut [f16], v: &[f16], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA/F16C were detected just above.
        return unsafe { mad_f16_avx2(acc, v, w) };
    }
    mad_f16_scalar(acc, v, w)
}

pub fn mad_f16_scalar(acc: &mut [f16], v: &[f16], w: f32) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a = f16::from_f32(x.to_f32().mul_add(w, a.to_f32()));
    }
}

/// acc[i] = f16(acc[i]·w), as ggml's `ggml_vec_scale_f16`.
pub fn scale_f16(acc: &mut [f16], w: f32) {
    for a in acc.iter_mut() {
        *a = f16::from_f32(a.to_f32() * w);
    }
}

/// Scores of `G = q.len() / hd` query heads that share one KV head against `n` keys:
/// `out[h * n + j] = scale · Σ_i keys[j·stride + i] · q[h·hd + i]`. Each score is the same IEEE computation as
/// [`dot_f16_f32`] (then one multiply by `scale`), so results equal per-head calls bit for bit; the AVX2 path
/// converts each key once for all the heads of its group, which is most of the work in long prompts.
pub fn scores_f16(keys: &[f16], stride: usize, n: usize, q: &[f32], hd: usize, scale: f32, out: &mut [f32]) {
    let g = q.len() / hd;
    assert!(hd > 0 && q.len() == g * hd && out.len() == g * n, "attention score shapes");
    assert!(n == 0 || keys.len() >= (n - 1) * stride + hd, "key rows out of range");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd.is_multiple_of(8) {
        // SAFETY: AVX2/FMA/F16C were detected just above; shapes checked above.
        match g {
            1 => return unsafe { scores_f16_avx2::<1>(keys, stride, n, q, hd, scale, out) },
            2 => return unsafe { scores_f16_avx2::<2>(keys, stride, n, q, hd, scale, out) },
            4 => return unsafe { scores_f16_avx2::<4>(keys, stride, n, q, hd, scale, out) },
            8 => return unsafe { scores_f16_avx2::<8>(keys, stride, n, q, hd, scale, out) },
            _ => {}
        }
    }
    for h in 0..g {
        for j in 0..n {
            out[h * n + j] = dot_f16_f32(&keys[j * stride..j * stride + hd], &q[h * hd..(h + 1) * hd]) * scale;
        }
    }
}

/// Attention outputs of `G = out.len() / hd` heads that share one KV head:
/// `out[h·hd + i] = Σ_j p[h·n + j] · vals[j·stride + i]`, summed over j in order with one fused multiply-add per
/// term, as [`axpy_f16`] into a zeroed row does — bit for bit. The AVX2 path keeps the heads' partial rows in
/// registers across all keys instead of loading and storing them once per key.
pub fn weighted_sum_f16(vals: &[f16], stride: usize, n: usize, p: &[f32], hd: usize, out: &mut [f32]) {
    let g = out.len() / hd;
    assert!(hd > 0 && out.len() == g * hd && p.len() == g * n, "attention value shapes");
    assert!(n == 0 || vals.len() >= (n - 1) * stride + hd, "value rows out of range");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd.is_multiple_of(8) {
        // SAFETY: AVX2/FMA/F16C were detected just above; shapes checked above.
        match g {
            1 => return unsafe { weighted_sum_f16_avx2::<1>(vals, stride, n, p, hd, out) },
            2 => return unsafe { weighted_sum_f16_avx2::<2>(vals, stride, n, p, hd, out) },
            4 => return unsafe { weighted_sum_f16_avx2::<4>(vals, stride, n, p, hd, out) },
            8 => return unsafe { weighted_sum_f16_avx2::<8>(vals, stride, n, p, hd, out) },
            _ => {}
        }
    }
    out.fill(0.0);
    for h in 0..g {
        for j in 0..n {
            axpy_f16(&mut out[h * hd..(h + 1) * hd], p[h * n + j], &vals[j * stride..j * stride + hd]);
        }
    }
}

pub fn dot_f16_f32_scalar(k: &[f16], q: &[f32]) -> f32 {
    k.iter().zip(q).map(|(a, b)| a.to_f32() * b).sum()
}

pub fn axpy_f16_scalar(acc: &mut [f32], w: f32, v: &[f16]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += w * x.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| crate::dot::Backend::detect() == crate::dot::Backend::Avx2)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_f32_avx2(k: &[f16], q: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = k.len().min(q.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both slices; unaligned loads.
        let kv = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i)) };
        let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(i)) };
        acc = _mm256_fmadd_ps(kv, qv, acc);
        i += 8;
    }
    // SAFETY: AVX is enabled in this function.
    let mut s = unsafe { sum_lanes_in_order(acc) };
    for j in i..n {
        s += k[j].to_f32() * q[j];
    }
    s
}

/// Sum of a vector's lanes in lane order (`Iterator::sum` over the stored lanes): how `dot_f16_f32_avx2` and the
/// grouped scores finish, so both give the same bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sum_lanes_in_order(v: std::arch::x86_64::__m256) -> f32 {
    let mut buf = [0f32; 8];
    // SAFETY: buf has 8 floats.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(buf.as_mut_ptr(), v) };
    buf.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_f16_avx2<const G: usize>(
    keys: &[f16],
    stride: usize,
    n: usize,
    q: &[f32],
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (kp, qp) = (keys.as_ptr(), q.as_ptr());
    // Two keys at a time: 2·G independent FMA chains hide the FMA latency that one chain per head would expose.
    let mut j = 0;
    while j < n {
        let two = j + 1 < n;
        let mut acc = [[_mm256_setzero_ps(); G]; 2];
        let mut i = 0;
        while i < hd {
            // SAFETY: key j (and j+1 when `two`) spans [j·stride, j·stride + hd) within `keys` (checked by the
            // caller); q holds G rows of hd; i + 8 <= hd.
            unsafe {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(j * stride + i) as *const __m128i));
                for (h, a) in acc[0].iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(k0, _mm256_loadu_ps(qp.add(h * hd + i)), *a);
                }
                if two {
                    let k1 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add((j + 1) * stride + i) as *const __m128i));
                    for (h, a) in acc[1].iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(k1, _mm256_loadu_ps(qp.add(h * hd + i)), *a);
                    }
                }
            }
            i += 8;
        }
        for (jj, acc) in acc.iter().enumerate().take(if two { 2 } else { 1 }) {
            for (h, a) in acc.iter().enumerate() {
                // SAFETY: AVX is enabled in this function.
                out[h * n + j + jj] = unsafe { sum_lanes_in_order(*a) } * scale;
            }
        }
        j += if two { 2 } else { 1 };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_f16_avx2<const G: usize>(
    vals: &[f16],
    stride: usize,
    n: usize,
    p: &[f32],
    hd: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (vp, pp, op) = (vals.as_ptr(), p.as_ptr(), out.as_mut_ptr());
    // Sixteen dimensions of every head at a time: 2·G accumulators stay in registers across all n keys.
    let mut i = 0;
    while i < hd {
        let wide = i + 16 <= hd;
        let (mut lo, mut hi) = ([_mm256_setzero_ps(); G], [_mm256_setzero_ps(); G]);
        for j in 0..n {
            // SAFETY: value row j spans [j·stride, j·stride + hd) within `vals` (checked by the caller), i + 8
            // (i + 16 when `wide`) <= hd; p holds G rows of n.
            unsafe {
                let v0 = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(j * stride + i) as *const __m128i));
                let v1 = if wide {
                    _mm256_cvtph_ps(_mm_loadu_si128(vp.add(j * stride + i + 8) as *const __m128i))
                } else {
                    v0
                };
                for (h, (lo, hi)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
                    let w = _mm256_broadcast_ss(&*pp.add(h * n + j));
                    *lo = _mm256_fmadd_ps(w, v0, *lo);
                    if wide {
                        *hi = _mm256_fmadd_ps(w, v1, *hi);
                    }
                }
            }
        }
        for (h, (lo, hi)) in lo.iter().zip(&hi).enumerate() {
            // SAFETY: out holds G rows of hd; i + 8 (i + 16 when `wide`) <= hd.
            unsafe {
                _mm256_storeu_ps(op.add(h * hd + i), *lo);
                if wide {
                    _mm256_storeu_ps(op.add(h * hd + i + 8), *hi);
                }
            }
        }
        i += if wide { 16 } else { 8 };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_avx2(acc: &mut [f32], w: f32, v: &[f16]) {
    use std::arch::x86_64::*;
    let n = acc.len().min(v.len());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both slices.
        unsafe {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
            _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_fmadd_ps(wv, x, a));
        }
        i += 8;
    }
    for j in i..n {
        acc[j] += w * v[j].to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mad_f16_avx2(acc: &mut [f16], v: &[f16], w: f32) {
    use std::arch::x86_64::*;
    let n = acc.len().min(v.len());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n bounds both slices.
        unsafe {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
            let a = _mm256_cvtph_ps(_mm_loadu_si128(acc.as_ptr().add(i) as *const __m128i));
            let r = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_fmadd_ps(x, wv, a));
            _mm_storeu_si128(acc.as_mut_ptr().add(i) as *mut __m128i, r);
        }
        i += 8;
    }
    mad_f16_scalar(&mut acc[i..n], &v[i..n], w);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform values in [-1, 1] from a xorshift32 stream.
    fn uniform(seed: u32) -> impl FnMut() -> f32 {
        let mut rnd = crate::xorshift32(seed);
        move || (rnd() as f32 / u32::MAX as f32) * 2.0 - 1.0
    }

    #[test]
    fn simd_equals_scalar() {
        let mut rnd = uniform(12345);
        for n in [1usize, 7, 8, 64, 129] {
            let k: Vec<f16> = (0..n).map(|_| f16::from_f32(rnd())).collect();
            let q: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let (a, b) = (dot_f16_f32(&k, &q), dot_f16_f32_scalar(&k, &q));
            assert!((a - b).abs() < 1e-4, "{n}: {a} vs {b}");
            let mut acc1: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let mut acc2 = acc1.clone();
            axpy_f16(&mut acc1, 0.37, &k);
            axpy_f16_scalar(&mut acc2, 0.37, &k);
            for (x, y) in acc1.iter().zip(&acc2) {
                assert!((x - y).abs() < 1e-6);
            }
            // Fused multiply-add then one rounding to f16: bit-identical in both paths.
            let mut h1: Vec<f16> = (0..n).map(|_| f16::from_f32(rnd())).collect();
            let mut h2 = h1.clone();
            mad_f16(&mut h1, &k, -0.61);
            mad_f16_scalar(&mut h2, &k, -0.61);
            assert_eq!(h1, h2);
        }
    }

    /// The grouped score and value kernels equal per-head `dot_f16_f32` / `axpy_f16` calls bit for bit, for every
    /// group size (the SIMD specialisations and the generic fallback), odd key counts and a padded stride.
    #[test]
    fn grouped_attention_equals_per_head_calls() {
        let mut rnd = uniform(777);
        for (g, hd, n) in [(1usize, 128usize, 7usize), (2, 64, 1), (3, 24, 5), (4, 128, 33), (8, 8, 2), (4, 40, 0)] {
            let stride = hd * 2 + 8;
            let rows: Vec<f16> = (0..n * stride + hd).map(|_| f16::from_f32(rnd())).collect();
            let q: Vec<f32> = (0..g * hd).map(|_| rnd()).collect();
            let mut scores = vec![0f32; g * n];
            scores_f16(&rows, stride, n, &q, hd, 0.125, &mut scores);
            let p: Vec<f32> = (0..g * n).map(|_| rnd().abs()).collect();
            let mut out = vec![f32::NAN; g * hd];
            weighted_sum_f16(&rows, stride, n, &p, hd, &mut out);
            for h in 0..g {
                let mut want = vec![0f32; hd];
                for j in 0..n {
                    let row = &rows[j * stride..j * stride + hd];
                    let sc = dot_f16_f32(row, &q[h * hd..(h + 1) * hd]) * 0.125;
                    assert_eq!(scores[h * n + j].to_bits(), sc.to_bits(), "g {g} hd {hd}: score {h},{j}");
                    axpy_f16(&mut want, p[h * n + j], row);
                }
                for (i, (a, b)) in out[h * hd..(h + 1) * hd].iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "g {g} hd {hd}: output {h},{i}");
                }
            }
        }
    }
}
