//! Importing a quantized ONNX model in QDQ form (QuantizeLinear / DequantizeLinear pairs
//! around float ops, as `coordinator export --format onnx-qdq` writes it) back into an
//! integer network ([`QNetwork`]).
//!
//! The model must have the structure ccq's integer engine runs, stated in ONNX:
//! - the float input goes through one QuantizeLinear (u8) and DequantizeLinear;
//! - every Conv/Gemm reads a dequantized activation, int8 weights through a
//!   DequantizeLinear with zero point 0 (per output channel or per tensor) and an optional
//!   bias (int32 through a DequantizeLinear, or float); its output, optionally through
//!   Relu/Clip, is quantized to u8 — except the last layer, whose float output (optionally
//!   rounded to a logit scale by Div, Round and Mul, and flattened) is the graph's output,
//!   the logits;
//! - Add, MaxPool, AveragePool, GlobalAveragePool, Slice, Pad (constant zero), Flatten,
//!   Relu and Clip read dequantized activations and are followed by their own
//!   QuantizeLinear/DequantizeLinear pair; all but Add and Clip/Relu must keep their
//!   input's scale and zero point, as they do in ccq.
//!
//! Requantization multipliers are recomputed from the file's f32 scales, and the input
//! lookup table follows ONNX's QuantizeLinear (round half to even), so the imported network
//! computes what the file says; it is the network that was exported up to those roundings.
//! The input normalisation comes from the model's `ccq.mean` / `ccq.std` metadata or, for
//! models written elsewhere, from the caller.

use std::collections::HashMap;

use super::node::OnnxNode;
use super::proto::{
    tensor_shape_proto::dimension, DataLocation, DataType, ModelProto, TensorProto,
};
use super::tensor::Tensor;
use crate::export::onnx_quantize;
use crate::kernels::{AddParams, ConvGeom, OutputStage, PoolGeom, Requant};
use crate::model::{window_out, Normalization};
use crate::qnet::{
    code_range, InputQuant, LayerVars, QConv, QNetwork, QNode, QOp, QValue, VarKind,
};
use crate::{Error, Result};

/// Whether the model holds any QuantizeLinear node, i.e. is meant for [`import_qdq`]
/// rather than the float importer.
pub fn is_qdq(model: &ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.op_type == "QuantizeLinear"))
}

/// Imports a QDQ model. `norm` is used when the model carries no `ccq.mean` / `ccq.std`
/// metadata; without either, the input lookup table cannot be built and this fails.
pub fn import_qdq(
    model: &ModelProto,
    origin: &str,
    norm: Option<&Normalization>,
) -> Result<QNetwork> {
    let bad_file = |reason: String| Error::OnnxDecode {
        path: origin.to_string(),
        reason,
    };
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| bad_file("the model has no graph".into()))?;
    let meta: HashMap<&str, &str> = model
        .metadata_props
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    let norm = match (meta.get("ccq.mean"), meta.get("ccq.std")) {
        (Some(m), Some(s)) => Normalization {
            mean: parse_floats(m).ok_or_else(|| bad_file(format!("metadata ccq.mean '{m}'")))?,
            std: parse_floats(s).ok_or_else(|| bad_file(format!("metadata ccq.std '{s}'")))?,
        },
        _ => norm.cloned().ok_or_else(|| {
            bad_file(
                "the quantized model records no input normalisation (ccq.mean / ccq.std \
                 metadata); give --mean and --std"
                    .into(),
            )
        })?,
    };
    let bits = |key: &str| -> Result<Option<u8>> {
        meta.get(key)
            .map(|v| {
                v.parse::<u8>()
                    .ok()
                    .filter(|b| (2..=8).contains(b))
                    .ok_or_else(|| bad_file(format!("metadata {key} = '{v}' is not 2..=8")))
            })
            .transpose()
    };
    let weight_bits = bits("ccq.weight_bits")?;
    let act_bits = bits("ccq.act_bits")?.unwrap_or(8);
    let layer_bits = meta
        .get("ccq.layer_weight_bits")
        .map(|v| {
            v.split(',')
                .map(|b| b.trim().parse::<u8>().ok().filter(|b| (2..=8).contains(b)))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| {
                    bad_file(format!(
                        "metadata ccq.layer_weight_bits = '{v}' is not a list of 2..=8"
                    ))
                })
        })
        .transpose()?;

    let graph_label = if graph.name.is_empty() {
        "(graph)".to_string()
    } else {
        graph.name.clone()
    };
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !graph.initializer.iter().any(|t| t.name == i.name))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(Error::InvalidModel {
            node: graph_label,
            reason: format!(
                "the graph has {} run-time inputs; ccq expects exactly one image input",
                inputs.len()
            ),
        });
    };
    let [output] = graph.output.as_slice() else {
        return Err(Error::InvalidModel {
            node: graph_label,
            reason: format!(
                "the graph has {} outputs; ccq expects exactly one (the logits)",
                graph.output.len()
            ),
        });
    };
    let input_dims = image_dims(input)?;
    if norm.mean.len() != input_dims[0] || norm.std.len() != input_dims[0] {
        return Err(Error::setting(
            "mean/std",
            norm.mean.len(),
            format!("the model input has {} channels", input_dims[0]),
        ));
    }
    if let Some(&s) = norm.std.iter().find(|&&s| s.is_nan() || s <= 0.0) {
        return Err(Error::setting("std", s, "must be > 0"));
    }

    let mut im = Importer {
        consts: graph
            .initializer
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect(),
        syms: HashMap::new(),
        input_name: input.name.clone(),
        input_dims,
        input_value: None,
        nodes: Vec::new(),
        values: Vec::new(),
    };
    for (index, proto) in graph.node.iter().enumerate() {
        im.node(&OnnxNode::new(proto, index))?;
    }
    im.finish(
        &output.name,
        norm,
        (weight_bits, layer_bits),
        act_bits,
        origin,
    )
}

