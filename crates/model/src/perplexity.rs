//! Perplexity exactly as llama.cpp's `llama-perplexity` computes it: the text is cut into chunks of `n_ctx`
//! tokens; each chunk is evaluated from an empty cache (its first token replaced by BOS when the vocabulary adds
//! one), and only the second half of each window is scored, so every scored token has at least n_ctx/2 of context.

use crate::decoder::{BatchToken, Model};
use anyhow::{ensure, Result};
use ternlm_kernels::ThreadPool;

#[derive(Clone, Debug)]
pub struct PerplexityResult {
    /// Running estimate after each chunk (what llama.cpp prints as `[i]value`).
    pub running: Vec<f64>,
    pub ppl: f64,
    /// Standard error of the estimate, as llama.cpp reports it.
    pub stderr: f64,
}

/// `log p(tok)` under `logits`, with llama.cpp's arithmetic (f32 max, f64 sum of exponentials).
pub fn log_softmax_at(logits: &[f32], tok: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    (logits[tok] - max) as f64 - sum.ln()
}

pub fn perplexity(
    model: &Model,
    pool: &ThreadPool,
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<PerplexityResult> {
    ensure!(n_ctx >= 8, "context size {n_ctx} is too small for perplexity");
    let mut n_chunks = tokens.len() / n_ctx;
    if let Some(m) = max_chunks {
        n_chunks = n_chunks.min(m);
    }
    ensure!(n_chunks > 0, "the text has {} tokens; perplexity at -c {n_ctx} needs at least {n_ctx}", tokens.len());
    let first = n_ctx / 2;
    let mut kv = model.new_kv_cache(n_ctx, 1);
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunks);
    for c in 0..n_chunks {
        let chunk = &tokens[c * n_ctx..(c + 1) * n_ctx];
        kv.truncate(0, 0);
        let batch: Vec<BatchToken> = chunk
            .iter()
            .enumerate()
            .map(|(i, &t)| BatchToken {
                token: if i == 0 { bos.unwrap_or(t) } else { t },
                pos: i,
                seq: 0,
                logits: i >= first && i + 1 < n_ctx,
            })
            .collect();
        let logits = model.forward(&batch, &mut kv, pool)?;
        let nv = model.cfg.n_vocab;
        for (j, row) in logits.chunks_exact(nv).enumerate() {
            let target = chunk[first + j + 1] as usize;
            let v = -log_softmax_at(row, target);
            nll += v;
            nll2 += v * v;
        }
        count += n_ctx - 1 - first;
        let ppl = (nll / count as f64).exp();
        running.push(ppl);
        on_chunk(c, ppl);
    }
    let mean = nll / count as f64;
    let var = (nll2 / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    let stderr = ppl * (var / (count as f64 - 1.0).max(1.0)).sqrt();
    Ok(PerplexityResult { running, ppl, stderr })
}
