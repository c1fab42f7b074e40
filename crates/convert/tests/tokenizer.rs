//! Tokenizer metadata written by `convert` from Hugging Face files reproduces llama.cpp: for Llama-3 the whole
//! vocabulary (tokens, types, merges, pre-tokenizer name) equals llama.cpp's own `ggml-vocab-llama-bpe.gguf`, and
//! for Llama-3, Qwen and SentencePiece (Llama-2) the converted vocabularies pass llama.cpp's tokenizer test vectors.

mod common;

use common::{shared, tmp};
use serde_json::json;
use std::path::{Path, PathBuf};
use ternlm_convert::vocab::{vocab_keys, SpModel};
use ternlm_convert::PreChoice;
use ternlm_gguf::{GgufFile, GgufWriter, Value};
use ternlm_tokenizer::Tokenizer;

fn vectors() -> PathBuf {
    shared().join("fixtures/tokenizer/llama-cpp-vectors")
}

/// Converts the tokenizer files in `dir` and writes them as a vocab-only GGUF.
fn vocab_gguf(dir: &Path, n_vocab: usize, out: &Path) -> GgufFile {
    let keys = vocab_keys(dir, &json!({}), n_vocab, &PreChoice::Detect).unwrap_or_else(|e| panic!("{e:#}"));
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    for (k, v) in keys {
        w.set(k, v);
    }
    w.write_to_file(out).unwrap();
    GgufFile::open(out).unwrap()
}

fn check_vectors(tok: &Tokenizer, vocab: &str) -> usize {
    let dir = vectors();
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.out"))).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), ids.len());
    for (text, want) in texts.iter().zip(&ids) {
        assert_eq!(&tok.encode(text, false, false), want, "{vocab}: {text:?}");
    }
    texts.len()
}

fn array_eq(a: &GgufFile, b: &GgufFile, key: &str) {
    let (x, y) = (a.get(key).unwrap_or_else(|| panic!("converted file lacks {key}")), b.get(key).unwrap());
    assert!(x == y, "{key} differs from llama.cpp's vocab file");
}

#[test]
fn llama3_tokenizer_json_equals_llama_cpp_vocab() {
    let out = tmp("tok-llama3").join("vocab.gguf");
    let f = vocab_gguf(&shared().join("fixtures/tokenizer/hf/llama3"), 128256, &out);
    let reference = GgufFile::open(vectors().join("ggml-vocab-llama-bpe.gguf")).unwrap();
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
    ] {
        array_eq(&f, &reference, key);
    }
    assert_eq!(f.get_u64("tokenizer.ggml.bos_token_id").unwrap(), Some(128000));
    assert_eq!(f.get_u64("tokenizer.ggml.eos_token_id").unwrap(), Some(128001));
    assert!(f.get_str("tokenizer.chat_template").unwrap().is_some());
    let n = check_vectors(&Tokenizer::from_gguf(&f, None).unwrap(), "llama-bpe");
    assert!(n > 20);
}

#[test]
fn qwen3_tokenizer_json_passes_qwen2_vectors() {
    let out = tmp("tok-qwen3").join("vocab.gguf");
    // Qwen3-0.6B's config.json vocab_size: the tokenizer's 151669 tokens are padded with [PAD] entries.
    let f = vocab_gguf(&shared().join("fixtures/tokenizer/hf/qwen3"), 151936, &out);
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), Some("qwen2"));
    let reference = GgufFile::open(vectors().join("ggml-vocab-qwen2.gguf")).unwrap();
    array_eq(&f, &reference, "tokenizer.ggml.merges");
    // The shared base vocabulary (ids below 151643) is identical to llama.cpp's Qwen2 file.
    let (a, b) = (
        f.get_array("tokenizer.ggml.tokens").unwrap().unwrap().as_strings().unwrap(),
        reference.get_array("tokenizer.ggml.tokens").unwrap().unwrap().as_strings().unwrap(),
    );
    assert_eq!(a[..151643], b[..151643]);
    assert_eq!(a[151936 - 1], "[PAD151935]");
    let tok = Tokenizer::from_gguf(&f, None).unwrap();
    assert_eq!(tok.token_type(151644), Tokenizer::from_gguf(&reference, None).unwrap().token_type(151644));
    assert_eq!(f.get_bool("tokenizer.ggml.add_bos_token").unwrap(), Some(false));
    assert_eq!(
        f.get_u64("tokenizer.ggml.eos_token_id").unwrap(),
        Some(151645),
        "<|im_end|> from tokenizer_config.json"
    );
    check_vectors(&tok, "qwen2");
}

#[test]
fn sentencepiece_model_passes_llama_spm_vectors() {
    // A tokenizer.model holding llama.cpp's Llama-2 vocabulary (pieces, scores, types), as 1bitLLM ships it.
    let reference = GgufFile::open(vectors().join("ggml-vocab-llama-spm.gguf")).unwrap();
    let tokens = reference.get_array("tokenizer.ggml.tokens").unwrap().unwrap().as_strings().unwrap().to_vec();
    let scores = reference.get_array("tokenizer.ggml.scores").unwrap().unwrap().to_f32_vec().unwrap();
    let types = reference.get_array("tokenizer.ggml.token_type").unwrap().unwrap().to_i64_vec().unwrap();
    let sp = SpModel {
        pieces: (0..tokens.len()).map(|i| (tokens[i].clone(), scores[i], types[i] as i32)).collect(),
        unk: 0,
        bos: 1,
        eos: 2,
        pad: -1,
        add_dummy_prefix: true,
    };
    assert_eq!(SpModel::parse(&sp.to_bytes()).unwrap(), sp, "protobuf round trip");
    let dir = tmp("tok-spm");
    std::fs::write(dir.join("tokenizer.model"), sp.to_bytes()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"add_bos_token": true, "add_eos_token": false, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}"#).unwrap();
    let f = vocab_gguf(&dir, 32000, &dir.join("vocab.gguf"));
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
    ] {
        let (x, y) = (f.get(key).unwrap_or_else(|| panic!("missing {key}")), reference.get(key).unwrap());
        assert!(x.as_i64().zip(y.as_i64()).map_or(x == y, |(a, b)| a == b), "{key} differs");
    }
    check_vectors(&Tokenizer::from_gguf(&f, None).unwrap(), "llama-spm");
}

#[test]
fn unknown_pre_tokenizer_is_a_clear_error() {
    let dir = tmp("tok-unknown-pre");
    let mut t: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("fixtures/tokenizer/hf/llama3/tokenizer.json")).unwrap(),
    )
    .unwrap();
    t["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!("\\p{L}+|\\s+");
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&t).unwrap()).unwrap();
    let e = vocab_keys(&dir, &json!({}), 128256, &PreChoice::Detect).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("--pre"), "{e}");
    // Naming it (or omitting it, as the official 2B4T file does) works.
    let keys = vocab_keys(&dir, &json!({}), 128256, &PreChoice::Named("llama-bpe".into())).unwrap();
    assert!(keys.iter().any(|(k, v)| k == "tokenizer.ggml.pre" && *v == Value::String("llama-bpe".into())));
    let keys = vocab_keys(&dir, &json!({}), 128256, &PreChoice::Omit).unwrap();
    assert!(!keys.iter().any(|(k, _)| k == "tokenizer.ggml.pre"));
}
