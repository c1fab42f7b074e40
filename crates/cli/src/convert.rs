//! `ternlm convert` (HF directory → GGUF) and `ternlm export-hf` (GGUF → HF directory).

use anyhow::{bail, Result};
use clap::Args;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;
use ternlm_convert::export::{ExportDtype, ExportOptions};
use ternlm_convert::ternary::ScaleConvention;
use ternlm_convert::{parse_type, ConvertOptions, HfCheckpoint, PreChoice};

#[derive(Args)]
pub struct ConvertArgs {
    /// Hugging Face model directory (config.json, *.safetensors or model.safetensors.index.json, tokenizer files).
    pub dir: PathBuf,
    /// Output GGUF file.
    #[arg(short, long, required_unless_present = "dry_run")]
    pub output: Option<PathBuf>,
    /// Type of the attention/FFN projections: i2_s, tq2_0, tq1_0 (ternarized with BitNet's absmean, or unpacked
    /// exactly from packed checkpoints), or f32, f16, bf16, q8_0, q6_k (for every matrix). auto: i2_s for BitNet
    /// families and packed checkpoints, else f16.
    #[arg(short = 't', long = "type", default_value = "auto")]
    pub out_type: String,
    /// Output head type when the head is not tied (f32, f16, bf16, q8_0, q6_k). Default: f16 for ternary --type, else --type.
    #[arg(long)]
    pub head_type: Option<String>,
    /// Token embedding type (f32, f16, bf16, q8_0, q6_k). Default as for --head-type.
    #[arg(long)]
    pub embd_type: Option<String>,
    /// Write this `tokenizer.ggml.pre` instead of the one recognised from tokenizer.json.
    #[arg(long, conflicts_with = "no_pre")]
    pub pre: Option<String>,
    /// Write no `tokenizer.ggml.pre` (as the official BitNet 2B4T GGUF does; llama.cpp then uses its default rules).
    #[arg(long)]
    pub no_pre: bool,
    /// How packed checkpoints' weight_scale is meant: multiply (AutoBitLinear, 2B4T) or divide (BitLinear,
    /// Falcon3). Default: from quantization_config.linear_class, checked against the values.
    #[arg(long, value_parser = ["multiply", "divide"])]
    pub weight_scale: Option<String>,
    /// general.name (default: the directory name).
    #[arg(long)]
    pub name: Option<String>,
    /// List what would be written (keys, tensors, types, sizes) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let ck = HfCheckpoint::open(&a.dir)?;
    let ty = if a.out_type == "auto" { ternlm_convert::default_type(&ck)? } else { parse_type(&a.out_type)? };
    let mut opts = ConvertOptions::new(ty);
    opts.head_type = a.head_type.as_deref().map(parse_type).transpose()?;
    opts.embd_type = a.embd_type.as_deref().map(parse_type).transpose()?;
    opts.pre = match (&a.pre, a.no_pre) {
        (Some(p), _) => PreChoice::Named(p.clone()),
        (None, true) => PreChoice::Omit,
        _ => PreChoice::Detect,
    };
    opts.weight_scale =
        a.weight_scale
            .as_deref()
            .map(|s| if s == "divide" { ScaleConvention::Divide } else { ScaleConvention::Multiply });
    opts.name = a.name.clone();
    let plan = ternlm_convert::plan(&ck, &opts)?;
    let h = &plan.hparams;
    let total: u64 = plan.tensors.iter().map(|t| t.nbytes()).sum();
    eprintln!(
        "{}: {} → {} ({} layers, hidden {}, heads {}/{}, ffn {}, vocab {}{}), {} tensors, {} → {}",
        a.dir.display(),
        h.family.hf_name(),
        h.family.gguf_arch(),
        h.n_layer,
        h.n_embd,
        h.n_head,
        h.n_head_kv,
        h.n_ff,
        h.n_vocab,
        if h.tied { ", tied head" } else { "" },
        plan.tensors.len(),
        human(ck.total_bytes()),
        human(total)
    );
    if let Some(c) = plan.convention {
        eprintln!(
            "packed ternary weights: weight_scale is {}",
            if c == ScaleConvention::Divide { "1/mean|W| (divide)" } else { "mean|W| (multiply)" }
        );
    }
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    if a.dry_run {
        let mut out = std::io::stdout().lock();
        writeln!(out, "metadata:")?;
        for (k, v) in &plan.kvs {
            writeln!(out, "  {k:<44} {}", v.summary())?;
        }
        writeln!(out, "tensors:")?;
        for t in &plan.tensors {
            let how = if t.ternarize {
                "absmean ternarized"
            } else if matches!(t.source, ternlm_convert::convert::Source::Packed(..)) {
                "unpacked"
            } else {
                ""
            };
            let perm = if t.permute_heads.is_some() { " q/k-permuted" } else { "" };
            writeln!(
                out,
                "  {:<28} {:<6} {:<16} {:>10}  ← {} {how}{perm}",
                t.name,
                t.ty.name(),
                format!("{:?}", t.dims),
                human(t.nbytes()),
                t.source_name()
            )?;
        }
        writeln!(out, "total tensor bytes: {total} ({})", human(total))?;
        return Ok(());
    }
    let Some(out) = a.output else { bail!("--output is required") };
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let (mut done, mut last_pct) = (0u64, u64::MAX);
    let n = plan.tensors.len();
    ternlm_convert::write(&ck, &plan, &out, |i, t| {
        done += t.nbytes();
        let pct = done * 100 / total.max(1);
        if tty {
            let bar = (pct / 4) as usize;
            eprint!(
                "\r[{}{}] {pct:>3}% {:>4}/{n} {:<28} {:>9} {:>5.0} s",
                "#".repeat(bar),
                " ".repeat(25 - bar),
                i + 1,
                t.name,
                human(done),
                start.elapsed().as_secs_f64()
            );
        } else if pct / 10 != last_pct / 10 || i + 1 == n {
            eprintln!(
                "{pct:>3}% {}/{n} tensors, {} written, {:.0} s",
                i + 1,
                human(done),
                start.elapsed().as_secs_f64()
            );
        }
        last_pct = pct;
    })?;
    if tty {
        eprintln!();
    }
    eprintln!(
        "wrote {} ({}) in {:.1} s",
        out.display(),
        human(std::fs::metadata(&out)?.len()),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
pub struct ExportHfArgs {
    /// GGUF file to export.
    pub model: PathBuf,
    /// Output directory (created).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Float tensor type: auto (F16/BF16/F32 kept, quantized types → f32, exact), f32, f16, bf16.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "f16", "bf16"])]
    pub dtype: String,
    /// Write ternary projections as dequantized floats instead of HF's packed BitNet layout.
    #[arg(long)]
    pub dequantize_ternary: bool,
}

pub fn export_hf(a: ExportHfArgs) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => ExportDtype::F32,
        "f16" => ExportDtype::F16,
        "bf16" => ExportDtype::BF16,
        _ => ExportDtype::Auto,
    };
    let start = Instant::now();
    let s = ternlm_convert::export_hf(
        &a.model,
        &a.output,
        &ExportOptions { dtype, dequantize_ternary: a.dequantize_ternary },
    )?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "wrote {} ({} tensors, {} packed ternary) in {:.1} s",
        a.output.display(),
        s.tensors,
        s.packed_ternary,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
