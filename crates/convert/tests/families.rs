//! Every model family `ternlm convert` knows, as a tiny synthetic Hugging Face checkpoint (random weights written
//! with the `safetensors` crate): the converted GGUF, run by ternlm's decoder, must give the logits of an
//! independent f64 forward pass over the same HF weights in HF's conventions (rotate-half RoPE on un-permuted q/k,
//! BitNet layers as absmean-ternary weights × per-token int8 activations). Ternary tensors must equal the absmean
//! reference (latent checkpoints) or the packed codes (packed checkpoints) exactly.

mod common;

use common::*;
use safetensors::Dtype;
use serde_json::json;
use std::sync::Arc;
use ternlm_convert::arch::permute_rows;
use ternlm_convert::ternary::{decode_ternary, ScaleConvention, Ternary};
use ternlm_convert::{parse_type, ConvertOptions, HfCheckpoint};
use ternlm_gguf::{GgmlType, GgufFile};
use ternlm_kernels::ThreadPool;
use ternlm_model::{BatchToken, Model};

#[derive(Clone, Copy, PartialEq)]
enum Style {
    /// Full-precision weights converted to a float type.
    Float,
    /// Full-precision latent weights ternarized by the converter.
    Latent,
    /// HF packed uint8 + weight_scale with this convention.
    Packed(ScaleConvention),
}

#[derive(Clone)]
struct Spec {
    arch: &'static str,
    d: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    ff: usize,
    n_layer: usize,
    dtype: Dtype,
    style: Style,
    biases: bool,
    qk_norm: bool,
    /// HF names of the attention / FFN sub-norms, if the model has them.
    sub_norms: Option<(&'static str, &'static str)>,
    tied: bool,
    relu2: bool,
    base: f64,
    spm: bool,
    shards: usize,
    extra_config: serde_json::Value,
}

impl Spec {
    fn new(arch: &'static str) -> Spec {
        Spec {
            arch,
            d: 256,
            n_head: 4,
            n_kv: 2,
            hd: 64,
            ff: 512,
            n_layer: 2,
            dtype: Dtype::BF16,
            style: Style::Float,
            biases: false,
            qk_norm: false,
            sub_norms: None,
            tied: false,
            relu2: false,
            base: 10000.0,
            spm: false,
            shards: 1,
            extra_config: json!({}),
        }
    }
}

const VOCAB: usize = 300;
const SPM_VOCAB: usize = 280;

