//! The OpenAI-compatible HTTP API: request parsing and validation, OpenAI-style errors, SSE streaming.

use crate::engine::{Done, Engine, Event, Job, SubmitError};
use crate::metrics::Metrics;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use ternlm_model::chat::{encode_chat, ChatTemplate, Message};
use ternlm_model::{FinishReason, GenerateOptions, SamplingParams};
use ternlm_tokenizer::Tokenizer;
use tokio::sync::mpsc;

pub struct AppState {
    pub engine: Engine,
    pub tok: Arc<Tokenizer>,
    pub template: ChatTemplate,
    pub model_id: String,
    pub api_key: Option<String>,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    pub metrics: Arc<Metrics>,
    pub created: u64,
    pub next_id: AtomicU64,
    pub max_body_bytes: usize,
}

pub type Shared = Arc<AppState>;

/// An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`.
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), param: None, code: None }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    fn param(mut self, p: &'static str) -> ApiError {
        self.param = Some(p);
        self
    }
    fn code(mut self, c: &'static str) -> ApiError {
        self.code = Some(c);
        self
    }
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Counts every answer by route and status.
pub async fn count_requests(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let route = match req.uri().path() {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/" => "/",
        _ => "other",
    };
    let resp = next.run(req).await;
    s.metrics.request(route, resp.status().as_u16());
    resp
}

/// `Authorization: Bearer KEY` on the API routes when the server has a key.
pub async fn require_key(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid or missing API key (send Authorization: Bearer KEY)",
            )
            .code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route").code("not_found")
}

pub async fn index() -> Html<&'static str> {
    Html(include_str!("chat.html"))
}

pub async fn health(State(s): State<Shared>) -> Response {
    if s.engine.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting down"}))).into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

pub async fn metrics(State(s): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

pub async fn models(State(s): State<Shared>) -> Json<Value> {
    let cfg = s.engine.config();
    Json(json!({"object": "list", "data": [{
        "id": s.model_id, "object": "model", "created": s.created, "owned_by": "ternlm",
        "meta": {"n_ctx_per_slot": cfg.n_ctx, "n_slots": cfg.n_slots, "n_vocab": s.tok.n_vocab()},
    }]}))
}

/// `stop` may be one string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The parameters both endpoints share. Unknown fields are ignored, as OpenAI clients send many.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// llama.cpp extensions.
    top_k: Option<u64>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
    stop: Option<StopField>,
    seed: Option<u64>,
    n: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Value>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// Message content: a string, or a list of parts of which only text is understood.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the server accepts (--max-body-bytes)".to_string()
        } else {
            e.body_text()
        };
        ApiError::new(status, msg)
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// What a request asks the engine for, validated.
struct Plan {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    stream: bool,
    include_usage: bool,
}

impl AppState {
    fn plan(&self, c: Common, prompt: Vec<u32>) -> Result<Plan, ApiError> {
        if let Some(m) = &c.model {
            if !m.is_empty() && *m != self.model_id {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("the model '{m}' does not exist; this server serves '{}'", self.model_id),
                )
                .param("model")
                .code("model_not_found"));
            }
        }
        if c.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("only n=1 is supported").param("n"));
        }
        if c.logprobs.as_ref().is_some_and(|v| !v.is_null() && *v != Value::Bool(false)) {
            return Err(ApiError::bad("logprobs are not supported").param("logprobs"));
        }
        let temperature = c.temperature.unwrap_or(0.8);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(format!("temperature must be in [0, 2], got {temperature}")).param("temperature"));
        }
        let top_p = c.top_p.unwrap_or(0.95);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(format!("top_p must be in (0, 1], got {top_p}")).param("top_p"));
        }
        let min_p = c.min_p.unwrap_or(0.05);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad(format!("min_p must be in [0, 1], got {min_p}")).param("min_p"));
        }
        let repeat_penalty = c.repeat_penalty.unwrap_or(1.0);
        if !(repeat_penalty.is_finite() && repeat_penalty > 0.0) {
            return Err(ApiError::bad("repeat_penalty must be positive").param("repeat_penalty"));
        }
        let stop = match c.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        };
        if stop.len() > 16 || stop.iter().any(|s| s.len() > 256) {
            return Err(ApiError::bad("at most 16 stop strings of at most 256 bytes").param("stop"));
        }
        let n_ctx = self.engine.config().n_ctx;
        if prompt.is_empty() {
            return Err(ApiError::bad("the prompt is empty").param("prompt"));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.tok.n_vocab()) {
            return Err(ApiError::bad(format!("token id {bad} is outside the vocabulary ({})", self.tok.n_vocab()))
                .param("prompt"));
        }
        if prompt.len() >= n_ctx {
            return Err(ApiError::bad(format!(
                "this model's maximum context length is {n_ctx} tokens, but the prompt has {} tokens",
                prompt.len()
            ))
            .param("messages")
            .code("context_length_exceeded"));
        }
        let room = n_ctx - prompt.len();
        let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
            None => room.min(self.max_tokens_limit),
            Some(0) => return Err(ApiError::bad("max_tokens must be at least 1").param("max_tokens")),
            Some(m) if m as usize > self.max_tokens_limit => {
                return Err(ApiError::bad(format!(
                    "max_tokens is {m}, but this server allows at most {} (--max-tokens)",
                    self.max_tokens_limit
                ))
                .param("max_tokens"))
            }
            Some(m) if m as usize > room => {
                return Err(ApiError::bad(format!(
                    "this model's maximum context length is {n_ctx} tokens; the prompt has {} and max_tokens asks \
                     for {m} more",
                    prompt.len()
                ))
                .param("max_tokens")
                .code("context_length_exceeded"))
            }
            Some(m) => m as usize,
        };
        let seed = c.seed.unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
                ^ self.next_id.load(Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        let sampling = SamplingParams {
            temperature,
            top_k: c.top_k.unwrap_or(40) as usize,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n: 64,
            seed,
        };
        Ok(Plan {
            prompt,
            opts: GenerateOptions { max_tokens, sampling, stop, ignore_eos: c.ignore_eos, ..Default::default() },
            stream: c.stream,
            include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        })
    }

    fn submit(&self, prompt: Vec<u32>, opts: GenerateOptions) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job { prompt, opts, events: tx, submitted: Instant::now() };
        match self.engine.submit(job) {
            Ok(()) => Ok(rx),
            Err(SubmitError::QueueFull) => Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the server is busy: every slot is taken and the queue is full; retry later",
            )
            .code("queue_full")),
            Err(SubmitError::ShuttingDown) => {
                Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down").code("shutting_down"))
            }
        }
    }
}

