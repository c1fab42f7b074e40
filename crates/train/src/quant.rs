//! BitNet quantization-aware training: absmean ternary weights and per-token int8 activations, both with the
//! straight-through estimator (`x + (quant(x) - x).detach()`). The forward semantics are exactly what ternlm's
//! I2_S inference path computes (and what `ternlm convert` writes), so a trained student exports losslessly:
//! weights `Δ = max(mean|W|, 1e-5)`, `Wq = Δ · clamp(round(W / Δ), -1, 1)`; activations per row
//! `s = 127 / max(max|x|, 1e-5)`, `Xq = clamp(round(x · s), -128, 127) / s`.
//!
//! candle's `round` rounds halves away from zero where ternlm's kernels round them to even; the two differ only
//! on exact .5 ties, which do not occur for trained float weights and activations in practice.

use candle_core::{Result, Tensor, D};

/// Absmean ternarization as one candle op: forward `Δ · clamp(round(W / Δ), -1, 1)` with `Δ = max(mean|W|, 1e-5)`
/// (mean accumulated in f64), backward the identity (the straight-through estimator). Fused because it runs on
/// every projection every step, and the ten tensor ops it replaces each made a full copy of the weights.
struct TernarySte;

/// The ternary values of `w` (f32, the training type).
fn absmean_ternary(w: &[f32]) -> Vec<f32> {
    let mean = (w.iter().map(|x| x.abs() as f64).sum::<f64>() / w.len().max(1) as f64) as f32;
    let delta = mean.max(1e-5);
    w.iter().map(|&x| (x / delta).round().clamp(-1.0, 1.0) * delta).collect()
}

/// The same in f64 (the gradient checks run in f64).
fn absmean_ternary_f64(w: &[f64]) -> Vec<f64> {
    let delta = (w.iter().map(|x| x.abs()).sum::<f64>() / w.len().max(1) as f64).max(1e-5);
    w.iter().map(|&x| (x / delta).round().clamp(-1.0, 1.0) * delta).collect()
}

impl candle_core::CustomOp1 for TernarySte {
    fn name(&self) -> &'static str {
        "ternary-ste"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage::{F32, F64};
        let out = match (storage, layout.contiguous_offsets()) {
            (F32(w), Some((a, b))) => F32(absmean_ternary(&w[a..b])),
            (F64(w), Some((a, b))) => F64(absmean_ternary_f64(&w[a..b])),
            _ => candle_core::bail!("ternary-ste: weights must be contiguous f32 or f64"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.clone()))
    }
}

/// Absmean ternary values of a weight matrix (no gradient path).
pub fn ternary_values(w: &Tensor) -> Result<Tensor> {
    w.detach().contiguous()?.apply_op1_no_bwd(&TernarySte)
}

/// Ternary weights with the straight-through estimator: forward = [`ternary_values`], gradient = identity.
pub fn ternary_ste(w: &Tensor) -> Result<Tensor> {
    w.contiguous()?.apply_op1(TernarySte)
}

/// Per-row (per-token) int8 fake quantization of the last dimension (no gradient path).
pub fn int8_values(x: &Tensor) -> Result<Tensor> {
    let s = x.abs()?.max_keepdim(D::Minus1)?.maximum(1e-5)?.recip()?.affine(127.0, 0.0)?;
    x.broadcast_mul(&s)?.round()?.clamp(-128f32, 127f32)?.broadcast_div(&s)
}

/// int8 activations with the straight-through estimator.
pub fn int8_ste(x: &Tensor) -> Result<Tensor> {
    let q = int8_values(&x.detach())?;
    x + (q - x)?.detach()
}

/// `x · Wᵀ (+ b)` for `x` of shape [.., in] and `w` [out, in]; ternary (BitNet) or full precision.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, ternary: bool) -> Result<Tensor> {
    let (x, w) = if ternary { (int8_ste(x)?, ternary_ste(w)?) } else { (x.clone(), w.clone()) };
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}
