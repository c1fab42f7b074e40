//! Model hyper-parameters and architecture flags, read from GGUF metadata. Every architecture ternlm runs is a
//! set of flags over one decoder (see `decoder.rs`), not a copy of it.

use anyhow::{bail, Result};
use ternlm_gguf::GgufFile;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs (2i, 2i+1): llama.cpp's `llama` GGUFs (q/k rows permuted by the converter).
    Interleaved,
    /// Rotate halves (i, i + d/2): NeoX / Qwen / BitNet b1.58.
    Neox,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnActivation {
    /// silu(gate) · up
    SiluGated,
    /// relu(gate)² · up (BitNet b1.58)
    ReluSqrGated,
}

/// How attention rounds, chosen to agree with the engine that defines each architecture's reference outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionNumerics {
    /// llama.cpp's CPU flash attention (its default): Q rounded to f16, online softmax, f16 V accumulator.
    FlashF16,
    /// bitnet.cpp (no flash attention): Q rounded to f16, f32 softmax, V weighted by the f32 probabilities.
    F32Probs,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: String,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_base: f32,
    /// Linear RoPE scaling: positions are multiplied by this (1 / scaling factor).
    pub rope_freq_scale: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    pub n_ctx_train: usize,
    pub ffn_act: FfnActivation,
    /// RMSNorms before the attention output and FFN down projections (BitNet's SubLN).
    pub sub_norms: bool,
    /// Use the token embedding as the output head even when an `output` tensor exists (BitNet b1.58).
    pub force_tied_head: bool,
    pub attention: AttentionNumerics,
    /// Dot F16 weights with f32 activations (bitnet.cpp) rather than f16 ones (llama.cpp).
    pub f16_weights_f32_acts: bool,
}

impl ModelConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig> {
        let arch = f
            .get_str("general.architecture")?
            .ok_or_else(|| anyhow::anyhow!("{}: missing key 'general.architecture'", f.path().display()))?
            .to_string();
        let (rope_style, ffn_act, sub_norms, force_tied_head) = match arch.as_str() {
            "llama" | "mistral" | "granite" => (RopeStyle::Interleaved, FfnActivation::SiluGated, false, false),
            "qwen2" | "qwen3" => (RopeStyle::Neox, FfnActivation::SiluGated, false, false),
            "bitnet-b1.58" | "bitnet-25" => (RopeStyle::Neox, FfnActivation::ReluSqrGated, true, true),
            // 1bitLLM: same graph as bitnet-b1.58 but SiLU-gated (llama.cpp and bitnet.cpp both use NeoX RoPE here).
            "bitnet" => (RopeStyle::Neox, FfnActivation::SiluGated, true, false),
            other => bail!(
                "{}: architecture '{other}' is not supported (supported: llama, qwen2, qwen3, bitnet-b1.58, bitnet-25, bitnet)",
                f.path().display()
            ),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize> {
            let v = f.require_u64(&key(k))?;
            if v == 0 || v > 1 << 24 {
                bail!("{}: key '{}' is {v}, expected 1..=16777216", f.path().display(), key(k));
            }
            Ok(v as usize)
        };
        let n_embd = req("embedding_length")?;
        let n_layer = req("block_count")?;
        let n_ff = req("feed_forward_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = match f.get_u64(&key("attention.head_count_kv"))? {
            Some(v) => v as usize,
            None => n_head,
        };
        let head_dim = match f.get_u64(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => n_embd / n_head,
        };
        if n_head_kv == 0 || n_head % n_head_kv != 0 || head_dim == 0 || head_dim % 2 != 0 {
            bail!(
                "{}: {n_head} heads / {n_head_kv} KV heads / head dim {head_dim} is not a valid attention shape",
                f.path().display()
            );
        }
        let rope_dim = f.get_u64(&key("rope.dimension_count"))?.map(|v| v as usize).unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            bail!(
                "{}: rope.dimension_count {rope_dim} must be even and at most the head dim {head_dim}",
                f.path().display()
            );
        }
        let rope_base = f.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
        let rope_freq_scale = match (f.get_str(&key("rope.scaling.type"))?, f.get_f64(&key("rope.scaling.factor"))?) {
            (Some("linear"), Some(s)) if s > 0.0 => (1.0 / s) as f32,
            _ => 1.0,
        };
        let rms_eps = f.get_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32;
        let n_ctx_train = f.get_u64(&key("context_length"))?.unwrap_or(4096) as usize;
        let n_vocab = match f.get_u64(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => f
                .get_array("tokenizer.ggml.tokens")?
                .map(|a| a.len())
                .ok_or_else(|| anyhow::anyhow!("{}: no vocab_size and no tokenizer.ggml.tokens", f.path().display()))?,
        };
        Ok(ModelConfig {
            arch,
            n_vocab,
            n_embd,
            n_layer,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            rope_base,
            rope_freq_scale,
            rope_style,
            rms_eps,
            n_ctx_train,
            ffn_act,
            sub_norms,
            force_tied_head,
            // The ternary architectures' reference engine is bitnet.cpp; everything else is checked against llama.cpp.
            attention: if sub_norms { AttentionNumerics::F32Probs } else { AttentionNumerics::FlashF16 },
            f16_weights_f32_acts: sub_norms,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
