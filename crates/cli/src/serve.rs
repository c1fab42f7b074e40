//! `ternlm serve`: flags → [`ternlm_server::ServerConfig`].

use crate::commands::ModelArgs;
use anyhow::{Context, Result};
use clap::Args;
use std::time::Duration;
use ternlm_server::{EngineConfig, ServerConfig};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Address to listen on (loopback by default; use 0.0.0.0 to expose it, ideally with --api-key)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together (KV slots); each gets --ctx-size tokens of context
    #[arg(long = "parallel", short = 'P', default_value_t = 4)]
    pub parallel: usize,
    /// Tokens per forward pass: the generating sequences' tokens plus prompt chunks (a long prompt is split so
    /// it does not stall the others)
    #[arg(short = 'b', long = "batch-size", default_value_t = 256)]
    pub batch_size: usize,
    /// Requests allowed to wait for a free slot; more get HTTP 429
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (also read from TERNLM_API_KEY)
    #[arg(long, env = "TERNLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model id reported by /v1/models and expected in requests (default: the file name without .gguf)
    #[arg(long)]
    pub alias: Option<String>,
    /// Largest request body in bytes (HTTP 413 beyond)
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest max_tokens a request may ask for (default: the context size)
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Seconds running requests may go on after SIGTERM / Ctrl-C before they are cancelled
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let l = a.m.load()?;
    let model_id = a.alias.clone().unwrap_or_else(|| {
        a.m.model.file_name().map_or("model".into(), |n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
    });
    let addr = format!("{}:{}", a.host, a.port);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .with_context(|| format!("--host/--port: cannot resolve '{addr}'"))?
        .next()
        .with_context(|| format!("--host/--port: '{addr}' resolves to no address"))?;
    anyhow::ensure!(a.parallel >= 1, "--parallel must be at least 1");
    let engine = EngineConfig {
        n_slots: a.parallel,
        n_ctx: l.n_ctx,
        n_batch: a.batch_size.max(a.parallel),
        max_queue: a.max_queue,
    };
    let kv_mib = l.model.new_kv_cache(1, 1).bytes() as f64 * (l.n_ctx * a.parallel) as f64 / (1 << 20) as f64;
    eprintln!("ternlm serve: KV cache {kv_mib:.0} MiB ({} slots × {} tokens)", a.parallel, l.n_ctx);
    let cfg = ServerConfig {
        addr,
        engine,
        model_id,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_body_bytes: a.max_body_bytes,
        max_tokens_limit: a.max_tokens.unwrap_or(l.n_ctx),
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
    };
    ternlm_server::serve(l.model, l.tok, l.pool, cfg)
}
