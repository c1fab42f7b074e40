//! `ternlm serve`: an OpenAI-compatible HTTP server over one model.
//!
//! - [`engine`]: the scheduler thread (continuous batching over KV slots, chunked prompts, prefix reuse).
//! - [`api`]: the HTTP routes (axum), request validation, OpenAI-style errors, SSE streaming.
//! - [`metrics`]: Prometheus counters.
//!
//! The model runs on its own threads; tokio only moves bytes.

pub mod api;
pub mod engine;
pub mod metrics;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use ternlm_kernels::ThreadPool;
use ternlm_model::chat::ChatTemplate;
use ternlm_model::Model;
use ternlm_tokenizer::Tokenizer;

pub use engine::{Engine, EngineConfig};

pub struct ServerConfig {
    pub addr: SocketAddr,
    pub engine: EngineConfig,
    pub model_id: String,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub max_tokens_limit: usize,
    /// After SIGTERM / Ctrl-C: how long running requests may go on before they are cancelled.
    pub shutdown_grace: Duration,
}

pub fn router(state: api::Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/models", get(api::models))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), api::require_key));
    Router::new()
        .route("/", get(api::index))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .merge(v1)
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), api::count_requests))
        .with_state(state)
}

/// Serves until SIGTERM or Ctrl-C, then stops taking requests, lets running ones finish for `shutdown_grace`,
/// cancels what is left and returns.
pub fn serve(model: Model, tok: Tokenizer, pool: ThreadPool, cfg: ServerConfig) -> Result<()> {
    let template = ChatTemplate::from_gguf(&model.file, &tok)?;
    let tok = Arc::new(tok);
    let metrics = Arc::new(metrics::Metrics::default());
    let engine = Engine::start(model, tok.clone(), pool, cfg.engine, metrics.clone());
    let state = Arc::new(api::AppState {
        engine: engine.clone(),
        tok,
        template,
        model_id: cfg.model_id.clone(),
        api_key: cfg.api_key.clone(),
        max_tokens_limit: cfg.max_tokens_limit,
        metrics,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        next_id: AtomicU64::new(0),
        max_body_bytes: cfg.max_body_bytes,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let engine_for_signal = engine.clone();
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(cfg.addr).await.with_context(|| format!("binding {}", cfg.addr))?;
        let local = listener.local_addr()?;
        eprintln!(
            "ternlm serve: listening on http://{local} (model '{}', {} slots × {} tokens, web chat at /)",
            cfg.model_id, cfg.engine.n_slots, cfg.engine.n_ctx
        );
        let shutdown_engine = engine_for_signal;
        let grace = cfg.shutdown_grace;
        let shutdown = async move {
            wait_for_signal().await;
            eprintln!("ternlm serve: shutting down; running requests have {} s to finish", grace.as_secs());
            shutdown_engine.drain();
            let e = shutdown_engine.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                e.cancel_all();
            });
        };
        axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await.context("serving HTTP")
    })?;
    engine.stop();
    eprintln!("ternlm serve: stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
