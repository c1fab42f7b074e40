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
    assert_eq!(m.add_sub_norms(ternlm_train::model::SubLn::Paper).unwrap(), 0, "the fixture already has its sub-norms");
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
    assert_mostly_exact(&diffs, scale, "fixture");
}

/// The tolerance policy for ternary logits compared across implementations: int8 requantization lets an f32
/// rounding difference (the summation order differs between candle's matmul, whose kernel depends on the CPU, and
/// ours) move one activation by a step, rarely, at any position, and through the KV cache every later position.
/// So: some positions exact, none far off. A wrong layout, scale or missing tensor is off at every position, by
/// far more than a flip moves a logit (seen: up to 1.8% of the largest logit).
fn assert_mostly_exact(diffs: &[f32], scale: f32, what: &str) {
    eprintln!("{what}: max |Δlogit| per position {diffs:?} (max |logit| {scale})");
    let exact = diffs.iter().filter(|&&d| d <= 1e-4 * scale).count();
    assert!(exact >= 2, "{what}: only {exact} of {} positions agree", diffs.len());
    assert!(diffs.iter().all(|&d| d <= 5e-2 * scale), "{what}: {diffs:?}");
}

/// The same on a model whose width (192) is not a multiple of 128, like SmolLM2's 576: the exported I2_S rows
/// are not whole blocks and the engine repacks them at load.
#[test]
fn ragged_width_student_exports_and_matches() {
    use ternlm_model::generator::{write_random_model, GenSpec};
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ragged");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = GenSpec {
        arch: "bitnet-b1.58".into(),
        n_embd: 192,
        n_layer: 2,
        n_ff: 320,
        n_head: 4,
        n_head_kv: 2,
        n_ctx: 64,
        rope_base: 10000.0,
        weight_type: GgmlType::F32,
        embd_type: GgmlType::F32,
        seed: 11,
    };
    let src = dir.join("fp.gguf");
    write_random_model(&spec, &shared().join("fixtures/tokenizer/llama-cpp-vectors/ggml-vocab-llama-spm.gguf"), &src)
        .unwrap();
    let mut m = TrainModel::from_gguf(Arc::new(GgufFile::open(&src).unwrap()), true).unwrap();
    m.f16_qkv = true;
    assert_engine_matches(&m, &dir.join("student.gguf"), "ragged");
}

/// Exports the (ternary) training model to `out` as I2_S and checks the engine's logits against the training
/// forward on a short SPM-vocabulary prompt (see `assert_mostly_exact` for the tolerance).
fn assert_engine_matches(m: &TrainModel, out: &std::path::Path, what: &str) {
    let tokens: Vec<u32> = vec![1, 450, 7483, 310, 3444, 338, 3681, 29889];
    let (logits, _) =
        m.forward(&Tensor::new(tokens.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None).unwrap();
    let train: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    export_gguf(m, out, GgmlType::F32).unwrap();
    let model = Model::from_gguf(Arc::new(GgufFile::open(out).unwrap())).unwrap();
    let mut kv = model.new_kv_cache(32, 1);
    let batch: Vec<BatchToken> =
        tokens.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: true }).collect();
    let engine = model.forward(&batch, &mut kv, &ThreadPool::new(2)).unwrap();
    let nv = model.cfg.n_vocab;
    let scale = engine.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diffs: Vec<f32> = (0..tokens.len())
        .map(|p| {
            train[p * nv..(p + 1) * nv]
                .iter()
                .zip(&engine[p * nv..(p + 1) * nv])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        })
        .collect();
    assert_mostly_exact(&diffs, scale, what);
}

