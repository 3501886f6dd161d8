//! The typed float graph IR: what [`crate::onnx`] produces and what the float engine
//! ([`crate::float`]) and the quantizer ([`crate::quant`]) consume.
//!
//! It is deliberately small. Every value is one image's tensor of shape `[C, H, W]`
//! (feature vectors are `[F, 1, 1]`); the batch dimension is implicit. BatchNormalization
//! is folded into the preceding Conv/Linear at import time, Identity/Dropout are dropped,
//! Reshape-to-2D becomes [`Op::Flatten`], MatMul+Add becomes [`Op::Linear`].
//! Float layout is NCHW (ONNX's), so flattening is channel-major.

use serde::{Deserialize, Serialize};

/// Index of a value in a [`Graph`]: 0 is the graph input, `i >= 1` is the output of
/// `graph.nodes[i - 1]`.
pub type ValueId = usize;

/// Per-image tensor shape `[C, H, W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub fn new(c: usize, h: usize, w: usize) -> Self {
        Shape { c, h, w }
    }
    pub fn len(&self) -> usize {
        self.c * self.h * self.w
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}, {}]", self.c, self.h, self.w)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    /// ONNX name of the graph input.
    pub input_name: String,
    pub input_shape: Shape,
    /// In topological order; node `i` produces value `i + 1`.
    pub nodes: Vec<Node>,
    /// The value holding the logits (shape `[classes, 1, 1]`).
    pub output: ValueId,
}

impl Graph {
    /// Shape of any value.
    pub fn shape(&self, v: ValueId) -> Shape {
        if v == 0 {
            self.input_shape
        } else {
            self.nodes[v - 1].shape
        }
    }

    pub fn num_classes(&self) -> usize {
        self.shape(self.output).len()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The ONNX node name (or a generated one), for error messages and reports.
    pub name: String,
    pub op: Op,
    /// Values consumed; all precede this node.
    pub inputs: Vec<ValueId>,
    /// Shape of the value this node produces.
    pub shape: Shape,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Conv(Conv),
    Linear(Linear),
    Relu,
    /// Elementwise clamp to `[min, max]` (ONNX Clip, e.g. ReLU6).
    Clip {
        min: f32,
        max: f32,
    },
    /// Elementwise sum of two same-shape inputs (residual connections).
    Add,
    /// An elementwise function of one input (activations other than ReLU and Clip).
    Unary(Unary),
    /// Elementwise product of two inputs: the second has the first's shape or is
    /// `[C, 1, 1]`, broadcast over H and W (the scaling of a squeeze-excitation block).
    Mul,
    /// Concatenation along channels of inputs with equal H and W.
    Concat,
    MaxPool(Pool),
    AveragePool(Pool),
    /// Mean over H and W: `[C, H, W] -> [C, 1, 1]`.
    GlobalAveragePool,
    /// `[C, H, W] -> [C*H*W, 1, 1]`, channel-major (NCHW order).
    Flatten,
    /// Strided crop on each axis, e.g. the option-A shortcut's `x[:, :, ::2, ::2]`.
    Slice(Slice),
    /// Constant-zero padding on each axis, e.g. the option-A shortcut's channel padding.
    Pad(Pad),
}

/// The elementwise activations the integer engine runs as a 256-entry lookup table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Unary {
    Sigmoid,
    Tanh,
    /// `max(0, min(1, alpha * x + beta))` (ONNX defaults 0.2 and 0.5; PyTorch's
    /// Hardsigmoid exports 1/6 and 0.5).
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x * max(0, min(1, x / 6 + 1 / 2))`.
    HardSwish,
    /// `x` when `x >= 0`, else `alpha * x`.
    LeakyRelu {
        alpha: f32,
    },
    /// SiLU / Swish, `x * sigmoid(x)` (PyTorch exports it as Sigmoid then Mul; the importer
    /// fuses the pair).
    Silu,
}

impl Unary {
    /// The function, in f64 (the float engine rounds the result to f32; the quantizer
    /// tabulates it).
    pub fn apply(self, x: f64) -> f64 {
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        match self {
            Unary::Sigmoid => sigmoid(x),
            Unary::Tanh => x.tanh(),
            // Constant bounds, so clamp cannot panic.
            Unary::HardSigmoid { alpha, beta } => (alpha as f64 * x + beta as f64).clamp(0.0, 1.0),
            Unary::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Unary::LeakyRelu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha as f64 * x
                }
            }
            Unary::Silu => x * sigmoid(x),
        }
    }

    /// The ONNX operator name (SiLU has none: "Sigmoid+Mul").
    pub fn name(self) -> &'static str {
        match self {
            Unary::Sigmoid => "Sigmoid",
            Unary::Tanh => "Tanh",
            Unary::HardSigmoid { .. } => "HardSigmoid",
            Unary::HardSwish => "HardSwish",
            Unary::LeakyRelu { .. } => "LeakyRelu",
            Unary::Silu => "Sigmoid+Mul (SiLU)",
        }
    }
}

/// 2-D convolution with the weights in ONNX layout `[O, I/group, KH, KW]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv {
    pub out_channels: usize,
    pub in_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    pub dilation: [usize; 2],
    pub group: usize,
    /// `out_channels * (in_channels / group) * kh * kw` values.
    pub weight: Vec<f32>,
    /// One per output channel (zeros when the model had none).
    pub bias: Vec<f32>,
}

/// `y = W x + b` with `W` row-major `[out, in]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    pub out_features: usize,
    pub in_features: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    /// AveragePool only: whether padded cells count in the divisor.
    pub count_include_pad: bool,
}

/// Per-axis `(start, end, step)` over `[C, H, W]`, with `0 <= start`, `end <= dim`,
/// `step >= 1` (already normalised from ONNX's negative/clamped forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub start: [usize; 3],
    pub end: [usize; 3],
    pub step: [usize; 3],
}

/// Zero padding `before[axis]` / `after[axis]` over `[C, H, W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pad {
    pub before: [usize; 3],
    pub after: [usize; 3],
}

/// Output spatial size of a window op along one axis.
pub fn window_out(
    input: usize,
    kernel: usize,
    stride: usize,
    pad_a: usize,
    pad_b: usize,
    dilation: usize,
) -> usize {
    let span = dilation * (kernel - 1) + 1;
    let padded = input + pad_a + pad_b;
    if padded < span {
        0
    } else {
        (padded - span) / stride + 1
    }
}

/// Preprocessing that turns u8 pixels into the model's float input:
/// `(pixel / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    pub fn identity(channels: usize) -> Self {
        Normalization {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Float model input for one pixel value of channel `c`.
    pub fn apply(&self, c: usize, pixel: u8) -> f32 {
        (pixel as f32 / 255.0 - self.mean[c]) / self.std[c]
    }
}