/// An activation value as the importer tracks it.
#[derive(Debug, Clone, Copy)]
struct Act {
    id: usize,
    /// 4 (`[N, C, H, W]`) or 2 (`[N, F]`).
    rank: usize,
    /// `[H, W, C]` when flattened from a map with `H * W > 1` (ccq orders such features
    /// HWC, ONNX CHW).
    hwc: Option<[usize; 3]>,
}

/// What an ONNX tensor name stands for.
#[derive(Debug, Clone)]
enum Sym {
    /// Dequantized constant: weight codes or integer bias, with per-tensor or per-axis scale.
    ConstDq {
        dims: Vec<usize>,
        ints: Vec<i64>,
        scale: Vec<f32>,
        axis: usize,
        int32: bool,
    },
    /// u8 codes of activation `id`.
    Codes(usize),
    /// Dequantized activation.
    Act(Act),
    /// A float result waiting for its QuantizeLinear.
    Pending(Box<Pending>),
}

#[derive(Debug, Clone)]
struct Pending {
    node: String,
    op: PendingOp,
    /// Real bounds from Relu/Clip applied on the way to the QuantizeLinear.
    lo: f32,
    hi: f32,
    /// The logits layer was flattened (a 4-D Conv's `[N, K, 1, 1]` output).
    flattened: bool,
}

#[derive(Debug, Clone)]
enum PendingOp {
    Layer {
        input: Act,
        geom: ConvGeom,
        /// OHWI.
        codes: Vec<i8>,
        w_scale: Vec<f32>,
        bias: BiasInit,
    },
    Add(Act, Act),
    /// An op that keeps its input's quantization: (input, op, output `[C, H, W]`, rank, hwc).
    Keep(Act, Box<QOp>, [usize; 3], usize, Option<[usize; 3]>),
    Clamp(Act),
}

#[derive(Debug, Clone)]
enum BiasInit {
    None,
    /// int32 values with their per-channel scale.
    Int(Vec<i64>, Vec<f32>),
    Float(Vec<f32>),
}

struct Importer {
    consts: HashMap<String, TensorProto>,
    syms: HashMap<String, Sym>,
    input_name: String,
    /// `[C, H, W]`.
    input_dims: [usize; 3],
    input_value: Option<(QValue, f32)>,
    nodes: Vec<QNode>,
    /// Per value id: f32 scale as written, zero point, rank, hwc.
    values: Vec<(f32, u8, usize, Option<[usize; 3]>)>,
}

impl Importer {
    fn node(&mut self, n: &OnnxNode<'_>) -> Result<()> {
        if !(n.proto.domain.is_empty() || n.proto.domain == "ai.onnx") {
            return Err(n.unsupported(format!(
                "operators of domain '{}' are not supported in a quantized model",
                n.proto.domain
            )));
        }
        let out = n
            .proto
            .output
            .first()
            .filter(|o| !o.is_empty())
            .ok_or_else(|| n.invalid("the node has no output"))?
            .clone();
        if self.syms.contains_key(&out) || self.consts.contains_key(&out) {
            return Err(n.invalid(format!("output '{out}' is already defined")));
        }
        let sym = match n.op() {
            "Constant" => {
                let t = n.tensor("value")?.ok_or_else(|| {
                    n.unsupported("only tensor-valued Constant nodes are supported")
                })?;
                self.consts.insert(out, t.clone());
                return Ok(());
            }
            "Identity" => self.sym(n, 0)?.clone(),
            "QuantizeLinear" => self.quantize(n)?,
            "DequantizeLinear" => self.dequantize(n)?,
            "Conv" => self.conv(n)?,
            "Gemm" => self.gemm(n)?,
            "Add" => {
                let (a, b) = (self.act(n, 0)?, self.act(n, 1)?);
                if self.shape(a.id) != self.shape(b.id) || a.rank != b.rank || a.hwc != b.hwc {
                    return Err(n.invalid("the two inputs of Add have different shapes"));
                }
                pending(n, PendingOp::Add(a, b))
            }
            "Relu" | "Clip" => self.clip(n)?,
            "MaxPool" | "AveragePool" => self.pool(n)?,
            "GlobalAveragePool" => {
                let x = self.image(n, 0)?;
                let [c, _, _] = self.shape(x.id);
                pending(
                    n,
                    PendingOp::Keep(x, Box::new(QOp::GlobalAvgPool), [c, 1, 1], 4, None),
                )
            }
            "Flatten" => self.flatten(n)?,
            "Div" | "Round" | "Mul" => self.logit_rounding(n)?,
            "Slice" => self.slice(n)?,
            "Pad" => self.pad(n)?,
            other => {
                return Err(n.unsupported(format!(
                    "{other} is not supported in a quantized model; supported: QuantizeLinear, \
                     DequantizeLinear, Conv, Gemm, Add, Relu, Clip, MaxPool, AveragePool, \
                     GlobalAveragePool, Flatten, Slice, Pad, Identity, Constant, and Div, Round \
                     and Mul rounding the logits"
                )))
            }
        };
        self.syms.insert(out, sym);
        Ok(())
    }

    // ---- lookups ------------------------------------------------------------------------

    fn sym(&self, n: &OnnxNode<'_>, index: usize) -> Result<&Sym> {
        let name = n.required_input(index)?;
        self.syms.get(name).ok_or_else(|| {
            if self.consts.contains_key(name) {
                n.unsupported(format!(
                    "input '{name}' is a constant where ccq expects a quantized activation"
                ))
            } else if name == self.input_name {
                n.invalid(format!(
                    "reads the float input '{name}' directly; it must be quantized first"
                ))
            } else {
                n.invalid(format!("input '{name}' is not produced by an earlier node"))
            }
        })
    }

