//! `ternlm-train`: BitDistill's stages on the CPU.
//!
//! - `finetune`: plain fine-tuning on a task (full precision → the FP teacher; `--ternary` → the BitNet-SFT baseline);
//! - `cpt`: Stage 2, continued pre-training of the (SubLN, ternary) student on plain text;
//! - `distill`: Stage 3, CE + λ·KL_τ + γ·attention relations from a frozen teacher;
//! - `eval`: greedy task accuracy of a GGUF (training-side forward).
//!
//! Every stage reads a GGUF, writes `OUT/checkpoint.safetensors` (resumable), `OUT/metrics.jsonl`,
//! `OUT/config.txt` (the exact command line) and `OUT/model.gguf`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use ternlm_gguf::{GgmlType, GgufFile};
use ternlm_tokenizer::Tokenizer;
use ternlm_train::data::{text_chunks, Task};
use ternlm_train::export::export_gguf;
use ternlm_train::model::SubLn;
use ternlm_train::stage::{evaluate, train, Data, StageConfig};
use ternlm_train::TrainModel;

#[derive(Parser)]
#[command(
    name = "ternlm-train",
    version,
    about = "BitDistill: distill full-precision models into ternary students (CPU)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune on a task with cross-entropy (FP teacher, or --ternary for the BitNet-SFT baseline).
    Finetune(Common),
    /// Stage 2: continued pre-training on a text file (the student is ternary, with SubLN unless --no-subln).
    Cpt {
        #[command(flatten)]
        c: Common,
        /// Plain-text corpus.
        #[arg(long)]
        text: PathBuf,
    },
    /// Stage 3: distillation fine-tuning from a frozen teacher GGUF.
    Distill {
        #[command(flatten)]
        c: Common,
        /// The fine-tuned full-precision teacher.
        #[arg(long)]
        teacher: PathBuf,
        #[arg(long, default_value_t = 10.0)]
        lambda: f64,
        #[arg(long, default_value_t = 1e5)]
        gamma: f64,
        #[arg(long, default_value_t = 5.0)]
        tau: f64,
        /// Layer for attention relations (negative counts from the end).
        #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
        rel_layer: i64,
        #[arg(long, default_value_t = 32)]
        rel_heads: usize,
    },
    /// Greedy accuracy of a model on a task's test set.
    Eval {
        #[arg(short, long)]
        model: PathBuf,
        #[arg(long, default_value = "sst2")]
        task: String,
        #[arg(long, default_value = "../shared/data")]
        data: PathBuf,
        /// Treat the model's projections as ternary (BitNet forward).
        #[arg(long)]
        ternary: bool,
        #[arg(long)]
        limit: Option<usize>,
        /// Write each row's predicted first token id, one per line.
        #[arg(long)]
        predictions: Option<PathBuf>,
        #[arg(short = 't', long, default_value_t = 2)]
        threads: usize,
    },
}

#[derive(Args)]
struct Common {
    /// Model to train (GGUF; any type, dequantized).
    #[arg(short, long)]
    model: PathBuf,
    #[arg(short, long)]
    out: PathBuf,
    #[arg(long, default_value = "sst2")]
    task: String,
    #[arg(long, default_value = "../shared/data")]
    data: PathBuf,
    /// Ternary (BitNet) projections with the straight-through estimator.
    #[arg(long)]
    ternary: bool,
    /// Do not insert SubLN norms (ternary runs insert them by default, as Stage 1).
    #[arg(long)]
    no_subln: bool,
    /// Stage 1 placement: `paper` (before attn_output and ffn_down) or `allnorm` (before every projection).
    #[arg(long, value_enum, default_value = "paper")]
    subln: SubLn,
    /// Start from the latent (full-precision) weights of an earlier stage's `checkpoint.safetensors` (or its
    /// directory) instead of the GGUF's values: chaining Stage 2 → Stage 3 through the exported I2_S file would
    /// re-ternarize already ternary weights (a different scale) and lose the latent precision.
    #[arg(long)]
    init: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    #[arg(long, default_value_t = 0.05)]
    warmup: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 50)]
    ckpt_every: usize,
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Evaluate on this many test rows at the end (0: none; default all).
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Threads for candle's matrix products.
    #[arg(short = 't', long, default_value_t = 2)]
    threads: usize,
}

fn stage_config(c: &Common) -> StageConfig {
    StageConfig {
        steps: c.steps,
        batch: c.batch,
        max_len: c.max_len,
        lr: c.lr,
        warmup: c.warmup,
        weight_decay: c.weight_decay,
        seed: c.seed,
        ckpt_every: c.ckpt_every,
        log_every: c.log_every,
        out: c.out.clone(),
        lambda: 0.0,
        gamma: 0.0,
        tau: 5.0,
        rel_layer: -1,
        rel_heads: 32,
    }
}

fn load_student(c: &Common, ternary: bool) -> Result<(TrainModel, Tokenizer)> {
    let (m, tok) = load(&c.model, ternary, (!c.no_subln).then_some(c.subln))?;
    if let Some(init) = &c.init {
        init_from(&m, init)?;
    }
    Ok((m, tok))
}

