//! `ternlm convert` and `ternlm export-hf`: Hugging Face checkpoints (config.json, safetensors shards,
//! tokenizer.json / tokenizer.model) to GGUF and back, with no Python.
//!
//! - `hf.rs` reads a model directory (memory-mapped shards, one tensor at a time);
//! - `arch.rs` maps `config.json` to a GGUF architecture and HF tensor names to GGUF names (both directions);
//! - `ternary.rs` ternarizes (absmean), unpacks and packs ternary weights;
//! - `vocab.rs` converts tokenizers and chat templates;
//! - `convert.rs` plans and streams HF → GGUF; `export.rs` writes GGUF → HF.

pub mod arch;
pub mod convert;
pub mod export;
pub mod hf;
pub mod ternary;
pub mod vocab;

pub use convert::{default_type, parse_type, plan, write, write_to, ConvertOptions, Plan, PlannedTensor};
pub use export::{export_hf, ExportOptions};
pub use hf::HfCheckpoint;
pub use vocab::PreChoice;
