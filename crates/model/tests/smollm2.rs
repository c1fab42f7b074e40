//! SmolLM2-135M-Instruct (Q4_1 + Q8_0, fetched by scripts/fetch-models.sh) against llama.cpp's reference outputs in
//! ../shared/reference/smollm2: tokenizer cases, the greedy 32-token continuation, and per-chunk perplexity.
//!
//! These tests need the model file. They fail when it is missing, unless TERNLM_SKIP_MODEL_TESTS=1 is set, in
//! which case they print a loud notice. CI always runs them (.ci/run fetches the model first).

use ternlm_kernels::ThreadPool;
use ternlm_model::chat::{ChatTemplate, Message};
use ternlm_model::{generate, BatchToken, GenerateOptions, Model, SamplingParams};
use ternlm_tokenizer::Tokenizer;

mod common;
use common::shared;

struct Env {
    model: Model,
    tok: Tokenizer,
    pool: ThreadPool,
}

fn load() -> Option<Env> {
    let f = common::model_file("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")?;
    let tok = Tokenizer::from_gguf(&f, None).unwrap();
    let model = Model::from_gguf(f).unwrap();
    Some(Env { model, tok, pool: ThreadPool::new(2) })
}

#[test]
fn tokenizer_cases_match_llama_cpp() {
    let Some(e) = load() else { return };
    let dir = shared().join("reference/smollm2");
    let inp = std::fs::read_to_string(dir.join("tokenizer-cases.inp")).unwrap();
    let out = std::fs::read_to_string(dir.join("tokenizer-cases.out")).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let mut lines: Vec<&str> = out.lines().collect();
    // The file ends with one extra blank line; only trailing blanks beyond the case count are dropped.
    while lines.len() > texts.len() && lines.last() == Some(&"") {
        lines.pop();
    }
    let want: Vec<Vec<u32>> =
        lines.iter().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), want.len());
    for (t, w) in texts.iter().zip(&want) {
        assert_eq!(&e.tok.encode(t, false, false), w, "{t:?}");
    }
    assert_eq!(e.tok.encode("The capital of France is", true, false), vec![504, 3575, 282, 4649, 314]);
}

#[test]
fn greedy_32_tokens_match_llama_cpp() {
    let Some(e) = load() else { return };
    let want = std::fs::read_to_string(shared().join("reference/smollm2/greedy-32.txt")).unwrap();
    let prompt = "The capital of France is";
    let ids = e.tok.encode(prompt, true, false);
    let mut kv = e.model.new_kv_cache(256, 1);
    let opts = GenerateOptions { max_tokens: 32, sampling: SamplingParams::greedy(), ..Default::default() };
    let mut text = String::from(prompt);
    let st = generate(&e.model, &e.tok, &e.pool, &mut kv, 0, &ids, &opts, &mut |t| {
        text.push_str(t);
        true
    })
    .unwrap();
    assert_eq!(st.n_generated, 32);
    assert_eq!(text, want.trim_end_matches('\n'));
}

/// Running perplexity of the first chunks of wikitext-2 at -c 512 within 1% of llama.cpp's per-chunk values.
#[test]
fn perplexity_first_chunks_match_llama_cpp() {
    let Some(e) = load() else { return };
    let reference =
        std::fs::read_to_string(shared().join("reference/smollm2/perplexity-wikitext-c512-40chunks.txt")).unwrap();
    let line = reference.lines().find(|l| l.starts_with("[1]")).expect("per-chunk line");
    let want: Vec<f64> =
        line.split(',').filter(|s| !s.is_empty()).map(|s| s.split(']').nth(1).unwrap().parse().unwrap()).collect();
    assert_eq!(want.len(), 40);
    let text = std::fs::read_to_string(shared().join("data/text/wikitext-2-raw-test.txt")).unwrap();
    let tokens = e.tok.encode(&text, true, false);
    let n_chunks = 3;
    let bos = if e.tok.add_bos { e.tok.bos } else { None };
    let r =
        ternlm_model::perplexity::perplexity(&e.model, &e.pool, &tokens, 512, Some(n_chunks), bos, |_, _| {}).unwrap();
    for (i, (got, want)) in r.running.iter().zip(&want).enumerate() {
        let rel = (got - want).abs() / want;
        eprintln!("[{}] ternlm {got:.4} llama.cpp {want:.4} ({:.3}%)", i + 1, rel * 100.0);
        assert!(rel < 0.01, "chunk {}: {got} vs llama.cpp {want}", i + 1);
    }
}

