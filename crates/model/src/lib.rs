//! The model runtime: configuration from GGUF, one decoder for every supported architecture, the KV cache,
//! sampling, streaming generation, chat templates, perplexity and task accuracy.

pub mod chat;
pub mod config;
pub mod decoder;
pub mod generate;
pub mod generator;
pub mod kv;
pub mod ops;
pub mod perplexity;
pub mod sampling;
pub mod tasks;

pub use config::ModelConfig;
pub use decoder::{BatchToken, Linear, Model};
pub use generate::{generate, Continuation, FinishReason, GenerateOptions, GenerateStats};
pub use kv::KvCache;
pub use sampling::{Sampler, SamplingParams};
