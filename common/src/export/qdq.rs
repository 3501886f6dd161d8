//! [`QNetwork`] -> ONNX in QDQ form (opset [`ONNX_OPSET`], or the next when a HardSwish
//! needs it).
//!
//! Every activation value of the integer network becomes a QuantizeLinear ->
//! DequantizeLinear pair with the value's scale and u8 zero point, applied to the float
//! result of the op that computes it (after a Clip when the integer engine clamps to less
//! than the full u8 range: fused ReLUs, fewer than 8 activation bits). Layers read their
//! weights as int8 codes through a per-output-channel DequantizeLinear (`axis` 0, zero
//! point 0) and their biases as int32 through a DequantizeLinear at scale
//! `s_in * w_scale[oc]`, so the codes and biases in the file are exactly ccq's. The graph
//! input is the normalised float image, quantized like ccq's input lookup table; the
//! output is the last layer's float result rounded to ccq's logit scale (Div, Round, Mul),
//! i.e. ccq's integer logits in real units.
//!
//! Layout goes back to ONNX's NCHW: weights OHWI -> OIHW, and the columns of a fully
//! connected layer that reads a flattened feature map from ccq's HWC order back to CHW.
//!
//! Tensor names follow the ccq node names: `{node}` is the dequantized output (the
//! quantized input is `input_quant`),
//! `{node}.codes` its u8 codes, `{node}.weight` / `{node}.bias` a layer's dequantized
//! parameters with `.codes`, `.scale` and `.zero_point` initializers beside them.

use std::collections::HashSet;

use prost::Message;

