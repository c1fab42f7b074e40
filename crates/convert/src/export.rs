//! GGUF → Hugging Face directory (`ternlm export-hf`): `config.json`, `model.safetensors`, tokenizer files.
//! Float and k-quant tensors are dequantized; ternary ones (I2_S, one-scale TQ1_0/TQ2_0) are written in HF's
//! packed BitNet layout (uint8, 4 codes per byte, plus `weight_scale` = mean|W|, `AutoBitLinear`'s convention),
//! so a re-conversion reproduces the codes and scale exactly. `llama` q/k rows are un-permuted.

use crate::arch::{permute_rows, BlockTensor, Family, Role};
use crate::ternary::decode_ternary;
use crate::vocab::hf_tokenizer_files;
use anyhow::{bail, Context, Result};
use safetensors::{Dtype, View};
use serde_json::{json, Map, Value as J};
use std::borrow::Cow;
use std::path::Path;
use ternlm_gguf::{GgmlType, GgufFile, TensorInfo};
use ternlm_kernels::scalar;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    /// F32/F16/BF16 tensors keep their type; quantized ones become F32 (exact).
    Auto,
    F32,
    F16,
    BF16,
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub dtype: ExportDtype,
    /// Write ternary tensors as dequantized floats instead of the packed layout.
    pub dequantize_ternary: bool,
}

pub struct ExportSummary {
    pub tensors: usize,
    pub packed_ternary: usize,
    pub warnings: Vec<String>,
}

enum Kind {
    Float { out: Dtype },
    Packed,
    Scale(f32),
}

struct Lazy<'a> {
    f: &'a GgufFile,
    info: &'a TensorInfo,
    kind: Kind,
    shape: Vec<usize>,
    /// Un-permute rows with this many heads (llama q/k).
    unpermute: Option<usize>,
}

impl Lazy<'_> {
    fn floats(&self) -> Vec<f32> {
        let data = self.f.tensor_data(self.info);
        let (cols, rows) = (self.info.row_len(), self.info.n_rows());
        // Types were checked when the export was planned.
        let out = scalar::dequantize_tensor(self.info.ty, data, rows, cols).expect("type checked before export");
        match self.unpermute {
            Some(nh) => permute_rows(&out, cols, nh, true),
            None => out,
        }
    }
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        match self.kind {
            Kind::Float { out } => out,
            Kind::Packed => Dtype::U8,
            Kind::Scale(_) => Dtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.kind {
            Kind::Scale(s) => Cow::Owned(s.to_le_bytes().to_vec()),
            Kind::Packed => {
                let (cols, rows) = (self.info.row_len(), self.info.n_rows());
                let n = cols * rows;
                let mut t =
                    decode_ternary(self.info.ty, self.f.tensor_data(self.info), n).expect("checked before export");
                if let Some(nh) = self.unpermute {
                    t.codes = permute_rows(&t.codes, cols, nh, true);
                }
                Cow::Owned(t.pack_hf(rows, cols))
            }
            Kind::Float { out } => {
                let v = self.floats();
                Cow::Owned(match out {
                    Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                    Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
                    _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                })
            }
        }
    }
    fn data_len(&self) -> usize {
        let n: usize = self.shape.iter().product();
        match self.kind {
            Kind::Scale(_) => 4,
            Kind::Packed => n,
            Kind::Float { out } => n * out.bitsize() / 8,
        }
    }
}

/// A float read as f32 and written to JSON as its shortest decimal (1e-5, not 9.99999974737875e-06).
fn num(x: f32) -> J {
    x.to_string().parse::<f64>().map(|v| json!(v)).unwrap_or(J::Null)
}

