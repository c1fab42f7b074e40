//! `ternlm gen-model` files: the official 2B4T key set and order (as in the bitnet.cpp fixture F1, which copies it),
//! the same tensor names/shapes/order, and TQ1_0 / TQ2_0 twins that decode to the same weights give bit-identical
//! logits (both are exact ternary × Q8_K dots with the same f16 scales).

mod common;

use std::sync::Arc;
use ternlm_gguf::{GgmlType, GgufFile};
use ternlm_kernels::ThreadPool;
use ternlm_model::generator::{write_random_model, GenSpec};
use ternlm_model::{BatchToken, Model};

fn tiny(wt: GgmlType) -> GenSpec {
    GenSpec::tiny(wt, GgmlType::F16)
}

#[test]
fn generated_files_match_the_official_layout_and_tq_twins_agree() {
    let vocab = common::shared().join("fixtures/tokenizer/llama-cpp-vectors/ggml-vocab-llama-bpe.gguf");
    let f1 = GgufFile::open(common::shared().join("fixtures/models/tiny-b158-i2s.gguf")).unwrap();
    let dir = std::env::temp_dir().join(format!("ternlm-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = ThreadPool::new(2);
    let mut logits = Vec::new();
    for wt in [GgmlType::I2_S, GgmlType::TQ2_0, GgmlType::TQ1_0] {
        let path = dir.join(format!("tiny-{wt}.gguf"));
        write_random_model(&tiny(wt), &vocab, &path).unwrap();
        let f = Arc::new(GgufFile::open(&path).unwrap());
        let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
        let want: Vec<&str> = f1.metadata().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, want, "{wt}: metadata keys and their order");
        assert!(f.get("tokenizer.ggml.pre").is_none());
        let shapes = |g: &GgufFile| g.tensors().iter().map(|t| (t.name.clone(), t.dims.clone())).collect::<Vec<_>>();
        assert_eq!(shapes(&f), shapes(&f1), "{wt}: tensor names, shapes and order");
        for t in f.tensors() {
            if t.dims.len() == 2 && t.name != "token_embd.weight" {
                assert_eq!(t.ty, wt, "{}", t.name);
            }
        }
        let tok = ternlm_tokenizer::Tokenizer::from_gguf(&f, None).unwrap();
        let model = Model::from_gguf(f).unwrap();
        let ids = tok.encode("The capital of France is", true, false);
        assert_eq!(ids[0], 128000, "BOS added as the official file asks");
        let batch: Vec<BatchToken> =
            ids.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: true }).collect();
        logits.push(model.forward(&batch, &mut model.new_kv_cache(64, 1), &pool).unwrap());
    }
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(logits[1], logits[2], "TQ2_0 and TQ1_0 of the same weights must give identical logits");
    let d = logits[0].iter().zip(&logits[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1.0, "I2_S (per-token activations) and TQ2_0 (per-block) differ by {d}");
}

/// With per-token activations, a TQ2_0 file computes what the I2_S file of the same weights computes (BitNet
/// semantics) up to float summation order; with llama.cpp's per-block Q8_K they differ by int8 rounding effects.
#[test]
fn tq_per_token_semantics_reproduce_i2s() {
    let vocab = common::shared().join("fixtures/tokenizer/llama-cpp-vectors/ggml-vocab-llama-bpe.gguf");
    let dir = std::env::temp_dir().join(format!("ternlm-tq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = ThreadPool::new(2);
    let run = |wt: GgmlType, per_token: bool| {
        let path = dir.join(format!("{wt}.gguf"));
        if !path.exists() {
            write_random_model(&tiny(wt), &vocab, &path).unwrap();
        }
        let mut model = Model::from_gguf(Arc::new(GgufFile::open(&path).unwrap())).unwrap();
        if per_token {
            model.use_per_token_tq_acts();
        }
        let ids = [128000u32, 791, 6864, 315, 9822, 374, 12366, 13];
        let batch: Vec<BatchToken> =
            ids.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: true }).collect();
        model.forward(&batch, &mut model.new_kv_cache(16, 1), &pool).unwrap()
    };
    let i2s = run(GgmlType::I2_S, false);
    let tq_tok = run(GgmlType::TQ2_0, true);
    let tq_blk = run(GgmlType::TQ2_0, false);
    std::fs::remove_dir_all(&dir).ok();
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let (d_tok, d_blk) = (diff(&i2s, &tq_tok), diff(&i2s, &tq_blk));
    eprintln!("I2_S vs TQ2_0 per-token: {d_tok:.2e}; vs per-block: {d_blk:.2e}");
    assert!(d_tok < 1e-3, "per-token TQ2_0 should reproduce I2_S, differs by {d_tok}");
    assert!(d_blk > 10.0 * d_tok, "per-block semantics should be measurably different");
}

/// `llama` with ternary weights (Falcon3-1.58bit / Llama3-8B-1.58 style: no sub-norms, SiLU, interleaved RoPE):
/// I2_S and per-token TQ2_0 files of the same weights run and agree.
#[test]
fn llama_arch_with_ternary_weights() {
    let vocab = common::shared().join("fixtures/tokenizer/llama-cpp-vectors/ggml-vocab-llama-bpe.gguf");
    let dir = std::env::temp_dir().join(format!("ternlm-llama-tern-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = ThreadPool::new(2);
    let mut out = Vec::new();
    for wt in [GgmlType::I2_S, GgmlType::TQ2_0] {
        let path = dir.join(format!("llama-{wt}.gguf"));
        write_random_model(&GenSpec { arch: "llama".into(), ..tiny(wt) }, &vocab, &path).unwrap();
        let f = Arc::new(GgufFile::open(&path).unwrap());
        assert!(f.tensor_info("blk.0.attn_sub_norm.weight").is_none());
        let mut model = Model::from_gguf(f).unwrap();
        assert_eq!(model.cfg.arch, "llama");
        model.use_per_token_tq_acts();
        let ids = [128000u32, 791, 6864, 315, 9822, 374];
        let batch: Vec<BatchToken> =
            ids.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: true }).collect();
        out.push(model.forward(&batch, &mut model.new_kv_cache(16, 1), &pool).unwrap());
    }
    std::fs::remove_dir_all(&dir).ok();
    let d = out[0].iter().zip(&out[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(out[0].iter().all(|v| v.is_finite()));
    assert!(d < 1e-3, "llama I2_S vs per-token TQ2_0 differ by {d}");
}
