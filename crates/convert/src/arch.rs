//! Which GGUF architecture a Hugging Face `config.json` describes, its hyper-parameters, and the tensor name map
//! between the two worlds (both directions: `convert` and `export-hf` share it).

use crate::hf::HfCheckpoint;
use anyhow::{bail, Result};
use serde_json::Value;

/// The model families the converter knows, by `config.json` `architectures[0]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `BitNetForCausalLM` (BitNet b1.58 2B4T): sub-norms, relu², tied head.
    BitNetB158,
    /// `BitnetForCausalLM` (1bitLLM bitnet_b1_58): sub-norms (`inner_attn_ln`, `ffn_layernorm`), SiLU.
    Bitnet1BitLlm,
    /// `LlamaForCausalLM` / `MistralForCausalLM`: ordinary Llamas and the ternary Llama3-8B-1.58, Falcon3/Falcon-E.
    Llama,
    Qwen2,
    Qwen3,
}

impl Family {
    pub fn from_hf_name(name: &str) -> Option<Family> {
        Some(match name {
            "BitNetForCausalLM" => Family::BitNetB158,
            "BitnetForCausalLM" => Family::Bitnet1BitLlm,
            "LlamaForCausalLM" | "MistralForCausalLM" => Family::Llama,
            "Qwen2ForCausalLM" => Family::Qwen2,
            "Qwen3ForCausalLM" => Family::Qwen3,
            _ => return None,
        })
    }

    pub fn from_gguf_arch(arch: &str) -> Option<Family> {
        Some(match arch {
            "bitnet-b1.58" | "bitnet-25" => Family::BitNetB158,
            "bitnet" => Family::Bitnet1BitLlm,
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            _ => return None,
        })
    }

