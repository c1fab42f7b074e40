//! BitNet quantization-aware training: absmean ternary weights and per-token int8 activations, both with the
//! straight-through estimator (`x + (quant(x) - x).detach()`). The forward semantics are exactly what ternlm's
//! I2_S inference path computes (and what `ternlm convert` writes), so a trained student exports losslessly:
//! weights `Δ = max(mean|W|, 1e-5)`, `Wq = Δ · clamp(round(W / Δ), -1, 1)`; activations per row
//! `s = 127 / max(max|x|, 1e-5)`, `Xq = clamp(round(x · s), -128, 127) / s`.
//!
//! candle's `round` rounds halves away from zero where ternlm's kernels round them to even; the two differ only
//! on exact .5 ties, which do not occur for trained float weights and activations in practice.

use candle_core::{Result, Tensor, D};

/// Absmean ternary values of a weight matrix (no gradient path).
pub fn ternary_values(w: &Tensor) -> Result<Tensor> {
    let delta = w.abs()?.mean_all()?.maximum(1e-5)?;
    w.broadcast_div(&delta)?.round()?.clamp(-1f32, 1f32)?.broadcast_mul(&delta)
}

/// Ternary weights with the straight-through estimator: forward = [`ternary_values`], gradient = identity.
pub fn ternary_ste(w: &Tensor) -> Result<Tensor> {
    let q = ternary_values(&w.detach())?;
    w + (q - w)?.detach()
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