use super::ONNX_OPSET;
use crate::model::Unary;
use crate::onnx::proto::{
    tensor_shape_proto::{dimension, Dimension},
    type_proto, AttributeProto, AttributeType, DataType, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use crate::qnet::{QConv, QNetwork, QNode, QOp, QValue};
use crate::{Error, Result};

/// An exported QDQ model.
#[derive(Debug, Clone)]
pub struct QdqExport {
    /// The serialized `ModelProto`.
    pub bytes: Vec<u8>,
    /// Input lookup-table entries (channel, pixel value) for which ONNX's QuantizeLinear
    /// on the normalised pixel (f32, round half to even) gives another code than ccq's
    /// table: inputs on which the exported model and ccq start one code apart.
    pub input_mismatches: usize,
}

/// ONNX QuantizeLinear to uint8: `saturate(round_half_even(x / scale) + zp)` in f32, as
/// the specification (and ONNX Runtime) computes it.
pub fn onnx_quantize(x: f32, scale: f32, zp: u8) -> u8 {
    let q = (x / scale).round_ties_even() + f32::from(zp);
    if q.is_nan() {
        zp
    } else {
        q.clamp(0.0, 255.0) as u8
    }
}

/// Metadata keys of the exported model (`ModelProto.metadata_props`).
pub(crate) mod keys {
    pub const FORMAT: &str = "ccq.format";
    pub const MEAN: &str = "ccq.mean";
    pub const STD: &str = "ccq.std";
    pub const WEIGHT_BITS: &str = "ccq.weight_bits";
    pub const ACT_BITS: &str = "ccq.act_bits";
    /// Per weight layer, comma separated; only written when the layers' bits differ from
    /// `ccq.weight_bits` (mixed precision, `first_last_bits`).
    pub const LAYER_WEIGHT_BITS: &str = "ccq.layer_weight_bits";
}

/// Exports `net` as a QDQ ONNX model.
pub fn to_onnx_qdq(net: &QNetwork) -> Result<QdqExport> {
    let mut b = Builder::default();
    let labels = node_labels(&net.nodes);

    // The input: normalised float in, quantized like ccq's lookup table.
    let iv = net.input_value;
    let input = "input".to_string();
    let mut vals = vec![Val {
        name: b.quantize("input_quant", input.clone(), &iv, None),
        rank: 4,
        hwc: None,
    }];

    let last = net.nodes.len() - 1;
    let mut output = String::new();
    for (i, node) in net.nodes.iter().enumerate() {
        let label = &labels[i];
        let src = &vals[node.inputs[0]];
        let src_q = net.value(node.inputs[0]);
        let spatial = |what: &str| -> Result<()> {
            if src.rank == 4 {
                Ok(())
            } else {
                Err(Error::InvalidModel {
                    node: node.name.clone(),
                    reason: format!("{what} of a flattened value cannot be written as ONNX"),
                })
            }
        };
        let mut rank = src.rank;
        let mut hwc = src.hwc;
        let name = match &node.op {
            QOp::Conv(c) => {
                if i == last {
                    let real = b.layer(label, c, src, &src_q, node, &real(label))?;
                    output = b.logits(label, real, net.logit_scale, src.rank);
                    break;
                }
                let real = b.layer(label, c, src, &src_q, node, &real(label))?;
                rank = src.rank;
                hwc = None;
                let stage = c
                    .stage
                    .as_ref()
                    .expect("hidden layers have an output stage");
                b.quantize(label, real, &node.out, Some((stage.min, stage.max)))
            }
            QOp::Add(p) => {
                let other = &vals[node.inputs[1]];
                if other.rank != src.rank || other.hwc != src.hwc {
                    return Err(Error::InvalidModel {
                        node: node.name.clone(),
                        reason: "adds a flattened value to an unflattened one".into(),
                    });
                }
                let real = b.node(
                    "Add",
                    label,
                    &[&src.name, &other.name],
                    &format!("{label}.real"),
                    vec![],
                );
                b.quantize(label, real, &node.out, Some((p.min, p.max)))
            }
            QOp::MaxPool(g) => {
                spatial("MaxPool")?;
                let attrs = vec![
                    ints("kernel_shape", &[g.k_h, g.k_w]),
                    ints("strides", &[g.stride_h, g.stride_w]),
                    ints("pads", &[g.pad_t, g.pad_l, g.pad_b, g.pad_r]),
                ];
                let real = b.node("MaxPool", label, &[&src.name], &real(label), attrs);
                b.quantize(label, real, &node.out, None)
            }
            QOp::AvgPool {
                geom: g,
                count_include_pad,
            } => {
                spatial("AveragePool")?;
                let attrs = vec![
                    ints("kernel_shape", &[g.k_h, g.k_w]),
                    ints("strides", &[g.stride_h, g.stride_w]),
                    ints("pads", &[g.pad_t, g.pad_l, g.pad_b, g.pad_r]),
                    int("count_include_pad", i64::from(*count_include_pad)),
                ];
                let real = b.node("AveragePool", label, &[&src.name], &real(label), attrs);
                b.quantize(label, real, &node.out, None)
            }
            QOp::GlobalAvgPool => {
                spatial("GlobalAveragePool")?;
                let real = b.node(
                    "GlobalAveragePool",
                    label,
                    &[&src.name],
                    &real(label),
                    vec![],
                );
                b.quantize(label, real, &node.out, None)
            }
            QOp::Slice { start, step } => {
                spatial("Slice")?;
                let out = [node.out.c, node.out.h, node.out.w];
                // The last index taken plus one: exact, whatever the input's size.
                let ends: Vec<usize> = (0..3)
                    .map(|a| start[a] + (out[a].max(1) - 1) * step[a] + 1)
                    .collect();
                let starts = b.i64s(&format!("{label}.starts"), &[3], start);
                let ends = b.i64s(&format!("{label}.ends"), &[3], &ends);
                let axes = b.i64s(&format!("{label}.axes"), &[3], &[1, 2, 3]);
                let steps = b.i64s(&format!("{label}.steps"), &[3], step);
                let real = b.node(
                    "Slice",
                    label,
                    &[&src.name, &starts, &ends, &axes, &steps],
                    &real(label),
                    vec![],
                );
                b.quantize(label, real, &node.out, None)
            }
            QOp::Pad { before } => {
                spatial("Pad")?;
                let (s, d) = (src_q, node.out);
                let after = [
                    d.c - s.c - before[0],
                    d.h - s.h - before[1],
                    d.w - s.w - before[2],
                ];
                let pads = b.i64s(
                    &format!("{label}.pads"),
                    &[8],
                    &[
                        0, before[0], before[1], before[2], 0, after[0], after[1], after[2],
                    ],
                );
                // The padding value 0.0 is the zero point's real value, as in ccq.
                let real = b.node("Pad", label, &[&src.name, &pads], &real(label), vec![]);
                b.quantize(label, real, &node.out, None)
            }
            QOp::Flatten => {
                if src.rank == 4 {
                    rank = 2;
                    hwc = (src_q.h * src_q.w > 1).then_some([src_q.h, src_q.w, src_q.c]);
                }
                let real = b.node(
                    "Flatten",
                    label,
                    &[&src.name],
                    &real(label),
                    vec![int("axis", 1)],
                );
                b.quantize(label, real, &node.out, None)
            }
            QOp::Clamp { min, max } => {
                b.quantize(label, src.name.clone(), &node.out, Some((*min, *max)))
            }
            // ONNX Runtime evaluates the function in float between the QDQ pairs; ccq
            // tabulated it in f64, so a value on a rounding boundary may land one code
            // apart.
            QOp::Lut { func, .. } => {
                let x = [src.name.as_str()];
                let real = match *func {
                    Unary::Silu => {
                        let sig = format!("{label}.sigmoid");
                        let s = b.node("Sigmoid", &sig, &x, &sig, vec![]);
                        b.node("Mul", label, &[&src.name, &s], &real(label), vec![])
                    }
                    Unary::HardSigmoid { alpha, beta } => {
                        let attrs = vec![float("alpha", alpha), float("beta", beta)];
                        b.node("HardSigmoid", label, &x, &real(label), attrs)
                    }
                    Unary::LeakyRelu { alpha } => {
                        let attrs = vec![float("alpha", alpha)];
                        b.node("LeakyRelu", label, &x, &real(label), attrs)
                    }
                    f => b.node(f.name(), label, &x, &real(label), vec![]),
                };
                b.quantize(label, real, &node.out, None)
            }
            QOp::Mul(p) => {
                let other = &vals[node.inputs[1]];
                if other.rank != src.rank {
                    return Err(Error::InvalidModel {
                        node: node.name.clone(),
                        reason: "multiplies a flattened value by an unflattened one".into(),
                    });
                }
                // The `[N, C, 1, 1]` operand broadcasts over H and W as in ccq.
                let real = b.node(
                    "Mul",
                    label,
                    &[&src.name, &other.name],
                    &real(label),
                    vec![],
                );
                b.quantize(label, real, &node.out, Some((p.min, p.max)))
            }
            QOp::Concat { .. } => {
                let names: Vec<&str> = node.inputs.iter().map(|&v| vals[v].name.as_str()).collect();
                if node.inputs.iter().any(|&v| vals[v].rank != src.rank) {
                    return Err(Error::InvalidModel {
                        node: node.name.clone(),
                        reason: "concatenates flattened and unflattened values".into(),
                    });
                }
                let real = b.node("Concat", label, &names, &real(label), vec![int("axis", 1)]);
                b.quantize(label, real, &node.out, None)
            }
        };
        vals.push(Val { name, rank, hwc });
    }
    debug_assert_eq!(output, "logits");

    let ishape = [iv.c, iv.h, iv.w];
    let mut graph = b.graph;
    graph.name = format!("ccq_{}", net.precision());
    graph.doc_string = format!(
        "ccq integer network ({}) in QDQ form. Input: float NCHW, (pixel / 255 - mean) / std \
         per channel with mean {:?} and std {:?}. Output: class logits.",
        net.precision(),
        net.input.mean,
        net.input.std
    );
    graph
        .input
        .push(value_info(&input, DataType::Float, &ishape));
    graph
        .output
        .push(value_info("logits", DataType::Float, &[net.num_classes]));

    let join = |v: &[f32]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let layer_bits = net.layer_bits();
    let mut meta = vec![
        (keys::FORMAT, "onnx-qdq".to_string()),
        (keys::MEAN, join(&net.input.mean)),
        (keys::STD, join(&net.input.std)),
        (keys::WEIGHT_BITS, net.weight_bits.to_string()),
        (keys::ACT_BITS, net.act_bits.to_string()),
    ];
    if layer_bits.iter().any(|&b| b != net.weight_bits) {
        let list: Vec<String> = layer_bits.iter().map(u8::to_string).collect();
        meta.push((keys::LAYER_WEIGHT_BITS, list.join(",")));
    }
    // HardSwish entered ONNX in opset 14 (IR version 7 reads both).
    let hard_swish = net.nodes.iter().any(|n| {
        matches!(
            n.op,
            QOp::Lut {
                func: Unary::HardSwish,
                ..
            }
        )
    });
    let model = ModelProto {
        // IR version 7 is the one that goes with opset 13.
        ir_version: 7,
        producer_name: "ccq".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: if hard_swish {
                ONNX_OPSET + 1
            } else {
                ONNX_OPSET
            },
        }],
        metadata_props: meta
            .into_iter()
            .map(|(key, value)| StringStringEntryProto {
                key: key.into(),
                value,
            })
            .collect(),
        ..Default::default()
    };
    Ok(QdqExport {
        bytes: model.encode_to_vec(),
        input_mismatches: input_mismatches(net),
    })
}