    pub fn gguf_arch(self) -> &'static str {
        match self {
            Family::BitNetB158 => "bitnet-b1.58",
            Family::Bitnet1BitLlm => "bitnet",
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Family::BitNetB158 => "BitNetForCausalLM",
            Family::Bitnet1BitLlm => "BitnetForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    pub fn hf_model_type(self) -> &'static str {
        match self {
            Family::BitNetB158 => "bitnet",
            Family::Bitnet1BitLlm | Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// BitNet families: sub-norms are required and the projections are ternary by design.
    pub fn is_bitnet(self) -> bool {
        matches!(self, Family::BitNetB158 | Family::Bitnet1BitLlm)
    }

    /// llama.cpp's `llama` GGUFs use interleaved RoPE, so the converter permutes HF's rotate-half q/k rows.
    pub fn permutes_qk(self) -> bool {
        self == Family::Llama
    }

    pub const SUPPORTED: &'static str = "BitNetForCausalLM, BitnetForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM";
}

/// Hyper-parameters shared by both directions, in the names llama.cpp's GGUF keys use.
#[derive(Clone, Debug, PartialEq)]
pub struct Hparams {
    pub family: Family,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ctx: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Linear RoPE scaling factor (`rope_scaling: {type: linear}`), if any.
    pub rope_linear_factor: Option<f32>,
    /// Llama 3.1-style RoPE frequency factors (written as the `rope_freqs` tensor), if any.
    pub rope_llama3: Option<Llama3Rope>,
    pub tied: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Rope {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

impl Llama3Rope {
    /// llama.cpp's `rope_freqs` values (one per rotated pair), as its HF converter computes them.
    pub fn factors(&self, base: f32, head_dim: usize) -> Vec<f32> {
        let low_wavelen = self.original_max_position_embeddings / self.low_freq_factor;
        let high_wavelen = self.original_max_position_embeddings / self.high_freq_factor;
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / base.powf((2 * i) as f32 / head_dim as f32);
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                }
            })
            .collect()
    }
}

impl Hparams {
    pub fn from_hf(ck: &HfCheckpoint) -> Result<Hparams> {
        let dir = ck.dir.display();
        let archs = ck.config.get("architectures").and_then(|a| a.as_array());
        let name = archs.and_then(|a| a.first()).and_then(|v| v.as_str()).unwrap_or("");
        let Some(family) = Family::from_hf_name(name) else {
            if name.is_empty() {
                bail!("{dir}: config.json field 'architectures' is missing; expected one of {}", Family::SUPPORTED);
            }
            bail!(
                "{dir}: config.json field 'architectures' is '{name}', which ternlm cannot convert (supported: {})",
                Family::SUPPORTED
            );
        };
        let n_embd = ck.cfg_usize("hidden_size")?;
        let n_head = ck.cfg_usize("num_attention_heads")?;
        let n_head_kv = ck.cfg_opt_usize("num_key_value_heads")?.unwrap_or(n_head);
        let head_dim = ck.cfg_opt_usize("head_dim")?.unwrap_or(n_embd / n_head);
        if n_head % n_head_kv != 0 || head_dim % 2 != 0 || (ck.config.get("head_dim").is_none() && n_embd % n_head != 0)
        {
            bail!("{dir}: config.json: {n_head} attention heads, {n_head_kv} KV heads, head_dim {head_dim} is not a valid attention shape");
        }
        let (mut rope_linear_factor, mut rope_llama3) = (None, None);
        if let Some(rs) = ck.config.get("rope_scaling").filter(|v| !v.is_null()) {
            let kind = rs.get("rope_type").or(rs.get("type")).and_then(|v| v.as_str()).unwrap_or("");
            let f = |k: &str, d: f64| rs.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
            match kind {
                "linear" => rope_linear_factor = Some(f("factor", 1.0)),
                "llama3" => {
                    rope_llama3 = Some(Llama3Rope {
                        factor: f("factor", 8.0),
                        low_freq_factor: f("low_freq_factor", 1.0),
                        high_freq_factor: f("high_freq_factor", 4.0),
                        original_max_position_embeddings: f("original_max_position_embeddings", 8192.0),
                    })
                }
                "default" | "" => {}
                other => bail!("{dir}: config.json field 'rope_scaling' has type '{other}'; ternlm converts linear and llama3 scaling"),
            }
        }
        if family == Family::Bitnet1BitLlm && rope_linear_factor.is_none() {
            // bitnet.cpp's converter writes this for 1bitLLM models; keep files identical in shape.
            rope_linear_factor = Some(1.0);
        }
        let tied_default = family == Family::BitNetB158;
        let tied = match ck.config.get("tie_word_embeddings") {
            Some(Value::Bool(b)) => *b,
            _ => tied_default,
        } || family == Family::BitNetB158;
        let eps_key = if ck.config.get("rms_norm_eps").is_some() { "rms_norm_eps" } else { "layer_norm_eps" };
        Ok(Hparams {
            family,
            n_vocab: ck.cfg_usize("vocab_size")?,
            n_embd,
            n_layer: ck.cfg_usize("num_hidden_layers")?,
            n_ff: ck.cfg_usize("intermediate_size")?,
            n_head,
            n_head_kv,
            head_dim,
            n_ctx: ck.cfg_opt_usize("max_position_embeddings")?.unwrap_or(4096),
            rms_eps: ck.cfg_f64(eps_key)?.unwrap_or(1e-6) as f32,
            rope_base: ck.cfg_f64("rope_theta")?.unwrap_or(10000.0) as f32,
            rope_linear_factor,
            rope_llama3,
            tied,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

/// What a tensor is, independent of naming convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    TokenEmbd,
    OutputNorm,
    Output,
    Block(usize, BlockTensor),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockTensor {
    AttnNorm,
    Q,
    QBias,
    K,
    KBias,
    V,
    VBias,
    QNorm,
    KNorm,
    O,
    OBias,
    AttnSubNorm,
    FfnNorm,
    Gate,
    Up,
    Down,
    FfnSubNorm,
}

use BlockTensor as B;

/// GGUF tensor order within a block (the official 2B4T file's, extended with biases and QK-norms).
pub const BLOCK_ORDER: [BlockTensor; 17] = [
    B::AttnNorm,
    B::Q,
    B::QBias,
    B::K,
    B::KBias,
    B::V,
    B::VBias,
    B::QNorm,
    B::KNorm,
    B::O,
    B::OBias,
    B::AttnSubNorm,
    B::FfnNorm,
    B::Gate,
    B::Up,
    B::Down,
    B::FfnSubNorm,
];

impl BlockTensor {
    /// The seven projection matrices: the tensors a ternary model stores in a ternary type.
    pub fn is_projection(self) -> bool {
        matches!(self, B::Q | B::K | B::V | B::O | B::Gate | B::Up | B::Down)
    }

    fn gguf(self) -> &'static str {
        match self {
            B::AttnNorm => "attn_norm.weight",
            B::Q => "attn_q.weight",
            B::QBias => "attn_q.bias",
            B::K => "attn_k.weight",
            B::KBias => "attn_k.bias",
            B::V => "attn_v.weight",
            B::VBias => "attn_v.bias",
            B::QNorm => "attn_q_norm.weight",
            B::KNorm => "attn_k_norm.weight",
            B::O => "attn_output.weight",
            B::OBias => "attn_output.bias",
            B::AttnSubNorm => "attn_sub_norm.weight",
            B::FfnNorm => "ffn_norm.weight",
            B::Gate => "ffn_gate.weight",
            B::Up => "ffn_up.weight",
            B::Down => "ffn_down.weight",
            B::FfnSubNorm => "ffn_sub_norm.weight",
        }
    }

    /// HF names; the first is the one `export-hf` writes. 1bitLLM calls the sub-norms differently.
    fn hf(self, family: Family) -> &'static [&'static str] {
        match self {
            B::AttnNorm => &["input_layernorm.weight"],
            B::Q => &["self_attn.q_proj.weight"],
            B::QBias => &["self_attn.q_proj.bias"],
            B::K => &["self_attn.k_proj.weight"],
            B::KBias => &["self_attn.k_proj.bias"],
            B::V => &["self_attn.v_proj.weight"],
            B::VBias => &["self_attn.v_proj.bias"],
            B::QNorm => &["self_attn.q_norm.weight"],
            B::KNorm => &["self_attn.k_norm.weight"],
            B::O => &["self_attn.o_proj.weight"],
            B::OBias => &["self_attn.o_proj.bias"],
            B::AttnSubNorm if family == Family::Bitnet1BitLlm => {
                &["self_attn.inner_attn_ln.weight", "self_attn.attn_sub_norm.weight"]
            }
            B::AttnSubNorm => &["self_attn.attn_sub_norm.weight", "self_attn.inner_attn_ln.weight"],
            B::FfnNorm => &["post_attention_layernorm.weight"],
            B::Gate => &["mlp.gate_proj.weight"],
            B::Up => &["mlp.up_proj.weight"],
            B::Down => &["mlp.down_proj.weight"],
            B::FfnSubNorm if family == Family::Bitnet1BitLlm => {
                &["mlp.ffn_layernorm.weight", "mlp.ffn_sub_norm.weight"]
            }
            B::FfnSubNorm => &["mlp.ffn_sub_norm.weight", "mlp.ffn_layernorm.weight"],
        }
    }

    /// HF shape (rows, cols) — or (len, 0) for vectors — given the hyper-parameters.
    pub fn hf_shape(self, h: &Hparams) -> (usize, usize) {
        let (d, q, kv, ff) = (h.n_embd, h.q_dim(), h.kv_dim(), h.n_ff);
        match self {
            B::AttnNorm | B::FfnNorm | B::OBias => (d, 0),
            B::Q => (q, d),
            B::QBias | B::AttnSubNorm => (q, 0),
            B::K | B::V => (kv, d),
            B::KBias | B::VBias => (kv, 0),
            B::QNorm | B::KNorm => (h.head_dim, 0),
            B::O => (d, q),
            B::Gate | B::Up => (ff, d),
            B::Down => (d, ff),
            B::FfnSubNorm => (ff, 0),
        }
    }
}

impl Role {
    pub fn gguf_name(self) -> String {
        match self {
            Role::TokenEmbd => "token_embd.weight".into(),
            Role::OutputNorm => "output_norm.weight".into(),
            Role::Output => "output.weight".into(),
            Role::Block(i, t) => format!("blk.{i}.{}", t.gguf()),
        }
    }

    /// Every HF name this role is known by (first = canonical).
    pub fn hf_names(self, family: Family) -> Vec<String> {
        match self {
            Role::TokenEmbd => vec!["model.embed_tokens.weight".into()],
            Role::OutputNorm => vec!["model.norm.weight".into()],
            Role::Output => vec!["lm_head.weight".into()],
            Role::Block(i, t) => t.hf(family).iter().map(|s| format!("model.layers.{i}.{s}")).collect(),
        }
    }

    pub fn from_gguf_name(name: &str) -> Option<Role> {
        match name {
            "token_embd.weight" => return Some(Role::TokenEmbd),
            "output_norm.weight" => return Some(Role::OutputNorm),
            "output.weight" => return Some(Role::Output),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?;
        let (i, t) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        BLOCK_ORDER.iter().find(|b| b.gguf() == t).map(|&b| Role::Block(i, b))
    }

    pub fn is_projection(self) -> bool {
        matches!(self, Role::Block(_, t) if t.is_projection())
    }

    /// Vectors (norms, biases) are always F32 in GGUF.
    pub fn is_vector(self) -> bool {
        match self {
            Role::OutputNorm => true,
            Role::Block(_, t) => t.hf_shape_is_vector(),
            _ => false,
        }
    }
}

impl BlockTensor {
    fn hf_shape_is_vector(self) -> bool {
        !matches!(self, B::Q | B::K | B::V | B::O | B::Gate | B::Up | B::Down)
    }
}

/// llama.cpp's q/k row permutation for `llama` GGUFs: HF keeps each head's rotate-half pairs (i, i+d/2) apart,
/// ggml's interleaved RoPE wants them adjacent (2i, 2i+1). Rows of `w` (each `cols` long) are reordered.
pub fn permute_rows<T: Copy>(w: &[T], cols: usize, n_head: usize, inverse: bool) -> Vec<T> {
    let rows = w.len() / cols.max(1);
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for r in 0..hd {
            // GGUF row r of head h = HF row (r % 2) * half + r / 2.
            let src = if inverse {
                // HF row r comes from GGUF row 2 * (r % half) + r / half.
                2 * (r % half) + r / half
            } else {
                (r % 2) * half + r / 2
            };
            let s = (h * hd + src) * cols;
            out.extend_from_slice(&w[s..s + cols]);
        }
    }
    out
}