fn load(path: &PathBuf, ternary: bool, subln: Option<SubLn>) -> Result<(TrainModel, Tokenizer)> {
    let f = Arc::new(GgufFile::open(path)?);
    let tok = Tokenizer::from_gguf(&f, None)?;
    let m = TrainModel::from_gguf(f, ternary)?;
    if let (true, Some(placement)) = (ternary, subln) {
        let n = m.add_sub_norms(placement)?;
        if n > 0 {
            let at = if placement == SubLn::Paper { "attn_output and ffn_down" } else { "every projection" };
            eprintln!("Stage 1 (SubLN): inserted {n} RMSNorms before {at}");
        }
    }
    Ok((m, tok))
}

/// Replaces every parameter with the same-named `param.*` tensor of a stage checkpoint.
fn init_from(m: &TrainModel, path: &std::path::Path) -> Result<()> {
    let path = if path.is_dir() { path.join(ternlm_train::stage::CHECKPOINT) } else { path.to_path_buf() };
    let st = candle_core::safetensors::load(&path, m.device())
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let vars = m.vars.data().lock().unwrap();
    for (name, var) in vars.iter() {
        let t = st.get(&format!("param.{name}")).with_context(|| {
            format!("{}: no 'param.{name}' (a checkpoint of a different model, or without SubLN?)", path.display())
        })?;
        if t.shape() != var.shape() {
            anyhow::bail!("{}: 'param.{name}' has shape {:?}, the model {:?}", path.display(), t.dims(), var.dims());
        }
        var.set(t)?;
    }
    let extra = st.keys().filter(|k| k.starts_with("param.") && !vars.contains_key(&k[6..])).count();
    if extra > 0 {
        anyhow::bail!("{}: {extra} parameters the model does not have", path.display());
    }
    eprintln!("initialised {} parameters from {}", vars.len(), path.display());
    Ok(())
}

fn finish(m: &TrainModel, c: &Common, task: Option<&Task>) -> Result<()> {
    let out = c.out.join("model.gguf");
    export_gguf(m, &out, GgmlType::F16)?;
    eprintln!("wrote {}", out.display());
    if let (Some(task), Some(limit)) = (task, c.eval_limit.or(Some(usize::MAX))) {
        if limit > 0 {
            let (acc, preds) = evaluate(m, task, 16, Some(limit))?;
            eprintln!("{} accuracy (training-side greedy): {:.2}%", task.name, acc * 100.0);
            std::fs::write(c.out.join("accuracy.txt"), format!("{acc:.6}\n"))?;
            let text: String = preds.iter().map(|t| format!("{t}\n")).collect();
            std::fs::write(c.out.join("predictions.txt"), text)?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Finetune(c) | Cmd::Cpt { c, .. } | Cmd::Distill { c, .. } => c.threads,
        Cmd::Eval { threads, .. } => *threads,
    };
    // candle's CPU kernels size their pool from this variable on first use.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    if let Cmd::Finetune(c) | Cmd::Cpt { c, .. } | Cmd::Distill { c, .. } = &cli.cmd {
        std::fs::create_dir_all(&c.out).with_context(|| format!("{}: cannot create", c.out.display()))?;
        let args: Vec<String> = std::env::args().collect();
        std::fs::write(c.out.join("config.txt"), args.join(" ") + "\n")?;
    }
    match cli.cmd {
        Cmd::Finetune(c) => {
            let (m, tok) = load_student(&c, c.ternary)?;
            let task = Task::load(&c.task, &c.data, &tok)?;
            train(&m, None, Data::Task(&task), &stage_config(&c))?;
            finish(&m, &c, Some(&task))
        }
        Cmd::Cpt { c, text } => {
            let (m, tok) = load_student(&c, true)?;
            let chunks = text_chunks(&text, &tok, c.max_len)?;
            eprintln!("{}: {} chunks of {} tokens", text.display(), chunks.len(), c.max_len);
            train(&m, None, Data::Text(&chunks), &stage_config(&c))?;
            finish(&m, &c, None)
        }
        Cmd::Distill { c, teacher, lambda, gamma, tau, rel_layer, rel_heads } => {
            let (m, tok) = load_student(&c, true)?;
            let (t, _) = load(&teacher, false, None)?;
            let task = Task::load(&c.task, &c.data, &tok)?;
            let cfg = StageConfig { lambda, gamma, tau, rel_layer, rel_heads, ..stage_config(&c) };
            train(&m, Some(&t), Data::Task(&task), &cfg)?;
            finish(&m, &c, Some(&task))
        }
        Cmd::Eval { model, task, data, ternary, limit, predictions, .. } => {
            let (m, tok) = load(&model, ternary, None)?;
            let task = Task::load(&task, &data, &tok)?;
            let (acc, preds) = evaluate(&m, &task, 16, limit)?;
            if let Some(p) = &predictions {
                let text: String = preds.iter().map(|t| format!("{t}\n")).collect();
                std::fs::write(p, text).with_context(|| format!("{}: cannot write", p.display()))?;
            }
            println!(
                "{} accuracy: {:.2}% ({} rows)",
                task.name,
                acc * 100.0,
                limit.unwrap_or(task.test.len()).min(task.test.len())
            );
            Ok(())
        }
    }
}
