//! [`QNetwork`] -> plain arrays in one JSON document (`ccq-integer-arrays`, version 1).
//!
//! This is the integer network with nothing left to derive: an integer-only runtime (a
//! microcontroller, a code generator) reads the input lookup table, then runs the nodes in
//! order with the formulas of docs/EXPORT.md. Layouts are ccq's own: activations NHWC (HWC
//! per image), weights OHWI, so a fully connected layer after a Flatten reads its input in
//! HWC order — its columns are already permuted for that.
//!
//! Arrays are JSON number lists; the largest networks ccq trains (ResNet-20, 270k
//! weights) give a file of about 1.5 MB, which keeps the format one self-contained file.

use serde::Serialize;

use crate::kernels::Requant;
use crate::qnet::{QNetwork, QOp, QValue};

const FORMAT: &str = "ccq-integer-arrays";
const VERSION: u32 = 1;

#[derive(Serialize)]
struct File<'a> {
    format: &'static str,
    version: u32,
    precision: String,
    weight_bits: u8,
    act_bits: u8,
    input: Input<'a>,
    /// Indexed by value id: 0 is the input codes, `i >= 1` the output of `nodes[i - 1]`.
    values: Vec<Value>,
    nodes: Vec<Node<'a>>,
    logits: Logits,
}

#[derive(Serialize)]
struct Input<'a> {
    /// `[C, H, W]` of the raw u8 image (CHW planar, as datasets store it).
    shape: [usize; 3],
    mean: &'a [f32],
    std: &'a [f32],
    /// Per channel, 256 codes: `code = lut[c][pixel]`.
    lut: Vec<&'a [u8]>,
}

#[derive(Serialize)]
struct Value {
    id: usize,
    /// `[H, W, C]`: the NHWC layout of the value's codes.
    shape: [usize; 3],
    scale: f64,
    zero_point: u8,
}

#[derive(Serialize)]
struct Multipliers {
    multiplier: Vec<i32>,
    shift: Vec<u8>,
}

