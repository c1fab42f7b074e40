//! The training model's ternary forward equals ternlm's inference engine running the exported I2_S GGUF: the
//! student trains with exactly the numbers it will be served with. Starts from the bitnet.cpp fixture
//! `tiny-b158-i2s.gguf` (bitnet-b1.58: sub-norms, relu², GQA 4:1, tied head).

use candle_core::{Device, Tensor};
use std::path::PathBuf;
use std::sync::Arc;
use ternlm_gguf::{GgmlType, GgufFile};
use ternlm_kernels::ThreadPool;
use ternlm_model::{BatchToken, Model};
use ternlm_train::export::export_gguf;
use ternlm_train::TrainModel;

fn shared() -> PathBuf {
    std::env::var_os("TERNLM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

#[test]
fn ternary_training_forward_equals_i2s_inference() {
    let f = Arc::new(GgufFile::open(shared().join("fixtures/models/tiny-b158-i2s.gguf")).unwrap());
    let mut m = TrainModel::from_gguf(f, true).unwrap();
    assert_eq!(m.add_sub_norms().unwrap(), 0, "the fixture already has its sub-norms");
    m.f16_qkv = true; // the engine's KV cache is f16
    let tokens: Vec<u32> = vec![128000, 791, 6864, 315, 9822, 374, 12366, 13];
    let (logits, _) =
        m.forward(&Tensor::new(tokens.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None).unwrap();
    let train: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();

    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("student-fixture.gguf");
    export_gguf(&m, &out, GgmlType::F32).unwrap();
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.tensor_info("blk.0.attn_q.weight").unwrap().ty, GgmlType::I2_S);
    let model = Model::from_gguf(Arc::new(g)).unwrap();
    let mut kv = model.new_kv_cache(32, 1);
    let batch: Vec<BatchToken> =
        tokens.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: true }).collect();
    let engine = model.forward(&batch, &mut kv, &ThreadPool::new(2)).unwrap();

    let nv = model.cfg.n_vocab;
    let scale = engine.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diffs: Vec<f32> = (0..tokens.len())
        .map(|p| {
            let (a, b) = (&train[p * nv..(p + 1) * nv], &engine[p * nv..(p + 1) * nv]);
            a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
        })
        .collect();
    eprintln!("max |Δlogit| per position {diffs:?} (max |logit| {scale})");
    // Same tolerance policy as the converter's family tests: int8 requantization lets an f32 rounding difference
    // move one activation by a step, rarely, and everything after it.
    assert!(diffs[0] <= 1e-4 * scale, "position 0 differs by {}", diffs[0]);
    let mut sorted = diffs.clone();
    sorted.sort_by(f32::total_cmp);
    assert!(sorted[sorted.len() / 2] <= 1e-4 * scale, "median position differs by {}", sorted[sorted.len() / 2]);
    assert!(sorted[sorted.len() - 1] <= 2e-2 * scale);
}