/// Writes the checkpoint for `spec` into a fresh directory and returns it with the reference model.
fn build(name: &str, spec: &Spec, seed: u64) -> (std::path::PathBuf, RefModel) {
    let dir = tmp(name);
    let vocab = if spec.spm { SPM_VOCAB } else { VOCAB };
    let mut r = Rand::new(seed);
    let mut t = Tensors::new();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let put_vec = |t: &mut Tensors, r: &mut Rand, name: String, n: usize, scale: f32, offset: f32| -> Vec<f64> {
        let s = store(spec.dtype, &[n], &r.vec(n, scale, offset));
        let v = f64s(&values(&s));
        t.insert(name, s);
        v
    };
    let embed = put_vec(&mut t, &mut r, "model.embed_tokens.weight".into(), vocab * spec.d, 1.0, 0.0);
    // Reshape the embedding to 2-D.
    t.get_mut("model.embed_tokens.weight").unwrap().shape = vec![vocab, spec.d];
    let head = if spec.tied {
        embed.clone()
    } else {
        let h = put_vec(&mut t, &mut r, "lm_head.weight".into(), vocab * spec.d, 0.5, 0.0);
        t.get_mut("lm_head.weight").unwrap().shape = vec![vocab, spec.d];
        h
    };
    let norm = put_vec(&mut t, &mut r, "model.norm.weight".into(), spec.d, 0.2, 1.0);
    let (qd, kvd) = (spec.n_head * spec.hd, spec.n_kv * spec.hd);
    let mut layers = Vec::new();
    for l in 0..spec.n_layer {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let linear = |t: &mut Tensors,
                      r: &mut Rand,
                      name: &str,
                      rows: usize,
                      cols: usize,
                      scale: f32,
                      bias: bool|
         -> RefLinear {
            let base = p(name);
            let bias = bias.then(|| {
                let s = store(spec.dtype, &[rows], &r.vec(rows, 0.1, 0.0));
                let v = f64s(&values(&s));
                t.insert(format!("{base}.bias"), s);
                v
            });
            match spec.style {
                Style::Float | Style::Latent => {
                    let s = store(spec.dtype, &[rows, cols], &r.vec(rows * cols, scale, 0.0));
                    let w = values(&s);
                    t.insert(format!("{base}.weight"), s);
                    let ternary = (spec.style == Style::Latent).then(|| {
                        let (codes, sc) = absmean_reference(&w);
                        (codes, sc as f64)
                    });
                    RefLinear { w: f64s(&w), rows, cols, bias, ternary }
                }
                Style::Packed(conv) => {
                    let codes = r.codes(rows * cols);
                    let scale = scale * 0.6;
                    let stored = match conv {
                        ScaleConvention::Multiply => scale,
                        ScaleConvention::Divide => 1.0 / scale,
                    };
                    let st = store(Dtype::BF16, &[1], &[stored]);
                    let weight_scale = conv.weight_scale(values(&st)[0]);
                    t.insert(format!("{base}.weight_scale"), st);
                    let packed = Ternary { codes: codes.clone(), scale: weight_scale }.pack_hf(rows, cols);
                    t.insert(
                        format!("{base}.weight"),
                        Stored { dtype: Dtype::U8, shape: vec![rows / 4, cols], bytes: packed },
                    );
                    RefLinear { w: Vec::new(), rows, cols, bias, ternary: Some((codes, weight_scale as f64)) }
                }
            }
        };
        let attn_norm = put_vec(&mut t, &mut r, p("input_layernorm.weight"), spec.d, 0.2, 1.0);
        let q = linear(&mut t, &mut r, "self_attn.q_proj", qd, spec.d, 0.15, spec.biases);
        let k = linear(&mut t, &mut r, "self_attn.k_proj", kvd, spec.d, 0.15, spec.biases);
        let v = linear(&mut t, &mut r, "self_attn.v_proj", kvd, spec.d, 0.15, spec.biases);
        let o = linear(&mut t, &mut r, "self_attn.o_proj", spec.d, qd, 0.1, false);
        let (q_norm, k_norm) = if spec.qk_norm {
            (
                Some(put_vec(&mut t, &mut r, p("self_attn.q_norm.weight"), spec.hd, 0.2, 1.0)),
                Some(put_vec(&mut t, &mut r, p("self_attn.k_norm.weight"), spec.hd, 0.2, 1.0)),
            )
        } else {
            (None, None)
        };
        let (attn_sub_norm, ffn_sub_norm) = match spec.sub_norms {
            Some((a, f)) => (
                Some(put_vec(&mut t, &mut r, p(&format!("{a}.weight")), qd, 0.2, 1.0)),
                Some(put_vec(&mut t, &mut r, p(&format!("{f}.weight")), spec.ff, 0.2, 1.0)),
            ),
            None => (None, None),
        };
        let ffn_norm = put_vec(&mut t, &mut r, p("post_attention_layernorm.weight"), spec.d, 0.2, 1.0);
        let gate = linear(&mut t, &mut r, "mlp.gate_proj", spec.ff, spec.d, 0.15, false);
        let up = linear(&mut t, &mut r, "mlp.up_proj", spec.ff, spec.d, 0.15, false);
        let down = linear(&mut t, &mut r, "mlp.down_proj", spec.d, spec.ff, 0.1, false);
        layers.push(RefLayer {
            attn_norm,
            q,
            k,
            v,
            o,
            q_norm,
            k_norm,
            attn_sub_norm,
            ffn_norm,
            gate,
            up,
            down,
            ffn_sub_norm,
        });
    }
    let mut config = json!({
        "architectures": [spec.arch], "hidden_size": spec.d, "intermediate_size": spec.ff,
        "num_hidden_layers": spec.n_layer, "num_attention_heads": spec.n_head, "num_key_value_heads": spec.n_kv,
        "head_dim": spec.hd, "rms_norm_eps": 1e-5, "rope_theta": spec.base, "vocab_size": vocab,
        "max_position_embeddings": 512, "tie_word_embeddings": spec.tied,
    });
    for (k, v) in spec.extra_config.as_object().unwrap() {
        config[k] = v.clone();
    }
    write_checkpoint(&dir, &config, &t, spec.shards);
    if spec.spm {
        write_tiny_spm_tokenizer(&dir);
    } else {
        write_tiny_bpe_tokenizer(&dir, vocab);
    }
    let cfg = RefCfg {
        d: spec.d,
        n_head: spec.n_head,
        n_kv: spec.n_kv,
        hd: spec.hd,
        ff: spec.ff,
        n_layer: spec.n_layer,
        vocab,
        eps: 1e-5,
        base: spec.base,
        relu2: spec.relu2,
        int8_acts: spec.style != Style::Float,
        flash_f16: !spec.arch.starts_with("Bit"),
        rope_llama3: spec.extra_config.get("rope_scaling").map(|r| {
            let f = |k: &str| r[k].as_f64().unwrap();
            (f("factor"), f("low_freq_factor"), f("high_freq_factor"), f("original_max_position_embeddings"))
        }),
    };
    (dir, RefModel { cfg, embed, head, norm, layers })
}

