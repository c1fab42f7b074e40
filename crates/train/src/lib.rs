//! BitDistill on CPU (candle): quantization-aware training of ternary students, distillation losses, export to
//! I2_S GGUF. Kept out of the inference crates' dependency tree; the `ternlm-train` binary is its front end.
//!
//! - `quant.rs`: absmean ternary weights and per-token int8 activations with the straight-through estimator;
//! - `model.rs`: the training decoder (same flags and tensor names as the inference decoder), SubLN insertion;
//! - `loss.rs`: cross-entropy, logits KL, attention-relation distillation;
//! - `export.rs`: trained model → GGUF.

pub mod export;
pub mod loss;
pub mod model;
pub mod quant;

pub use model::{Captured, TrainModel};