/// One exported activation value.
#[derive(Debug, Clone)]
struct Val {
    /// Name of its dequantized float tensor.
    name: String,
    /// ONNX rank: 4 (`[N, C, H, W]`) or 2 (`[N, F]`, after a Flatten or a Gemm).
    rank: usize,
    /// For a value flattened from a `[C, H, W]` map with `H * W > 1`: `[H, W, C]`. ccq
    /// orders its features HWC, ONNX's Flatten CHW; a Gemm reading it must permute.
    hwc: Option<[usize; 3]>,
}

fn real(label: &str) -> String {
    format!("{label}.real")
}

/// Unique, non-empty labels for the nodes (ONNX tensor names must be unique).
fn node_labels(nodes: &[QNode]) -> Vec<String> {
    let mut seen: HashSet<String> = ["input", "input_quant", "logits"].map(String::from).into();
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut label = if n.name.is_empty() {
                format!("node{i}")
            } else {
                n.name.clone()
            };
            if seen.contains(&label) {
                label = format!("{label}#{i}");
            }
            seen.insert(label.clone());
            label
        })
        .collect()
}

fn input_mismatches(net: &QNetwork) -> usize {
    let iv = net.input_value;
    let (scale, zp) = (iv.scale as f32, iv.zp);
    let mut count = 0;
    for c in 0..iv.c {
        for p in 0..=255u8 {
            let x = (f32::from(p) / 255.0 - net.input.mean[c]) / net.input.std[c];
            if onnx_quantize(x, scale, zp) != net.input.lut[c * 256 + p as usize] {
                count += 1;
            }
        }
    }
    count
}

