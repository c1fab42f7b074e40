//! HF checkpoint → GGUF. [`plan`] reads only headers and config (it is `--dry-run`); [`write`] then streams the
//! tensors one at a time — large ones a slice of rows at a time — into a temporary file renamed into place at the
//! end, so memory stays far below the model size and a failed run leaves no half-written GGUF.

use crate::arch::{permute_rows, BlockTensor, Family, Hparams, Role, BLOCK_ORDER};
use crate::hf::{HfCheckpoint, HfTensor};
use crate::ternary::{detect_convention, encode_ternary, ScaleConvention, Ternary};
use crate::vocab::{vocab_keys, PreChoice};
use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use std::io::{BufWriter, Write};
use std::path::Path;
use ternlm_gguf::{GgmlType, GgufWriter, Value};

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Type of the seven projection matrices (and, for non-ternary types, of every matrix).
    pub out_type: GgmlType,
    /// Token embedding type (default: F16 for ternary `out_type`, else `out_type`).
    pub embd_type: Option<GgmlType>,
    /// Untied output head type (default as for the embedding).
    pub head_type: Option<GgmlType>,
    pub pre: PreChoice,
    /// How packed checkpoints' `weight_scale` is meant; `None` decides from config and numbers.
    pub weight_scale: Option<ScaleConvention>,
    /// `general.name` (default: the directory's name).
    pub name: Option<String>,
}

impl ConvertOptions {
    pub fn new(out_type: GgmlType) -> Self {
        ConvertOptions {
            out_type,
            embd_type: None,
            head_type: None,
            pre: PreChoice::Detect,
            weight_scale: None,
            name: None,
        }
    }
}

pub const OUT_TYPES: &str = "i2_s, tq2_0, tq1_0, f32, f16, bf16, q8_0, q6_k";

pub fn is_ternary(t: GgmlType) -> bool {
    matches!(t, GgmlType::I2_S | GgmlType::TQ1_0 | GgmlType::TQ2_0)
}

/// Parses a `--type` name.
pub fn parse_type(s: &str) -> Result<GgmlType> {
    let t = GgmlType::from_name(&s.to_ascii_uppercase()).filter(|t| {
        matches!(
            t,
            GgmlType::I2_S
                | GgmlType::TQ1_0
                | GgmlType::TQ2_0
                | GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q6_K
        )
    });
    t.with_context(|| format!("unknown output type '{s}' (expected one of {OUT_TYPES})"))
}

/// Where a GGUF tensor's values come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A float HF tensor (F32/F16/BF16).
    Float(HfTensor),
    /// A packed ternary HF tensor and its `weight_scale` (already in weight units).
    Packed(HfTensor, f32),
    /// Values computed by the converter (Llama 3.1 `rope_freqs`).
    Computed(Vec<f32>),
}

#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order (row length first).
    pub dims: Vec<u64>,
    pub source: Source,
    /// Rows are permuted for interleaved RoPE, with this many heads.
    pub permute_heads: Option<usize>,
    pub ternarize: bool,
}

impl PlannedTensor {
    pub fn nbytes(&self) -> u64 {
        let n: u64 = self.dims.iter().product();
        self.ty.tensor_bytes(self.dims[0], n).unwrap_or(0)
    }
    pub fn source_name(&self) -> &str {
        match &self.source {
            Source::Float(t) | Source::Packed(t, _) => &t.name,
            Source::Computed(_) => "(computed)",
        }
    }
}

pub struct Plan {
    pub hparams: Hparams,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<PlannedTensor>,
    pub warnings: Vec<String>,
    pub convention: Option<ScaleConvention>,
}

impl Plan {
    pub fn writer(&self) -> Result<GgufWriter<'static>> {
        let mut w = GgufWriter::new();
        for (k, v) in &self.kvs {
            w.set(k.clone(), v.clone());
        }
        for t in &self.tensors {
            w.declare_tensor(t.name.clone(), t.ty, &t.dims)?;
        }
        Ok(w)
    }
}