    /// A dequantized activation at input `index`.
    fn act(&self, n: &OnnxNode<'_>, index: usize) -> Result<Act> {
        match self.sym(n, index)? {
            Sym::Act(a) => Ok(*a),
            _ => Err(n.unsupported(format!(
                "input '{}' must be a dequantized activation (the output of a \
                 DequantizeLinear of u8 codes)",
                n.proto.input[index]
            ))),
        }
    }

    fn image(&self, n: &OnnxNode<'_>, index: usize) -> Result<Act> {
        let a = self.act(n, index)?;
        if a.rank != 4 {
            return Err(n.invalid(format!(
                "input '{}' is 2-D; {} needs [N, C, H, W]",
                n.proto.input[index],
                n.op()
            )));
        }
        Ok(a)
    }

    /// `[C, H, W]` of value `id`.
    fn shape(&self, id: usize) -> [usize; 3] {
        let v = if id == 0 {
            self.input_value.map(|(v, _)| v)
        } else {
            self.nodes.get(id - 1).map(|n| n.out)
        };
        v.map_or([0; 3], |v| [v.c, v.h, v.w])
    }

    fn qvalue(&self, id: usize) -> QValue {
        if id == 0 {
            self.input_value.expect("value 0 exists once referenced").0
        } else {
            self.nodes[id - 1].out
        }
    }

    fn constant(&self, n: &OnnxNode<'_>, index: usize, what: &str) -> Result<&TensorProto> {
        let name = n.required_input(index)?;
        self.consts.get(name).ok_or_else(|| {
            n.unsupported(format!(
                "{what} '{name}' must be a constant (an initializer or Constant node)"
            ))
        })
    }

    fn floats(&self, n: &OnnxNode<'_>, index: usize, what: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.constant(n, index, what)?;
        let tensor =
            Tensor::decode(t).map_err(|r| n.invalid(format!("{what} '{}': {r}", t.name)))?;
        let v = tensor
            .floats()
            .map_err(|r| n.invalid(format!("{what} '{}': {r}", t.name)))?
            .to_vec();
        Ok((tensor.dims, v))
    }

    fn optional_scalar(&self, n: &OnnxNode<'_>, index: usize, what: &str) -> Result<Option<f32>> {
        if n.input(index).is_none() {
            return Ok(None);
        }
        match self.floats(n, index, what)?.1.as_slice() {
            [v] => Ok(Some(*v)),
            v => Err(n.invalid(format!("{what} must be a scalar, found {} values", v.len()))),
        }
    }

    fn int_list(&self, n: &OnnxNode<'_>, index: usize, what: &str) -> Result<Option<Vec<i64>>> {
        if n.input(index).is_none() {
            return Ok(None);
        }
        let t = self.constant(n, index, what)?;
        let (_, v, _) =
            int_tensor(t).map_err(|r| n.invalid(format!("{what} '{}': {r}", t.name)))?;
        Ok(Some(v))
    }

