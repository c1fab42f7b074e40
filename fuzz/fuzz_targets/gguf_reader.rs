//! Arbitrary bytes through the GGUF reader, every metadata accessor, tensor data access, and the tokenizer
//! builder: any input must give Ok or a clean error, never a panic or an out-of-bounds read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ternlm_gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else { return };
    for (k, v) in f.metadata() {
        let _ = v.summary();
        let _ = (f.get_u64(k), f.get_f64(k), f.get_str(k), f.get_bool(k), f.get_array(k));
    }
    for t in f.tensors() {
        let d = f.tensor_data(t);
        assert_eq!(d.len() as u64, t.size);
        let _ = (t.n_rows(), t.row_len());
    }
    let _ = ternlm_tokenizer::Tokenizer::from_gguf(&f, None).map(|t| t.encode("Hello world 123", true, true));
});