fn usage(d: &Done) -> Value {
    json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": d.cached_tokens},
    })
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        _ => "length",
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

pub async fn chat_completions(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let r: ChatRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut msgs = Vec::with_capacity(r.messages.len());
    for m in &r.messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
            return ApiError::bad(format!("unknown message role '{}'", m.role)).param("messages").into_response();
        }
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(x)) => t.push_str(x),
                        (k, _) => {
                            return ApiError::bad(format!("content parts of type '{k}' are not supported"))
                                .param("messages")
                                .into_response()
                        }
                    }
                }
                t
            }
        };
        // "developer" is OpenAI's newer name for the system role; chat templates know "system".
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        msgs.push(Message::new(role, &content));
    }
    if msgs.is_empty() {
        return ApiError::bad("messages must not be empty").param("messages").into_response();
    }
    let text = match s.template.render(&msgs, true) {
        Ok(t) => t,
        Err(e) => return ApiError::bad(format!("the chat template refused the messages: {e:#}")).into_response(),
    };
    let prompt = encode_chat(&s.tok, &text);
    respond(s, r.common, prompt, Kind::Chat).await
}

pub async fn completions(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let r: CompletionRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // As `ternlm run`: BOS as the vocabulary asks, control-token text in the prompt is not parsed.
    let prompt = match r.prompt {
        PromptField::Text(t) => s.tok.encode(&t, true, false),
        PromptField::Texts(v) if v.len() == 1 => s.tok.encode(&v[0], true, false),
        PromptField::Texts(_) => {
            return ApiError::bad("exactly one prompt per request is supported").param("prompt").into_response()
        }
        PromptField::Tokens(ids) => ids,
    };
    respond(s, r.common, prompt, Kind::Completion).await
}

async fn respond(s: Shared, c: Common, prompt: Vec<u32>, kind: Kind) -> Response {
    let Plan { prompt, opts, stream: streaming, include_usage } = match s.plan(c, prompt) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let rx = match s.submit(prompt, opts) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{n:x}{created:x}"),
        Kind::Completion => format!("cmpl-{n:x}{created:x}"),
    };
    let meta = Meta { id, created, model: s.model_id.clone(), kind };
    if streaming {
        stream(meta, rx, include_usage).into_response()
    } else {
        collect(meta, rx).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn chunk(&self, choice: Option<Value>, usage: Option<Value>) -> Value {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": "ternlm", "choices": choice.map_or(vec![], |c| vec![c])});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
    fn delta(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

async fn collect(meta: Meta, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(d)) => {
                let fr = finish_reason(d.finish);
                let choice = match meta.kind {
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": null, "finish_reason": fr}),
                    Kind::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": fr}),
                };
                let object = if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
                return Json(json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model,
                    "system_fingerprint": "ternlm", "choices": [choice], "usage": usage(&d)}))
                .into_response();
            }
            Some(Event::Error(e)) => return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
            None => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine dropped the request")
                    .into_response()
            }
        }
    }
}

struct StreamState {
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    out: VecDeque<String>,
    started: bool,
    ended: bool,
}

/// Server-Sent Events as OpenAI sends them: a first chunk with the role, content deltas, a last chunk with the
/// finish reason, a usage chunk if asked, then `[DONE]`. Dropping the stream (the client left) drops the
/// receiver, which cancels the job.
fn stream(meta: Meta, rx: mpsc::UnboundedReceiver<Event>, include_usage: bool) -> impl IntoResponse {
    let st = StreamState { meta, rx, include_usage, out: VecDeque::new(), started: false, ended: false };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.ended {
                return None;
            }
            if !st.started {
                st.started = true;
                if st.meta.kind == Kind::Chat {
                    let first = st.meta.chunk(Some(st.meta.delta(Some(""), true, None)), None);
                    st.out.push_back(first.to_string());
                    continue;
                }
            }
            match st.rx.recv().await {
                Some(Event::Text(t)) => {
                    let c = st.meta.chunk(Some(st.meta.delta(Some(&t), false, None)), None);
                    st.out.push_back(c.to_string());
                }
                Some(Event::Done(d)) => {
                    let fr = finish_reason(d.finish);
                    let text = if st.meta.kind == Kind::Chat { None } else { Some("") };
                    let last = st.meta.chunk(Some(st.meta.delta(text, false, Some(fr))), None);
                    st.out.push_back(last.to_string());
                    if st.include_usage {
                        st.out.push_back(st.meta.chunk(None, Some(usage(&d))).to_string());
                    }
                    st.out.push_back("[DONE]".into());
                    st.ended = true;
                }
                Some(Event::Error(e)) => {
                    let err = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e);
                    st.out.push_back(err.body().to_string());
                    st.ended = true;
                }
                None => st.ended = true,
            }
        }
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, "no-cache".parse().unwrap());
    headers.insert("x-accel-buffering", "no".parse().unwrap());
    (headers, Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}