/// Two sequences decoded together in one batch give the same logits as each alone (continuous batching).
#[test]
fn batched_sequences_equal_separate_runs() {
    let Some(e) = load() else { return };
    let a = e.tok.encode("Once upon a time", true, false);
    let b = e.tok.encode("The quick brown fox jumps", true, false);
    let run_alone = |ids: &[u32]| {
        let mut kv = e.model.new_kv_cache(64, 1);
        let batch: Vec<BatchToken> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: i + 1 == ids.len() })
            .collect();
        e.model.forward(&batch, &mut kv, &e.pool).unwrap()
    };
    let (la, lb) = (run_alone(&a), run_alone(&b));
    let mut kv = e.model.new_kv_cache(64, 2);
    let mut batch = Vec::new();
    for (seq, ids) in [(0, &a), (1, &b)] {
        batch.extend(ids.iter().enumerate().map(|(i, &t)| BatchToken {
            token: t,
            pos: i,
            seq,
            logits: i + 1 == ids.len(),
        }));
    }
    let both = e.model.forward(&batch, &mut kv, &e.pool).unwrap();
    let nv = e.model.cfg.n_vocab;
    assert_eq!(&both[..nv], &la[..]);
    assert_eq!(&both[nv..], &lb[..]);
    // Decoding one more token per sequence in a shared batch continues each correctly.
    let next = [ternlm_model::sampling::argmax(&la), ternlm_model::sampling::argmax(&lb)];
    let step = [
        BatchToken { token: next[0], pos: a.len(), seq: 0, logits: true },
        BatchToken { token: next[1], pos: b.len(), seq: 1, logits: true },
    ];
    let two = e.model.forward(&step, &mut kv, &e.pool).unwrap();
    let mut a2 = a.clone();
    a2.push(next[0]);
    assert_eq!(&two[..nv], &run_alone(&a2)[..]);
    // Out-of-order positions are refused with an error, not silently accepted.
    let bad = [BatchToken { token: 1, pos: a.len() + 5, seq: 0, logits: true }];
    assert!(e.model.forward(&bad, &mut kv, &e.pool).is_err());
}

/// A prompt longer than the forward's micro-batch (it runs in pieces internally) gives the same logits, bit for
/// bit, as feeding its tokens one at a time.
#[test]
fn long_prompt_equals_token_by_token() {
    let Some(e) = load() else { return };
    let text = std::fs::read_to_string(shared().join("data/text/wikitext-2-raw-test.txt")).unwrap();
    let mut ids = e.tok.encode(&text[..4000], true, false);
    ids.truncate(300);
    assert_eq!(ids.len(), 300);
    let wanted = |i: usize| i.is_multiple_of(37) || i + 1 == ids.len();
    let mut kv = e.model.new_kv_cache(320, 1);
    let batch: Vec<BatchToken> =
        ids.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: wanted(i) }).collect();
    let all = e.model.forward(&batch, &mut kv, &e.pool).unwrap();
    let nv = e.model.cfg.n_vocab;
    let mut kv1 = e.model.new_kv_cache(320, 1);
    let mut k = 0;
    for (i, &t) in ids.iter().enumerate() {
        let l = e.model.forward(&[BatchToken { token: t, pos: i, seq: 0, logits: wanted(i) }], &mut kv1, &e.pool);
        let l = l.unwrap();
        if wanted(i) {
            assert!(all[k * nv..(k + 1) * nv] == l[..], "position {i}: batched logits differ from one at a time");
            k += 1;
        }
    }
    assert_eq!(k * nv, all.len());
}

