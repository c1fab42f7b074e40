//! Our Q6_K quantizer against llama.cpp's: the ternary fixture F1 (`../shared/fixtures/models/tiny-b158-i2s.gguf`)
//! stores its token embedding as llama.cpp's Q6_K of N(0, 0.05²) drawn by numpy's `default_rng(101)` (the fixture
//! README's recipe). `data/f1-token-embd-rows.f32` holds twelve of those source rows in f32 (rows 0–7 and four rows
//! where a fused versus unfused multiply-add decides a sub-block scale), drawn again with numpy; their Q6_K bytes
//! must equal the fixture's, byte for byte.

use std::path::PathBuf;
use ternlm_gguf::GgufFile;

const ROWS: [usize; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 5222, 37195, 62745, 113021];

#[test]
fn q6_k_equals_llama_cpp_bytes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shared = std::env::var_os("TERNLM_SHARED").map(PathBuf::from).unwrap_or_else(|| root.join("../shared"));
    let path = shared.join("fixtures/models/tiny-b158-i2s.gguf");
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = file.tensors().iter().find(|t| t.name == "token_embd.weight").expect("token_embd.weight").clone();
    assert_eq!(t.ty, ternlm_gguf::GgmlType::Q6_K);
    let want = file.tensor_data(&t);
    let raw =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/f1-token-embd-rows.f32")).unwrap();
    let src: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(src.len(), ROWS.len() * 256);
    for (i, &r) in ROWS.iter().enumerate() {
        let ours = ternlm_kernels::quant::quantize_q6_k(&src[256 * i..256 * (i + 1)]);
        let theirs = &want[210 * r..210 * (r + 1)];
        let diff: Vec<usize> = (0..210).filter(|&b| ours[b] != theirs[b]).collect();
        assert!(diff.is_empty(), "row {r}: bytes {diff:?} differ from llama.cpp's");
    }
}