impl Multipliers {
    fn new(r: &[Requant]) -> Multipliers {
        Multipliers {
            multiplier: r.iter().map(|r| r.multiplier).collect(),
            shift: r.iter().map(|r| r.shift).collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Node<'a> {
    Conv {
        name: &'a str,
        input: usize,
        output: usize,
        in_channels: usize,
        out_channels: usize,
        /// Output channel `oc` reads input channels `oc / (out_channels / groups) *
        /// (in_channels / groups)` onwards, `in_channels / groups` of them.
        groups: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        /// `[top, left, bottom, right]`; padded cells hold the input zero point.
        pads: [usize; 4],
        weight_bits: u8,
        /// OHWI, `out_channels * kh * kw * (in_channels / groups)` codes.
        weights: &'a [i8],
        /// Per output channel, at scale `input scale * weight_scale[oc]`.
        bias: &'a [i32],
        input_zero_point: u8,
        /// Informational: the real weight of code `w` is `w * weight_scale[oc]`.
        weight_scale: &'a [f64],
        /// `None` for the logits layer (see `logits`).
        requant: Option<Multipliers>,
        output_zero_point: i32,
        clamp_min: u8,
        clamp_max: u8,
    },
    Add {
        name: &'a str,
        inputs: [usize; 2],
        output: usize,
        a_zero_point: i32,
        a_multiplier: i32,
        b_zero_point: i32,
        b_multiplier: i32,
        shift: u8,
        output_zero_point: i32,
        clamp_min: u8,
        clamp_max: u8,
    },
    MaxPool {
        name: &'a str,
        input: usize,
        output: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
    },
    AvgPool {
        name: &'a str,
        input: usize,
        output: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
        count_include_pad: bool,
    },
    GlobalAvgPool {
        name: &'a str,
        input: usize,
        output: usize,
    },
    Slice {
        name: &'a str,
        input: usize,
        output: usize,
        /// `[C, H, W]` axis order.
        start: [usize; 3],
        step: [usize; 3],
    },
    Pad {
        name: &'a str,
        input: usize,
        output: usize,
        /// `[C, H, W]` axis order; the rest of the output is padding after.
        before: [usize; 3],
    },
    Flatten {
        name: &'a str,
        input: usize,
        output: usize,
    },
    Clamp {
        name: &'a str,
        input: usize,
        output: usize,
        min: u8,
        max: u8,
    },
    /// `out = table[x]`; `function` says what the table holds (for people).
    Lookup {
        name: &'a str,
        input: usize,
        output: usize,
        function: &'static str,
        table: &'a [u8],
    },
    /// The second input has the first's shape or is `[1, 1, C]` (broadcast per pixel).
    Mul {
        name: &'a str,
        inputs: [usize; 2],
        output: usize,
        a_zero_point: i32,
        b_zero_point: i32,
        multiplier: i32,
        shift: u8,
        output_zero_point: i32,
        clamp_min: u8,
        clamp_max: u8,
    },
    /// Along channels; input `k`'s codes go through `tables[k]` first.
    Concat {
        name: &'a str,
        inputs: &'a [usize],
        output: usize,
        tables: Vec<&'a [u8]>,
    },
}

#[derive(Serialize)]
struct Logits {
    /// The value id whose "codes" are the i32 logits (the last node's output).
    value: usize,
    classes: usize,
    /// Per class: accumulator -> logit at the common scale.
    requant: Multipliers,
    /// Real logit = `logit * scale`.
    scale: f64,
}

fn shape(v: &QValue) -> [usize; 3] {
    [v.h, v.w, v.c]
}

/// The JSON document for `net`.
pub fn to_json(net: &QNetwork) -> Vec<u8> {
    let iv = net.input_value;
    let mut values = vec![Value {
        id: 0,
        shape: shape(&iv),
        scale: iv.scale,
        zero_point: iv.zp,
    }];
    // Weight scales as the network runs them (with its searched channel scales, if any).
    let weight_scales: Vec<Vec<f64>> = (net.nodes.iter())
        .map(|n| match &n.op {
            QOp::Conv(c) => c.weight_scales(),
            _ => Vec::new(),
        })
        .collect();
    let mut nodes = Vec::with_capacity(net.nodes.len());
    for (i, n) in net.nodes.iter().enumerate() {
        let (name, input, output) = (n.name.as_str(), n.inputs[0], i + 1);
        values.push(Value {
            id: output,
            shape: shape(&n.out),
            scale: n.out.scale,
            zero_point: n.out.zp,
        });
        nodes.push(match &n.op {
            QOp::Conv(c) => {
                let g = c.geom;
                let (requant, output_zero_point, clamp_min, clamp_max) = match &c.stage {
                    Some(s) => (Some(Multipliers::new(&s.requant)), s.out_zp, s.min, s.max),
                    None => (None, 0, 0, 0),
                };
                Node::Conv {
                    name,
                    input,
                    output,
                    in_channels: g.in_c,
                    out_channels: g.out_c,
                    groups: g.groups,
                    kernel: [g.k_h, g.k_w],
                    stride: [g.stride_h, g.stride_w],
                    dilation: [g.dil_h, g.dil_w],
                    pads: [g.pad_t, g.pad_l, g.pad_b, g.pad_r],
                    weight_bits: c.weight_bits,
                    weights: &c.codes,
                    bias: &c.bias,
                    input_zero_point: c.input_zp,
                    weight_scale: &weight_scales[i],
                    requant,
                    output_zero_point,
                    clamp_min,
                    clamp_max,
                }
            }
            QOp::Add(p) => Node::Add {
                name,
                inputs: [n.inputs[0], n.inputs[1]],
                output,
                a_zero_point: p.a_zp,
                a_multiplier: p.a_mult,
                b_zero_point: p.b_zp,
                b_multiplier: p.b_mult,
                shift: p.shift,
                output_zero_point: p.out_zp,
                clamp_min: p.min,
                clamp_max: p.max,
            },
            QOp::MaxPool(g) => Node::MaxPool {
                name,
                input,
                output,
                kernel: [g.k_h, g.k_w],
                stride: [g.stride_h, g.stride_w],
                pads: [g.pad_t, g.pad_l, g.pad_b, g.pad_r],
            },
            QOp::AvgPool {
                geom: g,
                count_include_pad,
            } => Node::AvgPool {
                name,
                input,
                output,
                kernel: [g.k_h, g.k_w],
                stride: [g.stride_h, g.stride_w],
                pads: [g.pad_t, g.pad_l, g.pad_b, g.pad_r],
                count_include_pad: *count_include_pad,
            },
            QOp::GlobalAvgPool => Node::GlobalAvgPool {
                name,
                input,
                output,
            },
            QOp::Slice { start, step } => Node::Slice {
                name,
                input,
                output,
                start: *start,
                step: *step,
            },
            QOp::Pad { before } => Node::Pad {
                name,
                input,
                output,
                before: *before,
            },
            QOp::Flatten => Node::Flatten {
                name,
                input,
                output,
            },
            QOp::Clamp { min, max } => Node::Clamp {
                name,
                input,
                output,
                min: *min,
                max: *max,
            },
            QOp::Lut { func, table } => Node::Lookup {
                name,
                input,
                output,
                function: func.name(),
                table,
            },
            QOp::Mul(p) => Node::Mul {
                name,
                inputs: [n.inputs[0], n.inputs[1]],
                output,
                a_zero_point: p.a_zp,
                b_zero_point: p.b_zp,
                multiplier: p.requant.multiplier,
                shift: p.requant.shift,
                output_zero_point: p.out_zp,
                clamp_min: p.min,
                clamp_max: p.max,
            },
            QOp::Concat { tables } => Node::Concat {
                name,
                inputs: &n.inputs,
                output,
                tables: tables.iter().map(Vec::as_slice).collect(),
            },
        });
    }
    let file = File {
        format: FORMAT,
        version: VERSION,
        precision: net.precision(),
        weight_bits: net.weight_bits,
        act_bits: net.act_bits,
        input: Input {
            shape: [iv.c, iv.h, iv.w],
            mean: &net.input.mean,
            std: &net.input.std,
            lut: net.input.lut.chunks(256).collect(),
        },
        values,
        nodes,
        logits: Logits {
            value: net.nodes.len(),
            classes: net.num_classes,
            requant: Multipliers::new(&net.logit_requant),
            scale: net.logit_scale,
        },
    };
    serde_json::to_vec(&file).expect("plain data always serialises")
}
