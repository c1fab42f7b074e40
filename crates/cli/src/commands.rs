use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use ternlm_gguf::GgufFile;
use ternlm_kernels::ThreadPool;
use ternlm_model::chat::{encode_chat, ChatTemplate, Message};
use ternlm_model::{generate, GenerateOptions, Model, SamplingParams};
use ternlm_tokenizer::Tokenizer;

#[derive(Args)]
pub struct InfoArgs {
    /// GGUF file
    pub file: PathBuf,
    /// Skip the tensor table
    #[arg(long)]
    pub no_tensors: bool,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let f = GgufFile::open(&a.file)?;
    println!("file: {}", a.file.display());
    println!(
        "GGUF version {}, alignment {}, {} metadata keys, {} tensors",
        f.version,
        f.alignment,
        f.metadata().len(),
        f.tensors().len()
    );
    println!("\nmetadata:");
    for (k, v) in f.metadata() {
        println!("  {k:<44} {}", v.summary());
    }
    if !a.no_tensors {
        println!("\ntensors:");
        println!("  {:<36} {:>6} {:>22} {:>14}", "name", "type", "shape", "bytes");
        let mut total = 0u64;
        for t in f.tensors() {
            total += t.size;
            let shape = format!("{:?}", t.dims);
            println!("  {:<36} {:>6} {:>22} {:>14}", t.name, t.ty.name(), shape, t.size);
        }
        println!("  total tensor bytes: {total} ({:.1} MiB)", total as f64 / (1 << 20) as f64);
    }
    Ok(())
}

#[derive(Args)]
pub struct TokenizeArgs {
    /// GGUF file (a vocab-only GGUF works)
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    #[arg(short = 'p', long)]
    pub prompt: String,
    /// Print only the ids, as a list
    #[arg(long)]
    pub ids: bool,
    /// Add BOS/EOS as the vocabulary asks
    #[arg(long)]
    pub add_bos: bool,
    /// Recognise control tokens written in the text
    #[arg(long)]
    pub parse_special: bool,
    /// Override the BPE pre-tokenizer (e.g. llama3)
    #[arg(long)]
    pub pre: Option<String>,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let f = GgufFile::open(&a.model)?;
    let tok = Tokenizer::from_gguf(&f, a.pre.as_deref())?;
    let ids = tok.encode(&a.prompt, a.add_bos, a.parse_special);
    if a.ids {
        println!("{ids:?}");
    } else {
        for id in ids {
            let piece = String::from_utf8_lossy(&tok.token_to_piece(id, true)).into_owned();
            println!("{id:>6} -> '{piece}'");
        }
    }
    Ok(())
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// GGUF model file, or a Hugging Face model directory (converted in memory, as `ternlm convert` would)
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Threads for matrix products (default: all cores)
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Context size in tokens (default: the model's training context, at most 4096)
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Override the BPE pre-tokenizer named in the file (e.g. llama3)
    #[arg(long)]
    pub pre: Option<String>,
    /// Activation quantization for TQ1_0/TQ2_0 weights: per-block (llama.cpp's Q8_K, the default, matches llama.cpp
    /// and bitnet.cpp outputs) or per-token (BitNet's training semantics, as I2_S uses)
    #[arg(long, default_value = "per-block")]
    pub tq_acts: String,
    /// Re-quantize the output head at load: q8_0, q6_k or f16 (default: as stored in the file)
    #[arg(long)]
    pub head_type: Option<String>,
    /// Copy the model into memory (transparent huge pages where the OS allows) instead of mapping the file: a few
    /// percent faster generation; the whole file stays resident (--head-type keeps the old head's pages)
    #[arg(long)]
    pub no_mmap: bool,
}

/// `-m HF_DIR`: converts a Hugging Face model directory in memory (I2_S for BitNet and packed checkpoints, F16
/// otherwise) — the same conversion as `ternlm convert`, without a file.
fn convert_in_memory(dir: &std::path::Path) -> Result<GgufFile> {
    let ck = ternlm_convert::HfCheckpoint::open(dir)?;
    let ty = ternlm_convert::default_type(&ck)?;
    let plan = ternlm_convert::plan(&ck, &ternlm_convert::ConvertOptions::new(ty))?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    let start = std::time::Instant::now();
    let bytes = ternlm_convert::write_to(&ck, &plan, Vec::new(), |_, _| {})?;
    eprintln!(
        "{}: converted in memory to {ty} ({} MB) in {:.1} s",
        dir.display(),
        bytes.len() >> 20,
        start.elapsed().as_secs_f64()
    );
    Ok(GgufFile::from_bytes(dir, bytes)?)
}

/// Opens a GGUF model file: mapped, or copied into memory with `--no-mmap`.
pub fn open_model(path: &std::path::Path, no_mmap: bool) -> Result<GgufFile> {
    Ok(if no_mmap { GgufFile::open_resident(path)? } else { GgufFile::open(path)? })
}

/// `--head-type NAME`: re-quantize the output head in memory.
pub fn apply_head_type(model: &mut Model, name: &str, pool: &ThreadPool) -> Result<()> {
    let ty = ternlm_gguf::GgmlType::from_name(name).with_context(|| format!("unknown --head-type '{name}'"))?;
    model.requantize_head(ty, pool)
}

pub struct Loaded {
    pub model: Model,
    pub tok: Tokenizer,
    pub pool: ThreadPool,
    pub n_ctx: usize,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Loaded> {
        let file = Arc::new(if self.model.is_dir() {
            convert_in_memory(&self.model)?
        } else {
            open_model(&self.model, self.no_mmap)?
        });
        let tok = Tokenizer::from_gguf(&file, self.pre.as_deref())?;
        let mut model = Model::from_gguf(file)?;
        match self.tq_acts.as_str() {
            "per-block" => {}
            "per-token" => model.use_per_token_tq_acts(),
            other => bail!("--tq-acts must be per-block or per-token, not '{other}'"),
        }
        let threads =
            self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
        let n_ctx = self.ctx_size.unwrap_or(model.cfg.n_ctx_train.min(4096)).max(16);
        let pool = ThreadPool::new(threads);
        if let Some(h) = &self.head_type {
            apply_head_type(&mut model, h, &pool)?;
        }
        Ok(Loaded { model, tok, pool, n_ctx })
    }
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Temperature (0 = greedy)
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// RNG seed (default: random)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable)
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        }
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Prompt text
    #[arg(short = 'p', long)]
    pub prompt: String,
    /// Tokens to generate
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    /// Wrap the prompt in the model's chat template as a user message
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub s: SamplingArgs,
    /// Do not print the prompt before the completion
    #[arg(long)]
    pub no_echo: bool,
    /// Print timing statistics to stderr
    #[arg(long)]
    pub stats: bool,
    /// Never stop at end-of-generation tokens (they are masked out), e.g. for benchmarks
    #[arg(long)]
    pub ignore_eos: bool,
}