    /// Scale (f32, one per-tensor value) and u8 zero point of a Q/DQ node on activations.
    fn act_params(&self, n: &OnnxNode<'_>) -> Result<(f32, u8)> {
        let (dims, s) = self.floats(n, 1, "scale")?;
        let [scale] = *s.as_slice() else {
            return Err(n.unsupported(format!(
                "activations need one per-tensor scale; found dims {dims:?}"
            )));
        };
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(n.invalid(format!("scale {scale} must be positive and finite")));
        }
        let zp = match n.input(2) {
            None => 0,
            Some(_) => {
                let t = self.constant(n, 2, "zero point")?;
                let (_, v, ty) = int_tensor(t)
                    .map_err(|r| n.invalid(format!("zero point '{}': {r}", t.name)))?;
                match (ty, v.as_slice()) {
                    (DataType::Uint8, [z]) => *z as u8,
                    _ => {
                        return Err(n.unsupported(
                            "activations must be uint8 with one per-tensor zero point \
                             (ccq's activation codes are u8)",
                        ))
                    }
                }
            }
        };
        Ok((scale, zp))
    }

    // ---- ops ----------------------------------------------------------------------------

    fn quantize(&mut self, n: &OnnxNode<'_>) -> Result<Sym> {
        let (scale, zp) = self.act_params(n)?;
        let x = n.required_input(0)?;
        if x == self.input_name {
            if self.input_value.is_some() {
                return Err(n.unsupported("the input may be quantized only once"));
            }
            let [c, h, w] = self.input_dims;
            let v = QValue {
                h,
                w,
                c,
                scale: f64::from(scale),
                zp,
            };
            self.input_value = Some((v, scale));
            self.values.push((scale, zp, 4, None));
            return Ok(Sym::Codes(0));
        }
        let Sym::Pending(p) = self.sym(n, 0)?.clone() else {
            return Err(n.unsupported(
                "QuantizeLinear must follow a computing op (a dequantized value may not be \
                 requantized)",
            ));
        };
        if p.flattened {
            return Err(n.unsupported("a flattened layer output may only be the graph output"));
        }
        self.finalize(n, *p, scale, zp)?;
        Ok(Sym::Codes(self.nodes.len()))
    }

    /// Turns a pending float op and its output quantization into a QNode.
    fn finalize(&mut self, n: &OnnxNode<'_>, p: Pending, scale: f32, zp: u8) -> Result<()> {
        let s_out = f64::from(scale);
        let code = |x: f32| onnx_quantize(x, scale, zp);
        let (min, max) = (code(p.lo), code(p.hi));
        let value = |[c, h, w]: [usize; 3]| QValue {
            h,
            w,
            c,
            scale: s_out,
            zp,
        };
        let same_quant = |this: &Self, a: &Act, what: &str| -> Result<()> {
            let (s, z, _, _) = this.values[a.id];
            if s.to_bits() == scale.to_bits() && z == zp {
                Ok(())
            } else {
                Err(n.unsupported(format!(
                    "{what} '{}' changes the quantization (scale {s} zp {z} -> {scale} zp {zp}); \
                     ccq keeps it through {what}",
                    p.node
                )))
            }
        };
        let (op, inputs, out, rank, hwc) = match p.op {
            PendingOp::Layer {
                input,
                geom,
                codes,
                w_scale,
                bias,
            } => {
                let src = self.qvalue(input.id);
                let (bias, requant, w_scale) = layer_params(&src, &w_scale, &bias, Some(s_out));
                let stage = OutputStage {
                    requant,
                    out_zp: i32::from(zp),
                    min,
                    max,
                };
                let out = value([geom.out_c, geom.out_h(), geom.out_w()]);
                let conv = QConv::new(geom, 8, codes, bias, src.zp, w_scale, Some(stage));
                (QOp::Conv(conv), vec![input.id], out, input.rank, None)
            }
            PendingOp::Add(a, b) => {
                let (qa, qb) = (self.qvalue(a.id), self.qvalue(b.id));
                let params = AddParams::new(
                    qa.scale,
                    i32::from(qa.zp),
                    qb.scale,
                    i32::from(qb.zp),
                    s_out,
                    i32::from(zp),
                    min,
                    max,
                );
                let out = value(self.shape(a.id));
                (QOp::Add(params), vec![a.id, b.id], out, a.rank, a.hwc)
            }
            PendingOp::Keep(input, op, dims, rank, hwc) => {
                same_quant(self, &input, op_name(&op))?;
                if p.lo > f32::NEG_INFINITY || p.hi < f32::INFINITY {
                    return Err(n.unsupported(format!(
                        "a Relu/Clip after {} is not supported; put it before",
                        op_name(&op)
                    )));
                }
                (*op, vec![input.id], value(dims), rank, hwc)
            }
            PendingOp::Clamp(input) => {
                same_quant(self, &input, "Relu/Clip")?;
                let out = value(self.shape(input.id));
                (
                    QOp::Clamp { min, max },
                    vec![input.id],
                    out,
                    input.rank,
                    input.hwc,
                )
            }
        };
        self.nodes.push(QNode {
            name: p.node,
            op,
            inputs,
            out,
        });
        self.values.push((scale, zp, rank, hwc));
        Ok(())
    }

    fn dequantize(&mut self, n: &OnnxNode<'_>) -> Result<Sym> {
        let x = n.required_input(0)?;
        if let Some(t) = self.consts.get(x) {
            return self.const_dq(n, t.clone());
        }
        let Sym::Codes(id) = *self.sym(n, 0)? else {
            return Err(
                n.unsupported("DequantizeLinear must read a QuantizeLinear output or a constant")
            );
        };
        let (scale, zp) = self.act_params(n)?;
        let (s, z, rank, hwc) = self.values[id];
        if s.to_bits() != scale.to_bits() || z != zp {
            return Err(n.unsupported(format!(
                "dequantizes with scale {scale} zp {zp}, but the codes were quantized with \
                 scale {s} zp {z}"
            )));
        }
        Ok(Sym::Act(Act { id, rank, hwc }))
    }

    /// DequantizeLinear of a constant: weights (int8) or bias (int32).
    fn const_dq(&self, n: &OnnxNode<'_>, t: TensorProto) -> Result<Sym> {
        let (dims, ints, ty) =
            int_tensor(&t).map_err(|r| n.invalid(format!("'{}': {r}", t.name)))?;
        let int32 = match ty {
            DataType::Int8 => false,
            DataType::Int32 => true,
            _ => {
                return Err(n.unsupported(format!(
                    "constant '{}' must be int8 weight codes or an int32 bias",
                    t.name
                )))
            }
        };
        let (sdims, scale) = self.floats(n, 1, "scale")?;
        if scale.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            return Err(n.invalid("weight and bias scales must be positive and finite"));
        }
        if n.input(2).is_some() {
            let z = self.constant(n, 2, "zero point")?;
            let (_, zs, _) = int_tensor(z).map_err(|r| n.invalid(format!("zero point: {r}")))?;
            if zs.iter().any(|&z| z != 0) {
                return Err(n.unsupported(
                    "ccq's weights and biases are symmetric: every zero point must be 0",
                ));
            }
        }
        let rank = dims.len();
        let axis = n.int("axis", 1)?;
        let axis = usize::try_from(if axis < 0 { axis + rank as i64 } else { axis })
            .ok()
            .filter(|&a| a < rank.max(1))
            .ok_or_else(|| n.invalid(format!("axis {axis} is out of range")))?;
        if scale.len() != 1 && (sdims.len() != 1 || dims.get(axis) != Some(&scale.len())) {
            return Err(n.invalid(format!(
                "scale dims {sdims:?} fit neither per-tensor nor axis {axis} of {dims:?}"
            )));
        }
        Ok(Sym::ConstDq {
            dims,
            ints,
            scale,
            axis,
            int32,
        })
    }

    /// Weight codes and per-output-channel scales of input `index`; `out_axis` is the
    /// output-channel axis of the weight.
    fn weights(
        &self,
        n: &OnnxNode<'_>,
        index: usize,
        out_axis: usize,
    ) -> Result<(Vec<usize>, Vec<i8>, Vec<f32>)> {
        let Sym::ConstDq {
            dims,
            ints,
            scale,
            axis,
            int32: false,
        } = self.sym(n, index)?
        else {
            return Err(
                n.unsupported("weights must be int8 codes through a DequantizeLinear (QDQ form)")
            );
        };
        let out = dims.get(out_axis).copied().unwrap_or(0);
        let scale = if scale.len() == 1 {
            vec![scale[0]; out]
        } else if *axis == out_axis {
            scale.clone()
        } else {
            return Err(n.unsupported(format!(
                "weight scales must be per tensor or per output channel (axis {out_axis}), \
                 found axis {axis}"
            )));
        };
        // int_tensor checked the int8 range.
        Ok((dims.clone(), ints.iter().map(|&v| v as i8).collect(), scale))
    }

    fn bias(&self, n: &OnnxNode<'_>, index: usize, out_c: usize) -> Result<BiasInit> {
        if n.input(index).is_none() {
            return Ok(BiasInit::None);
        }
        let name = n.required_input(index)?;
        let bias = match self.syms.get(name) {
            Some(Sym::ConstDq {
                ints,
                scale,
                int32: true,
                ..
            }) => {
                let scale = if scale.len() == 1 {
                    vec![scale[0]; ints.len()]
                } else {
                    scale.clone()
                };
                BiasInit::Int(ints.clone(), scale)
            }
            Some(_) => return Err(n.unsupported("the bias must be int32 codes or float")),
            None => BiasInit::Float(self.floats(n, index, "bias")?.1),
        };
        let len = match &bias {
            BiasInit::Int(v, _) => v.len(),
            BiasInit::Float(v) => v.len(),
            BiasInit::None => out_c,
        };
        if len != out_c {
            return Err(n.invalid(format!("the bias has {len} values for {out_c} outputs")));
        }
        Ok(bias)
    }

    fn conv(&self, n: &OnnxNode<'_>) -> Result<Sym> {
        let x = self.image(n, 0)?;
        let [in_c, in_h, in_w] = self.shape(x.id);
        let (dims, codes, w_scale) = self.weights(n, 1, 0)?;
        let [o, i, kh, kw] = *dims.as_slice() else {
            return Err(n.unsupported(format!("only 2-D convolutions: weight dims {dims:?}")));
        };
        let group = usize::try_from(n.int("group", 1)?)
            .ok()
            .filter(|&g| g >= 1)
            .ok_or_else(|| n.invalid("attribute 'group' must be >= 1"))?;
        if i.checked_mul(group) != Some(in_c) || o == 0 || kh == 0 || kw == 0 || o % group != 0 {
            return Err(n.invalid(format!(
                "weight dims {dims:?} with group={group} do not fit an input of {in_c} channels"
            )));
        }
        if n.string("auto_pad", "NOTSET")? != "NOTSET" {
            return Err(n.unsupported("auto_pad is not supported; give explicit pads"));
        }
        let [stride_h, stride_w] = n.pair("strides", [1, 1], 1)?;
        let [dil_h, dil_w] = n.pair("dilations", [1, 1], 1)?;
        let [pad_t, pad_l, pad_b, pad_r] = n.pads()?;
        let geom = ConvGeom {
            in_h,
            in_w,
            in_c,
            out_c: o,
            k_h: kh,
            k_w: kw,
            stride_h,
            stride_w,
            dil_h,
            dil_w,
            pad_t,
            pad_l,
            pad_b,
            pad_r,
            groups: group,
        };
        if geom.out_h() == 0 || geom.out_w() == 0 {
            return Err(n.invalid("the kernel is larger than the padded input"));
        }
        // OIHW -> OHWI (I = input channels per group).
        let mut ohwi = vec![0i8; codes.len()];
        for oc in 0..o {
            for ic in 0..i {
                for y in 0..kh {
                    for x in 0..kw {
                        ohwi[((oc * kh + y) * kw + x) * i + ic] =
                            codes[((oc * i + ic) * kh + y) * kw + x];
                    }
                }
            }
        }
        let bias = self.bias(n, 2, o)?;
        Ok(pending(
            n,
            PendingOp::Layer {
                input: x,
                geom,
                codes: ohwi,
                w_scale,
                bias,
            },
        ))
    }

    fn gemm(&self, n: &OnnxNode<'_>) -> Result<Sym> {
        let x = self.act(n, 0)?;
        if x.rank != 2 {
            return Err(n.invalid("Gemm needs a 2-D [N, F] input; flatten it first"));
        }
        if n.int("transA", 0)? != 0 || n.float("alpha", 1.0)? != 1.0 || n.float("beta", 1.0)? != 1.0
        {
            return Err(n.unsupported("only transA = 0, alpha = 1 and beta = 1 are supported"));
        }
        let trans_b = n.int("transB", 0)? != 0;
        let out_axis = if trans_b { 0 } else { 1 };
        let (dims, codes, w_scale) = self.weights(n, 1, out_axis)?;
        let [rows, cols] = *dims.as_slice() else {
            return Err(n.invalid(format!("the weight must be 2-D, found {dims:?}")));
        };
        let (o, k) = if trans_b { (rows, cols) } else { (cols, rows) };
        let [in_c, _, _] = self.shape(x.id);
        if k != in_c || o == 0 {
            return Err(n.invalid(format!(
                "weight dims {dims:?} do not fit an input of {in_c} features"
            )));
        }
        // To ccq's [out][in] with the input columns in ccq's feature order.
        let at = |oc: usize, col: usize| {
            if trans_b {
                codes[oc * k + col]
            } else {
                codes[col * o + oc]
            }
        };
        let mut w = vec![0i8; o * k];
        for oc in 0..o {
            match x.hwc {
                Some([h, wd, c]) => {
                    let hw = h * wd;
                    for p in 0..hw {
                        for ci in 0..c {
                            w[oc * k + p * c + ci] = at(oc, ci * hw + p);
                        }
                    }
                }
                None => {
                    for col in 0..k {
                        w[oc * k + col] = at(oc, col);
                    }
                }
            }
        }
        let geom = ConvGeom::dense(k, o);
        let bias = self.bias(n, 2, o)?;
        Ok(pending(
            n,
            PendingOp::Layer {
                input: x,
                geom,
                codes: w,
                w_scale,
                bias,
            },
        ))
    }

    fn clip(&self, n: &OnnxNode<'_>) -> Result<Sym> {
        let (lo, hi) = if n.op() == "Relu" {
            (0.0, f32::INFINITY)
        } else {
            (
                self.optional_scalar(n, 1, "min")?
                    .unwrap_or(f32::NEG_INFINITY),
                self.optional_scalar(n, 2, "max")?.unwrap_or(f32::INFINITY),
            )
        };
        match self.sym(n, 0)? {
            Sym::Act(a) => {
                let mut p = pending(n, PendingOp::Clamp(*a));
                if let Sym::Pending(p) = &mut p {
                    (p.lo, p.hi) = (lo, hi);
                }
                Ok(p)
            }
            Sym::Pending(p) if !matches!(p.op, PendingOp::Keep(..)) && !p.flattened => {
                let mut p = p.clone();
                p.lo = p.lo.max(lo);
                p.hi = p.hi.min(hi);
                Ok(Sym::Pending(p))
            }
            _ => Err(n.unsupported(
                "Relu/Clip must follow a Conv, Gemm or Add, or read a dequantized activation",
            )),
        }
    }

    fn pool(&self, n: &OnnxNode<'_>) -> Result<Sym> {
        let x = self.image(n, 0)?;
        let [c, in_h, in_w] = self.shape(x.id);
        let Some(&[kh, kw]) = n.ints("kernel_shape")? else {
            return Err(n.invalid("attribute 'kernel_shape' must have 2 values"));
        };
        if kh < 1 || kw < 1 {
            return Err(n.invalid("kernel_shape must be positive"));
        }
        if n.pair("dilations", [1, 1], 1)? != [1, 1]
            || n.int("ceil_mode", 0)? != 0
            || n.string("auto_pad", "NOTSET")? != "NOTSET"
        {
            return Err(n.unsupported("dilations, ceil_mode and auto_pad are not supported"));
        }
        let [stride_h, stride_w] = n.pair("strides", [1, 1], 1)?;
        let [pad_t, pad_l, pad_b, pad_r] = n.pads()?;
        let g = PoolGeom {
            in_h,
            in_w,
            c,
            k_h: kh as usize,
            k_w: kw as usize,
            stride_h,
            stride_w,
            pad_t,
            pad_l,
            pad_b,
            pad_r,
        };
        if pad_t >= g.k_h || pad_b >= g.k_h || pad_l >= g.k_w || pad_r >= g.k_w {
            return Err(n.invalid("pads must be smaller than the kernel"));
        }
        let (oh, ow) = (
            window_out(in_h, g.k_h, stride_h, pad_t, pad_b, 1),
            window_out(in_w, g.k_w, stride_w, pad_l, pad_r, 1),
        );
        if oh == 0 || ow == 0 {
            return Err(n.invalid("the window is larger than the padded input"));
        }
        let op = if n.op() == "MaxPool" {
            QOp::MaxPool(g)
        } else {
            QOp::AvgPool {
                geom: g,
                count_include_pad: n.int("count_include_pad", 0)? != 0,
            }
        };
        Ok(pending(
            n,
            PendingOp::Keep(x, Box::new(op), [c, oh, ow], 4, None),
        ))
    }

    fn flatten(&self, n: &OnnxNode<'_>) -> Result<Sym> {
        if n.int("axis", 1)? != 1 {
            return Err(n.unsupported("only Flatten with axis = 1 is supported"));
        }
        match self.sym(n, 0)? {
            // The logits layer's `[N, K, 1, 1]` output.
            Sym::Pending(p) if matches!(p.op, PendingOp::Layer { .. }) => {
                let mut p = p.clone();
                p.flattened = true;
                Ok(Sym::Pending(p))
            }
            _ => {
                let x = self.act(n, 0)?;
                let [c, h, w] = self.shape(x.id);
                let hwc = match x.rank {
                    4 => (h * w > 1).then_some([h, w, c]),
                    _ => x.hwc,
                };
                Ok(pending(
                    n,
                    PendingOp::Keep(x, Box::new(QOp::Flatten), [c * h * w, 1, 1], 2, hwc),
                ))
            }
        }
    }

    /// `Round(y / step) * step` on the logits layer's output: the rounding to a common
    /// logit scale that ccq's engine applies anyway (with its own scale), so it passes
    /// through.
    fn logit_rounding(&self, n: &OnnxNode<'_>) -> Result<Sym> {
        let only = || {
            n.unsupported(format!(
                "{} is supported only as the rounding of the logits (Div and Mul by one \
                 positive constant, Round) after the last Conv/Gemm",
                n.op()
            ))
        };
        let Sym::Pending(p) = self.sym(n, 0)? else {
            return Err(only());
        };
        if !matches!(p.op, PendingOp::Layer { .. })
            || p.lo > f32::NEG_INFINITY
            || p.hi < f32::INFINITY
        {
            return Err(only());
        }
        if n.op() != "Round" {
            match self.optional_scalar(n, 1, "logit scale")? {
                Some(s) if s > 0.0 && s.is_finite() => {}
                _ => return Err(only()),
            }
        }
        Ok(Sym::Pending(p.clone()))
    }

    fn slice(&self, n: &OnnxNode<'_>) -> Result<Sym> {
        let x = self.image(n, 0)?;
        let dims = self.shape(x.id);
        let starts = self.int_list(n, 1, "starts")?.unwrap_or_default();
        let ends = self.int_list(n, 2, "ends")?.unwrap_or_default();
        let axes = self
            .int_list(n, 3, "axes")?
            .unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = self
            .int_list(n, 4, "steps")?
            .unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return Err(n.invalid("starts, ends, axes and steps differ in length"));
        }
        let (mut start, mut step, mut out) = ([0; 3], [1; 3], dims);
        for i in 0..starts.len() {
            let axis = if axes[i] < 0 { axes[i] + 4 } else { axes[i] };
            let a = match axis {
                1..=3 => (axis - 1) as usize,
                _ => return Err(n.unsupported("only the C, H and W axes may be sliced")),
            };
            let size = dims[a] as i64;
            let (s, e) = (starts[i].clamp(0, size), ends[i].clamp(0, size));
            if steps[i] < 1 || s >= e {
                return Err(n.unsupported(
                    "only non-empty slices with positive steps and non-negative bounds are supported",
                ));
            }
            start[a] = s as usize;
            step[a] = steps[i] as usize;
            out[a] = (e - s) as usize;
            out[a] = out[a].div_ceil(step[a]);
        }
        Ok(pending(
            n,
            PendingOp::Keep(x, Box::new(QOp::Slice { start, step }), out, 4, None),
        ))
    }

    fn pad(&self, n: &OnnxNode<'_>) -> Result<Sym> {
        let x = self.image(n, 0)?;
        let dims = self.shape(x.id);
        if n.string("mode", "constant")? != "constant"
            || self
                .optional_scalar(n, 2, "constant_value")?
                .is_some_and(|v| v != 0.0)
        {
            return Err(n.unsupported("only constant padding with 0 is supported"));
        }
        let pads = self
            .int_list(n, 1, "pads")?
            .ok_or_else(|| n.invalid("pads are missing"))?;
        let [0, bc, bh, bw, 0, ac, ah, aw] = *pads.as_slice() else {
            return Err(n.unsupported(format!(
                "pads {pads:?}: only 8 values with none on the batch axis are supported"
            )));
        };
        let all = [bc, bh, bw, ac, ah, aw];
        if all.iter().any(|&p| !(0..=1 << 20).contains(&p)) {
            return Err(n.unsupported("only non-negative pads are supported"));
        }
        let before = [bc as usize, bh as usize, bw as usize];
        let out = [
            dims[0] + before[0] + ac as usize,
            dims[1] + before[1] + ah as usize,
            dims[2] + before[2] + aw as usize,
        ];
        Ok(pending(
            n,
            PendingOp::Keep(x, Box::new(QOp::Pad { before }), out, 4, None),
        ))
    }

    /// Closes the network: the graph output must be a pending layer (the logits).
    fn finish(
        mut self,
        output: &str,
        norm: Normalization,
        (weight_bits, layer_bits): (Option<u8>, Option<Vec<u8>>),
        act_bits: u8,
        origin: &str,
    ) -> Result<QNetwork> {
        let invalid = |reason: &str| Error::InvalidModel {
            node: output.to_string(),
            reason: reason.to_string(),
        };
        let Some(Sym::Pending(p)) = self.syms.get(output).cloned() else {
            return Err(invalid(
                "the graph output must be the float output of the last Conv/Gemm (the logits)",
            ));
        };
        let Pending {
            node, op, lo, hi, ..
        } = *p;
        let PendingOp::Layer {
            input,
            geom,
            codes,
            w_scale,
            bias,
        } = op
        else {
            return Err(invalid(
                "the graph output must be computed by a Conv or Gemm",
            ));
        };
        if lo > f32::NEG_INFINITY || hi < f32::INFINITY {
            return Err(invalid("the logits may not be clipped"));
        }
        if geom.out_h() * geom.out_w() != 1 {
            return Err(invalid("the logits layer must produce one value per class"));
        }
        let (iv, _) = self
            .input_value
            .ok_or_else(|| invalid("the graph input is never quantized"))?;
        let src = self.qvalue(input.id);
        let (bias, _, w_scale) = layer_params(&src, &w_scale, &bias, None);
        let wmax = w_scale.iter().copied().fold(0.0, f64::max);
        let wmax = if wmax > 0.0 { wmax } else { 1.0 };
        let logit_requant = w_scale
            .iter()
            .map(|&s| Requant::from_real(s / wmax))
            .collect();
        let num_classes = geom.out_c;
        let out = QValue {
            h: 1,
            w: 1,
            c: num_classes,
            scale: src.scale * wmax,
            zp: 0,
        };
        let conv = QConv::new(geom, 8, codes, bias, src.zp, w_scale, None);
        self.nodes.push(QNode {
            name: node,
            op: QOp::Conv(conv),
            inputs: vec![input.id],
            out,
        });

        // Bit widths: as recorded, else the narrowest that holds every code.
        let widest = self
            .nodes
            .iter()
            .filter_map(|n| match &n.op {
                QOp::Conv(c) => c.codes.iter().map(|&x| bits_for(x)).max(),
                _ => None,
            })
            .max()
            .unwrap_or(2);
        let weight_bits = weight_bits.unwrap_or(widest);
        let convs = self
            .nodes
            .iter()
            .filter(|n| matches!(n.op, QOp::Conv(_)))
            .count();
        let layer_bits = layer_bits.unwrap_or_else(|| vec![weight_bits; convs]);
        if layer_bits.len() != convs {
            return Err(Error::InvalidModel {
                node: output.to_string(),
                reason: format!(
                    "metadata ccq.layer_weight_bits names {} layers, the graph has {convs}",
                    layer_bits.len()
                ),
            });
        }
        let mut layers: Vec<LayerVars> = Vec::new();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let QOp::Conv(c) = &mut node.op {
                c.weight_bits = layer_bits[layers.len()];
                let (lo, hi) = code_range(c.weight_bits);
                let g = c.geom;
                layers.push(LayerVars {
                    kind: VarKind::Weights,
                    node: i,
                    name: node.name.clone(),
                    offset: layers.last().map_or(0, |l| l.offset + l.len),
                    len: c.codes.len(),
                    lo,
                    hi,
                    dims: [g.out_c, g.k_h, g.k_w, g.in_per_group()],
                });
            }
        }
        let scale = iv.scale as f32;
        let mut lut = Vec::with_capacity(iv.c * 256);
        for c in 0..iv.c {
            lut.extend((0..=255u8).map(|p| onnx_quantize(norm.apply(c, p), scale, iv.zp)));
        }
        let net = QNetwork {
            input: InputQuant {
                lut,
                mean: norm.mean,
                std: norm.std,
            },
            input_value: iv,
            nodes: self.nodes,
            num_classes,
            logit_requant,
            logit_scale: out.scale,
            weight_bits,
            act_bits,
            layers,
            clips: Vec::new(),
        };
        net.validate(origin)?;
        Ok(net)
    }
}