/// BitDistill's "allnorm" Stage 1 (an RMSNorm before every projection): the norms (given non-trivial weights, as
/// training would) export as `<proj>_in_norm` and the engine applies them. (`bitnet-b1.58` so attention is the
/// plain f32 kind on both sides and only the norms are under test.)
#[test]
fn allnorm_student_exports_and_matches() {
    use ternlm_model::generator::{write_random_model, GenSpec};
    use ternlm_train::model::SubLn;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("allnorm");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = GenSpec {
        arch: "bitnet-b1.58".into(),
        n_embd: 128,
        n_layer: 2,
        n_ff: 256,
        n_head: 4,
        n_head_kv: 2,
        n_ctx: 64,
        rope_base: 10000.0,
        weight_type: GgmlType::F32,
        embd_type: GgmlType::F32,
        seed: 17,
    };
    let src = dir.join("fp.gguf");
    write_random_model(&spec, &shared().join("fixtures/tokenizer/llama-cpp-vectors/ggml-vocab-llama-spm.gguf"), &src)
        .unwrap();
    let student = || {
        let mut m = TrainModel::from_gguf(Arc::new(GgufFile::open(&src).unwrap()), true).unwrap();
        m.f16_qkv = true;
        assert_eq!(m.add_sub_norms(SubLn::AllNorm).unwrap(), 2 * 5, "five input norms per block");
        // In name order: the var map is a HashMap, and weights that changed from run to run made the test flaky.
        let vars = m.vars.data().lock().unwrap().clone();
        let mut names: Vec<&String> =
            vars.keys().filter(|n| n.contains("_in_norm") || n.contains("sub_norm")).collect();
        names.sort();
        for (i, name) in names.into_iter().enumerate() {
            let n = vars[name].elem_count();
            let w: Vec<f32> = (0..n).map(|j| 1.0 + 0.5 * (((j * 7 + i * 13) % 11) as f32 / 10.0 - 0.5)).collect();
            vars[name].set(&Tensor::from_vec(w, n, &Device::Cpu).unwrap()).unwrap();
        }
        m
    };
    let out = dir.join("student.gguf");
    assert_engine_matches(&student(), &out, "allnorm");
    let g = GgufFile::open(&out).unwrap();
    assert!(g.tensor_info("blk.1.ffn_up_in_norm.weight").is_some());
    // The same model built again (a new var map, so another hash order) exports to the same bytes.
    let again = dir.join("student-again.gguf");
    export_gguf(&student(), &again, GgmlType::F32).unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(), "export is not reproducible");
}

/// Task accuracy is the same number on both sides: the trainer's greedy evaluation (`ternlm-train eval`) and the
/// engine's (`ternlm accuracy`) predict the same first tokens on SST-2 rows for the I2_S fixture loaded directly
/// (ternary weights reloaded for training keep their stored scale).
#[test]
fn trainer_and_engine_task_predictions_agree() {
    let f = Arc::new(GgufFile::open(shared().join("fixtures/models/tiny-b158-i2s.gguf")).unwrap());
    let tok = ternlm_tokenizer::Tokenizer::from_gguf(&f, None).unwrap();
    let task = ternlm_model::tasks::Task::load("sst2", &shared().join("data"), &tok).unwrap();
    assert_eq!(task.test.len(), 872);
    let mut m = TrainModel::from_gguf(f.clone(), true).unwrap();
    m.f16_qkv = true;
    let n = 48;
    let (train_acc, train_preds) = ternlm_train::stage::evaluate(&m, &task, 16, Some(n)).unwrap();
    let model = Model::from_gguf(f).unwrap();
    let r = ternlm_model::tasks::engine_accuracy(&model, &ThreadPool::new(2), &task, 8, Some(n), |_, _| {}).unwrap();
    let (engine_acc, engine_preds) = (r.accuracy, r.predictions);
    let agree = train_preds.iter().zip(&engine_preds).filter(|(a, b)| a == b).count();
    eprintln!("trainer {train_acc:.4} / engine {engine_acc:.4}; same prediction on {agree}/{n} rows");
    let mut sorted = r.margins.clone();
    sorted.sort_by(f32::total_cmp);
    for i in (0..n).filter(|&i| train_preds[i] != engine_preds[i]) {
        eprintln!("row {i}: engine margin {} (median margin {})", r.margins[i], sorted[n / 2]);
        assert!(r.margins[i] < 0.25 * sorted[n / 2], "row {i} differs without a near-tie");
    }
    // A random tiny model's top logits can sit within an int8-rounding flip of each other; allow one such row.
    assert!(agree >= n - 1, "trainer and engine disagree on {} of {n} rows", n - agree);
}