/// Writes to stdout; a closed pipe (e.g. `| head`) ends the program quietly instead of panicking.
fn emit(s: &str) -> bool {
    let mut out = std::io::stdout().lock();
    if out.write_all(s.as_bytes()).and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
    true
}

pub fn run(a: RunArgs) -> Result<()> {
    let l = a.m.load()?;
    let (text, parse_special) = if a.chat {
        let tmpl = ChatTemplate::from_gguf(&l.model.file, &l.tok)?;
        let mut msgs = Vec::new();
        if let Some(sys) = &a.system {
            msgs.push(Message::new("system", sys));
        }
        msgs.push(Message::new("user", &a.prompt));
        (tmpl.render(&msgs, true)?, true)
    } else {
        (a.prompt.clone(), false)
    };
    let ids = if parse_special { encode_chat(&l.tok, &text) } else { l.tok.encode(&text, true, false) };
    let mut kv = l.model.new_kv_cache(l.n_ctx, 1);
    let opts = GenerateOptions {
        max_tokens: a.n_predict,
        sampling: a.s.params(),
        stop: a.s.stop.clone(),
        ignore_eos: a.ignore_eos,
        ..Default::default()
    };
    if !a.no_echo && !a.chat {
        emit(&a.prompt);
    }
    let st = generate(&l.model, &l.tok, &l.pool, &mut kv, 0, &ids, &opts, &mut |t| emit(t))?;
    emit("\n");
    if a.stats {
        eprintln!(
            "prompt: {} tokens ({} reused) in {:.2} s ({:.1} t/s) | generation: {} tokens in {:.2} s ({:.1} t/s) | finish: {:?}",
            st.n_prompt,
            st.n_prompt_reused,
            st.prompt_time.as_secs_f64(),
            (st.n_prompt - st.n_prompt_reused) as f64 / st.prompt_time.as_secs_f64(),
            st.n_generated,
            st.gen_time.as_secs_f64(),
            st.n_generated as f64 / st.gen_time.as_secs_f64().max(1e-9),
            st.finish
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// System message
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum tokens per reply
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    pub n_predict: usize,
    #[command(flatten)]
    pub s: SamplingArgs,
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let l = a.m.load()?;
    let tmpl = ChatTemplate::from_gguf(&l.model.file, &l.tok)?;
    let mut msgs = Vec::new();
    if let Some(sys) = &a.system {
        msgs.push(Message::new("system", sys));
    }
    let mut kv = l.model.new_kv_cache(l.n_ctx, 1);
    let mut params = a.s.params();
    eprintln!(
        "ternlm chat: {} ({}). Type a message; an empty line or Ctrl-D quits.",
        a.m.model.display(),
        l.model.cfg.arch
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("\n> ");
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        msgs.push(Message::new("user", line.trim_end()));
        let text = tmpl.render(&msgs, true)?;
        let ids = encode_chat(&l.tok, &text);
        if ids.len() + 8 >= l.n_ctx {
            bail!(
                "the conversation ({} tokens) no longer fits the context of {} tokens; restart with a larger -c",
                ids.len(),
                l.n_ctx
            );
        }
        params.seed = params.seed.wrapping_add(1);
        let opts = GenerateOptions {
            max_tokens: a.n_predict,
            sampling: params.clone(),
            stop: a.s.stop.clone(),
            ..Default::default()
        };
        let mut reply = String::new();
        generate(&l.model, &l.tok, &l.pool, &mut kv, 0, &ids, &opts, &mut |t| {
            reply.push_str(t);
            emit(t)
        })?;
        emit("\n");
        msgs.push(Message::new("assistant", reply.trim()));
    }
    Ok(())
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Text file
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Stop after this many chunks
    #[arg(long)]
    pub chunks: Option<usize>,
}

#[derive(clap::Args)]
pub struct AccuracyArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Task: sst2 (GLUE dev, 872 rows) or qnli (the reproducible test split of its GLUE dev set)
    #[arg(long, default_value = "sst2")]
    pub task: String,
    /// Directory holding sst2/ and qnli/
    #[arg(long, default_value = "../shared/data")]
    pub data: PathBuf,
    /// Only the first N test rows
    #[arg(long)]
    pub limit: Option<usize>,
    /// Prompts per forward pass
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Write each row's predicted first token id and its margin (top-1 minus top-2 logit), tab-separated, one row per line
    #[arg(long)]
    pub predictions: Option<PathBuf>,
}

/// Greedy task accuracy with the inference engine (what `ternlm run` would answer).
pub fn accuracy(a: AccuracyArgs) -> Result<()> {
    let mut m = a.m.clone();
    m.ctx_size = Some(a.m.ctx_size.unwrap_or(512));
    let l = m.load()?;
    let task = ternlm_model::tasks::Task::load(&a.task, &a.data, &l.tok)?;
    let t0 = std::time::Instant::now();
    let r = ternlm_model::tasks::engine_accuracy(&l.model, &l.pool, &task, a.batch, a.limit, |done, total| {
        if std::io::stderr().is_terminal() {
            eprint!("\r{done}/{total} rows");
        }
    })?;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    println!("{} accuracy: {:.2}% ({} rows)", task.name, r.accuracy * 100.0, r.predictions.len());
    eprintln!("accuracy: {:.1} s", t0.elapsed().as_secs_f64());
    if let Some(p) = &a.predictions {
        let text: String = r.predictions.iter().zip(&r.margins).map(|(t, m)| format!("{t}\t{m:.5}\n")).collect();
        std::fs::write(p, text).with_context(|| format!("{}: cannot write", p.display()))?;
    }
    Ok(())
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let mut m = a.m.clone();
    m.ctx_size = Some(a.m.ctx_size.unwrap_or(512));
    let l = m.load()?;
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let t0 = std::time::Instant::now();
    let tokens = l.tok.encode(&text, true, false);
    eprintln!(
        "perplexity: tokenized {} bytes into {} tokens in {:.2} s",
        text.len(),
        tokens.len(),
        t0.elapsed().as_secs_f64()
    );
    let n_ctx = l.n_ctx;
    let n_chunks = (tokens.len() / n_ctx).min(a.chunks.unwrap_or(usize::MAX));
    eprintln!("perplexity: calculating perplexity over {n_chunks} chunks, n_ctx={n_ctx}");
    let bos = if l.tok.add_bos { l.tok.bos } else { None };
    let t1 = std::time::Instant::now();
    let r = ternlm_model::perplexity::perplexity(&l.model, &l.pool, &tokens, n_ctx, a.chunks, bos, |i, p| {
        emit(&format!("[{}]{:.4},", i + 1, p));
    })?;
    emit("\n");
    println!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.stderr);
    eprintln!(
        "perplexity: {:.2} s ({:.1} tokens/s)",
        t1.elapsed().as_secs_f64(),
        (n_chunks * n_ctx) as f64 / t1.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(short = 'p', long)]
    pub prompt: String,
    /// How many (id, logit) pairs per position
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// JSON output: one object per position
    #[arg(long)]
    pub json: bool,
    /// Add BOS as the vocabulary asks (default on)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub add_bos: bool,
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let l = a.m.load()?;
    let ids = l.tok.encode(&a.prompt, a.add_bos, false);
    if ids.is_empty() {
        bail!("the prompt tokenizes to nothing");
    }
    let mut kv = l.model.new_kv_cache(l.n_ctx.max(ids.len() + 1), 1);
    let batch: Vec<ternlm_model::BatchToken> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| ternlm_model::BatchToken { token: t, pos: i, seq: 0, logits: true })
        .collect();
    let logits = l.model.forward(&batch, &mut kv, &l.pool)?;
    let nv = l.model.cfg.n_vocab;
    let mut rows = Vec::new();
    for (pos, row) in logits.chunks_exact(nv).enumerate() {
        let mut idx: Vec<usize> = (0..nv).collect();
        idx.sort_by(|&x, &y| row[y].total_cmp(&row[x]).then(x.cmp(&y)));
        let top: Vec<(usize, f32)> = idx.iter().take(a.top).map(|&i| (i, row[i])).collect();
        if a.json {
            rows.push(serde_json::json!({"pos": pos, "token": ids[pos], "top": top.iter().map(|(i, v)| serde_json::json!([i, v])).collect::<Vec<_>>()}));
        } else {
            let piece = String::from_utf8_lossy(&l.tok.token_to_piece(ids[pos], true)).into_owned();
            let list: Vec<String> = top.iter().map(|(i, v)| format!("({i}, {v:.4})")).collect();
            emit(&format!("{pos:>4} {:>7} {piece:?}: {}\n", ids[pos], list.join(" ")));
        }
    }
    if a.json {
        emit(&format!("{}\n", serde_json::to_string(&rows)?));
    }
    Ok(())
}