#[derive(Default)]
struct Builder {
    graph: GraphProto,
}

impl Builder {
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<AttributeProto>,
    ) -> String {
        let suffix = match op {
            "QuantizeLinear" => "/quantize",
            "DequantizeLinear" => "/dequantize",
            "Clip" => "/clip",
            _ => "",
        };
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: format!("{name}{suffix}"),
            op_type: op.to_string(),
            attribute,
            ..Default::default()
        });
        output.to_string()
    }

    fn tensor(&mut self, name: &str, dtype: DataType, dims: &[usize], raw_data: Vec<u8>) -> String {
        self.graph.initializer.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dtype as i32,
            name: name.to_string(),
            raw_data,
            ..Default::default()
        });
        name.to_string()
    }

    fn f32s(&mut self, name: &str, dims: &[usize], v: &[f32]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, DataType::Float, dims, raw)
    }

    fn i32s(&mut self, name: &str, dims: &[usize], v: &[i32]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, DataType::Int32, dims, raw)
    }

    fn i64s(&mut self, name: &str, dims: &[usize], v: &[usize]) -> String {
        let raw = v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
        self.tensor(name, DataType::Int64, dims, raw)
    }

    /// `x` (float) -> [Clip] -> QuantizeLinear -> DequantizeLinear with the scale and zero
    /// point of `q`; the Clip when `clamp` (codes) is narrower than `[0, 255]`. Returns
    /// the dequantized tensor's name, which is `label`.
    fn quantize(&mut self, label: &str, x: String, q: &QValue, clamp: Option<(u8, u8)>) -> String {
        let scale = self.f32s(&format!("{label}.scale"), &[], &[q.scale as f32]);
        let zp = self.tensor(
            &format!("{label}.zero_point"),
            DataType::Uint8,
            &[],
            vec![q.zp],
        );
        let x = match clamp {
            Some((min, max)) if min > 0 || max < 255 => {
                // Clip bounds are exact code boundaries, so QuantizeLinear lands on the
                // clamped code itself.
                let real = |code: u8| ((f64::from(code) - f64::from(q.zp)) * q.scale) as f32;
                let lo = self.f32s(&format!("{label}.min"), &[], &[real(min)]);
                let hi = self.f32s(&format!("{label}.max"), &[], &[real(max)]);
                self.node(
                    "Clip",
                    label,
                    &[&x, &lo, &hi],
                    &format!("{label}.clip"),
                    vec![],
                )
            }
            _ => x,
        };
        let codes = self.node(
            "QuantizeLinear",
            label,
            &[&x, &scale, &zp],
            &format!("{label}.codes"),
            vec![],
        );
        self.node(
            "DequantizeLinear",
            label,
            &[&codes, &scale, &zp],
            label,
            vec![],
        )
    }

    /// The graph output from the last layer's float result: ccq's integer logits
    /// (`round(y / logit_scale)`, at the common scale the engine rounds every class to)
    /// times `logit_scale`, flattened to `[N, K]` from a Conv's `[N, K, 1, 1]`. Rounding
    /// as the engine does keeps its ties (equal logits, first class wins) in the file.
    fn logits(&mut self, label: &str, real: String, logit_scale: f64, rank: usize) -> String {
        let step = self.f32s(&format!("{label}.logit_scale"), &[], &[logit_scale as f32]);
        let steps = self.node(
            "Div",
            &format!("{label}/logit_steps"),
            &[&real, &step],
            &format!("{label}.logit_steps"),
            vec![],
        );
        let rounded = self.node(
            "Round",
            &format!("{label}/round"),
            &[&steps],
            &format!("{label}.logits_int"),
            vec![],
        );
        let flat = if rank == 4 {
            format!("{label}.logits")
        } else {
            "logits".to_string()
        };
        let scaled = self.node(
            "Mul",
            &format!("{label}/logit_scale"),
            &[&rounded, &step],
            &flat,
            vec![],
        );
        if rank == 4 {
            let flatten = format!("{label}/flatten");
            self.node(
                "Flatten",
                &flatten,
                &[&scaled],
                "logits",
                vec![int("axis", 1)],
            )
        } else {
            scaled
        }
    }

    /// A Conv (4-D input) or Gemm (2-D input) with dequantized int8 weights and int32
    /// bias, writing its float result to `output`.
    fn layer(
        &mut self,
        label: &str,
        c: &QConv,
        src: &Val,
        src_q: &QValue,
        node: &QNode,
        output: &str,
    ) -> Result<String> {
        let g = c.geom;
        let (o, k) = (g.out_c, g.k_len());
        let (dims, codes): (Vec<usize>, Vec<i8>) = if src.rank == 4 {
            // OHWI -> OIHW, I being the input channels per group.
            let ipg = g.in_per_group();
            let mut w = vec![0i8; c.codes.len()];
            for oc in 0..o {
                for y in 0..g.k_h {
                    for x in 0..g.k_w {
                        for ic in 0..ipg {
                            w[((oc * ipg + ic) * g.k_h + y) * g.k_w + x] =
                                c.codes[((oc * g.k_h + y) * g.k_w + x) * ipg + ic];
                        }
                    }
                }
            }
            (vec![o, ipg, g.k_h, g.k_w], w)
        } else if (g.in_h, g.in_w, g.k_h, g.k_w) == (1, 1, 1, 1) {
            let w = match src.hwc {
                // ccq column p * C + ch  ->  ONNX column ch * H * W + p.
                Some([h, w, ch]) => {
                    let hw = h * w;
                    let mut out = vec![0i8; c.codes.len()];
                    for oc in 0..o {
                        for p in 0..hw {
                            for ci in 0..ch {
                                out[oc * k + ci * hw + p] = c.codes[oc * k + p * ch + ci];
                            }
                        }
                    }
                    out
                }
                None => c.codes.clone(),
            };
            (vec![o, k], w)
        } else {
            return Err(Error::InvalidModel {
                node: node.name.clone(),
                reason: "a convolution over a flattened value cannot be written as ONNX".into(),
            });
        };
        let axis0 = || vec![int("axis", 0)];
        let w_codes = self.tensor(
            &format!("{label}.weight.codes"),
            DataType::Int8,
            &dims,
            codes.iter().map(|&x| x as u8).collect(),
        );
        // As the network runs them: with its searched channel scales, if any; the bias
        // codes are at `s_in` times these.
        let run_scales = c.weight_scales();
        let w_scales: Vec<f32> = run_scales.iter().map(|&s| s as f32).collect();
        let w_scale = self.f32s(&format!("{label}.weight.scale"), &[o], &w_scales);
        let w_zp = self.tensor(
            &format!("{label}.weight.zero_point"),
            DataType::Int8,
            &[o],
            vec![0; o],
        );
        let weight = self.node(
            "DequantizeLinear",
            &format!("{label}.weight"),
            &[&w_codes, &w_scale, &w_zp],
            &format!("{label}.weight"),
            axis0(),
        );
        let b_codes = self.i32s(&format!("{label}.bias.codes"), &[o], &c.bias);
        let b_scales: Vec<f32> = (run_scales.iter())
            .map(|&s| (src_q.scale * s) as f32)
            .collect();
        let b_scale = self.f32s(&format!("{label}.bias.scale"), &[o], &b_scales);
        let b_zp = self.i32s(&format!("{label}.bias.zero_point"), &[o], &vec![0; o]);
        let bias = self.node(
            "DequantizeLinear",
            &format!("{label}.bias"),
            &[&b_codes, &b_scale, &b_zp],
            &format!("{label}.bias"),
            axis0(),
        );
        let inputs = [src.name.as_str(), weight.as_str(), bias.as_str()];
        Ok(if src.rank == 4 {
            let attrs = vec![
                ints("kernel_shape", &[g.k_h, g.k_w]),
                ints("strides", &[g.stride_h, g.stride_w]),
                ints("dilations", &[g.dil_h, g.dil_w]),
                ints("pads", &[g.pad_t, g.pad_l, g.pad_b, g.pad_r]),
                int("group", g.groups as i64),
            ];
            self.node("Conv", label, &inputs, output, attrs)
        } else {
            self.node("Gemm", label, &inputs, output, vec![int("transB", 1)])
        })
    }
}

fn float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f,
        r#type: AttributeType::Float as i32,
        ..Default::default()
    }
}

fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i,
        r#type: AttributeType::Int as i32,
        ..Default::default()
    }
}

fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.iter().map(|&x| x as i64).collect(),
        r#type: AttributeType::Ints as i32,
        ..Default::default()
    }
}

/// `[N, dims...]` with a symbolic batch dimension.
fn value_info(name: &str, dtype: DataType, dims: &[usize]) -> ValueInfoProto {
    let mut dim = vec![Dimension {
        value: Some(dimension::Value::DimParam("N".into())),
        denotation: String::new(),
    }];
    dim.extend(dims.iter().map(|&d| Dimension {
        value: Some(dimension::Value::DimValue(d as i64)),
        denotation: String::new(),
    }));
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(type_proto::Tensor {
                elem_type: dtype as i32,
                shape: Some(TensorShapeProto { dim }),
            }),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}