fn convert(dir: &std::path::Path, out_type: &str, embd: &str) -> std::path::PathBuf {
    let ck = HfCheckpoint::open(dir).unwrap();
    let mut opts = ConvertOptions::new(parse_type(out_type).unwrap());
    opts.embd_type = Some(parse_type(embd).unwrap());
    opts.head_type = Some(parse_type(embd).unwrap());
    let plan = ternlm_convert::plan(&ck, &opts).unwrap_or_else(|e| panic!("{e:#}"));
    let out = dir.join("model.gguf");
    ternlm_convert::write(&ck, &plan, &out, |_, _| {}).unwrap_or_else(|e| panic!("{e:#}"));
    out
}

/// Runs the converted model on a few tokens and compares every position's logits with the reference.
///
/// Float models: position 0 (no attention mixing) to 1e-4 of the logit scale, later positions to 5e-4 (the f16 KV
/// cache and f16 attention accumulator are modelled, the remaining differences are f32 vs f64). Models with int8
/// activations: 1e-4 at the median position and 2e-2 everywhere, because an f32-vs-f64 difference that lands on
/// an int8 rounding boundary legitimately moves one activation by a whole step, at any position, and what depends
/// on it (see the ternary fixtures' README). A wrong permutation, scale or norm placement
/// moves logits by order 1.
fn check_logits(gguf: &std::path::Path, reference: &RefModel) {
    let model = Model::from_gguf(Arc::new(GgufFile::open(gguf).unwrap())).unwrap();
    let pool = ThreadPool::new(2);
    let tokens: Vec<u32> = vec![1, 17, 42, 99, 7, 250, 3, 64];
    let mut kv = model.new_kv_cache(64, 1);
    let batch: Vec<BatchToken> =
        tokens.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: true }).collect();
    let got = model.forward(&batch, &mut kv, &pool).unwrap();
    let want = reference.forward(&tokens);
    let nv = reference.cfg.vocab;
    let scale = want.iter().flatten().fold(1f64, |m, v| m.max(v.abs()));
    let diffs: Vec<f64> = want
        .iter()
        .enumerate()
        .map(|(pos, w)| {
            got[pos * nv..(pos + 1) * nv].iter().zip(w).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max)
        })
        .collect();
    let name = gguf.display();
    let shown: Vec<String> = diffs.iter().map(|d| format!("{d:.1e}")).collect();
    eprintln!("{name}: max |Δlogit| per position [{}] (max |logit| {scale:.1})", shown.join(" "));
    if reference.cfg.int8_acts {
        let mut sorted = diffs.clone();
        sorted.sort_by(f64::total_cmp);
        assert!(
            sorted[sorted.len() / 2] <= 1e-4 * scale,
            "{name}: median position differs by {}",
            sorted[sorted.len() / 2]
        );
        assert!(sorted[sorted.len() - 1] <= 2e-2 * scale, "{name}: a position differs by {}", sorted[sorted.len() - 1]);
    } else {
        assert!(diffs[0] <= 1e-4 * scale, "{name}: position 0 logits differ by {}", diffs[0]);
        assert!(diffs.iter().all(|&d| d <= 5e-4 * scale), "{name}: logits differ by up to {diffs:?}");
    }
}

