//! Malformed checkpoints give clear errors that name the file, the tensor or field, and what was expected.

mod common;

use common::*;
use safetensors::Dtype;
use serde_json::json;
use std::path::{Path, PathBuf};
use ternlm_convert::{parse_type, ConvertOptions, HfCheckpoint};

const D: usize = 128;
const FF: usize = 256;
const VOCAB: usize = 300;

fn config() -> serde_json::Value {
    json!({"architectures": ["LlamaForCausalLM"], "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "vocab_size": VOCAB,
           "tie_word_embeddings": true})
}

fn tensors() -> Tensors {
    let mut r = Rand::new(9);
    let mut t = Tensors::new();
    let mut add = |name: &str, shape: &[usize]| {
        let n = shape.iter().product();
        t.insert(name.to_string(), store(Dtype::F16, shape, &r.vec(n, 0.1, 0.0)));
    };
    add("model.embed_tokens.weight", &[VOCAB, D]);
    add("model.norm.weight", &[D]);
    let p = "model.layers.0.";
    for (n, s) in [
        ("input_layernorm.weight", vec![D]),
        ("self_attn.q_proj.weight", vec![D, D]),
        ("self_attn.k_proj.weight", vec![64, D]),
        ("self_attn.v_proj.weight", vec![64, D]),
        ("self_attn.o_proj.weight", vec![D, D]),
        ("post_attention_layernorm.weight", vec![D]),
        ("mlp.gate_proj.weight", vec![FF, D]),
        ("mlp.up_proj.weight", vec![FF, D]),
        ("mlp.down_proj.weight", vec![D, FF]),
    ] {
        add(&format!("{p}{n}"), &s);
    }
    t
}

fn write(name: &str, cfg: &serde_json::Value, t: &Tensors, shards: usize) -> PathBuf {
    let dir = tmp(name);
    write_checkpoint(&dir, cfg, t, shards);
    write_tiny_bpe_tokenizer(&dir, VOCAB);
    dir
}

fn error(dir: &Path, ty: &str) -> String {
    let r = HfCheckpoint::open(dir).and_then(|ck| {
        let plan = ternlm_convert::plan(&ck, &ConvertOptions::new(parse_type(ty)?))?;
        ternlm_convert::write(&ck, &plan, &dir.join("out.gguf"), |_, _| {})
    });
    let e = format!("{:#}", r.expect_err("conversion should fail"));
    assert!(!dir.join("out.gguf").exists() && !dir.join("out.gguf.tmp").exists(), "no output left behind");
    e
}

fn has(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "error {e:?} should mention {p:?}");
    }
}

#[test]
fn a_valid_checkpoint_converts() {
    let dir = write("err-valid", &config(), &tensors(), 2);
    let ck = HfCheckpoint::open(&dir).unwrap();
    let plan = ternlm_convert::plan(&ck, &ConvertOptions::new(parse_type("q8_0").unwrap())).unwrap();
    ternlm_convert::write(&ck, &plan, &dir.join("out.gguf"), |_, _| {}).unwrap();
    assert!(dir.join("out.gguf").exists());
}

#[test]
fn missing_shard() {
    let dir = write("err-shard", &config(), &tensors(), 2);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    has(&error(&dir, "f16"), &["model-00002-of-00002.safetensors", "missing", "model.safetensors.index.json"]);
}

#[test]
fn wrong_dtype() {
    let mut t = tensors();
    t.insert(
        "model.layers.0.self_attn.q_proj.weight".into(),
        Stored { dtype: Dtype::I32, shape: vec![D, D], bytes: vec![0; D * D * 4] },
    );
    let dir = write("err-dtype", &config(), &t, 1);
    has(
        &error(&dir, "f16"),
        &["model.safetensors", "model.layers.0.self_attn.q_proj.weight", "I32", "expected F32, F16 or BF16"],
    );
}

#[test]
fn shape_mismatch() {
    let mut t = tensors();
    t.insert("model.layers.0.mlp.up_proj.weight".into(), store(Dtype::F16, &[FF + 1, D], &vec![0.0; (FF + 1) * D]));
    let dir = write("err-shape", &config(), &t, 1);
    has(
        &error(&dir, "f16"),
        &["model.layers.0.mlp.up_proj.weight", "[257, 128]", "expected [256, 128]", "intermediate_size"],
    );
}

#[test]
fn unknown_architecture() {
    let mut cfg = config();
    cfg["architectures"] = json!(["GPTNeoXForCausalLM"]);
    let dir = write("err-arch", &cfg, &tensors(), 1);
    has(&error(&dir, "f16"), &["config.json", "architectures", "GPTNeoXForCausalLM", "LlamaForCausalLM"]);
}

#[test]
fn missing_tensor() {
    let mut t = tensors();
    t.remove("model.layers.0.mlp.down_proj.weight");
    let dir = write("err-missing", &config(), &t, 1);
    has(&error(&dir, "f16"), &["missing", "model.layers.0.mlp.down_proj.weight"]);
}

#[test]
fn unknown_tensor() {
    let mut t = tensors();
    t.insert("model.layers.0.self_attn.rel_pos.weight".into(), store(Dtype::F16, &[4], &[0.0; 4]));
    let dir = write("err-unknown", &config(), &t, 1);
    has(&error(&dir, "f16"), &["model.layers.0.self_attn.rel_pos.weight", "does not know"]);
}

#[test]
fn missing_config_field() {
    let mut cfg = config();
    cfg.as_object_mut().unwrap().remove("intermediate_size");
    let dir = write("err-field", &cfg, &tensors(), 1);
    has(&error(&dir, "f16"), &["config.json", "intermediate_size"]);
}

#[test]
fn ternary_type_needs_row_multiple() {
    // Rows of 128 fit I2_S but not TQ2_0's 256-blocks.
    let dir = write("err-tq2", &config(), &tensors(), 1);
    has(&error(&dir, "tq2_0"), &["blk.0.attn_q.weight", "128", "TQ2_0", "256"]);
}

#[test]
fn packed_weight_without_scale() {
    let mut t = tensors();
    t.insert(
        "model.layers.0.mlp.gate_proj.weight".into(),
        Stored { dtype: Dtype::U8, shape: vec![FF / 4, D], bytes: vec![0x55; FF / 4 * D] },
    );
    let dir = write("err-packed", &config(), &t, 1);
    has(&error(&dir, "i2_s"), &["model.layers.0.mlp.gate_proj.weight", "weight_scale", "missing"]);
}

#[test]
fn corrupt_safetensors_header() {
    let dir = write("err-corrupt", &config(), &tensors(), 1);
    let p = dir.join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b[0..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&p, b).unwrap();
    has(&error(&dir, "f16"), &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn unknown_output_type() {
    let e = parse_type("q4_k").unwrap_err().to_string();
    has(&e, &["q4_k", "i2_s", "q8_0"]);
}