fn pending(n: &OnnxNode<'_>, op: PendingOp) -> Sym {
    Sym::Pending(Box::new(Pending {
        node: n.name.clone(),
        op,
        lo: f32::NEG_INFINITY,
        hi: f32::INFINITY,
        flattened: false,
    }))
}

/// i32 bias at scale `s_in * w_scale`, requantization to `s_out` (when given) and the
/// weight scales as f64. An int32 bias whose scale is that product (to f32 rounding) is
/// kept exactly; others are rescaled.
fn layer_params(
    src: &QValue,
    w_scale: &[f32],
    bias: &BiasInit,
    s_out: Option<f64>,
) -> (Vec<i32>, Vec<Requant>, Vec<f64>) {
    let w_scale: Vec<f64> = w_scale.iter().map(|&s| f64::from(s)).collect();
    let acc_scale: Vec<f64> = w_scale.iter().map(|s| src.scale * s).collect();
    let round = |x: f64| x.round().clamp(i32::MIN as f64, i32::MAX as f64) as i32;
    let bias = match bias {
        BiasInit::None => vec![0; w_scale.len()],
        BiasInit::Int(v, s) => v
            .iter()
            .zip(s)
            .zip(&acc_scale)
            .map(|((&b, &bs), &acc)| {
                let bs = f64::from(bs);
                if ((bs - acc) / acc).abs() < 1e-6 {
                    b.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
                } else {
                    round(b as f64 * bs / acc)
                }
            })
            .collect(),
        BiasInit::Float(v) => v
            .iter()
            .zip(&acc_scale)
            .map(|(&b, &acc)| round(f64::from(b) / acc))
            .collect(),
    };
    let requant = s_out.map_or_else(Vec::new, |s_out| {
        acc_scale
            .iter()
            .map(|&acc| Requant::from_real(acc / s_out))
            .collect()
    });
    (bias, requant, w_scale)
}

