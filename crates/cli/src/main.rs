//! `ternlm`: a thin command-line layer over the ternlm crates.

mod bench;
mod commands;
mod convert;
mod serve;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ternlm",
    version,
    about = "Run, inspect and measure ternary (1.58-bit) and ordinary GGUF LLMs on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a raw completion of a prompt (or a chat reply with --chat), streaming the text.
    Run(commands::RunArgs),
    /// Interactive chat using the model's chat template.
    Chat(commands::ChatArgs),
    /// Print metadata and a tensor table.
    Info(commands::InfoArgs),
    /// Print the token ids of a text, like llama-tokenize.
    Tokenize(commands::TokenizeArgs),
    /// Perplexity over a text file, computed the way llama.cpp's llama-perplexity does.
    Perplexity(commands::PerplexityArgs),
    /// Greedy accuracy on a classification task (SST-2, QNLI) cast as generation, with the inference engine.
    Accuracy(commands::AccuracyArgs),
    /// Print the top-K (id, logit) pairs at every prompt position.
    Logits(commands::LogitsArgs),
    /// Convert a Hugging Face model directory (safetensors + config + tokenizer) to GGUF, ternarizing if asked.
    Convert(convert::ConvertArgs),
    /// Write a GGUF model as a Hugging Face directory (safetensors + config.json + tokenizer files).
    ExportHf(convert::ExportHfArgs),
    /// Fine-tune on a task (FP teacher, or --ternary for the BitNet-SFT baseline); runs `ternlm-train finetune`.
    #[command(disable_help_flag = true)]
    Finetune {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// BitDistill Stage 2: continued pre-training of the ternary SubLN student; runs `ternlm-train cpt`.
    #[command(disable_help_flag = true)]
    Cpt {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// BitDistill Stage 3: logits + attention-relation distillation from a teacher; runs `ternlm-train distill`.
    #[command(disable_help_flag = true)]
    Distill {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write a random-weight GGUF of any shape and type (for tests and benchmarks).
    GenModel(commands::GenModelArgs),
    /// Prompt and generation speed, like llama-bench (with --json), plus memory and bandwidth figures.
    Bench(bench::BenchArgs),
    /// OpenAI-compatible HTTP server (chat/completions, SSE streaming, continuous batching) with a web chat page.
    Serve(serve::ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Command::Run(a) => commands::run(a),
        Command::Chat(a) => commands::chat(a),
        Command::Info(a) => commands::info(a),
        Command::Tokenize(a) => commands::tokenize(a),
        Command::Perplexity(a) => commands::perplexity(a),
        Command::Accuracy(a) => commands::accuracy(a),
        Command::Logits(a) => commands::logits(a),
        Command::Convert(a) => convert::convert(a),
        Command::ExportHf(a) => convert::export_hf(a),
        Command::Finetune { args } => train::forward("finetune", &args),
        Command::Cpt { args } => train::forward("cpt", &args),
        Command::Distill { args } => train::forward("distill", &args),
        Command::GenModel(a) => commands::gen_model(a),
        Command::Bench(a) => bench::bench(a),
        Command::Serve(a) => serve::serve(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
