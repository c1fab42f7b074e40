//! GGUF v2/v3: the file format of llama.cpp and bitnet.cpp models.
//!
//! [`GgufFile`] reads (memory-mapped, zero-copy, safe on hostile input); [`GgufWriter`] writes files that
//! llama.cpp-family tools read. [`GgmlType`] knows every tensor type's exact byte size, including bitnet.cpp's I2_S.

mod error;
mod reader;
mod types;
mod value;
mod writer;

pub use error::{ErrorKind, GgufError};
pub use reader::{GgufFile, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
pub use types::GgmlType;
pub use value::{Array, Value};
pub use writer::{GgufStream, GgufWriter};
