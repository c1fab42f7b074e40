//! BitDistill end to end on a tiny random `llama` model (hidden 128, 2 blocks, GQA 4/2, the Llama-2 SPM vocabulary
//! so real SST-2 text tokenizes): a distillation run whose loss falls and whose export `ternlm` runs; a
//! `ternlm-train` run killed with SIGKILL and restarted finishes with exactly the weights of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use ternlm_gguf::{GgmlType, GgufFile};
use ternlm_kernels::ThreadPool;
use ternlm_model::generator::{write_random_model, GenSpec};
use ternlm_model::{generate, GenerateOptions, Model};
use ternlm_tokenizer::Tokenizer;
use ternlm_train::data::{Example, Task};
use ternlm_train::stage::{evaluate, train, Data, StageConfig};
use ternlm_train::TrainModel;

fn shared() -> PathBuf {
    std::env::var_os("TERNLM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

fn work(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("train").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny full-precision teacher with a real SentencePiece vocabulary.
fn tiny_teacher(dir: &Path) -> PathBuf {
    let spec = GenSpec {
        arch: "llama".into(),
        n_embd: 128,
        n_layer: 2,
        n_ff: 256,
        n_head: 4,
        n_head_kv: 2,
        n_ctx: 256,
        rope_base: 10000.0,
        weight_type: GgmlType::F32,
        embd_type: GgmlType::F32,
        seed: 7,
    };
    let out = dir.join("teacher.gguf");
    write_random_model(&spec, &shared().join("fixtures/tokenizer/llama-cpp-vectors/ggml-vocab-llama-spm.gguf"), &out)
        .unwrap();
    out
}

fn config(out: PathBuf, steps: usize) -> StageConfig {
    StageConfig {
        steps,
        batch: 4,
        max_len: 32,
        lr: 3e-3,
        warmup: 0.1,
        weight_decay: 0.0,
        seed: 3,
        ckpt_every: 1000,
        log_every: 10,
        out,
        lambda: 10.0,
        gamma: 100.0,
        tau: 5.0,
        rel_layer: -1,
        rel_heads: 8,
    }
}

#[test]
fn tiny_distillation_learns_and_exports() {
    let dir = work("e2e");
    let teacher_path = tiny_teacher(&dir);
    let f = Arc::new(GgufFile::open(&teacher_path).unwrap());
    let tok = Tokenizer::from_gguf(&f, None).unwrap();
    let teacher = TrainModel::from_gguf(f.clone(), false).unwrap();
    let student = TrainModel::from_gguf(f, true).unwrap();
    assert_eq!(
        student.add_sub_norms(ternlm_train::model::SubLn::Paper).unwrap(),
        4,
        "Stage 1 inserts attn/ffn sub-norms in both blocks"
    );

    // A small task the student can fit: six reviews, label words " negative" / " positive".
    let texts = ["a gorgeous film", "dull and tired", "I loved it", "a waste of time", "warm and funny", "boring mess"];
    let label_tokens = ternlm_train::data::label_tokens(&tok, "Sentiment:", &[" negative", " positive"]).unwrap();
    let examples: Vec<Example> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Example {
            prompt: tok.encode(&format!("Review: {t}\nSentiment:"), true, false),
            label: (i + 1) % 2,
        })
        .collect();
    let task = Task { name: "tiny".into(), label_tokens, train: examples.clone(), test: examples };

    let cfg = config(dir.join("run"), 60);
    train(&student, Some(&teacher), Data::Task(&task), &cfg).unwrap();
    let log = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 60);
    for key in ["ce", "kd_logits", "kd_attention", "loss", "lr", "tokens_per_s"] {
        assert!(rows.iter().all(|r| r[key].as_f64().is_some_and(f64::is_finite)), "every step logs {key}");
    }
    let png = std::fs::read(dir.join("run/loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let series = ternlm_train::plot::read_metrics(&dir.join("run/metrics.jsonl")).unwrap();
    let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["loss", "ce", "kd_logits", "kd_attention"]);
    assert!(series.iter().all(|(_, v)| v.len() == 60));
    let mean =
        |r: &[serde_json::Value], k: &str| r.iter().map(|x| x[k].as_f64().unwrap()).sum::<f64>() / r.len() as f64;
    for k in ["loss", "ce", "kd_logits", "kd_attention"] {
        let (first, last) = (mean(&rows[..5], k), mean(&rows[55..], k));
        eprintln!("{k}: first 5 steps {first:.4}, last 5 {last:.4}");
        if k == "loss" || k == "ce" {
            assert!(last < 0.7 * first, "{k} should fall: {first} → {last}");
        }
    }
    let (acc, train_preds) = evaluate(&student, &task, 8, None).unwrap();
    eprintln!("training-set accuracy after distillation: {acc}");
    assert!(acc >= 5.0 / 6.0, "the student fits the six examples ({acc})");

    // Export: I2_S projections + sub-norms; ternlm's engine loads it, predicts the same labels, and generates.
    let out = dir.join("student.gguf");
    ternlm_train::export::export_gguf(&student, &out, GgmlType::F16).unwrap();
    let g = Arc::new(GgufFile::open(&out).unwrap());
    assert_eq!(g.tensor_info("blk.1.ffn_down.weight").unwrap().ty, GgmlType::I2_S);
    assert!(g.tensor_info("blk.1.attn_sub_norm.weight").is_some());
    let model = Model::from_gguf(g.clone()).unwrap();
    let tok = Tokenizer::from_gguf(&g, None).unwrap();
    let pool = ThreadPool::new(2);
    // Three prompts per forward pass: the engine's multi-sequence batches give what single prompts would.
    let r = ternlm_model::tasks::engine_accuracy(&model, &pool, &task, 3, None, |_, _| {}).unwrap();
    let (engine_acc, engine_preds) = (r.accuracy, r.predictions);
    let agree = engine_preds.iter().zip(&train_preds).filter(|(a, b)| a == b).count();
    eprintln!("engine accuracy {engine_acc}, predictions equal to the trainer's on {agree}/6");
    assert!(agree >= 5, "the inference engine reproduces the trained predictions ({agree}/6)");
    // Reloading the I2_S export for (ternary) training keeps the forward: the same predictions as the live student.
    let reloaded = TrainModel::from_gguf(g.clone(), true).unwrap();
    let (_, reloaded_preds) = evaluate(&reloaded, &task, 8, None).unwrap();
    assert_eq!(reloaded_preds, train_preds, "ternary reload of the export changes the forward");
    let ids = candle_core::Tensor::new(task.test[0].prompt.as_slice(), student.device()).unwrap().unsqueeze(0).unwrap();
    let flat =
        |m: &TrainModel| -> Vec<f32> { m.forward(&ids, None).unwrap().0.flatten_all().unwrap().to_vec1().unwrap() };
    let (a, b) = (flat(&student), flat(&reloaded));
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst <= 1e-2 * scale, "reloaded logits differ by {worst} (scale {scale})");
    let mut kv = model.new_kv_cache(64, 1);
    let opts = GenerateOptions { max_tokens: 4, ignore_eos: true, ..Default::default() };
    let mut text = String::new();
    generate(&model, &tok, &pool, &mut kv, 0, &task.test[0].prompt, &opts, &mut |t| {
        text.push_str(t);
        true
    })
    .unwrap();
    assert!(!text.is_empty());
}

#[test]
fn killed_run_resumes_to_the_same_weights() {
    let dir = work("resume");
    let teacher = tiny_teacher(&dir);
    let bin = env!("CARGO_BIN_EXE_ternlm-train");
    let data = shared().join("data");
    let run = |out: &Path| {
        let mut c = Command::new(bin);
        c.args(["finetune", "--ternary", "-m"]).arg(&teacher).arg("-o").arg(out).arg("--data").arg(&data);
        c.args([
            "--steps",
            "24",
            "--batch",
            "4",
            "--max-len",
            "48",
            "--lr",
            "1e-3",
            "--ckpt-every",
            "4",
            "--eval-limit",
            "0",
            "-t",
            "1",
        ]);
        c
    };
    let straight = dir.join("straight");
    assert!(run(&straight).status().unwrap().success());

    // Kill the second run once it has written a checkpoint, then start it again with the same command.
    let killed = dir.join("killed");
    let mut child = run(&killed).stderr(std::process::Stdio::null()).spawn().unwrap();
    let ckpt = killed.join("checkpoint.safetensors");
    let start = std::time::Instant::now();
    while !ckpt.exists() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was killed before finishing");
    assert!(ckpt.exists());
    let out = run(&killed).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"), "the restarted run resumes from the checkpoint");
    let (a, b) =
        (std::fs::read(straight.join("model.gguf")).unwrap(), std::fs::read(killed.join("model.gguf")).unwrap());
    assert!(a == b, "a resumed run ends with exactly the weights of an uninterrupted one");
}