fn file_type(t: GgmlType) -> u32 {
    match t {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 7,
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
        GgmlType::TQ1_0 => 36,
        GgmlType::TQ2_0 => 37,
        GgmlType::I2_S => 40,
        _ => 0,
    }
}

/// Reads config and headers, checks every tensor's presence, shape and dtype, and decides each output tensor.
pub fn plan(ck: &HfCheckpoint, opts: &ConvertOptions) -> Result<Plan> {
    let h = Hparams::from_hf(ck)?;
    let dir = ck.dir.display().to_string();
    let arch = h.family.gguf_arch();
    let mut warnings = Vec::new();
    let default_embd = if is_ternary(opts.out_type) { GgmlType::F16 } else { opts.out_type };
    let embd_ty = opts.embd_type.or(if h.tied { opts.head_type } else { None }).unwrap_or(default_embd);
    let head_ty = opts.head_type.unwrap_or(default_embd);
    for t in [embd_ty, head_ty] {
        if is_ternary(t) {
            bail!("the embedding and output head stay in full precision, Q8_0 or Q6_K (got {t}); ternary types are for the projections");
        }
    }

    // Packed checkpoints: one convention for the whole file.
    let linear_class =
        ck.config.get("quantization_config").and_then(|q| q.get("linear_class")).and_then(|v| v.as_str());
    let mut stored_scales = Vec::new();
    for (name, t) in &ck.tensors {
        if name.ends_with(".weight_scale") {
            let v = ck.f32(t)?;
            if v.len() != 1 {
                bail!(
                    "{}: tensor '{name}' has {} values, expected one per-tensor scale",
                    ck.shard_path(t).display(),
                    v.len()
                );
            }
            stored_scales.push(v[0]);
        }
    }
    let convention = if stored_scales.is_empty() {
        None
    } else {
        let (c, warn) = detect_convention(linear_class, &stored_scales);
        match opts.weight_scale {
            Some(forced) => Some(forced),
            None => {
                warnings.extend(warn);
                Some(c)
            }
        }
    };

    let mut used: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut missing: Vec<String> = Vec::new();
    let mut tensors: Vec<PlannedTensor> = Vec::new();
    let mut roles: Vec<Role> = vec![Role::TokenEmbd];
    for i in 0..h.n_layer {
        roles.extend(BLOCK_ORDER.iter().map(|&b| Role::Block(i, b)));
    }
    roles.push(Role::OutputNorm);
    if !h.tied {
        roles.push(Role::Output);
    }
    for role in roles {
        let names = role.hf_names(h.family);
        let found = names.iter().find_map(|n| ck.get(n));
        let required = match role {
            Role::Block(_, b) => match b {
                BlockTensor::QBias | BlockTensor::KBias | BlockTensor::VBias | BlockTensor::OBias => false,
                BlockTensor::AttnSubNorm | BlockTensor::FfnSubNorm => h.family.is_bitnet(),
                BlockTensor::QNorm | BlockTensor::KNorm => h.family == Family::Qwen3,
                _ => true,
            },
            _ => true,
        };
        let Some(t) = found else {
            if required {
                missing.push(names[0].clone());
            }
            continue;
        };
        used.insert(t.name.clone());
        let (rows, cols) = match role {
            Role::TokenEmbd | Role::Output => (h.n_vocab, h.n_embd),
            Role::OutputNorm => (h.n_embd, 0),
            Role::Block(_, b) => b.hf_shape(&h),
        };
        let path = ck.shard_path(t).display().to_string();
        let scale_name = format!("{}_scale", t.name);
        let packed = t.dtype == Dtype::U8 && role.is_projection();
        let source = if packed {
            let st = ck.get(&scale_name).with_context(|| {
                format!("{path}: tensor '{}' is packed uint8 but '{scale_name}' is missing", t.name)
            })?;
            used.insert(st.name.clone());
            if t.shape != [rows / 4, cols] || rows % 4 != 0 {
                bail!(
                    "{path}: packed tensor '{}' has shape {:?}, expected [{}, {cols}] (4 codes per byte)",
                    t.name,
                    t.shape,
                    rows / 4
                );
            }
            let stored = ck.f32(st)?[0];
            let conv = convention.unwrap_or(ScaleConvention::Multiply);
            let s = conv.weight_scale(stored);
            if !s.is_finite() || s < 0.0 {
                bail!("{path}: tensor '{scale_name}' is {stored}, which is not a usable scale");
            }
            Source::Packed(t.clone(), s)
        } else {
            let want: Vec<usize> = if cols == 0 { vec![rows] } else { vec![rows, cols] };
            if t.shape != want {
                bail!(
                    "{path}: tensor '{}' has shape {:?}, expected {want:?} (from config.json: hidden_size {}, heads {}/{}, head_dim {}, intermediate_size {}, vocab_size {})",
                    t.name, t.shape, h.n_embd, h.n_head, h.n_head_kv, h.head_dim, h.n_ff, h.n_vocab
                );
            }
            if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
                bail!("{path}: tensor '{}' has dtype {:?}, expected F32, F16 or BF16 (or U8 packed ternary with a weight_scale)", t.name, t.dtype);
            }
            Source::Float(t.clone())
        };
        let ty = if role.is_vector() {
            GgmlType::F32
        } else if role.is_projection() {
            opts.out_type
        } else if role == Role::Output {
            head_ty
        } else {
            embd_ty
        };
        let dims: Vec<u64> = if cols == 0 { vec![rows as u64] } else { vec![cols as u64, rows as u64] };
        if cols != 0 && ty.tensor_bytes(cols as u64, (rows * cols) as u64).is_none() {
            bail!(
                "tensor '{}' ({}) has rows of {cols} values; {ty} needs a multiple of {} — choose another --type{}",
                role.gguf_name(),
                t.name,
                if ty == GgmlType::I2_S { 4 } else { ty.block_size() },
                if is_ternary(ty) {
                    " (i2_s needs rows of a multiple of 4 and 128 | rows×cols; tq1_0/tq2_0 256)"
                } else {
                    ""
                }
            );
        }
        let permute_heads = match role {
            Role::Block(_, BlockTensor::Q | BlockTensor::QBias) if h.family.permutes_qk() => Some(h.n_head),
            Role::Block(_, BlockTensor::K | BlockTensor::KBias) if h.family.permutes_qk() => Some(h.n_head_kv),
            _ => None,
        };
        let ternarize = is_ternary(ty) && matches!(source, Source::Float(_));
        tensors.push(PlannedTensor { name: role.gguf_name(), ty, dims, source, permute_heads, ternarize });
    }
    if !missing.is_empty() {
        let n = missing.len();
        let list = missing.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
        bail!(
            "{dir}: {n} tensor(s) that a {} with {} layers needs are missing: {list}{}",
            h.family.hf_name(),
            h.n_layer,
            if n > 8 { ", …" } else { "" }
        );
    }
    let unknown: Vec<&String> = ck
        .tensors
        .keys()
        .filter(|n| !used.contains(*n))
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(h.tied && n.as_str() == "lm_head.weight"))
        .collect();
    if !unknown.is_empty() {
        let list = unknown.iter().take(8).map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        bail!(
            "{dir}: {} tensor(s) ternlm does not know how to place in a {arch} GGUF: {list}{} (config.json num_hidden_layers is {})",
            unknown.len(),
            if unknown.len() > 8 { ", …" } else { "" },
            h.n_layer
        );
    }
    if h.tied && ck.get("lm_head.weight").is_some() {
        warnings.push("lm_head.weight skipped: the head is tied to the token embedding".into());
    }
    if let Some(r) = h.rope_llama3 {
        let f = r.factors(h.rope_base, h.head_dim);
        tensors.push(PlannedTensor {
            name: "rope_freqs.weight".into(),
            ty: GgmlType::F32,
            dims: vec![f.len() as u64],
            source: Source::Computed(f),
            permute_heads: None,
            ternarize: false,
        });
    }

    // Metadata, in the official 2B4T file's order where it has the key.
    let mut kvs: Vec<(String, Value)> = Vec::new();
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| Value::U32(v as u32);
    let name = opts.name.clone().unwrap_or_else(|| {
        ck.dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into())
    });
    kvs.push(("general.architecture".into(), Value::String(arch.into())));
    kvs.push(("general.name".into(), Value::String(name)));
    kvs.push((k("vocab_size"), u(h.n_vocab)));
    kvs.push((k("context_length"), u(h.n_ctx)));
    kvs.push((k("embedding_length"), u(h.n_embd)));
    kvs.push((k("block_count"), u(h.n_layer)));
    kvs.push((k("feed_forward_length"), u(h.n_ff)));
    kvs.push((k("rope.dimension_count"), u(h.head_dim)));
    kvs.push((k("attention.head_count"), u(h.n_head)));
    kvs.push((k("attention.head_count_kv"), u(h.n_head_kv)));
    if h.head_dim * h.n_head != h.n_embd {
        kvs.push((k("attention.key_length"), u(h.head_dim)));
        kvs.push((k("attention.value_length"), u(h.head_dim)));
    }
    kvs.push((k("attention.layer_norm_rms_epsilon"), Value::F32(h.rms_eps)));
    kvs.push((k("rope.freq_base"), Value::F32(h.rope_base)));
    if let Some(f) = h.rope_linear_factor {
        kvs.push((k("rope.scaling.type"), Value::String("linear".into())));
        kvs.push((k("rope.scaling.factor"), Value::F32(f)));
    }
    kvs.push(("general.file_type".into(), Value::U32(file_type(opts.out_type))));
    kvs.extend(vocab_keys(&ck.dir, &ck.config, h.n_vocab, &opts.pre)?);
    kvs.push(("general.quantization_version".into(), Value::U32(2)));
    Ok(Plan { hparams: h, kvs, tensors, warnings, convention })
}

