//! The one error type of this crate. Every variant names the file it is about, so a user with a bad download
//! can tell which shard to fetch again.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file ends before a structure that the header promises.
    #[error("{path}: truncated: {what} needs bytes {start}..{end} but the file has {file_len}")]
    Truncated { path: PathBuf, what: String, start: u64, end: u64, file_len: u64 },
    /// Any other structural problem; `msg` says what and where (tensor, key, field).
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("{path}: tensor {tensor}: unknown dtype {dtype}")]
    UnknownDtype { path: PathBuf, tensor: String, dtype: String },
    #[error("{path}: tensor {tensor}: shape {shape:?} as {dtype} needs {expected} bytes, found {got}")]
    SizeMismatch { path: PathBuf, tensor: String, shape: Vec<u64>, dtype: String, expected: u64, got: u64 },
    #[error("{path}: malformed JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: missing required field `{field}`")]
    MissingField { path: PathBuf, field: String },
    #[error("{path}: tensor `{tensor}` not found")]
    MissingTensor { path: PathBuf, tensor: String },
}

impl FormatError {
    pub fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        FormatError::Invalid { path: path.into(), msg: msg.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io { path: path.into(), source }
    }
}
