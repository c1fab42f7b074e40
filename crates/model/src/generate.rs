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
struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

impl StopFilter {
    fn new(stops: Vec<String>) -> StopFilter {
        StopFilter { stops, pending: String::new() }
    }

    /// Text held back so far (emit it when generation ends without a stop string).
    fn take_pending(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Returns (text safe to emit, whether a stop string was found).
    fn push(&mut self, s: &str) -> (String, bool) {
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

/// The per-token half of generation, shared by [`generate`] and the server's scheduler: sampling, end-of-generation,
/// detokenizing (whole UTF-8 characters only), stop strings, and the token and context limits.
pub struct Continuation {
    sampler: Sampler,
    /// Prompt then generated tokens (the repetition penalty looks at both).
    history: Vec<u32>,
    n_prompt: usize,
    utf8: Utf8Stream,
    stop: StopFilter,
    max_tokens: usize,
    ignore_eos: bool,
    hit_stop: bool,
}

impl Continuation {
    pub fn new(prompt: &[u32], opts: &GenerateOptions) -> Continuation {
        Continuation {
            sampler: Sampler::new(opts.sampling.clone()),
            history: prompt.to_vec(),
            n_prompt: prompt.len(),
            utf8: Utf8Stream::default(),
            stop: StopFilter::new(opts.stop.clone()),
            max_tokens: opts.max_tokens,
            ignore_eos: opts.ignore_eos,
            hit_stop: false,
        }
    }

    /// Samples the next token from the logits of the last one (masking end-of-generation tokens in place when
    /// they are ignored). Returns the text that may be shown now and, if generation is over, why. Otherwise the
    /// sampled token ([`Continuation::last_token`]) is to be fed at position [`Continuation::next_pos`].
    pub fn accept(&mut self, tok: &Tokenizer, logits: &mut [f32], n_ctx: usize) -> (String, Option<FinishReason>) {
        if self.generated().len() >= self.max_tokens {
            return (String::new(), Some(FinishReason::Length));
        }
        if self.ignore_eos {
            for &id in tok.eog_ids() {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let next = self.sampler.sample(logits, &self.history);
        if tok.is_eog(next) {
            return (String::new(), Some(FinishReason::Stop));
        }
        self.history.push(next);
        let text = self.utf8.push(&tok.token_to_piece(next, false));
        let (out, hit) = self.stop.push(&text);
        let finish = if hit {
            self.hit_stop = true;
            Some(FinishReason::Stop)
        } else if self.generated().len() >= self.max_tokens {
            Some(FinishReason::Length)
        } else if self.next_pos() >= n_ctx {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        (out, finish)
    }

    /// Text held back at the end (an unfinished UTF-8 sequence, a partial stop-string prefix); nothing after a
    /// stop string.
    pub fn flush(&mut self) -> String {
        if self.hit_stop {
            return String::new();
        }
        let (mut rest, _) = self.stop.push(&self.utf8.finish());
        rest.push_str(&self.stop.take_pending());
        rest
    }

    pub fn generated(&self) -> &[u32] {
        &self.history[self.n_prompt..]
    }

    /// The token sampled last (the last prompt token before any was sampled).
    pub fn last_token(&self) -> u32 {
        *self.history.last().expect("a non-empty prompt")
    }

    /// The position of [`Continuation::last_token`].
    pub fn next_pos(&self) -> usize {
        self.history.len() - 1
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
    let start = kv.reuse_prefix(seq, prompt);
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

    let mut cont = Continuation::new(prompt, opts);
    let t1 = Instant::now();
    let finish = loop {
        let (text, done) = cont.accept(tok, &mut logits, kv.n_ctx);
        if !text.is_empty() && !on_text(&text) {
            break FinishReason::Cancelled;
        }
        if let Some(f) = done {
            break f;
        }
        let (token, pos) = (cont.last_token(), cont.next_pos());
        logits = model.forward(&[BatchToken { token, pos, seq, logits: true }], kv, pool)?;
    };
    if finish != FinishReason::Cancelled {
        let rest = cont.flush();
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    let generated = cont.generated().to_vec();
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
