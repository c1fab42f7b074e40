//! Random-weight GGUF models of any shape, for tests and benchmarks: `ternlm gen-model`. Files follow the key set,
//! key order and tensor order of the official BitNet b1.58 2B4T GGUF, with a real tokenizer copied from a vocab
//! GGUF, so they load in bitnet.cpp (I2_S) and llama.cpp (TQ types) as well as in ternlm.

use anyhow::{bail, Context, Result};
use half::f16;
use std::path::Path;
use ternlm_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use ternlm_kernels::quant;

#[derive(Clone, Debug)]
pub struct GenSpec {
    pub arch: String,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ctx: usize,
    pub rope_base: f32,
    /// Type of the attention / FFN projections.
    pub weight_type: GgmlType,
    /// Type of the token embedding (also the tied output head).
    pub embd_type: GgmlType,
    pub seed: u64,
}

impl GenSpec {
    /// The shape of the bitnet.cpp test fixtures: hidden 256, 2 blocks, FFN 768, 4/1 heads, context 512.
    pub fn tiny(weight_type: GgmlType, embd_type: GgmlType) -> GenSpec {
        GenSpec {
            n_embd: 256,
            n_layer: 2,
            n_ff: 768,
            n_head: 4,
            n_head_kv: 1,
            n_ctx: 512,
            ..Self::bitnet_2b4t(weight_type, embd_type)
        }
    }

    /// BitNet b1.58 2B4T: hidden 2560, 30 blocks, FFN 6912, 20/5 heads, context 4096, RoPE base 500000.
    pub fn bitnet_2b4t(weight_type: GgmlType, embd_type: GgmlType) -> GenSpec {
        GenSpec {
            arch: "bitnet-b1.58".into(),
            n_embd: 2560,
            n_layer: 30,
            n_ff: 6912,
            n_head: 20,
            n_head_kv: 5,
            n_ctx: 4096,
            rope_base: 500000.0,
            weight_type,
            embd_type,
            seed: 1,
        }
    }
}

/// The 2B4T chat format ("System: …User: …<|eot_id|>Assistant: "), written as Jinja for files whose vocabulary
/// source has no template.
pub const BITNET_2B4T_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] }}{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '<|eot_id|>' }}{% else %}{{ 'Assistant: ' + message['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// (name, type, ggml dims, bytes)
type Tensor = (String, GgmlType, Vec<u64>, Vec<u8>);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Approximately N(0, 1) (sum of uniforms; shape is not important here).
    fn normal(&mut self) -> f32 {
        let s: f64 = (0..4).map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64).sum();
        ((s - 2.0) * 3f64.sqrt()) as f32
    }
}

/// Ternary weights code·s with ~69% non-zero codes and an f16-exact scale s (as in real BitNet exports).
fn ternary(rng: &mut Rng, n: usize, absmean: f32) -> Vec<f32> {
    let s = f16::from_f32(absmean / 0.69).to_f32();
    (0..n)
        .map(|_| {
            let r = rng.next() % 100;
            if r < 31 {
                0.0
            } else if r < 65 {
                s
            } else {
                -s
            }
        })
        .collect()
}

fn encode(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => quant::quantize_q8_0(x),
        GgmlType::I2_S => quant::quantize_i2s(x),
        GgmlType::TQ2_0 => quant::quantize_tq2_0(x),
        GgmlType::TQ1_0 => quant::quantize_tq1_0(x),
        other => bail!("gen-model cannot write {other} tensors (supported: F32, F16, Q8_0, I2_S, TQ2_0, TQ1_0)"),
    })
}

