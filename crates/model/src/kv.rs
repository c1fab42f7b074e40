//! The KV cache: one slot per sequence, each holding f16 keys and values for every layer, so that one batched
//! forward pass can serve several independent sequences (continuous batching).

use half::f16;

pub struct SeqCache {
    /// Per layer: `capacity × kv_dim` keys, then values.
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    /// The tokens whose keys/values are held, by position (so a new prompt can reuse a shared prefix).
    tokens: Vec<u32>,
}

pub struct KvCache {
    pub n_ctx: usize,
    pub kv_dim: usize,
    pub n_layer: usize,
    slots: Vec<SeqCache>,
}

impl KvCache {
    pub fn new(n_layer: usize, kv_dim: usize, n_ctx: usize, n_seq: usize) -> KvCache {
        let slot = || SeqCache {
            k: (0..n_layer).map(|_| vec![f16::ZERO; n_ctx * kv_dim]).collect(),
            v: (0..n_layer).map(|_| vec![f16::ZERO; n_ctx * kv_dim]).collect(),
            tokens: Vec::new(),
        };
        KvCache { n_ctx, kv_dim, n_layer, slots: (0..n_seq).map(|_| slot()).collect() }
    }

    pub fn n_seq(&self) -> usize {
        self.slots.len()
    }

    pub fn seq_len(&self, seq: usize) -> usize {
        self.slots[seq].tokens.len()
    }

    /// The tokens cached for a sequence, by position.
    pub fn seq_tokens(&self, seq: usize) -> &[u32] {
        &self.slots[seq].tokens
    }

    /// How many leading tokens of `tokens` the slot already holds.
    pub fn common_prefix(&self, seq: usize, tokens: &[u32]) -> usize {
        self.seq_tokens(seq).iter().zip(tokens).take_while(|(a, b)| a == b).count()
    }

    /// Keeps the part of the slot that `prompt` starts with, and forgets the rest; at least the last prompt token
    /// is left to compute, since its logits start generation. Returns how many positions were kept.
    pub fn reuse_prefix(&mut self, seq: usize, prompt: &[u32]) -> usize {
        let keep = self.common_prefix(seq, prompt).min(prompt.len().saturating_sub(1));
        self.truncate(seq, keep);
        keep
    }

    /// Forgets positions `pos..` of a sequence (e.g. to start it over or roll back).
    pub fn truncate(&mut self, seq: usize, pos: usize) {
        self.slots[seq].tokens.truncate(pos);
    }

    pub fn bytes(&self) -> usize {
        self.slots.len() * self.n_layer * 2 * self.n_ctx * self.kv_dim * 2
    }

    pub(crate) fn write(&mut self, seq: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let d = self.kv_dim;
        let s = &mut self.slots[seq];
        for (dst, src) in s.k[layer][pos * d..(pos + 1) * d].iter_mut().zip(k) {
            *dst = f16::from_f32(*src);
        }
        for (dst, src) in s.v[layer][pos * d..(pos + 1) * d].iter_mut().zip(v) {
            *dst = f16::from_f32(*src);
        }
    }

    /// Records that `token` now occupies `pos` (positions after it are forgotten).
    pub(crate) fn record(&mut self, seq: usize, pos: usize, token: u32) {
        let t = &mut self.slots[seq].tokens;
        t.truncate(pos);
        t.push(token);
    }

    pub(crate) fn layer(&self, seq: usize, layer: usize) -> (&[f16], &[f16]) {
        let s = &self.slots[seq];
        (&s.k[layer], &s.v[layer])
    }
}
