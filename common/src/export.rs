//! Exporting an integer network ([`QNetwork`]) out of ccq, for deployment elsewhere.
//!
//! Formats ([`Format`]; docs/EXPORT.md documents each one field by field):
//! - [`Format::OnnxQdq`]: float ONNX with QuantizeLinear/DequantizeLinear pairs carrying
//!   ccq's exact scales, zero points, weight codes and integer biases. It takes the
//!   normalised float input the original model took, so it drops in where that model was;
//!   ONNX Runtime fuses the pairs into integer kernels. [`crate::onnx::load_quantized`]
//!   reads such a file back into a `QNetwork` (the round trip `coordinator eval` offers).
//! - [`Format::Json`]: the integer network as plain arrays in one JSON file: per layer the
//!   weight codes, i32 biases, fixed-point requantization multipliers and shifts, zero
//!   points and clamps — everything an integer-only runtime needs, nothing it must derive.
//!
//! [`reference_npz`] writes ccq's own logits on a dataset next to the images, so that
//! `scripts/check_export.py` can compare another runtime's results with ccq's engine.
//!
//! All of it is written from the `QNetwork` alone; a conversion never changes a code.

mod arrays;
mod npz;
mod qdq;

use std::str::FromStr;

use crate::data::Dataset;
use crate::qnet::{Activations, QNetwork};
use crate::{Error, Result};

pub use arrays::to_json;
pub use qdq::{onnx_quantize, to_onnx_qdq, QdqExport};

/// Opset of the exported ONNX models: the first with per-channel QuantizeLinear /
/// DequantizeLinear (`axis`), which every current runtime supports.
pub const ONNX_OPSET: i64 = 13;

/// An export format, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `onnx-qdq`.
    OnnxQdq,
    /// `json`.
    Json,
}

impl Format {
    pub const NAMES: &'static str = "onnx-qdq, json";

    pub fn name(self) -> &'static str {
        match self {
            Format::OnnxQdq => "onnx-qdq",
            Format::Json => "json",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "onnx-qdq" | "onnx" | "qdq" => Ok(Format::OnnxQdq),
            "json" => Ok(Format::Json),
            _ => Err(Error::setting(
                "format",
                s,
                format!("expected one of {}", Format::NAMES),
            )),
        }
    }
}

/// The file contents of `net` in `format`.
pub fn export(net: &QNetwork, format: Format) -> Result<Vec<u8>> {
    match format {
        Format::OnnxQdq => Ok(to_onnx_qdq(net)?.bytes),
        Format::Json => Ok(to_json(net)),
    }
}

/// Real-valued logits (`logit * logit_scale`, as f32) of ccq's integer engine on every
/// image of `data`, row-major `[n, classes]`, plus the integer logits themselves.
pub fn reference_logits(net: &QNetwork, data: &Dataset) -> (Vec<f32>, Vec<i32>) {
    const BATCH: usize = 256;
    let il = data.image_len();
    let mut acts = Activations::default();
    let mut ints = Vec::with_capacity(data.len() * net.num_classes);
    let mut i = 0;
    while i < data.len() {
        let m = BATCH.min(data.len() - i);
        net.forward(&data.images[i * il..(i + m) * il], m, &mut acts);
        ints.extend_from_slice(&acts.logits);
        i += m;
    }
    let real = ints
        .iter()
        .map(|&l| (l as f64 * net.logit_scale) as f32)
        .collect();
    (real, ints)
}

/// A NumPy `.npz` archive holding `data` and ccq's answers on it, for
/// `scripts/check_export.py`:
///
/// | array          | dtype   | shape          | meaning                                      |
/// |----------------|---------|----------------|----------------------------------------------|
/// | `images`       | uint8   | `[N, C, H, W]` | raw pixels, as the dataset stores them       |
/// | `labels`       | uint8   | `[N]`          | class labels                                 |
/// | `mean`, `std`  | float32 | `[C]`          | model input = `(pixel / 255 - mean) / std`   |
/// | `logits`       | float32 | `[N, K]`       | ccq's logits in real units                   |
/// | `logits_int`   | int32   | `[N, K]`       | ccq's integer logits                         |
/// | `logit_scale`  | float64 | `[]`           | real logit = `logits_int * logit_scale`      |
pub fn reference_npz(net: &QNetwork, data: &Dataset) -> Result<Reference> {
    if (data.channels, data.height, data.width)
        != (net.input_value.c, net.input_value.h, net.input_value.w)
    {
        return Err(Error::ShapeMismatch {
            expected: format!(
                "[{}, {}, {}]",
                net.input_value.c, net.input_value.h, net.input_value.w
            ),
            found: format!("[{}, {}, {}]", data.channels, data.height, data.width),
        });
    }
    let (real, ints) = reference_logits(net, data);
    let (n, k) = (data.len(), net.num_classes);
    let mut z = npz::Writer::default();
    z.add_u8(
        "images",
        &[n, data.channels, data.height, data.width],
        &data.images,
    );
    z.add_u8("labels", &[n], &data.labels);
    z.add_f32("mean", &[net.input.mean.len()], &net.input.mean);
    z.add_f32("std", &[net.input.std.len()], &net.input.std);
    z.add_f32("logits", &[n, k], &real);
    z.add_i32("logits_int", &[n, k], &ints);
    z.add_f64("logit_scale", &[], &[net.logit_scale]);
    let correct = ints
        .chunks_exact(k.max(1))
        .zip(&data.labels)
        .filter(|(row, &label)| first_argmax(row) == label as usize)
        .count();
    Ok(Reference {
        npz: z.finish(),
        images: n,
        correct,
    })
}

/// The reference file of [`reference_npz`] and ccq's accuracy on it.
#[derive(Debug, Clone)]
pub struct Reference {
    pub npz: Vec<u8>,
    pub images: usize,
    /// Images whose arg-max logit is the label.
    pub correct: usize,
}

impl Reference {
    /// Top-1, percent.
    pub fn top1(&self) -> f64 {
        100.0 * self.correct as f64 / self.images.max(1) as f64
    }
}

/// Index of the first maximum, the arg-max ccq's accuracy uses.
fn first_argmax(row: &[i32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}
