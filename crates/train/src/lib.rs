//! BitDistill on CPU (candle): quantization-aware training of ternary students, distillation losses, export to
//! I2_S GGUF. Kept out of the inference crates' dependency tree; the `ternlm-train` binary is its front end.
//!
//! - `quant.rs`: absmean ternary weights and per-token int8 activations with the straight-through estimator;
//! - `model.rs`: the training decoder (same flags and tensor names as the inference decoder), SubLN insertion;
//! - `loss.rs`: cross-entropy, logits KL, attention-relation distillation;
//! - `data.rs`: tasks as generation (SST-2, QNLI), text chunks, padded batches with loss masks;
//! - `optim.rs`: AdamW with checkpointable state, LR schedule, atomic saves;
//! - `stage.rs`: one training stage (fine-tune / distill / continued pre-training), resumable, JSONL log; eval;
//! - `plot.rs`: loss curves as a PNG (no image crate);
//! - `export.rs`: trained model → GGUF.

pub mod data;
pub mod export;
pub mod loss;
pub mod model;
pub mod optim;
pub mod plot;
pub mod quant;
pub mod stage;

pub use model::{Captured, TrainModel};
