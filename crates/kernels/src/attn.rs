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
    let mut buf = [0f32; 8];
    // SAFETY: buf has 8 floats.
    unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), acc) };
    let mut s: f32 = buf.iter().sum();
    for j in i..n {
        s += k[j].to_f32() * q[j];
    }
    s
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

    #[test]
    fn simd_equals_scalar() {
        let mut s = 12345u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        };
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
}
