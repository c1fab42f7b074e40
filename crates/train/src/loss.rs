//! BitDistill's three losses. Each takes a row mask (1 = counts, 0 = padding / prompt) so padded batches are exact.
//!
//! - [`cross_entropy`]: next-token CE over masked rows.
//! - [`logits_kl`]: `τ² · KL(softmax(t/τ) ‖ softmax(s/τ))` averaged over masked rows. The τ² factor follows the
//!   official code (the paper's equation omits it); λ = 10 was tuned with it.
//! - [`attention_relation`]: MiniLMv2-style relations of Q, K or V at one layer: heads concatenated and re-split
//!   into `A_r` relation heads, each vector L2-normalised, relation = row softmax of the cosine matrix; padding keys
//!   are masked with a large finite negative (not -inf, which turns fully masked rows into NaN); the loss is
//!   `KL(teacher row ‖ student row)` averaged over valid query rows and relation heads.

use candle_core::{DType, Result, Tensor, D};

pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let z = x.broadcast_sub(&m)?;
    z.broadcast_sub(&z.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Mean of `per_row` ([N]) over rows where `mask` ([N], 0/1) is 1.
fn masked_mean(per_row: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let n = mask.sum_all()?.maximum(1.0)?;
    (per_row * mask)?.sum_all()?.broadcast_div(&n)
}

/// Cross-entropy of `logits` [N, V] against `targets` [N] (u32) over rows with `mask` [N] = 1.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(logits)?;
    let picked = lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    masked_mean(&picked.neg()?, mask)
}

/// `τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ))` per row, averaged over masked rows. Rows are [N, V].
pub fn logits_kl(teacher: &Tensor, student: &Tensor, tau: f64, mask: &Tensor) -> Result<Tensor> {
    let t = (teacher.detach() / tau)?;
    let s = (student / tau)?;
    let (pt, lpt, lps) = (softmax(&t)?, log_softmax(&t)?, log_softmax(&s)?);
    let kl = (pt * (lpt - lps)?)?.sum(D::Minus1)?;
    masked_mean(&kl, mask)? * (tau * tau)
}

/// Relation logits of `x` [B, T, Dx] with `heads` relation heads: [B, heads, T, T] cosines, padded keys
/// (`key_mask` [B, T] = 0) pushed to −1e4 so the row softmax ignores them.
fn relation_logits(x: &Tensor, heads: usize, key_mask: &Tensor) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    if d % heads != 0 {
        candle_core::bail!("attention relation: width {d} is not divisible into {heads} relation heads");
    }
    let x = x.reshape((b, t, heads, d / heads))?.transpose(1, 2)?.contiguous()?;
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    let x = x.broadcast_div(&norm)?;
    let cos = x.matmul(&x.transpose(2, 3)?.contiguous()?)?;
    // Padded keys: −1e4 is far below any cosine (|cos| ≤ 1) yet finite.
    let bias = ((key_mask.to_dtype(x.dtype())? - 1.0)? * 1e4)?.reshape((b, 1, 1, t))?;
    cos.broadcast_add(&bias)
}

/// Attention-relation distillation loss for one of Q, K, V ([B, T, D] each, heads concatenated; teacher detached).
pub fn attention_relation(teacher: &Tensor, student: &Tensor, heads: usize, mask: &Tensor) -> Result<Tensor> {
    let (b, t, _) = student.dims3()?;
    let lt = relation_logits(&teacher.detach(), heads, mask)?;
    let ls = relation_logits(student, heads, mask)?;
    let kl = (softmax(&lt)? * (log_softmax(&lt)? - log_softmax(&ls)?)?)?.sum(D::Minus1)?; // [B, H, T]
    let per_row = kl.mean(1)?.reshape(b * t)?; // mean over relation heads
    masked_mean(&per_row, &mask.reshape(b * t)?.to_dtype(per_row.dtype())?)
}

/// A 0/1 mask tensor from booleans.
pub fn mask(rows: &[bool], dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
    Tensor::from_iter(rows.iter().map(|&r| if r { 1f32 } else { 0f32 }), dev)?.to_dtype(dtype)
}
