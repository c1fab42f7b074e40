//! Streaming generation for one sequence: prompt in batches, then sample → forward until EOG, the token limit, or
//! a stop string.

use crate::decoder::{BatchToken, Model};
use crate::kv::KvCache;
use crate::sampling::{Sampler, SamplingParams};
use anyhow::Result;
use std::time::{Duration, Instant};
use ternlm_kernels::ThreadPool;
use ternlm_tokenizer::{Tokenizer, Utf8Stream};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the stop string itself is not emitted.
    pub stop: Vec<String>,
    /// Prompt tokens per forward pass.
    pub batch_size: usize,
    /// Never sample end-of-generation tokens (for benchmarks), as llama.cpp's `--ignore-eos`.
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            batch_size: 512,
            ignore_eos: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token, or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Context full.
    ContextFull,
    /// The callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct GenerateStats {
    pub n_prompt: usize,
    /// Prompt tokens whose keys/values were already in the slot.
    pub n_prompt_reused: usize,
    pub n_generated: usize,
    pub prompt_time: Duration,
    pub gen_time: Duration,
    pub finish: FinishReason,
    pub tokens: Vec<u32>,
}

/// Holds back text that may be the start of a stop string, so that a stop string split across tokens is never
/// emitted.
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> StopFilter {
        StopFilter { stops, pending: String::new() }
    }

    /// Text held back so far (emit it when generation ends without a stop string).
    pub fn take_pending(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Returns (text safe to emit, whether a stop string was found).
    pub fn push(&mut self, s: &str) -> (String, bool) {
        self.pending.push_str(s);
        if let Some(pos) =
            self.stops.iter().filter(|st| !st.is_empty()).filter_map(|st| self.pending.find(st.as_str())).min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|st| {
                (1..st.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&k| st.is_char_boundary(k) && self.pending.ends_with(&st[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }
}

/// Generates a continuation of `prompt` in KV slot `seq`, calling `on_text` with each piece of new text. Returning
/// `false` from `on_text` cancels. Whatever prefix of `prompt` the slot already holds (e.g. the earlier turns of a
/// chat) is reused; the rest of the slot is discarded.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    pool: &ThreadPool,
    kv: &mut KvCache,
    seq: usize,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerateStats> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty (no tokens to start from)");
    anyhow::ensure!(
        prompt.len() < kv.n_ctx,
        "the prompt has {} tokens but the context holds {}",
        prompt.len(),
        kv.n_ctx
    );
    // Keep the common prefix, but always recompute at least the last prompt token to get its logits.
    let cached = kv.seq_tokens(seq).iter().zip(prompt).take_while(|(a, b)| a == b).count();
    let start = cached.min(prompt.len() - 1);
    kv.truncate(seq, start);
    let t0 = Instant::now();
    let mut logits = Vec::new();
    let bs = opts.batch_size.max(1);
    for (ci, chunk) in prompt[start..].chunks(bs).enumerate() {
        let base = start + ci * bs;
        let last = base + chunk.len() == prompt.len();
        let batch: Vec<BatchToken> = chunk
            .iter()
            .enumerate()
            .map(|(i, &t)| BatchToken { token: t, pos: base + i, seq, logits: last && i + 1 == chunk.len() })
            .collect();
        logits = model.forward(&batch, kv, pool)?;
    }
    let prompt_time = t0.elapsed();

    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut history = prompt.to_vec();
    let mut generated = Vec::new();
    let mut utf8 = Utf8Stream::default();
    let mut stop = StopFilter::new(opts.stop.clone());
    let t1 = Instant::now();
    let mut finish = FinishReason::Length;
    let mut hit_stop = false;
    while generated.len() < opts.max_tokens {
        if opts.ignore_eos {
            for &id in tok.eog_ids() {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let next = sampler.sample(&logits, &history);
        if tok.is_eog(next) {
            finish = FinishReason::Stop;
            break;
        }
        generated.push(next);
        history.push(next);
        let text = utf8.push(&tok.token_to_piece(next, false));
        let (out, hit) = stop.push(&text);
        if !out.is_empty() && !on_text(&out) {
            finish = FinishReason::Cancelled;
            break;
        }
        if hit {
            hit_stop = true;
            finish = FinishReason::Stop;
            break;
        }
        if generated.len() >= opts.max_tokens {
            break;
        }
        let pos = history.len() - 1;
        if pos >= kv.n_ctx {
            finish = FinishReason::ContextFull;
            break;
        }
        logits = model.forward(&[BatchToken { token: next, pos, seq, logits: true }], kv, pool)?;
    }
    if !hit_stop && finish != FinishReason::Cancelled {
        // Flush what was held back: an unfinished UTF-8 sequence and any partial stop-string prefix.
        let (mut rest, _) = stop.push(&utf8.finish());
        rest.push_str(&stop.take_pending());
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    Ok(GenerateStats {
        n_prompt: prompt.len(),
        n_prompt_reused: start,
        n_generated: generated.len(),
        prompt_time,
        gen_time: t1.elapsed(),
        finish,
        tokens: generated,
    })
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    #[test]
    fn stop_strings_are_cut_and_prefixes_held() {
        let mut f = StopFilter { stops: vec!["</s>".into()], pending: String::new() };
        assert_eq!(f.push("hello <"), ("hello ".to_string(), false));
        assert_eq!(f.push("/"), (String::new(), false));
        assert_eq!(f.push("s> more"), (String::new(), true));
        let mut f = StopFilter { stops: vec!["User:".into()], pending: String::new() };
        assert_eq!(f.push("a Us"), ("a ".to_string(), false));
        assert_eq!(f.push("e"), (String::new(), false), "'Use' may still become 'User:'");
        assert_eq!(f.push("d"), ("Used".to_string(), false));
    }
}