/// Rows per slice when a tensor is encoded piecewise (~16 M values: 64 MB of f32).
const SLICE_VALUES: usize = 1 << 24;

/// Converts and writes every planned tensor to `out` (through `out.tmp`, renamed at the end). `progress` gets
/// (index, tensor) after each tensor.
pub fn write(ck: &HfCheckpoint, plan: &Plan, out: &Path, progress: impl FnMut(usize, &PlannedTensor)) -> Result<()> {
    let tmp = out.with_extension("gguf.tmp");
    let f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let result = write_to(ck, plan, BufWriter::with_capacity(1 << 20, f), progress)
        .and_then(|w| w.into_inner().map_err(|e| e.into_error().into()))
        .and_then(|f| f.sync_all().map_err(Into::into))
        .with_context(|| format!("writing {}", tmp.display()));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot rename to {}", tmp.display(), out.display()))?;
    Ok(())
}

/// Streams the GGUF into any writer (a file, or memory for `ternlm run -m HF_DIR`) and returns it.
pub fn write_to<W: Write>(
    ck: &HfCheckpoint,
    plan: &Plan,
    w: W,
    mut progress: impl FnMut(usize, &PlannedTensor),
) -> Result<W> {
    let mut s = plan.writer()?.stream(w)?;
    for (i, t) in plan.tensors.iter().enumerate() {
        write_tensor(ck, t, &mut |bytes| s.write_part(&t.name, bytes).map_err(Into::into))
            .with_context(|| format!("converting {} → {}", t.source_name(), t.name))?;
        if let Source::Float(src) | Source::Packed(src, _) = &t.source {
            ck.release(src);
        }
        progress(i, t);
    }
    Ok(s.finish()?)
}

