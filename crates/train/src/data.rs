//! Right-padded training batches with loss masks, and plain-text corpora for continued pre-training. The tasks
//! themselves (SST-2, QNLI cast as generation) live in `ternlm_model::tasks`, shared with the engine's accuracy.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use ternlm_tokenizer::Tokenizer;

pub use ternlm_model::tasks::{label_tokens, Example, Task};

/// A right-padded batch: inputs [B, T], next-token targets [B·T], loss mask [B·T], key mask [B, T].
pub struct Batch {
    pub tokens: Tensor,
    pub targets: Tensor,
    pub loss_mask: Tensor,
    pub key_mask: Tensor,
    pub n_tokens: usize,
    /// Flat indices (into B·T) of the supervised positions, and their targets: the loss needs logits only there.
    pub loss_rows: Tensor,
    pub loss_targets: Tensor,
    pub n_loss_rows: usize,
}

/// Builds a batch from (sequence, index where the supervised part starts) pairs; sequences longer than `max_len`
/// keep their end.
pub fn make_batch(seqs: &[(Vec<u32>, usize)], max_len: usize, dev: &Device) -> Result<Batch> {
    let t = seqs.iter().map(|(s, _)| s.len().min(max_len + 1) - 1).max().unwrap_or(1).max(1);
    let b = seqs.len();
    let (mut tok, mut tgt, mut lm, mut km) =
        (vec![0u32; b * t], vec![0u32; b * t], vec![0f32; b * t], vec![0f32; b * t]);
    for (i, (s, sup)) in seqs.iter().enumerate() {
        let cut = s.len().saturating_sub(max_len + 1);
        let s = &s[cut..];
        let sup = sup.saturating_sub(cut);
        for j in 0..s.len() - 1 {
            tok[i * t + j] = s[j];
            tgt[i * t + j] = s[j + 1];
            km[i * t + j] = 1.0;
            if j + 1 >= sup {
                lm[i * t + j] = 1.0;
            }
        }
    }
    let n_tokens = km.iter().filter(|&&v| v > 0.0).count();
    let rows: Vec<u32> = (0..b * t).filter(|&i| lm[i] > 0.0).map(|i| i as u32).collect();
    let row_targets: Vec<u32> = rows.iter().map(|&i| tgt[i as usize]).collect();
    let n_loss_rows = rows.len();
    Ok(Batch {
        loss_rows: Tensor::from_vec(rows, n_loss_rows, dev)?,
        loss_targets: Tensor::from_vec(row_targets, n_loss_rows, dev)?,
        n_loss_rows,
        tokens: Tensor::from_vec(tok, (b, t), dev)?,
        targets: Tensor::from_vec(tgt, b * t, dev)?,
        loss_mask: Tensor::from_vec(lm, b * t, dev)?,
        key_mask: Tensor::from_vec(km, (b, t), dev)?,
        n_tokens,
    })
}

/// Token chunks of `len + 1` from a text file (for continued pre-training); the model's BOS starts each chunk.
pub fn text_chunks(path: &Path, tok: &Tokenizer, len: usize) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let ids = tok.encode(&text, false, false);
    Ok(ids.chunks_exact(len).map(|c| tok.bos.into_iter().chain(c.iter().copied()).collect()).collect())
}
