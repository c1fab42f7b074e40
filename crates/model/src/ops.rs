//! Elementwise and row operations of the forward pass, written to match ggml's arithmetic where it matters.

/// RMSNorm of one row, then times `w`, in ggml's order: squares in f32 summed in f64, `x·(1/√(mean+eps))`, then `·w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = (v * scale) * g;
    }
}

pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = (*v * scale) * g;
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in x.iter_mut() {
        // e^d rounds to +0 below ln(2^-150) ≈ -103.97; libm reaches that answer through its slow underflow
        // path (errno), which long prompts over random-weight models hit for most keys. Same result, no call.
        let d = *v - max;
        *v = if d < -104.0 { 0.0 } else { d.exp() };
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Rotary embedding of one head in place. `cos_sin` holds (cos θ_i, sin θ_i) for i < rope_dim/2.
pub fn rope(x: &mut [f32], cos_sin: &[(f32, f32)], neox: bool) {
    let half = cos_sin.len();
    for (i, &(c, s)) in cos_sin.iter().enumerate() {
        let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

/// ggml's rope cache: θ starts at the (scaled) position and is multiplied by base^(-2/d) per pair, in f32.
pub fn rope_cos_sin(
    pos: usize,
    rope_dim: usize,
    base: f32,
    freq_scale: f32,
    freq_factors: Option<&[f32]>,
) -> Vec<(f32, f32)> {
    let theta_scale = base.powf(-2.0 / rope_dim as f32);
    let mut theta = pos as f32;
    (0..rope_dim / 2)
        .map(|i| {
            let ff = freq_factors.map_or(1.0, |f| f[i]);
            let t = freq_scale * (theta / ff);
            theta *= theta_scale;
            (t.cos(), t.sin())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let x = vec![3.0f32; 8];
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut out = vec![0.0; 8];
        rms_norm(&x, &w, 0.0, &mut out);
        for (o, g) in out.iter().zip(&w) {
            assert!((o - g).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_preserves_norm_and_matches_definition() {
        let cs = rope_cos_sin(7, 8, 10000.0, 1.0, None);
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let n0: f32 = x.iter().map(|v| v * v).sum();
        rope(&mut x, &cs, true);
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
        // Pair 0 of the NeoX layout rotates (x0, x4) by θ0 = pos.
        let t = 7.0f32;
        assert!((x[0] - (1.0 * t.cos() - 5.0 * t.sin())).abs() < 1e-5);
    }

    /// The softmax skips `exp` below -104 because every such argument rounds to +0; hold libm to that.
    #[test]
    fn exp_underflow_cutoff_is_exact() {
        let mut d = -104.0f32;
        while d > -300.0 {
            assert_eq!(d.exp().to_bits(), 0, "e^{d} is not +0");
            d = f32::from_bits(d.to_bits() + 997); // walk down through many magnitudes
        }
        assert!((-103.9f32).exp() > 0.0);
        let mut x = [0.0f32, -103.99, -104.5, -1e30, f32::NEG_INFINITY];
        let want: Vec<f32> = x.iter().map(|v| v.exp()).collect();
        softmax(&mut x);
        let sum: f64 = want.iter().map(|&v| v as f64).sum();
        for (a, w) in x.iter().zip(&want) {
            assert_eq!(a.to_bits(), (w * (1.0 / sum) as f32).to_bits());
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1.0f32, 2.0, 3.0, -1e9];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }
}