pub fn export_hf(gguf: &Path, out_dir: &Path, opts: &ExportOptions) -> Result<ExportSummary> {
    let f = GgufFile::open(gguf)?;
    let path = gguf.display().to_string();
    let arch =
        f.get_str("general.architecture")?.with_context(|| format!("{path}: no general.architecture"))?.to_string();
    let family = Family::from_gguf_arch(&arch).with_context(|| {
        format!("{path}: architecture '{arch}' cannot be exported (llama, qwen2, qwen3, bitnet-b1.58, bitnet can)")
    })?;
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| -> Result<usize> { Ok(f.require_u64(&key(k))? as usize) };
    let n_embd = req("embedding_length")?;
    let n_head = req("attention.head_count")?;
    let n_head_kv = f.get_u64(&key("attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(n_head);
    let head_dim = f.get_u64(&key("attention.key_length"))?.map(|v| v as usize).unwrap_or(n_embd / n_head.max(1));
    let n_vocab = match f.get_u64(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => {
            f.get_array("tokenizer.ggml.tokens")?.map(|a| a.len()).with_context(|| format!("{path}: no vocab_size"))?
        }
    };
    let mut warnings = Vec::new();
    let tied = family == Family::BitNetB158 || f.tensor_info("output.weight").is_none();

    let mut views: Vec<(String, Lazy)> = Vec::new();
    let mut packed = 0;
    let mut any_bias = false;
    let mut float_out = None;
    for info in f.tensors() {
        let Some(role) = Role::from_gguf_name(&info.name) else {
            if info.name == "rope_freqs.weight" {
                warnings.push(
                    "rope_freqs.weight (Llama 3.1 RoPE factors) is not exported; config.json has no rope_scaling"
                        .into(),
                );
                continue;
            }
            bail!("{path}: tensor '{}' has no Hugging Face name ternlm knows", info.name);
        };
        if role == Role::Output && tied {
            continue;
        }
        if let Role::Block(_, BlockTensor::QBias | BlockTensor::KBias | BlockTensor::VBias) = role {
            any_bias = true;
        }
        let hf = role.hf_names(family).remove(0);
        let (cols, rows) = (info.row_len(), info.n_rows());
        let shape = if info.dims.len() == 1 { vec![cols] } else { vec![rows, cols] };
        let unpermute = match role {
            Role::Block(_, BlockTensor::Q | BlockTensor::QBias) if family.permutes_qk() => Some(n_head),
            Role::Block(_, BlockTensor::K | BlockTensor::KBias) if family.permutes_qk() => Some(n_head_kv),
            _ => None,
        };
        let ternary = matches!(info.ty, GgmlType::I2_S | GgmlType::TQ1_0 | GgmlType::TQ2_0);
        if ternary && !opts.dequantize_ternary && role.is_projection() && rows % 4 == 0 {
            if let Some(t) = decode_ternary(info.ty, f.tensor_data(info), rows * cols) {
                let base = hf.trim_end_matches(".weight");
                views.push((
                    format!("{base}.weight_scale"),
                    Lazy { f: &f, info, kind: Kind::Scale(t.scale), shape: vec![1], unpermute: None },
                ));
                views.push((hf, Lazy { f: &f, info, kind: Kind::Packed, shape: vec![rows / 4, cols], unpermute }));
                packed += 1;
                continue;
            }
            warnings.push(format!("{}: TQ block scales differ, exported dequantized", info.name));
        }
        let mut probe = vec![0f32; cols];
        let rb = info.ty.row_bytes(cols);
        scalar::dequantize_row(info.ty, &f.tensor_data(info)[..rb], &mut probe, 1.0)
            .map_err(|e| anyhow::anyhow!("{path}: tensor '{}': {e}", info.name))?;
        let out = match opts.dtype {
            ExportDtype::F32 => Dtype::F32,
            ExportDtype::F16 => Dtype::F16,
            ExportDtype::BF16 => Dtype::BF16,
            ExportDtype::Auto => match info.ty {
                GgmlType::F16 => Dtype::F16,
                GgmlType::BF16 => Dtype::BF16,
                _ => Dtype::F32,
            },
        };
        if role == Role::TokenEmbd {
            float_out = Some(out);
        }
        views.push((hf, Lazy { f: &f, info, kind: Kind::Float { out }, shape, unpermute }));
    }

    let toks = hf_tokenizer_files(&f)?;
    let mut cfg = Map::new();
    cfg.insert("architectures".into(), json!([family.hf_name()]));
    cfg.insert("model_type".into(), json!(family.hf_model_type()));
    cfg.insert("hidden_size".into(), json!(n_embd));
    cfg.insert("intermediate_size".into(), json!(req("feed_forward_length")?));
    cfg.insert("num_hidden_layers".into(), json!(req("block_count")?));
    cfg.insert("num_attention_heads".into(), json!(n_head));
    cfg.insert("num_key_value_heads".into(), json!(n_head_kv));
    cfg.insert("head_dim".into(), json!(head_dim));
    cfg.insert("max_position_embeddings".into(), json!(f.get_u64(&key("context_length"))?.unwrap_or(4096)));
    cfg.insert("rms_norm_eps".into(), num(f.get_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32));
    cfg.insert("rope_theta".into(), num(f.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32));
    if let (Some("linear"), Some(s)) = (f.get_str(&key("rope.scaling.type"))?, f.get_f64(&key("rope.scaling.factor"))?)
    {
        cfg.insert("rope_scaling".into(), json!({"type": "linear", "factor": num(s as f32)}));
    }
    cfg.insert("vocab_size".into(), json!(n_vocab));
    cfg.insert("tie_word_embeddings".into(), json!(tied));
    cfg.insert("hidden_act".into(), json!(if family == Family::BitNetB158 { "relu2" } else { "silu" }));
    if family == Family::Qwen2 || any_bias {
        cfg.insert("attention_bias".into(), json!(any_bias));
    }
    if let Some(b) = toks.bos {
        cfg.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = toks.eos {
        cfg.insert("eos_token_id".into(), json!(e));
    }
    let torch_dtype = match float_out.unwrap_or(Dtype::F32) {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    };
    cfg.insert("torch_dtype".into(), json!(torch_dtype));
    if packed > 0 {
        cfg.insert(
            "quantization_config".into(),
            json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}),
        );
    }

    std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let n = views.len();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let st = out_dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &st).map_err(|e| anyhow::anyhow!("{}: {e}", st.display()))?;
    std::fs::write(out_dir.join("config.json"), serde_json::to_vec_pretty(&J::Object(cfg))?)?;
    for (name, bytes) in &toks.files {
        std::fs::write(out_dir.join(name), bytes)
            .with_context(|| format!("{}: cannot write {name}", out_dir.display()))?;
    }
    Ok(ExportSummary { tensors: n, packed_ternary: packed, warnings })
}