/// Writes a random model with the tokenizer of `vocab` (any GGUF with `tokenizer.ggml.*` keys).
pub fn write_random_model(spec: &GenSpec, vocab: &Path, out: &Path) -> Result<()> {
    let v = GgufFile::open(vocab)?;
    let tokens = v
        .get_array("tokenizer.ggml.tokens")?
        .and_then(|a| a.as_strings())
        .with_context(|| format!("{}: no tokenizer.ggml.tokens", vocab.display()))?;
    let n_vocab = tokens.len();
    let (d, ff, hd) = (spec.n_embd, spec.n_ff, spec.n_embd / spec.n_head);
    let (qd, kvd) = (spec.n_head * hd, spec.n_head_kv * hd);
    for (what, k) in [("hidden", d), ("ffn", ff)] {
        let need = spec.weight_type.block_size().max(32);
        if k % need != 0 {
            bail!("{what} size {k} is not a multiple of {need}, which {} rows need", spec.weight_type);
        }
    }
    let arch = spec.arch.as_str();
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.name", Value::String(format!("ternlm random {arch} {d}x{}", spec.n_layer)));
    w.set(k("vocab_size"), Value::U32(n_vocab as u32));
    w.set(k("context_length"), Value::U32(spec.n_ctx as u32));
    w.set(k("embedding_length"), Value::U32(d as u32));
    w.set(k("block_count"), Value::U32(spec.n_layer as u32));
    w.set(k("feed_forward_length"), Value::U32(ff as u32));
    w.set(k("rope.dimension_count"), Value::U32(hd as u32));
    w.set(k("attention.head_count"), Value::U32(spec.n_head as u32));
    w.set(k("attention.head_count_kv"), Value::U32(spec.n_head_kv as u32));
    match v.get("tokenizer.ggml.add_bos_token") {
        Some(b) => {
            w.set("tokenizer.ggml.add_bos_token", b.clone());
        }
        // The official 2B4T file sets it; llama.cpp would otherwise not add BOS for this vocabulary.
        None if arch == "bitnet-b1.58" => {
            w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
        }
        None => {}
    }
    w.set(k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5));
    w.set(k("rope.freq_base"), Value::F32(spec.rope_base));
    let file_type = match spec.weight_type {
        GgmlType::I2_S => 40,
        GgmlType::TQ1_0 => 36,
        GgmlType::TQ2_0 => 37,
        GgmlType::Q8_0 => 7,
        GgmlType::F16 => 1,
        _ => 0,
    };
    w.set("general.file_type", Value::U32(file_type));
    if arch == "bitnet-b1.58" {
        // The official 2B4T file's tokenizer keys, in its order: no `tokenizer.ggml.pre` (llama.cpp then uses its
        // `default` pre-tokenizer, which bitnet.cpp's outputs reflect), scores all 0, padding = EOS.
        let copy = |w: &mut GgufWriter, key: &str| {
            if let Some(val) = v.get(key) {
                w.set(key, val.clone());
            }
        };
        copy(&mut w, "tokenizer.ggml.model");
        copy(&mut w, "tokenizer.ggml.tokens");
        w.set("tokenizer.ggml.scores", Value::Array(ternlm_gguf::Array::F32(vec![0.0; n_vocab])));
        copy(&mut w, "tokenizer.ggml.token_type");
        copy(&mut w, "tokenizer.ggml.merges");
        copy(&mut w, "tokenizer.ggml.bos_token_id");
        copy(&mut w, "tokenizer.ggml.eos_token_id");
        if let Some(pad) = v.get("tokenizer.ggml.padding_token_id").or(v.get("tokenizer.ggml.eos_token_id")) {
            w.set("tokenizer.ggml.padding_token_id", pad.clone());
        }
        let template = v.get_str("tokenizer.chat_template")?.unwrap_or(BITNET_2B4T_TEMPLATE).to_string();
        w.set("tokenizer.chat_template", Value::String(template));
    } else {
        for (key, val) in v.metadata() {
            if key.starts_with("tokenizer.") && key != "tokenizer.ggml.add_bos_token" {
                w.set(key.clone(), val.clone());
            }
        }
    }
    w.set("general.quantization_version", Value::U32(2));

    let mut rng = Rng(spec.seed);
    let mut tensors: Vec<Tensor> = Vec::new();
    let embd: Vec<f32> = (0..n_vocab * d).map(|_| 0.05 * rng.normal()).collect();
    tensors.push((
        "token_embd.weight".into(),
        spec.embd_type,
        vec![d as u64, n_vocab as u64],
        encode(spec.embd_type, &embd)?,
    ));
    drop(embd);
    let norm = |rng: &mut Rng, n: usize| -> Vec<u8> {
        (0..n).flat_map(|_| (1.0 + 0.1 * rng.normal()).to_le_bytes()).collect()
    };
    let sub = spec.arch.starts_with("bitnet");
    for l in 0..spec.n_layer {
        let p = |s: &str| format!("blk.{l}.{s}.weight");
        let ty = spec.weight_type;
        let proj = |rng: &mut Rng, name: String, cols: usize, rows: usize, absmean: f32| -> Result<Tensor> {
            let x = ternary(rng, rows * cols, absmean);
            Ok((name, ty, vec![cols as u64, rows as u64], encode(ty, &x)?))
        };
        tensors.push((p("attn_norm"), GgmlType::F32, vec![d as u64], norm(&mut rng, d)));
        tensors.push(proj(&mut rng, p("attn_q"), d, qd, 0.12)?);
        tensors.push(proj(&mut rng, p("attn_k"), d, kvd, 0.12)?);
        tensors.push(proj(&mut rng, p("attn_v"), d, kvd, 0.04)?);
        tensors.push(proj(&mut rng, p("attn_output"), qd, d, 0.012)?);
        if sub {
            tensors.push((p("attn_sub_norm"), GgmlType::F32, vec![qd as u64], norm(&mut rng, qd)));
        }
        tensors.push((p("ffn_norm"), GgmlType::F32, vec![d as u64], norm(&mut rng, d)));
        tensors.push(proj(&mut rng, p("ffn_gate"), d, ff, 0.08)?);
        tensors.push(proj(&mut rng, p("ffn_up"), d, ff, 0.08)?);
        tensors.push(proj(&mut rng, p("ffn_down"), ff, d, 0.012)?);
        if sub {
            tensors.push((p("ffn_sub_norm"), GgmlType::F32, vec![ff as u64], norm(&mut rng, ff)));
        }
    }
    tensors.push(("output_norm.weight".into(), GgmlType::F32, vec![d as u64], norm(&mut rng, d)));
    for (name, ty, dims, bytes) in &tensors {
        w.add_tensor(name.clone(), *ty, dims, bytes.as_slice())?;
    }
    w.write_to_file(out)?;
    Ok(())
}
