//! One training run (a BitDistill stage): fine-tuning on a task (CE, optionally + logits KL + attention-relation
//! distillation from a frozen teacher) or continued pre-training on text (CE). Deterministic for a seed (the data
//! order is a seeded permutation per epoch, so it is a function of the step), resumable (the checkpoint holds the
//! weights, AdamW's moments and the step, written atomically), with a JSONL log of every loss term.

use crate::data::{make_batch, Batch, Task};
use crate::loss::{attention_relation, cross_entropy, logits_kl};
use crate::model::TrainModel;
use crate::optim::{lr_at, save_atomic, AdamW, AdamWConfig};
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct StageConfig {
    pub steps: usize,
    pub batch: usize,
    pub max_len: usize,
    pub lr: f64,
    pub warmup: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub ckpt_every: usize,
    pub log_every: usize,
    pub out: PathBuf,
    /// Distillation weights (used when a teacher is given).
    pub lambda: f64,
    pub gamma: f64,
    pub tau: f64,
    /// Layer for attention-relation distillation (negative: from the end) and relation heads.
    pub rel_layer: i64,
    pub rel_heads: usize,
}

/// What a training example is to the loop: a token sequence and where supervision starts.
pub enum Data<'a> {
    Task(&'a Task),
    Text(&'a [Vec<u32>]),
}

impl Data<'_> {
    fn len(&self) -> usize {
        match self {
            Data::Task(t) => t.train.len(),
            Data::Text(c) => c.len(),
        }
    }
    fn item(&self, i: usize) -> (Vec<u32>, usize) {
        match self {
            Data::Task(t) => {
                let e = &t.train[i];
                let mut s = e.prompt.clone();
                s.extend(&t.label_tokens[e.label]);
                (s, e.prompt.len())
            }
            Data::Text(c) => (c[i].clone(), 1),
        }
    }
}

/// splitmix64 permutation of 0..n for (seed, epoch).
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    p
}

fn batch_at(data: &Data, step: usize, cfg: &StageConfig, dev: &candle_core::Device) -> Result<Batch> {
    let n = data.len();
    let items: Vec<(Vec<u32>, usize)> = (0..cfg.batch)
        .map(|j| {
            let k = step * cfg.batch + j;
            let perm = permutation(n, cfg.seed, (k / n) as u64);
            data.item(perm[k % n])
        })
        .collect();
    make_batch(&items, cfg.max_len, dev)
}

pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// Runs (or resumes) a stage; returns the final step's losses.
pub fn train(
    student: &TrainModel,
    teacher: Option<&TrainModel>,
    data: Data,
    cfg: &StageConfig,
) -> Result<HashMap<String, f64>> {
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("{}: cannot create", cfg.out.display()))?;
    let mut named: Vec<(String, candle_core::Var)> =
        student.vars.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = AdamW::new(named, AdamWConfig { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() })?;
    let ckpt = cfg.out.join(CHECKPOINT);
    if ckpt.exists() {
        let st = candle_core::safetensors::load(&ckpt, student.device())?;
        for (name, var) in student.vars.data().lock().unwrap().iter() {
            var.set(st.get(&format!("param.{name}")).with_context(|| format!("{}: lacks {name}", ckpt.display()))?)?;
        }
        opt.load_state(&st)?;
        eprintln!("resuming {} at step {}", ckpt.display(), opt.step);
    }
    let rel_layer = if cfg.rel_layer < 0 {
        (student.cfg.n_layer as i64 + cfg.rel_layer).max(0) as usize
    } else {
        cfg.rel_layer as usize
    };
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(cfg.out.join("metrics.jsonl"))?;
    let warmup = ((cfg.steps as f64) * cfg.warmup).round() as usize;
    let mut last = HashMap::new();
    let start = Instant::now();
    let mut tokens_done = 0usize;
    while opt.step < cfg.steps {
        let step = opt.step;
        let b = batch_at(&data, step, cfg, student.device())?;
        let capture = teacher.map(|_| rel_layer);
        let (logits, s_cap) = student.forward(&b.tokens, capture.filter(|_| cfg.gamma > 0.0))?;
        let v = logits.dim(2)?;
        let flat = logits.reshape(((), v))?;
        let ce = cross_entropy(&flat, &b.targets, &b.loss_mask)?;
        let mut loss = ce.clone();
        let mut terms: Vec<(&str, f64)> = vec![("ce", ce.to_scalar::<f32>()? as f64)];
        if let Some(t) = teacher {
            let (t_logits, t_cap) = t.forward(&b.tokens, capture.filter(|_| cfg.gamma > 0.0))?;
            if cfg.lambda > 0.0 {
                let kl = logits_kl(&t_logits.reshape(((), v))?, &flat, cfg.tau, &b.loss_mask)?;
                terms.push(("kd_logits", kl.to_scalar::<f32>()? as f64));
                loss = (loss + (kl * cfg.lambda)?)?;
            }
            if let (Some(sc), Some(tc)) = (s_cap, t_cap) {
                let mut ad = Tensor::zeros((), candle_core::DType::F32, student.device())?;
                for (tt, ss) in [(&tc.q, &sc.q), (&tc.k, &sc.k), (&tc.v, &sc.v)] {
                    ad = (ad + attention_relation(tt, ss, cfg.rel_heads, &b.key_mask)?)?;
                }
                terms.push(("kd_attention", ad.to_scalar::<f32>()? as f64));
                loss = (loss + (ad * cfg.gamma)?)?;
            }
        }
        let total = loss.to_scalar::<f32>()? as f64;
        if !total.is_finite() {
            anyhow::bail!("step {step}: loss is {total} (terms {terms:?})");
        }
        let lr = lr_at(step, cfg.steps, warmup, cfg.lr);
        opt.step(&loss, lr)?;
        tokens_done += b.n_tokens;
        let tps = tokens_done as f64 / start.elapsed().as_secs_f64();
        let mut rec = format!("{{\"step\":{},\"loss\":{total:.6},\"lr\":{lr:.3e},\"tokens_per_s\":{tps:.1}", step + 1);
        for (k, v) in &terms {
            rec.push_str(&format!(",\"{k}\":{v:.6}"));
        }
        rec.push('}');
        writeln!(log, "{rec}")?;
        last = terms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        last.insert("loss".into(), total);
        if (step + 1) % cfg.log_every.max(1) == 0 || step + 1 == cfg.steps {
            let t: Vec<String> = terms.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            eprintln!(
                "step {:>6}/{} loss {total:.4} ({}) lr {lr:.2e} {tps:.0} tok/s",
                step + 1,
                cfg.steps,
                t.join(", ")
            );
        }
        if (step + 1) % cfg.ckpt_every.max(1) == 0 || step + 1 == cfg.steps {
            save_checkpoint(student, &opt, &ckpt)?;
            log.flush()?;
            crate::plot::plot_metrics(&cfg.out.join("metrics.jsonl"), &cfg.out.join("loss.png"))?;
        }
    }
    Ok(last)
}

fn save_checkpoint(m: &TrainModel, opt: &AdamW, path: &Path) -> Result<()> {
    let mut st = opt.state()?;
    for (name, var) in m.vars.data().lock().unwrap().iter() {
        st.insert(format!("param.{name}"), var.as_tensor().clone());
    }
    save_atomic(&st, path)
}

/// Greedy accuracy on the test set: the argmax over the whole vocabulary after the prompt must be the first token
/// of the right label word. Returns (accuracy, predicted first tokens).
pub fn evaluate(m: &TrainModel, task: &Task, batch: usize, limit: Option<usize>) -> Result<(f64, Vec<u32>)> {
    let test = &task.test[..limit.unwrap_or(task.test.len()).min(task.test.len())];
    let mut preds = Vec::with_capacity(test.len());
    let mut correct = 0;
    for chunk in test.chunks(batch.max(1)) {
        let items: Vec<(Vec<u32>, usize)> =
            chunk.iter().map(|e| (e.prompt.iter().copied().chain([0]).collect(), 0)).collect();
        let b = make_batch(&items, usize::MAX / 2, m.device())?;
        let (logits, _) = m.forward(&b.tokens, None)?;
        for (i, e) in chunk.iter().enumerate() {
            let row = logits.get(i)?.get(e.prompt.len() - 1)?;
            let p = row.argmax(0)?.to_scalar::<u32>()?;
            preds.push(p);
            if p == task.label_tokens[e.label][0] {
                correct += 1;
            }
        }
    }
    Ok((correct as f64 / test.len().max(1) as f64, preds))
}