#[test]
fn chat_template_renders_smollm2_format() {
    let Some(e) = load() else { return };
    let t = ChatTemplate::from_gguf(&e.model.file, &e.tok).unwrap();
    let s = t.render(&[Message::new("user", "Hi")], true).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = e.tok.encode(&s, true, true);
    assert_eq!(ids[0], e.tok.token_id("<|im_start|>").unwrap(), "special tokens are parsed in chat prompts");
    assert!(e.tok.is_eog(e.tok.token_id("<|im_end|>").unwrap()));
}

/// A second prompt that extends the first reuses the cached prefix and gives exactly what a fresh cache gives.
#[test]
fn prompt_prefix_reuse_equals_fresh_cache() {
    let Some(e) = load() else { return };
    let opts = GenerateOptions { max_tokens: 12, sampling: SamplingParams::greedy(), ..Default::default() };
    let run = |kv: &mut ternlm_model::KvCache, ids: &[u32]| {
        let mut s = String::new();
        let st = generate(&e.model, &e.tok, &e.pool, kv, 0, ids, &opts, &mut |t| {
            s.push_str(t);
            true
        })
        .unwrap();
        (s, st.n_prompt_reused)
    };
    let first = e.tok.encode("Alice has three apples. Bob has", true, false);
    let second = e.tok.encode("Alice has three apples. Bob has two pears. Together they have", true, false);
    let mut kv = e.model.new_kv_cache(128, 1);
    let (_, reused0) = run(&mut kv, &first);
    assert_eq!(reused0, 0);
    let (warm, reused) = run(&mut kv, &second);
    assert!(reused >= first.len() - 1, "reused {reused} of a {}-token prefix", first.len());
    let (cold, _) = run(&mut e.model.new_kv_cache(128, 1), &second);
    assert_eq!(warm, cold);
}

/// Re-quantizing the head: to its own type is a no-op; to F16 keeps the logits close and the prediction.
#[test]
fn requantized_head_keeps_predictions() {
    let Some(mut e) = load() else { return };
    let ids = e.tok.encode("The capital of France is", true, false);
    let batch: Vec<BatchToken> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: i + 1 == ids.len() })
        .collect();
    let before = e.model.forward(&batch, &mut e.model.new_kv_cache(32, 1), &e.pool).unwrap();
    e.model.requantize_head(ternlm_gguf::GgmlType::Q8_0, &e.pool).unwrap();
    assert_eq!(e.model.forward(&batch, &mut e.model.new_kv_cache(32, 1), &e.pool).unwrap(), before);
    e.model.requantize_head(ternlm_gguf::GgmlType::F16, &e.pool).unwrap();
    assert_eq!(e.model.head().ty(), ternlm_gguf::GgmlType::F16);
    let after = e.model.forward(&batch, &mut e.model.new_kv_cache(32, 1), &e.pool).unwrap();
    let d = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    // The F16 head also dots with f16 activations instead of Q8_0-quantized ones: a different (finer) rounding.
    let scale = before.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(d < 0.02 * scale, "F16 head changed logits by {d} (logit scale {scale})");
    assert_eq!(ternlm_model::sampling::argmax(&before), ternlm_model::sampling::argmax(&after));
    assert!(e.model.requantize_head(ternlm_gguf::GgmlType::Q4_K, &e.pool).is_err());
    // SmolLM2's rows (576) are not whole Q6_K blocks: a clear error, not a crash.
    let err = e.model.requantize_head(ternlm_gguf::GgmlType::Q6_K, &e.pool).unwrap_err().to_string();
    assert!(err.contains("576") && err.contains("256"), "{err}");
}