/// A random `llama` file re-labelled as `arch`, with what that family adds: Qwen2's q/k/v biases, Qwen3's per-head
/// QK RMSNorms. Weights stay f32.
fn qwen_variant(src: &std::path::Path, arch: &str, out: &std::path::Path) {
    let f = GgufFile::open(src).unwrap();
    let mut w = ternlm_gguf::GgufWriter::new();
    for (k, v) in f.metadata() {
        let key = match k.strip_prefix("llama.") {
            Some(rest) => format!("{arch}.{rest}"),
            None => k.clone(),
        };
        w.set(key, if k == "general.architecture" { ternlm_gguf::Value::String(arch.into()) } else { v.clone() });
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    use rand::{Rng, SeedableRng};
    let mut vec_bytes = |n: usize, center: f32, spread: f32| -> Vec<u8> {
        (0..n).flat_map(|_| (center + rng.gen_range(-spread..spread)).to_le_bytes()).collect()
    };
    let hd = 32u64;
    let mut extra: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
    for info in f.tensors() {
        let rows = info.dims.get(1).copied().unwrap_or(1);
        for (proj, bias) in
            [("attn_q.weight", "attn_q.bias"), ("attn_k.weight", "attn_k.bias"), ("attn_v.weight", "attn_v.bias")]
        {
            if arch == "qwen2" && info.name.ends_with(proj) {
                extra.push((info.name.replace(proj, bias), vec![rows], vec_bytes(rows as usize, 0.0, 0.5)));
            }
        }
        if arch == "qwen3" && info.name.ends_with("attn_q.weight") {
            for n in ["attn_q_norm.weight", "attn_k_norm.weight"] {
                extra.push((info.name.replace("attn_q.weight", n), vec![hd], vec_bytes(hd as usize, 1.0, 0.3)));
            }
        }
    }
    for info in f.tensors() {
        w.add_tensor(info.name.clone(), info.ty, &info.dims, f.tensor_data(info)).unwrap();
    }
    for (name, dims, bytes) in extra {
        w.add_tensor(name, GgmlType::F32, &dims, bytes).unwrap();
    }
    w.write_to_file(out).unwrap();
}

/// The training decoder's Qwen2 (biases) and Qwen3 (QK-norm) paths, full precision, equal the engine's forward.
#[test]
fn qwen2_and_qwen3_training_forward_equals_engine() {
    use ternlm_model::generator::{write_random_model, GenSpec};
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qwen-train");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = GenSpec {
        arch: "llama".into(),
        n_embd: 128,
        n_layer: 2,
        n_ff: 256,
        n_head: 4,
        n_head_kv: 2,
        n_ctx: 64,
        rope_base: 1e6,
        weight_type: GgmlType::F32,
        embd_type: GgmlType::F32,
        seed: 13,
    };
    let src = dir.join("llama.gguf");
    write_random_model(&spec, &shared().join("fixtures/tokenizer/llama-cpp-vectors/ggml-vocab-qwen2.gguf"), &src)
        .unwrap();
    let tokens: Vec<u32> = vec![785, 6722, 315, 9625, 374, 12095, 13, 576, 3974];
    for arch in ["qwen2", "qwen3"] {
        let path = dir.join(format!("{arch}.gguf"));
        qwen_variant(&src, arch, &path);
        let f = Arc::new(GgufFile::open(&path).unwrap());
        let mut m = TrainModel::from_gguf(f.clone(), false).unwrap();
        m.f16_qkv = true;
        let ids = Tensor::new(tokens.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let train: Vec<f32> = m.forward(&ids, None).unwrap().0.flatten_all().unwrap().to_vec1().unwrap();
        let model = Model::from_gguf(f).unwrap();
        let mut kv = model.new_kv_cache(32, 1);
        let batch: Vec<BatchToken> =
            tokens.iter().enumerate().map(|(i, &t)| BatchToken { token: t, pos: i, seq: 0, logits: true }).collect();
        let engine = model.forward(&batch, &mut kv, &ThreadPool::new(2)).unwrap();
        let scale = engine.iter().fold(1f32, |m, v| m.max(v.abs()));
        let worst = train.iter().zip(&engine).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{arch}: max |Δlogit| {worst} (max |logit| {scale})");
        assert!(worst <= 1e-3 * scale, "{arch}: training forward differs from the engine by {worst}");
    }
}
