//! ONNX import: decodes a `.onnx` file (protobuf messages declared in [`proto`]) and lowers
//! its graph into the float IR of [`crate::model`].
//!
//! The importer targets eval-mode CNN exports (PyTorch, opset 11–17; older Clip, Slice,
//! Pad and Reshape forms are read too). Lowering works in one pass over the nodes, which
//! ONNX stores in topological order, and infers every value's per-image shape as it goes:
//!
//! - BatchNormalization is folded into the Conv/Gemm/MatMul before it, and an Add of a
//!   constant into that layer's bias, when that layer's output feeds nothing else;
//! - `Mul(x, Sigmoid(x))` (PyTorch's `nn.SiLU`) becomes one SiLU when the Mul is the
//!   Sigmoid's only reader; a Mul by an `[N, C, 1, 1]` scale keeps the scale second;
//! - MatMul by a constant `[in, out]` matrix and Gemm become [`Op::Linear`](crate::model::Op);
//! - Flatten and flattening Reshapes become `Flatten`; Identity, Dropout and no-op
//!   Flatten/Slice/Pad bind their output to their input and produce no node;
//! - Slice and Pad keep the batch axis whole (the batch stays implicit in the IR).
//!
//! Anything else is an [`Error::UnsupportedOp`] naming the node and listing the supported
//! ops; a structurally wrong model is an [`Error::InvalidModel`] naming the node. No input
//! can make the importer panic: every count or index read from the file is checked.

mod lower;
mod node;
pub mod proto;
pub mod qdq;
mod tensor;

use std::path::Path;

use prost::Message;

use crate::model::{Graph, Normalization};
use crate::qnet::QNetwork;
use crate::{Error, Result};

/// Reads and imports the ONNX model at `path`.
pub fn load_onnx(path: &Path) -> Result<Graph> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    import_onnx(&bytes, &path.display().to_string())
}

/// Imports an ONNX model from its serialized bytes; `origin` (a path or other label)
/// names the model in decode errors.
pub fn import_onnx(bytes: &[u8], origin: &str) -> Result<Graph> {
    let model = proto::ModelProto::decode(bytes).map_err(|e| Error::OnnxDecode {
        path: origin.to_string(),
        reason: e.to_string(),
    })?;
    lower::lower(&model, origin)
}

/// Reads the ONNX model at `path` as an integer network when it is quantized (QDQ form, as
/// `coordinator export` writes it; see [`qdq`]), or `None` when it is a float model for
/// [`load_onnx`]. `norm` is the input normalisation to use when the file records none.
pub fn load_quantized(path: &Path, norm: Option<&Normalization>) -> Result<Option<QNetwork>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let origin = path.display().to_string();
    let model = proto::ModelProto::decode(bytes.as_slice()).map_err(|e| Error::OnnxDecode {
        path: origin.clone(),
        reason: e.to_string(),
    })?;
    if !qdq::is_qdq(&model) {
        return Ok(None);
    }
    qdq::import_qdq(&model, &origin, norm).map(Some)
}
