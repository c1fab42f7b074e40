use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Io,
    Truncated,
    BadMagic,
    UnsupportedVersion,
    /// A count, dimension or size that cannot be right (larger than the file, or overflowing).
    TooLarge,
    BadTensor,
    UnknownType,
    BadUtf8,
    BadValue,
    MissingKey,
}

/// An error reading or writing a GGUF file; its message always names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct GgufError {
    pub path: String,
    pub kind: ErrorKind,
    pub msg: String,
}

impl GgufError {
    pub fn new(path: &Path, kind: ErrorKind, msg: impl Into<String>) -> Self {
        GgufError { path: path.display().to_string(), kind, msg: msg.into() }
    }
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Self::new(path, ErrorKind::Io, e.to_string())
    }
}