/// Every projection of the converted file equals the reference's ternary codes and scale exactly.
fn check_ternary_exact(gguf: &std::path::Path, reference: &RefModel, permuted: bool) {
    let f = GgufFile::open(gguf).unwrap();
    let c = reference.cfg;
    let mut n = 0;
    for (l, ly) in reference.layers.iter().enumerate() {
        for (name, lin, heads) in [
            ("attn_q", &ly.q, Some(c.n_head)),
            ("attn_k", &ly.k, Some(c.n_kv)),
            ("attn_v", &ly.v, None),
            ("attn_output", &ly.o, None),
            ("ffn_gate", &ly.gate, None),
            ("ffn_up", &ly.up, None),
            ("ffn_down", &ly.down, None),
        ] {
            let info = f.tensor_info(&format!("blk.{l}.{name}.weight")).unwrap();
            let t = decode_ternary(info.ty, f.tensor_data(info), lin.rows * lin.cols).unwrap();
            let (codes, scale) = lin.ternary.as_ref().unwrap();
            let mut got = t.codes.clone();
            if let (true, Some(nh)) = (permuted, heads) {
                got = permute_rows(&got, lin.cols, nh, true);
            }
            assert!(got == *codes, "blk.{l}.{name}: ternary codes differ from the reference");
            let want_scale =
                if info.ty == GgmlType::I2_S { *scale as f32 } else { half::f16::from_f32(*scale as f32).to_f32() };
            assert_eq!(t.scale, want_scale, "blk.{l}.{name}: scale");
            n += 1;
        }
    }
    assert_eq!(n, 7 * c.n_layer);
}

#[test]
fn bitnet_b158_bf16_latent_to_i2s() {
    let mut s = Spec::new("BitNetForCausalLM");
    s.style = Style::Latent;
    s.sub_norms = Some(("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"));
    s.tied = true;
    s.relu2 = true;
    s.base = 500000.0;
    let (dir, reference) = build("b158-latent", &s, 1);
    let out = convert(&dir, "i2_s", "f32");
    check_ternary_exact(&out, &reference, false);
    check_logits(&out, &reference);
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("bitnet-b1.58"));
    assert_eq!(f.get_u64("general.file_type").unwrap(), Some(40));
    assert!(f.tensor_info("output.weight").is_none(), "2B4T's head is tied");
}

#[test]
fn bitnet_b158_packed_autobitlinear_to_i2s_and_tq2_0() {
    let mut s = Spec::new("BitNetForCausalLM");
    s.style = Style::Packed(ScaleConvention::Multiply);
    s.sub_norms = Some(("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"));
    s.tied = true;
    s.relu2 = true;
    s.base = 500000.0;
    s.extra_config = json!({"quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}});
    let (dir, reference) = build("b158-packed", &s, 2);
    let out = convert(&dir, "i2_s", "f32");
    check_ternary_exact(&out, &reference, false);
    check_logits(&out, &reference);
    let out = convert(&dir, "tq2_0", "f32");
    check_ternary_exact(&out, &reference, false);
}

#[test]
fn bitnet_1bitllm_fp16_spm_to_i2s() {
    let mut s = Spec::new("BitnetForCausalLM");
    s.dtype = Dtype::F16;
    s.style = Style::Latent;
    s.sub_norms = Some(("self_attn.inner_attn_ln", "mlp.ffn_layernorm"));
    s.n_kv = 4;
    s.spm = true;
    let (dir, reference) = build("1bitllm", &s, 3);
    let out = convert(&dir, "i2_s", "f32");
    check_ternary_exact(&out, &reference, false);
    check_logits(&out, &reference);
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("bitnet"));
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), Some("llama"));
    assert_eq!(f.get_str("bitnet.rope.scaling.type").unwrap(), Some("linear"));
}