#[derive(Args)]
pub struct GenModelArgs {
    /// Output GGUF
    #[arg(short = 'o', long)]
    pub out: PathBuf,
    /// GGUF whose tokenizer.* keys are copied (e.g. ../shared/fixtures/tokenizer/llama-cpp-vectors/ggml-vocab-llama-bpe.gguf)
    #[arg(long)]
    pub vocab: PathBuf,
    /// Shape preset: 2b4t (BitNet b1.58 2B4T) or tiny (256 hidden, 2 blocks, like the test fixtures)
    #[arg(long, default_value = "2b4t")]
    pub preset: String,
    /// Architecture written into the file
    #[arg(long, default_value = "bitnet-b1.58")]
    pub arch: String,
    /// Projection weight type: i2_s, tq2_0, tq1_0, q8_0, f16, f32
    #[arg(long = "type", default_value = "i2_s")]
    pub weight_type: String,
    /// Token embedding / tied head type: f16, q8_0, f32
    #[arg(long, default_value = "f16")]
    pub embd_type: String,
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub ffn: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn gen_model(a: GenModelArgs) -> Result<()> {
    use ternlm_gguf::GgmlType;
    use ternlm_model::generator::{write_random_model, GenSpec};
    let ty = |s: &str| GgmlType::from_name(s).with_context(|| format!("unknown tensor type '{s}'"));
    let (wt, et) = (ty(&a.weight_type)?, ty(&a.embd_type)?);
    let mut spec = match a.preset.as_str() {
        "2b4t" => GenSpec::bitnet_2b4t(wt, et),
        "tiny" => GenSpec::tiny(wt, et),
        other => bail!("unknown preset '{other}' (2b4t, tiny)"),
    };
    spec.arch = a.arch.clone();
    spec.seed = a.seed;
    spec.n_embd = a.hidden.unwrap_or(spec.n_embd);
    spec.n_layer = a.layers.unwrap_or(spec.n_layer);
    spec.n_ff = a.ffn.unwrap_or(spec.n_ff);
    spec.n_head = a.heads.unwrap_or(spec.n_head);
    spec.n_head_kv = a.kv_heads.unwrap_or(spec.n_head_kv);
    let t0 = std::time::Instant::now();
    write_random_model(&spec, &a.vocab, &a.out)?;
    let size = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    eprintln!("wrote {} ({:.1} MB) in {:.1} s", a.out.display(), size as f64 / 1e6, t0.elapsed().as_secs_f64());
    Ok(())
}