/// Bits of the narrowest signed code range holding `x` (at least 2).
fn bits_for(x: i8) -> u8 {
    (2..=8)
        .find(|&b| {
            let (lo, hi) = code_range(b);
            (lo..=hi).contains(&x)
        })
        .unwrap_or(8)
}

fn op_name(op: &QOp) -> &'static str {
    match op {
        QOp::Conv(_) => "Conv",
        QOp::Add(_) => "Add",
        QOp::MaxPool(_) => "MaxPool",
        QOp::AvgPool { .. } => "AveragePool",
        QOp::GlobalAvgPool => "GlobalAveragePool",
        QOp::Slice { .. } => "Slice",
        QOp::Pad { .. } => "Pad",
        QOp::Flatten => "Flatten",
        QOp::Clamp { .. } => "Clip",
        QOp::Lut { func, .. } => func.name(),
        QOp::Mul(_) => "Mul",
        QOp::Concat { .. } => "Concat",
    }
}

fn parse_floats(s: &str) -> Option<Vec<f32>> {
    s.split(',').map(|v| v.trim().parse().ok()).collect()
}

/// `[C, H, W]` of a float `[N, C, H, W]` graph input with fixed C, H, W.
fn image_dims(input: &super::proto::ValueInfoProto) -> Result<[usize; 3]> {
    let invalid = |reason: &str| Error::InvalidModel {
        node: input.name.clone(),
        reason: reason.to_string(),
    };
    let t = input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| invalid("the graph input is not declared as a tensor"))?;
    if t.elem_type != DataType::Float as i32 {
        return Err(invalid(
            "the graph input must be FLOAT (the normalised image)",
        ));
    }
    let dims: Vec<Option<usize>> = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(v)) => usize::try_from(v).ok(),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match *dims.as_slice() {
        [_, Some(c), Some(h), Some(w)] if c > 0 && h > 0 && w > 0 && c * h * w <= 1 << 31 => {
            Ok([c, h, w])
        }
        _ => Err(invalid(
            "the graph input must be [N, C, H, W] with fixed, positive C, H and W",
        )),
    }
}

