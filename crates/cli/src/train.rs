//! `ternlm finetune | cpt | distill`: BitDistill's stages live in the `ternlm-train` binary (crate
//! `ternlm-train`, which brings candle) so the inference binary stays lean; these subcommands run it from beside
//! this executable (or from PATH) with the same arguments.

use anyhow::{Context, Result};
use std::process::Command;

pub fn forward(stage: &str, args: &[String]) -> Result<()> {
    let exe = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("ternlm-train")));
    let bin = exe.filter(|p| p.exists()).map(|p| p.into_os_string()).unwrap_or_else(|| "ternlm-train".into());
    let status = Command::new(&bin).arg(stage).args(args).status().with_context(|| {
        format!("cannot run {} (build it with: cargo build --release -p ternlm-train)", bin.to_string_lossy())
    })?;
    std::process::exit(status.code().unwrap_or(1));
}
