//! llama.cpp's own tokenizer test vectors (test-tokenizer-0): every case must give exactly the expected ids from
//! the vocab-only GGUF, and the Hugging Face tokenizer.json files must agree with the matching GGUF vocabularies.

use std::path::PathBuf;
use ternlm_gguf::GgufFile;
use ternlm_tokenizer::{HfTokenizer, Tokenizer};

fn shared() -> PathBuf {
    std::env::var_os("TERNLM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

fn vectors_dir() -> PathBuf {
    shared().join("fixtures/tokenizer/llama-cpp-vectors")
}

/// (input text, expected ids) pairs of one vocabulary's `.inp`/`.out` files.
fn cases(vocab: &str) -> Vec<(String, Vec<u32>)> {
    let dir = vectors_dir();
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.inp"))).expect("read .inp");
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.out"))).expect("read .out");
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> =
        out.lines().map(|l| l.split_whitespace().map(|t| t.parse().expect("id")).collect()).collect();
    assert_eq!(texts.len(), ids.len(), "{vocab}: case count");
    texts.into_iter().map(String::from).zip(ids).collect()
}

fn check_vocab(vocab: &str) {
    let f = GgufFile::open(vectors_dir().join(format!("ggml-vocab-{vocab}.gguf"))).expect("open vocab");
    let tok = Tokenizer::from_gguf(&f, None).expect("build tokenizer");
    let mut failures = Vec::new();
    for (text, want) in cases(vocab) {
        let got = tok.encode(&text, false, false);
        if got != want {
            failures.push(format!("  {text:?}\n    want {want:?}\n    got  {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{vocab}: {} case(s) differ from llama.cpp:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn llama_bpe() {
    check_vocab("llama-bpe");
}
#[test]
fn llama_spm() {
    check_vocab("llama-spm");
}
#[test]
fn qwen2() {
    check_vocab("qwen2");
}
#[test]
fn gpt_2() {
    check_vocab("gpt-2");
}
#[test]
fn falcon() {
    check_vocab("falcon");
}
#[test]
fn deepseek_llm() {
    check_vocab("deepseek-llm");
}
#[test]
fn starcoder() {
    check_vocab("starcoder");
}
#[test]
fn mpt() {
    check_vocab("mpt");
}

/// The HF tokenizer.json files give the same ids as the GGUF vocabularies (and so as llama.cpp) on every case.
fn check_hf(hf_dir: &str, vocab: &str) {
    let hf = HfTokenizer::from_file(shared().join("fixtures/tokenizer/hf").join(hf_dir).join("tokenizer.json"))
        .expect("load tokenizer.json");
    let f = GgufFile::open(vectors_dir().join(format!("ggml-vocab-{vocab}.gguf"))).unwrap();
    let tok = Tokenizer::from_gguf(&f, None).unwrap();
    for (text, want) in cases(vocab) {
        assert_eq!(hf.encode(&text, false).unwrap(), want, "{hf_dir} tokenizer.json on {text:?}");
        assert_eq!(tok.encode(&text, false, false), want);
    }
}

#[test]
fn hf_llama3_matches_gguf() {
    check_hf("llama3", "llama-bpe");
}

#[test]
fn hf_qwen3_matches_gguf() {
    check_hf("qwen3", "qwen2");
}

/// Round trip: decoding the ids gives back the text (byte-level BPE is lossless; SPM drops the leading space).
#[test]
fn decode_round_trips() {
    for vocab in ["llama-bpe", "qwen2", "gpt-2"] {
        let f = GgufFile::open(vectors_dir().join(format!("ggml-vocab-{vocab}.gguf"))).unwrap();
        let tok = Tokenizer::from_gguf(&f, None).unwrap();
        for (text, ids) in cases(vocab) {
            assert_eq!(tok.decode(&ids, false), text, "{vocab}");
        }
    }
}
