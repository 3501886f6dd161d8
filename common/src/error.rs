//! The one error type of ccq-common. Every variant names the file, node or field at fault,
//! so that a user can fix the input without reading code.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not a decodable ONNX ModelProto (truncated, wrong file, ...).
    #[error("{path}: not a valid ONNX model: {reason}")]
    OnnxDecode { path: String, reason: String },

    /// An operator (or an attribute value of one) that ccq cannot import.
    #[error("node '{node}' (op {op}): {reason}")]
    UnsupportedOp {
        node: String,
        op: String,
        reason: String,
    },

    /// The graph is structurally wrong: missing initializer, inconsistent shapes, ...
    #[error("node '{node}': {reason}")]
    InvalidModel { node: String, reason: String },

    /// A dataset file is truncated or malformed.
    #[error("{} at byte {offset}: {reason}", path.display())]
    MalformedData {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// A dataset file or directory that cannot be used as it is: an image that does not
    /// decode, a class directory without images, an array of the wrong type or shape.
    #[error("{}: {reason}", path.display())]
    DataFile { path: PathBuf, reason: String },

    /// A data source string such as `cifar10:DIR` that cannot be parsed.
    #[error("invalid data source '{spec}': {reason}")]
    InvalidDataSource { spec: String, reason: String },

    #[error("invalid shard {index}/{count}: {reason}")]
    InvalidShard {
        index: usize,
        count: usize,
        reason: String,
    },

    /// The data does not fit the model (channels, height, width).
    #[error("shape mismatch: model input expects {expected}, data has {found}")]
    ShapeMismatch { expected: String, found: String },

    /// A quantization or engine setting outside what ccq supports.
    #[error("invalid setting {field} = {value}: {reason}")]
    InvalidSetting {
        field: String,
        value: String,
        reason: String,
    },

    /// A `.ccq` integer network file that cannot be read back.
    #[error("{path}: not a valid ccq network file: {reason}")]
    NetworkFile { path: String, reason: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn setting(field: &str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::InvalidSetting {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
