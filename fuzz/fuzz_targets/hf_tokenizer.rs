//! Hostile tokenizer inputs of a Hugging Face directory: a SentencePiece `tokenizer.model` (our protobuf reader)
//! and a `tokenizer.json` pre_tokenizer must give an error or a value, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ternlm_convert::vocab::{detect_pre, SpModel};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = SpModel::parse(data) {
        // Whatever parsed must survive its own serialization.
        assert_eq!(SpModel::parse(&m.to_bytes()).ok().map(|n| n.pieces.len()), Some(m.pieces.len()));
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = detect_pre(&v);
    }
});