/// Dims, values and type of an integer constant: INT8 and UINT8 (codes, zero points),
/// INT32 and INT64, from `raw_data` or the typed field. Checks the element count and range.
fn int_tensor(t: &TensorProto) -> std::result::Result<(Vec<usize>, Vec<i64>, DataType), String> {
    let ty = DataType::try_from(t.data_type)
        .map_err(|_| format!("unknown data type {}", t.data_type))?;
    match ty {
        DataType::Int8 | DataType::Uint8 => {}
        DataType::Int32 | DataType::Int64 => {
            let tensor = Tensor::decode(t)?;
            let v = tensor.ints()?.to_vec();
            return Ok((tensor.dims, v, ty));
        }
        other => {
            return Err(format!(
                "data type {} where an integer tensor is expected",
                format!("{other:?}").to_uppercase()
            ))
        }
    }
    if t.data_location == DataLocation::External as i32 {
        return Err("its data is stored in an external file, which ccq does not read".into());
    }
    let dims = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension in {:?}", t.dims)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("dims {:?} overflow", t.dims))?;
    let signed = ty == DataType::Int8;
    let values: Vec<i64> = if !t.raw_data.is_empty() {
        t.raw_data
            .iter()
            .map(|&b| {
                if signed {
                    i64::from(b as i8)
                } else {
                    i64::from(b)
                }
            })
            .collect()
    } else {
        let (lo, hi) = if signed { (-128, 127) } else { (0, 255) };
        if let Some(v) = t.int32_data.iter().find(|v| !(lo..=hi).contains(*v)) {
            return Err(format!("value {v} is outside the {ty:?} range"));
        }
        t.int32_data.iter().map(|&v| i64::from(v)).collect()
    };
    if values.len() != count {
        return Err(format!(
            "has {} values, expected {count} for dims {:?}",
            values.len(),
            t.dims
        ));
    }
    Ok((dims, values, ty))
}