/// The output type `ternlm run -m HF_DIR` uses: I2_S for BitNet families and packed checkpoints (lossless for
/// them), F16 otherwise.
pub fn default_type(ck: &HfCheckpoint) -> Result<GgmlType> {
    let h = Hparams::from_hf(ck)?;
    let packed = ck.tensors.keys().any(|n| n.ends_with(".weight_scale"));
    Ok(if h.family.is_bitnet() || packed { GgmlType::I2_S } else { GgmlType::F16 })
}

fn encode_float(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::BF16 => x.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => ternlm_kernels::quant::quantize_q8_0(x),
        GgmlType::Q6_K => ternlm_kernels::quant::quantize_q6_k(x),
        other => bail!("cannot encode {other}"),
    })
}

fn write_tensor(ck: &HfCheckpoint, t: &PlannedTensor, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let cols = t.dims[0] as usize;
    let rows: usize = t.dims[1..].iter().product::<u64>() as usize;
    let permute = |v: Vec<f32>| match t.permute_heads {
        Some(nh) => permute_rows(&v, if t.dims.len() == 1 { 1 } else { cols }, nh, false),
        None => v,
    };
    match &t.source {
        Source::Computed(v) => sink(&encode_float(t.ty, v)?),
        Source::Packed(src, scale) => {
            let mut tern = Ternary::unpack_hf(ck.bytes(src), rows, cols, *scale)?;
            if let Some(nh) = t.permute_heads {
                tern.codes = permute_rows(&tern.codes, cols, nh, false);
            }
            if is_ternary(t.ty) {
                sink(&encode_ternary(&tern, t.ty)?)
            } else {
                sink(&encode_float(t.ty, &tern.values())?)
            }
        }
        Source::Float(src) if t.permute_heads.is_some() || t.dims.len() == 1 => {
            let v = permute(ck.f32(src)?);
            if t.ternarize {
                sink(&encode_ternary(&Ternary::absmean(&v), t.ty)?)
            } else {
                sink(&encode_float(t.ty, &v)?)
            }
        }
        Source::Float(src) => {
            // Row slices: the whole tensor never exists as f32. Ternary types first need the tensor's absmean.
            // I2_S blocks run over the flattened tensor: a slice must hold whole 128-weight blocks.
            let unit = if t.ty == GgmlType::I2_S { 128 / gcd(cols, 128) } else { 1 };
            let slice_rows = ((SLICE_VALUES / cols) / unit).max(1) * unit;
            let scale = if t.ternarize {
                let mut sum = 0f64;
                for r0 in (0..rows).step_by(slice_rows) {
                    let r1 = (r0 + slice_rows).min(rows);
                    let v = ck.f32_rows(src, r0, r1, cols)?;
                    sum = v.iter().fold(sum, |a, x| a + x.abs() as f64);
                    ck.release_rows(src, r0, r1, cols);
                }
                Some(((sum / (rows * cols) as f64) as f32).max(1e-5))
            } else {
                None
            };
            let mut any_nonzero = false;
            for r0 in (0..rows).step_by(slice_rows) {
                let r1 = (r0 + slice_rows).min(rows);
                let v = ck.f32_rows(src, r0, r1, cols)?;
                ck.release_rows(src, r0, r1, cols);
                match scale {
                    None => sink(&encode_float(t.ty, &v)?)?,
                    Some(mean) => {
                        let tern = Ternary::absmean_with_mean(&v, mean);
                        any_nonzero |= tern.codes.iter().any(|&c| c != 0);
                        let bytes = encode_ternary(&tern, t.ty)?;
                        // I2_S: the per-tensor tail goes once, after all the blocks.
                        let body = if t.ty == GgmlType::I2_S { &bytes[..bytes.len() - 32] } else { &bytes[..] };
                        sink(body)?;
                    }
                }
            }
            if let (Some(mean), GgmlType::I2_S) = (scale, t.ty) {
                // bitnet.cpp's tail: the max |value| of the tensor (0 when every code is 0), then 28 bytes.
                let s = if any_nonzero { 1.0f32 / (1.0f32 / mean) } else { 0.0 };
                let mut tail = [0u8; 32];
                tail[..4].copy_from_slice(&s.to_le_bytes());
                sink(&tail)?;
            }
            Ok(())
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