#[test]
fn llama_packed_bitlinear_falcon3_style_permuted() {
    let mut s = Spec::new("LlamaForCausalLM");
    s.style = Style::Packed(ScaleConvention::Divide);
    s.extra_config = json!({"quantization_config": {"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]}});
    let (dir, reference) = build("falcon3-packed", &s, 4);
    let out = convert(&dir, "i2_s", "f32");
    check_ternary_exact(&out, &reference, true);
    check_logits(&out, &reference);
    // Packed weights converted to a float type are the exact values code × scale.
    let mut reference = reference;
    reference.cfg.int8_acts = false;
    let out = convert(&dir, "f32", "f32");
    check_logits(&out, &reference);
}

#[test]
fn llama_full_precision_sharded_permuted() {
    let mut s = Spec::new("LlamaForCausalLM");
    s.shards = 3;
    // Llama 3.1-style RoPE scaling (a short original context so it matters within the test's 8 positions).
    s.extra_config = json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}});
    let (dir, reference) = build("llama-fp", &s, 5);
    // BF16 weights: F32 and BF16 outputs hold them exactly.
    let out = convert(&dir, "f32", "f32");
    check_logits(&out, &reference);
    assert!(GgufFile::open(&out).unwrap().tensor_info("rope_freqs.weight").is_some());
    // BF16 and Q8_0 outputs are dotted with rounded activations (BF16 / Q8_0, as llama.cpp does): lossy, so
    // only within a percent or a few.
    for (ty, tol) in [("bf16", 1e-2), ("q8_0", 5e-2)] {
        let out = convert(&dir, ty, ty);
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(f.tensor_info("blk.0.attn_q.weight").unwrap().ty, parse_type(ty).unwrap());
        let model = Model::from_gguf(Arc::new(f)).unwrap();
        let mut kv = model.new_kv_cache(8, 1);
        let got = model
            .forward(&[BatchToken { token: 17, pos: 0, seq: 0, logits: true }], &mut kv, &ThreadPool::new(1))
            .unwrap();
        let want = &reference.forward(&[17])[0];
        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
        let d = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
        assert!(d <= tol * scale, "{ty}: logits differ by {d} of {scale}");
    }
}

#[test]
fn qwen2_biases() {
    let mut s = Spec::new("Qwen2ForCausalLM");
    s.biases = true;
    s.tied = true;
    s.base = 1e6;
    let (dir, reference) = build("qwen2", &s, 6);
    let out = convert(&dir, "f32", "f32");
    check_logits(&out, &reference);
}

#[test]
fn qwen3_student_with_subln_ternarized() {
    let mut s = Spec::new("Qwen3ForCausalLM");
    s.qk_norm = true;
    s.hd = 128; // head_dim ≠ hidden / heads, as in Qwen3
    s.sub_norms = Some(("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"));
    s.style = Style::Latent;
    s.tied = true;
    let (dir, reference) = build("qwen3-subln", &s, 7);
    let out = convert(&dir, "i2_s", "f32");
    check_ternary_exact(&out, &reference, false);
    check_logits(&out, &reference);
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_u64("qwen3.attention.key_length").unwrap(), Some(128));
    assert!(f.tensor_info("blk.0.attn_sub_norm.weight").is_some());
}
