//! Qwen2.5-Coder-0.5B-Instruct (arch `qwen2`: QKV biases, NeoX RoPE; Q4_K_M mix of Q4_K, Q5_0, Q6_K, Q8_0), fetched
//! by `scripts/fetch-models.sh qwen2.5-coder-0.5b`. There is no llama.cpp reference output for it here, so the
//! checks are independent ones: the AVX2 kernels equal the scalar reference backend on the real weights, and
//! perplexity is in the range a working 0.5B model has (a wrong bias or RoPE layout gives hundreds).
//!
//! Fails when the model is missing unless TERNLM_SKIP_MODEL_TESTS=1 (then it prints a loud notice).

use std::sync::Arc;
use ternlm_gguf::GgufFile;
use ternlm_kernels::dot::Backend;
use ternlm_kernels::ThreadPool;
use ternlm_model::{BatchToken, Model};
use ternlm_tokenizer::Tokenizer;

mod common;

fn model_file() -> Option<Arc<GgufFile>> {
    common::model_file("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b")
}

#[test]
fn qwen2_simd_equals_scalar_backend_and_perplexity_is_sane() {
    let Some(f) = model_file() else { return };
    let tok = Tokenizer::from_gguf(&f, None).unwrap();
    assert_eq!(tok.pre_tokenizer_name(), Some("qwen2"));
    let pool = ThreadPool::new(2);
    let fast = Model::from_gguf(f.clone()).unwrap();
    assert_eq!(fast.cfg.arch, "qwen2");
    let reference = Model::from_gguf_with_backend(f.clone(), Backend::Scalar).unwrap();
    let ids = tok.encode("def fibonacci(n):\n    if n", false, false);
    let batch: Vec<BatchToken> =
        ids.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: true }).collect();
    let a = fast.forward(&batch, &mut fast.new_kv_cache(64, 1), &pool).unwrap();
    let b = reference.forward(&batch, &mut reference.new_kv_cache(64, 1), &pool).unwrap();
    // Matmuls are bit-exact between backends; only the attention dot's float summation order differs.
    let max_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max_diff < 2e-2, "AVX2 vs scalar backend logits differ by {max_diff}");
    let nv = fast.cfg.n_vocab;
    for (ra, rb) in a.chunks_exact(nv).zip(b.chunks_exact(nv)) {
        assert_eq!(ternlm_model::sampling::argmax(ra), ternlm_model::sampling::argmax(rb));
    }
    let text = std::fs::read_to_string(common::shared().join("data/text/wikitext-2-raw-test.txt")).unwrap();
    let tokens = tok.encode(&text[..20000], true, false);
    let r = ternlm_model::perplexity::perplexity(&fast, &pool, &tokens, 512, Some(1), None, |_, _| {}).unwrap();
    eprintln!("qwen2.5-coder-0.5b wikitext chunk 1 perplexity: {:.4}", r.ppl);
    assert!(r.ppl > 5.0 && r.ppl < 30.0, "perplexity {} is outside the range of a working model", r.ppl);
}
