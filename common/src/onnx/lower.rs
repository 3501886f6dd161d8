//! Lowering a decoded ONNX graph into [`Graph`]: graph input/output checks, one handler per
//! supported op, shape inference, and the folds (BatchNormalization and bias Adds into the
//! layer before them, Sigmoid + Mul into one SiLU).

use std::borrow::Cow;
use std::collections::HashMap;

use super::node::OnnxNode;
use super::proto::{
    tensor_shape_proto::dimension, DataType, GraphProto, ModelProto, TensorProto, ValueInfoProto,
};
use super::tensor::Tensor;
use crate::model::{self, Conv, Graph, Linear, Node, Op, Pad, Pool, Shape, Slice, Unary, ValueId};
use crate::{Error, Result};

/// Listed in every UnsupportedOp error so that a user sees what would work.
const SUPPORTED_OPS: &str = "Conv (any group), \
    BatchNormalization (after Conv/Gemm/MatMul), Relu, Clip, Sigmoid, Tanh, HardSigmoid, \
    HardSwish, LeakyRelu, Add, Mul (same shapes, or by an [N, C, 1, 1] scale), \
    Concat (axis 1), MaxPool, AveragePool, GlobalAveragePool, Flatten (axis 1), \
    Reshape (flatten to [N, K] only), Gemm, MatMul (by a constant), Identity, Dropout, \
    Slice, Pad (constant 0), Constant";

/// Largest per-image tensor ccq accepts; the integer engine indexes with i32-sized counts,
/// and the limit keeps every later size computation far from overflow.
const MAX_VALUE_LEN: usize = 1 << 31;

/// A run-time value as the lowering tracks it: its IR id and its ONNX rank, which is 4
/// (`[N, C, H, W]`) or 2 (`[N, F]`, stored as `[F, 1, 1]`).
#[derive(Debug, Clone, Copy)]
struct Val {
    id: ValueId,
    rank: usize,
}

pub(super) fn lower(model: &ModelProto, origin: &str) -> Result<Graph> {
    let not_onnx = |reason: &str| Error::OnnxDecode {
        path: origin.to_string(),
        reason: reason.to_string(),
    };
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| not_onnx("the model has no graph"))?;
    let opset = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .ok_or_else(|| not_onnx("the model imports no version of the default ONNX operator set"))?;

    let input = graph_input(graph)?;
    let (input_shape, input_rank, batch) = input_shape(input)?;
    let output_name = match graph.output.as_slice() {
        [one] => one.name.as_str(),
        outputs => {
            return Err(Error::InvalidModel {
                node: graph_label(graph),
                reason: format!(
                    "the graph has {} outputs; ccq expects exactly one (the logits)",
                    outputs.len()
                ),
            })
        }
    };

    let mut uses: HashMap<&str, usize> = HashMap::new();
    for name in graph.node.iter().flat_map(|n| &n.input) {
        *uses.entry(name.as_str()).or_default() += 1;
    }
    *uses.entry(output_name).or_default() += 1;

    let mut lowering = Lowering {
        opset,
        batch,
        input_shape,
        nodes: Vec::new(),
        values: HashMap::new(),
        consts: graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), Cow::Borrowed(t)))
            .collect(),
        uses,
        live_uses: vec![0],
    };
    lowering.bind_name(
        &input.name,
        Val {
            id: 0,
            rank: input_rank,
        },
    );

    for (index, proto) in graph.node.iter().enumerate() {
        lowering.node(&OnnxNode::new(proto, index))?;
    }

    let output = match lowering.values.get(output_name) {
        Some(v) if v.id > 0 => v.id,
        Some(_) => {
            return Err(Error::InvalidModel {
                node: output_name.to_string(),
                reason: "the graph output is the graph input: the model computes nothing".into(),
            })
        }
        None => {
            return Err(Error::InvalidModel {
                node: output_name.to_string(),
                reason: "the graph output is not produced by any node".into(),
            })
        }
    };
    Ok(Graph {
        input_name: input.name.clone(),
        input_shape,
        nodes: lowering.nodes,
        output,
    })
}

fn graph_label(graph: &GraphProto) -> String {
    if graph.name.is_empty() {
        "(graph)".into()
    } else {
        graph.name.clone()
    }
}

/// The one graph input that is not an initializer (before IR version 4, initializers were
/// listed among the inputs too).
fn graph_input(graph: &GraphProto) -> Result<&ValueInfoProto> {
    let is_initializer = |name: &str| graph.initializer.iter().any(|t| t.name == name);
    let inputs: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !is_initializer(&i.name))
        .collect();
    match inputs.as_slice() {
        [one] => Ok(one),
        many => Err(Error::InvalidModel {
            node: graph_label(graph),
            reason: format!(
                "the graph has {} run-time inputs ({}); ccq expects exactly one image input",
                many.len(),
                many.iter()
                    .map(|i| format!("'{}'", i.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Per-image shape, ONNX rank and (when fixed) batch size of the graph input, which must
/// be a float tensor `[N, C, H, W]` or `[N, F]` with every non-batch dimension fixed.
fn input_shape(input: &ValueInfoProto) -> Result<(Shape, usize, Option<i64>)> {
    let invalid = |reason: String| Error::InvalidModel {
        node: input.name.clone(),
        reason,
    };
    let tensor = input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| invalid("the graph input is not declared as a tensor".into()))?;
    if tensor.elem_type != DataType::Float as i32 {
        return Err(invalid(format!(
            "the graph input has element type {}, ccq expects FLOAT (1)",
            tensor.elem_type
        )));
    }
    let dims: Vec<Option<i64>> = tensor
        .shape
        .as_ref()
        .ok_or_else(|| invalid("the graph input has no declared shape".into()))?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(dimension::Value::DimValue(v)) => Some(v),
            _ => None,
        })
        .collect();
    let show = || {
        dims.iter()
            .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fixed = |d: Option<i64>| {
        d.and_then(|v| usize::try_from(v).ok())
            .filter(|&v| v > 0)
            .ok_or_else(|| {
                invalid(format!(
                    "the graph input has shape [{}]; its non-batch dimensions must be fixed \
                     and positive",
                    show()
                ))
            })
    };
    let (shape, rank) = match *dims.as_slice() {
        [_, c, h, w] => (Shape::new(fixed(c)?, fixed(h)?, fixed(w)?), 4),
        [_, f] => (Shape::new(fixed(f)?, 1, 1), 2),
        _ => {
            return Err(invalid(format!(
                "the graph input has shape [{}]; ccq expects [N, C, H, W] or [N, F]",
                show()
            )))
        }
    };
    let len_ok = shape
        .c
        .checked_mul(shape.h)
        .and_then(|v| v.checked_mul(shape.w))
        .is_some_and(|len| len <= MAX_VALUE_LEN);
    if !len_ok {
        return Err(invalid(format!(
            "the graph input shape [{}] is too large",
            show()
        )));
    }
    Ok((shape, rank, dims[0]))
}

struct Lowering<'a> {
    opset: i64,
    /// The graph input's batch dimension when the export fixed it.
    batch: Option<i64>,
    input_shape: Shape,
    nodes: Vec<Node>,
    /// ONNX tensor name -> run-time value. Aliasing ops add names for an existing value.
    values: HashMap<&'a str, Val>,
    /// ONNX tensor name -> constant (initializers, Constant nodes and aliases of those).
    consts: HashMap<&'a str, Cow<'a, TensorProto>>,
    /// How many node inputs (plus the graph output) reference each ONNX name.
    uses: HashMap<&'a str, usize>,
    /// Per value: how many node inputs (plus the graph output) read it through any of its
    /// names, not counting the aliasing nodes that created those names. When it is 1 at a
    /// BatchNormalization, that node is the value's only reader, so the layer producing
    /// the value may be rewritten in place.
    live_uses: Vec<usize>,
}

impl<'a> Lowering<'a> {
    fn node(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        if !(n.proto.domain.is_empty() || n.proto.domain == "ai.onnx") {
            return Err(n.unsupported(format!(
                "operators of domain '{}' are not supported; supported ops (default domain): \
                 {SUPPORTED_OPS}",
                n.proto.domain
            )));
        }
        if n.proto.output.first().is_none_or(|o| o.is_empty()) {
            return Err(n.invalid("the node has no output"));
        }
        // Secondary outputs (MaxPool indices, Dropout mask, BatchNormalization training
        // statistics) have no IR equivalent; they are fine as long as nothing reads them.
        for (i, out) in n.proto.output.iter().enumerate().skip(1) {
            if !out.is_empty() && self.uses.get(out.as_str()).is_some_and(|&u| u > 0) {
                return Err(n.unsupported(format!(
                    "output #{i} ('{out}') is used, but ccq only computes the first output of {}",
                    n.op()
                )));
            }
        }
        match n.op() {
            "Conv" => self.conv(n),
            "BatchNormalization" => self.batch_norm(n),
            "Relu" => self.elementwise(n, Op::Relu),
            "Clip" => self.clip(n),
            "Sigmoid" => self.elementwise(n, Op::Unary(Unary::Sigmoid)),
            "Tanh" => self.elementwise(n, Op::Unary(Unary::Tanh)),
            "HardSigmoid" => self.hard_sigmoid(n),
            "HardSwish" => self.elementwise(n, Op::Unary(Unary::HardSwish)),
            "LeakyRelu" => self.leaky_relu(n),
            "Add" => self.add(n),
            "Mul" => self.mul(n),
            "Concat" => self.concat(n),
            "MaxPool" => self.pool(n, false),
            "AveragePool" => self.pool(n, true),
            "GlobalAveragePool" => self.global_average_pool(n),
            "Flatten" => self.flatten(n),
            "Reshape" => self.reshape(n),
            "Gemm" => self.gemm(n),
            "MatMul" => self.matmul(n),
            "Identity" | "Dropout" => self.identity(n),
            "Constant" => self.constant_node(n),
            "Slice" => self.slice(n),
            "Pad" => self.pad(n),
            // Concat belongs to that pattern too, but it comes after these nodes, so the
            // pattern is reported here; on its own, Concat is a channel concatenation.
            "Shape" | "Gather" | "Unsqueeze" => Err(n.unsupported(format!(
                "run-time shape computations are not supported (PyTorch emits them for \
                 x.view(x.size(0), -1) with a dynamic batch; use torch.flatten(x, 1) instead); \
                 supported ops: {SUPPORTED_OPS}"
            ))),
            other => Err(n.unsupported(format!(
                "{other} is not supported; supported ops: {SUPPORTED_OPS}"
            ))),
        }
    }

    // ---- values, constants and bindings -------------------------------------------------

    fn shape(&self, v: ValueId) -> Shape {
        if v == 0 {
            self.input_shape
        } else {
            self.nodes[v - 1].shape
        }
    }

    fn bind_name(&mut self, name: &'a str, val: Val) {
        self.values.insert(name, val);
        self.live_uses[val.id] += self.uses.get(name).copied().unwrap_or(0);
    }

    /// The node's first output, which must not be defined yet (ONNX graphs are SSA).
    fn fresh_output(&self, n: &OnnxNode<'a>) -> Result<&'a str> {
        let out = n.proto.output[0].as_str();
        if self.values.contains_key(out) || self.consts.contains_key(out) {
            return Err(n.invalid(format!(
                "output '{out}' is already defined by an initializer or an earlier node"
            )));
        }
        Ok(out)
    }

    /// Binds the node's first output to `val`.
    fn bind(&mut self, n: &OnnxNode<'a>, val: Val) -> Result<()> {
        let out = self.fresh_output(n)?;
        self.bind_name(out, val);
        Ok(())
    }

    /// Binds the node's first output to a constant.
    fn bind_const(&mut self, n: &OnnxNode<'a>, tensor: Cow<'a, TensorProto>) -> Result<()> {
        let out = self.fresh_output(n)?;
        self.consts.insert(out, tensor);
        Ok(())
    }

    /// Makes the node's output another name for its input value `val` (no IR node).
    fn alias(&mut self, n: &OnnxNode<'a>, val: Val) -> Result<()> {
        // The aliasing node itself is not a reader; the readers of its output are added by
        // `bind`.
        self.live_uses[val.id] -= 1;
        self.bind(n, val)
    }

    /// Appends an IR node for `n` producing a value of `shape`.
    fn push(
        &mut self,
        n: &OnnxNode<'a>,
        op: Op,
        inputs: Vec<ValueId>,
        shape: Shape,
        rank: usize,
    ) -> Result<()> {
        let len = shape
            .c
            .checked_mul(shape.h)
            .and_then(|v| v.checked_mul(shape.w));
        if !len.is_some_and(|len| len > 0 && len <= MAX_VALUE_LEN) {
            return Err(n.invalid(format!("its output shape {shape} is empty or too large")));
        }
        self.nodes.push(Node {
            name: n.name.clone(),
            op,
            inputs,
            shape,
        });
        self.live_uses.push(0);
        self.bind(
            n,
            Val {
                id: self.nodes.len(),
                rank,
            },
        )
    }

    /// The run-time value at input `index`.
    fn value(&self, n: &OnnxNode<'a>, index: usize) -> Result<Val> {
        let name = n.required_input(index)?;
        if let Some(v) = self.values.get(name) {
            return Ok(*v);
        }
        if self.consts.contains_key(name) {
            return Err(n.unsupported(format!(
                "input '{name}' is a constant; ccq expects a run-time tensor here \
                 (fold constant subexpressions before exporting)"
            )));
        }
        Err(n.invalid(format!(
            "input '{name}' is not the graph input, an initializer or the output of an earlier node"
        )))
    }

    /// The run-time value at input `index`, which must be an `[N, C, H, W]` tensor.
    fn image(&self, n: &OnnxNode<'a>, index: usize) -> Result<Val> {
        let v = self.value(n, index)?;
        if v.rank != 4 {
            return Err(n.invalid(format!(
                "input '{}' is a 2-D [N, {}] tensor; {} needs [N, C, H, W]",
                n.proto.input[index],
                self.shape(v.id).c,
                n.op()
            )));
        }
        Ok(v)
    }

    fn constant_named(&self, n: &OnnxNode<'a>, name: &str, what: &str) -> Result<Tensor> {
        if let Some(t) = self.consts.get(name) {
            return Tensor::decode(t)
                .map_err(|reason| n.invalid(format!("{what} '{name}': {reason}")));
        }
        if self.values.contains_key(name) {
            return Err(n.unsupported(format!(
                "{what} '{name}' is computed at run time; ccq needs it to be constant \
                 (an initializer or Constant node)"
            )));
        }
        Err(n.invalid(format!(
            "{what} '{name}' is missing: no initializer, Constant node or earlier node produces it"
        )))
    }

    fn constant(&self, n: &OnnxNode<'a>, index: usize, what: &str) -> Result<Tensor> {
        self.constant_named(n, n.required_input(index)?, what)
    }

    fn optional_constant(
        &self,
        n: &OnnxNode<'a>,
        index: usize,
        what: &str,
    ) -> Result<Option<Tensor>> {
        n.input(index)
            .map(|name| self.constant_named(n, name, what))
            .transpose()
    }

    /// A float constant at input `index` with its dims.
    fn floats(&self, n: &OnnxNode<'a>, index: usize, what: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.constant(n, index, what)?;
        let values = t
            .floats()
            .map_err(|r| n.invalid(format!("{what} '{}': {r}", n.proto.input[index])))?
            .to_vec();
        Ok((t.dims, values))
    }

    /// A float constant with exactly `len` elements (BatchNormalization parameters).
    fn float_vector(
        &self,
        n: &OnnxNode<'a>,
        index: usize,
        what: &str,
        len: usize,
    ) -> Result<Vec<f32>> {
        let (dims, values) = self.floats(n, index, what)?;
        if values.len() != len {
            return Err(n.invalid(format!(
                "{what} '{}' has dims {dims:?}, expected {len} values",
                n.proto.input[index]
            )));
        }
        Ok(values)
    }

    /// An integer list given, depending on the opset, as constant input `index` or as
    /// attribute `attr` (Slice before opset 10, Pad before 11, Reshape before 5).
    fn int_list(
        &self,
        n: &OnnxNode<'a>,
        index: usize,
        attr: &str,
        from_input: bool,
    ) -> Result<Option<Vec<i64>>> {
        if !from_input {
            return Ok(n.ints(attr)?.map(<[i64]>::to_vec));
        }
        let Some(t) = self.optional_constant(n, index, attr)? else {
            return Ok(None);
        };
        let values = t
            .ints()
            .map_err(|r| n.invalid(format!("{attr} '{}': {r}", n.proto.input[index])))?;
        if t.dims.len() > 1 {
            return Err(n.invalid(format!(
                "{attr} must be a 1-D tensor, found dims {:?}",
                t.dims
            )));
        }
        Ok(Some(values.to_vec()))
    }

    // ---- ops ----------------------------------------------------------------------------

    fn conv(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let x = self.image(n, 0)?;
        let input = self.shape(x.id);
        let (wdims, weight) = self.floats(n, 1, "weight")?;
        let [out_c, in_per_group, kh, kw] = *wdims.as_slice() else {
            return Err(n.unsupported(format!(
                "only 2-D convolutions are supported; the weight has dims {wdims:?}"
            )));
        };
        if out_c == 0 || in_per_group == 0 || kh == 0 || kw == 0 {
            return Err(n.invalid(format!("the weight has an empty dimension: {wdims:?}")));
        }
        let bias = match n.input(2) {
            None => vec![0.0; out_c],
            Some(_) => self.float_vector(n, 2, "bias", out_c)?,
        };
        let group = usize::try_from(n.int("group", 1)?)
            .ok()
            .filter(|&g| g >= 1)
            .ok_or_else(|| n.invalid("attribute 'group' must be >= 1"))?;
        // Any group works (the float engine runs one matrix product per group), as long as
        // it splits both channel counts evenly, which ONNX requires too.
        if !input.c.is_multiple_of(group) {
            return Err(n.invalid(format!(
                "group={group} does not divide the {} input channels (input shape {input})",
                input.c
            )));
        }
        if in_per_group.checked_mul(group) != Some(input.c) {
            return Err(n.invalid(format!(
                "the weight {wdims:?} with group={group} expects {} input channels, the input \
                 has shape {input}",
                in_per_group.saturating_mul(group)
            )));
        }
        if !out_c.is_multiple_of(group) {
            return Err(n.invalid(format!(
                "group={group} does not divide the {out_c} output channels of the weight \
                 {wdims:?}"
            )));
        }
        if let Some(ks) = n.ints("kernel_shape")? {
            if ks != [kh as i64, kw as i64] {
                return Err(n.invalid(format!(
                    "attribute kernel_shape={ks:?} disagrees with the weight dims {wdims:?}"
                )));
            }
        }
        let kernel = [kh, kw];
        let stride = n.pair("strides", [1, 1], 1)?;
        let dilation = n.pair("dilations", [1, 1], 1)?;
        let (pads, [oh, ow]) = window(n, input, kernel, stride, dilation)?;
        let conv = Conv {
            out_channels: out_c,
            in_channels: input.c,
            kernel,
            stride,
            pads,
            dilation,
            group,
            weight,
            bias,
        };
        self.push(n, Op::Conv(conv), vec![x.id], Shape::new(out_c, oh, ow), 4)
    }

    /// Folds `y = scale * (x - mean) / sqrt(var + epsilon) + b` into the Conv or Linear
    /// that produces `x`, which must feed nothing else.
    fn batch_norm(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let x = self.value(n, 0)?;
        if n.int("training_mode", 0)? != 0 {
            return Err(
                n.unsupported("training_mode=1 is not supported; export the model in eval mode")
            );
        }
        let producer = match x.id {
            0 => "the graph input".to_string(),
            id => format!(
                "'{}' ({})",
                self.nodes[id - 1].name,
                op_name(&self.nodes[id - 1].op)
            ),
        };
        let foldable = x.id > 0 && matches!(self.nodes[x.id - 1].op, Op::Conv(_) | Op::Linear(_));
        if !foldable {
            return Err(n.unsupported(format!(
                "BatchNormalization is only supported right after a Conv, Gemm or MatMul (it is \
                 folded into that layer); its input comes from {producer}"
            )));
        }
        if self.live_uses[x.id] != 1 {
            return Err(n.unsupported(format!(
                "its input '{}' from {producer} also feeds other nodes, so the BatchNormalization \
                 cannot be folded into that layer",
                n.proto.input[0]
            )));
        }
        let channels = self.shape(x.id).c;
        let scale = self.float_vector(n, 1, "scale", channels)?;
        let shift = self.float_vector(n, 2, "B", channels)?;
        let mean = self.float_vector(n, 3, "mean", channels)?;
        let var = self.float_vector(n, 4, "var", channels)?;
        let epsilon = f64::from(n.float("epsilon", 1e-5)?);

        let (weight, bias) = match &mut self.nodes[x.id - 1].op {
            Op::Conv(c) => (&mut c.weight, &mut c.bias),
            Op::Linear(l) => (&mut l.weight, &mut l.bias),
            _ => unreachable!("checked to be foldable above"),
        };
        // Weights are [out, ...] in both layouts, so each output channel is a contiguous row.
        let row = weight.len() / channels;
        for (ch, (w_row, b)) in weight
            .chunks_exact_mut(row)
            .zip(bias.iter_mut())
            .enumerate()
        {
            let s = f64::from(scale[ch]) / (f64::from(var[ch]) + epsilon).sqrt();
            for w in w_row {
                *w = (f64::from(*w) * s) as f32;
            }
            *b = ((f64::from(*b) - f64::from(mean[ch])) * s + f64::from(shift[ch])) as f32;
        }
        if !weight.iter().chain(bias.iter()).all(|v| v.is_finite()) {
            return Err(n.invalid("folding it gives non-finite weights (is var + epsilon <= 0?)"));
        }
        self.alias(n, x)
    }

    fn elementwise(&mut self, n: &OnnxNode<'a>, op: Op) -> Result<()> {
        let x = self.value(n, 0)?;
        self.push(n, op, vec![x.id], self.shape(x.id), x.rank)
    }

    fn clip(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let (min, max) = if self.opset < 11 {
            (
                n.float("min", f32::NEG_INFINITY)?,
                n.float("max", f32::INFINITY)?,
            )
        } else {
            let bound = |index: usize, what: &str, absent: f32| -> Result<f32> {
                match self.optional_constant(n, index, what)? {
                    None => Ok(absent),
                    Some(t) => t
                        .scalar_f32()
                        .map_err(|r| n.invalid(format!("{what} '{}': {r}", n.proto.input[index]))),
                }
            };
            (
                bound(1, "min", f32::NEG_INFINITY)?,
                bound(2, "max", f32::INFINITY)?,
            )
        };
        if min.is_nan() || max.is_nan() || min > max {
            return Err(n.invalid(format!("invalid bounds min={min}, max={max}")));
        }
        self.elementwise(n, Op::Clip { min, max })
    }

    fn hard_sigmoid(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let alpha = n.float("alpha", 0.2)?;
        let beta = n.float("beta", 0.5)?;
        if !(alpha.is_finite() && beta.is_finite()) {
            return Err(n.invalid(format!(
                "attributes alpha={alpha} and beta={beta} must be finite"
            )));
        }
        self.elementwise(n, Op::Unary(Unary::HardSigmoid { alpha, beta }))
    }

    fn leaky_relu(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let alpha = n.float("alpha", 0.01)?;
        if !alpha.is_finite() {
            return Err(n.invalid(format!("attribute alpha={alpha} must be finite")));
        }
        self.elementwise(n, Op::Unary(Unary::LeakyRelu { alpha }))
    }

    fn add(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let (a, b) = (n.required_input(0)?, n.required_input(1)?);
        match (self.values.get(a).copied(), self.values.get(b).copied()) {
            (Some(x), Some(y)) => {
                let (sx, sy) = (self.shape(x.id), self.shape(y.id));
                if sx != sy || x.rank != y.rank {
                    return Err(n.invalid(format!(
                        "its inputs '{a}' {} and '{b}' {} differ in shape; ccq supports Add of \
                         same-shape tensors only (no broadcasting)",
                        onnx_shape(sx, x.rank),
                        onnx_shape(sy, y.rank)
                    )));
                }
                self.push(n, Op::Add, vec![x.id, y.id], sx, x.rank)
            }
            (Some(x), None) => self.fold_bias(n, x, b),
            (None, Some(y)) => self.fold_bias(n, y, a),
            // Neither input is a run-time value: `value` explains what the first one is.
            (None, None) => self.value(n, 0).map(drop),
        }
    }

    /// `x + constant` where `x` comes from a Linear (MatMul + Add) or Conv that feeds
    /// nothing else, and the constant varies only along the channel axis: a bias.
    fn fold_bias(&mut self, n: &OnnxNode<'a>, x: Val, bias_name: &'a str) -> Result<()> {
        let t = self.constant_named(n, bias_name, "bias")?;
        let values = t
            .floats()
            .map_err(|r| n.invalid(format!("bias '{bias_name}': {r}")))?;
        let channels = self.shape(x.id).c;
        // Broadcasting aligns trailing dims, so the constant is per-channel when its dim on
        // ONNX axis 1 (C) is C or 1 and every other dim it has is 1.
        let per_channel = t.dims.len() <= x.rank
            && t.dims.iter().rev().enumerate().all(|(from_end, &d)| {
                let axis = x.rank - 1 - from_end;
                d == 1 || (axis == 1 && d == channels)
            });
        let foldable = x.id > 0
            && matches!(self.nodes[x.id - 1].op, Op::Conv(_) | Op::Linear(_))
            && self.live_uses[x.id] == 1;
        if !foldable || !per_channel {
            return Err(n.unsupported(format!(
                "Add of a constant ('{bias_name}', dims {:?}) is only supported as the \
                 per-channel bias of the Conv, Gemm or MatMul that produces its other input \
                 and feeds nothing else",
                t.dims
            )));
        }
        let bias = match &mut self.nodes[x.id - 1].op {
            Op::Conv(c) => &mut c.bias,
            Op::Linear(l) => &mut l.bias,
            _ => unreachable!("checked to be foldable above"),
        };
        for (ch, b) in bias.iter_mut().enumerate() {
            *b += if values.len() == 1 {
                values[0]
            } else {
                values[ch]
            };
        }
        self.alias(n, x)
    }

    /// Elementwise product of two run-time tensors: same shapes, or a tensor and an
    /// `[N, C, 1, 1]` per-channel scale in either order (the IR wants the scale second),
    /// or `x * Sigmoid(x)`, which becomes one SiLU.
    fn mul(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let (a, b) = (n.required_input(0)?, n.required_input(1)?);
        let (x, y) = match (self.values.get(a).copied(), self.values.get(b).copied()) {
            (Some(x), Some(y)) => (x, y),
            (Some(_), None) | (None, Some(_)) => {
                // The IR has no constant operand, so a constant scale would have to be
                // folded into the layer before it, which is only exact for a per-channel
                // constant after a Conv/Gemm that feeds nothing else. The blocks this Mul
                // is for (squeeze-excitation, SiLU) multiply two run-time tensors, so a
                // constant is refused rather than folded.
                let name = if self.values.contains_key(a) { b } else { a };
                let t = self.constant_named(n, name, "factor")?;
                return Err(n.unsupported(format!(
                    "Mul by a constant ('{name}', dims {:?}) is not supported; ccq supports Mul \
                     of two run-time tensors of the same shape, or of a tensor by an \
                     [N, C, 1, 1] per-channel scale (fold constant scales into the layer \
                     before them when exporting)",
                    t.dims
                )));
            }
            // Neither input is a run-time value: `value` explains what the first one is.
            (None, None) => return self.value(n, 0).map(drop),
        };
        if self.fuse_silu(n, x, y)? {
            return Ok(());
        }
        let (sx, sy) = (self.shape(x.id), self.shape(y.id));
        if x.rank == y.rank && sx == sy {
            return self.push(n, Op::Mul, vec![x.id, y.id], sx, x.rank);
        }
        let per_channel = |s: Shape| s.h == 1 && s.w == 1;
        if x.rank == 4 && y.rank == 4 && sx.c == sy.c {
            if per_channel(sy) {
                return self.push(n, Op::Mul, vec![x.id, y.id], sx, 4);
            }
            if per_channel(sx) {
                return self.push(n, Op::Mul, vec![y.id, x.id], sy, 4);
            }
        }
        let shapes = format!(
            "'{a}' {} and '{b}' {}",
            onnx_shape(sx, x.rank),
            onnx_shape(sy, y.rank)
        );
        // Same-rank shapes whose dims differ with neither being 1 cannot broadcast at all;
        // anything else is valid ONNX that the IR has no form for.
        let pairs = [(sx.c, sy.c), (sx.h, sy.h), (sx.w, sy.w)];
        if x.rank == y.rank && pairs.iter().any(|&(p, q)| p != q && p != 1 && q != 1) {
            return Err(n.invalid(format!("its inputs {shapes} do not broadcast")));
        }
        Err(n.unsupported(format!(
            "broadcasting {shapes} is not supported; ccq supports Mul of same-shape tensors \
             and of an [N, C, H, W] tensor by an [N, C, 1, 1] per-channel scale (either order)"
        )))
    }

    /// `x * Sigmoid(x)` (either order) is SiLU as PyTorch exports `nn.SiLU`. When this Mul
    /// is the Sigmoid's only reader, the Sigmoid node becomes the SiLU in place (its
    /// position is already after `x`) and takes the Mul's name, since it now computes the
    /// Mul's output; the Mul's output then names that value, so no dead node remains. A
    /// Sigmoid read elsewhere too is left alone, and the Mul stays a Mul.
    fn fuse_silu(&mut self, n: &OnnxNode<'a>, x: Val, y: Val) -> Result<bool> {
        for (plain, gate) in [(x, y), (y, x)] {
            if gate.id == 0 || gate.rank != plain.rank || self.live_uses[gate.id] != 1 {
                continue;
            }
            let node = &mut self.nodes[gate.id - 1];
            if node.op == Op::Unary(Unary::Sigmoid) && node.inputs == [plain.id] {
                node.op = Op::Unary(Unary::Silu);
                node.name.clone_from(&n.name);
                self.alias(n, gate)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Concatenation along channels (features for `[N, F]` values) of inputs with equal
    /// H and W. One input is just renamed.
    fn concat(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        if n.proto.input.is_empty() {
            return Err(n.invalid("it has no inputs"));
        }
        let inputs = (0..n.proto.input.len())
            .map(|i| self.value(n, i))
            .collect::<Result<Vec<Val>>>()?;
        let first = inputs[0];
        let first_shape = self.shape(first.id);
        let describe = |i: usize, v: Val| {
            format!(
                "'{}' {}",
                n.proto.input[i],
                onnx_shape(self.shape(v.id), v.rank)
            )
        };
        if let Some(i) = inputs.iter().position(|v| v.rank != first.rank) {
            return Err(n.invalid(format!(
                "its inputs {} and {} differ in rank",
                describe(0, first),
                describe(i, inputs[i])
            )));
        }
        // `axis` is required from opset 4; before, it defaulted to 1.
        if self.opset >= 4 && !n.has_attr("axis") {
            return Err(n.invalid("attribute 'axis' is missing"));
        }
        let axis = n.int("axis", 1)?;
        if onnx_axis(n, axis, first.rank)? != 1 {
            return Err(n.unsupported(format!(
                "Concat along axis {axis} of {} is not supported; only along channels (axis 1; \
                 also -3 for [N, C, H, W] or -1 for [N, F] inputs) is",
                onnx_shape(first_shape, first.rank)
            )));
        }
        let mut channels = 0usize;
        for (i, &v) in inputs.iter().enumerate() {
            let s = self.shape(v.id);
            if (s.h, s.w) != (first_shape.h, first_shape.w) {
                return Err(n.invalid(format!(
                    "its inputs {} and {} differ in height or width; Concat along channels \
                     needs them equal",
                    describe(0, first),
                    describe(i, v)
                )));
            }
            channels = channels
                .checked_add(s.c)
                .ok_or_else(|| n.invalid("its output is too large"))?;
        }
        if inputs.len() == 1 {
            return self.alias(n, first);
        }
        let shape = Shape::new(channels, first_shape.h, first_shape.w);
        let ids = inputs.iter().map(|v| v.id).collect();
        self.push(n, Op::Concat, ids, shape, first.rank)
    }

    fn pool(&mut self, n: &OnnxNode<'a>, average: bool) -> Result<()> {
        let x = self.image(n, 0)?;
        let input = self.shape(x.id);
        let kernel = match n.ints("kernel_shape")? {
            None => return Err(n.invalid("attribute 'kernel_shape' is missing")),
            Some(&[kh, kw]) if kh >= 1 && kw >= 1 => [kh as usize, kw as usize],
            Some(ks) if ks.len() == 2 => {
                return Err(n.invalid(format!("kernel_shape={ks:?} must be positive")))
            }
            Some(ks) => {
                return Err(n.unsupported(format!(
                    "only 2-D pooling is supported; kernel_shape={ks:?}"
                )))
            }
        };
        let stride = n.pair("strides", [1, 1], 1)?;
        if n.pair("dilations", [1, 1], 1)? != [1, 1] {
            return Err(n.unsupported("dilated pooling is not supported"));
        }
        let (pads, [oh, ow]) = window(n, input, kernel, stride, [1, 1])?;
        // A window lying entirely in the padding would have no input cell (ONNX Runtime
        // rejects such models too).
        if pads[0] >= kernel[0]
            || pads[2] >= kernel[0]
            || pads[1] >= kernel[1]
            || pads[3] >= kernel[1]
        {
            return Err(n.invalid(format!(
                "pads {pads:?} must be smaller than kernel_shape {kernel:?}"
            )));
        }
        if n.int("ceil_mode", 0)? != 0 {
            let ceil = |axis: usize, size: usize| {
                let padded = size + pads[axis] + pads[axis + 2];
                (padded - kernel[axis]).div_ceil(stride[axis]) + 1
            };
            let (ch, cw) = (ceil(0, input.h), ceil(1, input.w));
            if (ch, cw) != (oh, ow) {
                return Err(n.unsupported(format!(
                    "ceil_mode=1 is only supported when it does not change the output size \
                     (here {ch}x{cw} instead of {oh}x{ow})"
                )));
            }
        }
        let pool = Pool {
            kernel,
            stride,
            pads,
            count_include_pad: average && n.int("count_include_pad", 0)? != 0,
        };
        let op = if average {
            Op::AveragePool(pool)
        } else {
            Op::MaxPool(pool)
        };
        self.push(n, op, vec![x.id], Shape::new(input.c, oh, ow), 4)
    }

    fn global_average_pool(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let x = self.image(n, 0)?;
        let shape = Shape::new(self.shape(x.id).c, 1, 1);
        self.push(n, Op::GlobalAveragePool, vec![x.id], shape, 4)
    }

    fn flatten(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let x = self.value(n, 0)?;
        let axis = n.int("axis", 1)?;
        if axis != 1 && axis != 1 - x.rank as i64 {
            return Err(n.unsupported(format!(
                "only Flatten with axis=1 (keeping the batch axis) is supported; axis={axis}"
            )));
        }
        self.flatten_value(n, x)
    }

    /// `[N, C, H, W] -> [N, C*H*W]`; NCHW memory order is unchanged, so a value that is
    /// already flat is just renamed.
    fn flatten_value(&mut self, n: &OnnxNode<'a>, x: Val) -> Result<()> {
        let shape = self.shape(x.id);
        if x.rank == 2 || (shape.h == 1 && shape.w == 1) {
            return self.alias(n, Val { id: x.id, rank: 2 });
        }
        self.push(n, Op::Flatten, vec![x.id], Shape::new(shape.len(), 1, 1), 2)
    }

    fn reshape(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let x = self.value(n, 0)?;
        let target = self
            .int_list(n, 1, "shape", self.opset >= 5)?
            .ok_or_else(|| n.invalid("the target shape is missing"))?;
        let allow_zero = n.int("allowzero", 0)? != 0;
        let len = self.shape(x.id).len() as i64;
        // The batch entry may be 0 (copy), -1 (infer, when K is given) or the batch size
        // the model was exported with; the feature entry -1 or K.
        let flattens = match *target.as_slice() {
            [b, k] => {
                let batch_ok = match b {
                    0 => !allow_zero,
                    -1 => k == len,
                    b if b > 0 => self.batch.is_none_or(|fixed| fixed == b),
                    _ => false,
                };
                batch_ok && (k == -1 || k == len)
            }
            _ => false,
        };
        if !flattens {
            return Err(n.unsupported(format!(
                "Reshape of {} to {target:?} is not supported: only a flatten to [N, {len}] \
                 (written [N, -1], [N, {len}], [0, -1] or [-1, {len}]) is",
                onnx_shape(self.shape(x.id), x.rank)
            )));
        }
        self.flatten_value(n, x)
    }

    fn gemm(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let x = self.value(n, 0)?;
        if n.int("transA", 0)? != 0 {
            return Err(n.unsupported("transA=1 is not supported"));
        }
        let trans_b = match n.int("transB", 0)? {
            0 => false,
            1 => true,
            t => return Err(n.invalid(format!("transB={t} must be 0 or 1"))),
        };
        let alpha = n.float("alpha", 1.0)?;
        let beta = n.float("beta", 1.0)?;
        let (dims, b) = self.floats(n, 1, "B")?;
        let mut linear = self.linear(n, x, &dims, b, trans_b)?;
        for w in &mut linear.weight {
            *w *= alpha;
        }
        if let Some(c) = self.optional_constant(n, 2, "C")? {
            let out = linear.out_features;
            let values = c
                .floats()
                .map_err(|r| n.invalid(format!("C '{}': {r}", n.proto.input[2])))?;
            // C broadcasts against [N, out]; ccq has no per-sample bias.
            let broadcastable = match *c.dims.as_slice() {
                [] => true,
                [k] | [1, k] => k == out || k == 1,
                _ => false,
            };
            if !broadcastable {
                return Err(n.unsupported(format!(
                    "C '{}' has dims {:?}; only a bias of [{out}], [1, {out}] or a scalar \
                     is supported",
                    n.proto.input[2], c.dims
                )));
            }
            for (o, bias) in linear.bias.iter_mut().enumerate() {
                *bias = beta
                    * if values.len() == 1 {
                        values[0]
                    } else {
                        values[o]
                    };
            }
        }
        self.push_linear(n, x, linear)
    }

    fn matmul(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let x = self.value(n, 0)?;
        let (dims, b) = self.floats(n, 1, "weight")?;
        let linear = self.linear(n, x, &dims, b, false)?;
        self.push_linear(n, x, linear)
    }

    /// A bias-free Linear from a constant matrix `b`: `[out, in]` when `transposed` (Gemm
    /// transB=1), else `[in, out]`.
    fn linear(
        &self,
        n: &OnnxNode<'a>,
        x: Val,
        dims: &[usize],
        b: Vec<f32>,
        transposed: bool,
    ) -> Result<Linear> {
        if x.rank != 2 {
            return Err(n.invalid(format!(
                "input '{}' has shape {}; {} needs a 2-D [N, K] input (add a Flatten before it)",
                n.proto.input[0],
                onnx_shape(self.shape(x.id), x.rank),
                n.op()
            )));
        }
        let &[rows, cols] = dims else {
            return Err(n.unsupported(format!(
                "the weight must be a 2-D matrix, it has dims {dims:?}"
            )));
        };
        let (out, inp) = if transposed {
            (rows, cols)
        } else {
            (cols, rows)
        };
        let features = self.shape(x.id).c;
        if inp != features || out == 0 {
            return Err(n.invalid(format!(
                "the weight {dims:?} expects {inp} input features, the input has {features}"
            )));
        }
        let weight = if transposed {
            b
        } else {
            let mut w = vec![0.0; b.len()];
            for (i, row) in b.chunks_exact(out).enumerate() {
                for (o, &v) in row.iter().enumerate() {
                    w[o * inp + i] = v;
                }
            }
            w
        };
        Ok(Linear {
            out_features: out,
            in_features: inp,
            weight,
            bias: vec![0.0; out],
        })
    }

    fn push_linear(&mut self, n: &OnnxNode<'a>, x: Val, linear: Linear) -> Result<()> {
        let shape = Shape::new(linear.out_features, 1, 1);
        self.push(n, Op::Linear(linear), vec![x.id], shape, 2)
    }

    /// Identity and (eval-mode) Dropout: the output is the input, value or constant.
    fn identity(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        if n.op() == "Dropout" && self.opset >= 12 {
            if let Some(t) = self.optional_constant(n, 2, "training_mode")? {
                if t.ints().is_ok_and(|v| v.iter().any(|&m| m != 0)) {
                    return Err(n.unsupported(
                        "training_mode=true is not supported; export the model in eval mode",
                    ));
                }
            }
        }
        if let Some(t) = self.consts.get(n.required_input(0)?).cloned() {
            return self.bind_const(n, t);
        }
        let x = self.value(n, 0)?;
        self.alias(n, x)
    }

    fn constant_node(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let tensor = if let Some(t) = n.tensor("value")? {
            Cow::Borrowed(t)
        } else if n.has_attr("value_float") {
            Cow::Owned(float_tensor(vec![], vec![n.float("value_float", 0.0)?]))
        } else if let Some(v) = n.floats("value_floats")? {
            Cow::Owned(float_tensor(vec![v.len() as i64], v.to_vec()))
        } else if n.has_attr("value_int") {
            Cow::Owned(int_tensor(vec![], vec![n.int("value_int", 0)?]))
        } else if let Some(v) = n.ints("value_ints")? {
            Cow::Owned(int_tensor(vec![v.len() as i64], v.to_vec()))
        } else {
            return Err(n.unsupported(
                "only Constant nodes with a value, value_float(s) or value_int(s) attribute \
                 are supported",
            ));
        };
        // Decode now so that a corrupt constant is reported at its Constant node.
        Tensor::decode(&tensor).map_err(|r| n.invalid(format!("value: {r}")))?;
        self.bind_const(n, tensor)
    }

    fn slice(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let x = self.value(n, 0)?;
        let shape = self.shape(x.id);
        let from_inputs = self.opset >= 10;
        let missing = |what: &str| n.invalid(format!("{what} is missing"));
        let starts = self
            .int_list(n, 1, "starts", from_inputs)?
            .ok_or_else(|| missing("starts"))?;
        let ends = self
            .int_list(n, 2, "ends", from_inputs)?
            .ok_or_else(|| missing("ends"))?;
        let axes = self.int_list(n, 3, "axes", from_inputs)?;
        let steps = if from_inputs {
            self.int_list(n, 4, "steps", true)?
        } else {
            None
        };
        let count = starts.len();
        let axes = axes.unwrap_or_else(|| (0..count as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; count]);
        if ends.len() != count || axes.len() != count || steps.len() != count {
            return Err(n.invalid(format!(
                "starts {starts:?}, ends {ends:?}, axes {axes:?} and steps {steps:?} differ \
                 in length"
            )));
        }

        let dims = [shape.c, shape.h, shape.w];
        let mut slice = Slice {
            start: [0; 3],
            end: dims,
            step: [1; 3],
        };
        let mut seen = [false; 4];
        for i in 0..count {
            let (start, end, step) = (starts[i], ends[i], steps[i]);
            let axis = onnx_axis(n, axes[i], x.rank)?;
            if std::mem::replace(&mut seen[axis], true) {
                return Err(n.invalid(format!("axis {} appears twice in axes {axes:?}", axes[i])));
            }
            if step == 0 {
                return Err(n.invalid("a step is 0"));
            }
            if step < 0 {
                return Err(n.unsupported("negative steps (reversal) are not supported"));
            }
            let Some(a) = ir_axis(axis) else {
                // The batch stays implicit, so it can only be kept whole.
                if start != 0 || step != 1 || end < i64::from(i32::MAX) {
                    return Err(n.unsupported(format!(
                        "slicing the batch axis ({start}..{end} step {step}) is not supported; \
                         only the full range is"
                    )));
                }
                continue;
            };
            // ONNX semantics: negative positions count from the end, then clamp to the
            // axis. i128 keeps `position + dim` exact for any i64.
            let dim = dims[a] as i128;
            let clamp = |p: i64| {
                let p = p as i128;
                (if p < 0 { p + dim } else { p }).clamp(0, dim) as usize
            };
            slice.start[a] = clamp(start);
            slice.end[a] = clamp(end);
            slice.step[a] = usize::try_from(step)
                .unwrap_or(usize::MAX)
                .min(dims[a].max(1));
        }
        let out: Vec<usize> = (0..3)
            .map(|a| {
                let span = slice.end[a].saturating_sub(slice.start[a]);
                span.div_ceil(slice.step[a])
            })
            .collect();
        if out.contains(&0) {
            return Err(n.invalid(format!(
                "it selects nothing from {} (starts {starts:?}, ends {ends:?}, axes {axes:?}, \
                 steps {steps:?})",
                onnx_shape(shape, x.rank)
            )));
        }
        if out == dims && slice.step == [1; 3] {
            return self.alias(n, x);
        }
        // Normalise `end` so that it never exceeds the last selected element by a step.
        for (a, &len) in out.iter().enumerate() {
            slice.end[a] = slice.start[a] + (len - 1) * slice.step[a] + 1;
        }
        self.push(
            n,
            Op::Slice(slice),
            vec![x.id],
            Shape::new(out[0], out[1], out[2]),
            x.rank,
        )
    }

    fn pad(&mut self, n: &OnnxNode<'a>) -> Result<()> {
        let x = self.value(n, 0)?;
        let shape = self.shape(x.id);
        let mode = n.string("mode", "constant")?;
        if mode != "constant" {
            return Err(n.unsupported(format!(
                "mode '{mode}' is not supported, only 'constant' (zero) padding"
            )));
        }
        let from_inputs = self.opset >= 11;
        let pads = self
            .int_list(n, 1, "pads", from_inputs)?
            .ok_or_else(|| n.invalid("pads is missing"))?;
        let value = if from_inputs {
            match self.optional_constant(n, 2, "constant_value")? {
                None => 0.0,
                Some(t) if t.len() == 0 => 0.0,
                Some(t) => t
                    .scalar_f32()
                    .map_err(|r| n.invalid(format!("constant_value: {r}")))?,
            }
        } else {
            n.float("value", 0.0)?
        };
        if value != 0.0 {
            return Err(n.unsupported(format!("padding value {value} is not supported, only 0")));
        }
        let axes = match self.int_list(n, 3, "axes", from_inputs)? {
            Some(axes) => axes,
            None => (0..x.rank as i64).collect(),
        };
        if pads.len() != 2 * axes.len() {
            return Err(n.invalid(format!(
                "pads {pads:?} should have 2 values per padded axis ({} axes)",
                axes.len()
            )));
        }
        let mut pad = Pad {
            before: [0; 3],
            after: [0; 3],
        };
        let mut seen = [false; 4];
        for (i, &axis) in axes.iter().enumerate() {
            let axis = onnx_axis(n, axis, x.rank)?;
            if std::mem::replace(&mut seen[axis], true) {
                return Err(n.invalid(format!("axis {axis} appears twice in axes {axes:?}")));
            }
            let (before, after) = (pads[i], pads[i + axes.len()]);
            if before < 0 || after < 0 {
                return Err(n.unsupported(format!(
                    "negative pads (cropping) are not supported: {pads:?}"
                )));
            }
            match ir_axis(axis) {
                None if before != 0 || after != 0 => {
                    return Err(n.unsupported(format!(
                        "padding the batch axis is not supported: {pads:?}"
                    )));
                }
                None => {}
                Some(a) => {
                    let too_large = || n.invalid(format!("pads {pads:?} are too large"));
                    pad.before[a] = usize::try_from(before).map_err(|_| too_large())?;
                    pad.after[a] = usize::try_from(after).map_err(|_| too_large())?;
                }
            }
        }
        let dims = [shape.c, shape.h, shape.w];
        let mut out = [0; 3];
        for a in 0..3 {
            out[a] = dims[a]
                .checked_add(pad.before[a])
                .and_then(|d| d.checked_add(pad.after[a]))
                .ok_or_else(|| n.invalid(format!("pads {pads:?} are too large")))?;
        }
        if out == dims {
            return self.alias(n, x);
        }
        self.push(
            n,
            Op::Pad(pad),
            vec![x.id],
            Shape::new(out[0], out[1], out[2]),
            x.rank,
        )
    }
}

/// `[top, left, bottom, right]` pads and the output `[h, w]` of a 2-D window op, from its
/// `pads` or `auto_pad` attribute.
fn window(
    n: &OnnxNode<'_>,
    input: Shape,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
) -> Result<([usize; 4], [usize; 2])> {
    let size = [input.h, input.w];
    let too_large = || n.invalid("kernel, dilation or pads are too large");
    let mut span = [0; 2];
    for a in 0..2 {
        span[a] = kernel[a]
            .checked_sub(1)
            .and_then(|k| k.checked_mul(dilation[a]))
            .and_then(|k| k.checked_add(1))
            .ok_or_else(too_large)?;
    }
    let auto_pad = n.string("auto_pad", "NOTSET")?;
    let pads = match auto_pad.as_str() {
        "NOTSET" => n.pads()?,
        "VALID" => [0; 4],
        "SAME_UPPER" | "SAME_LOWER" => {
            // Output ceil(in / stride); the odd pixel of padding goes at the end (UPPER) or
            // the beginning (LOWER).
            let mut pads = [0; 4];
            for a in 0..2 {
                let out = size[a].div_ceil(stride[a]);
                let needed = (out - 1)
                    .checked_mul(stride[a])
                    .and_then(|v| v.checked_add(span[a]))
                    .ok_or_else(too_large)?;
                let total = needed.saturating_sub(size[a]);
                let (small, big) = (total / 2, total - total / 2);
                (pads[a], pads[a + 2]) = if auto_pad == "SAME_UPPER" {
                    (small, big)
                } else {
                    (big, small)
                };
            }
            pads
        }
        other => return Err(n.invalid(format!("unknown auto_pad '{other}'"))),
    };
    let mut out = [0; 2];
    for a in 0..2 {
        size[a]
            .checked_add(pads[a])
            .and_then(|v| v.checked_add(pads[a + 2]))
            .ok_or_else(too_large)?;
        out[a] = model::window_out(
            size[a],
            kernel[a],
            stride[a],
            pads[a],
            pads[a + 2],
            dilation[a],
        );
        if out[a] == 0 {
            return Err(n.invalid(format!(
                "the window (kernel {kernel:?}, dilation {dilation:?}) is larger than the \
                 padded input {input} (pads {pads:?})"
            )));
        }
    }
    Ok((pads, out))
}

/// ONNX axis (negative counts from the end) of a rank-`rank` value, normalised to `0..rank`.
fn onnx_axis(n: &OnnxNode<'_>, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 {
        axis.saturating_add(r)
    } else {
        axis
    };
    usize::try_from(a)
        .ok()
        .filter(|&a| a < rank)
        .ok_or_else(|| {
            n.invalid(format!(
                "axis {axis} is out of range for a rank-{rank} tensor"
            ))
        })
}

/// The `[C, H, W]` index of a normalised ONNX axis; `None` for the batch axis. A rank-2
/// value `[N, F]` keeps F in C, so axis 1 maps to 0 for both ranks.
fn ir_axis(axis: usize) -> Option<usize> {
    axis.checked_sub(1)
}

/// A value's shape as ONNX sees it, for messages.
fn onnx_shape(s: Shape, rank: usize) -> String {
    if rank == 2 {
        format!("[N, {}]", s.c)
    } else {
        format!("[N, {}, {}, {}]", s.c, s.h, s.w)
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Conv(_) => "Conv",
        Op::Linear(_) => "Linear",
        Op::Relu => "Relu",
        Op::Clip { .. } => "Clip",
        Op::Add => "Add",
        Op::Unary(f) => f.name(),
        Op::Mul => "Mul",
        Op::Concat => "Concat",
        Op::MaxPool(_) => "MaxPool",
        Op::AveragePool(_) => "AveragePool",
        Op::GlobalAveragePool => "GlobalAveragePool",
        Op::Flatten => "Flatten",
        Op::Slice(_) => "Slice",
        Op::Pad(_) => "Pad",
    }
}

fn float_tensor(dims: Vec<i64>, values: Vec<f32>) -> TensorProto {
    TensorProto {
        dims,
        data_type: DataType::Float as i32,
        float_data: values,
        ..Default::default()
    }
}

fn int_tensor(dims: Vec<i64>, values: Vec<i64>) -> TensorProto {
    TensorProto {
        dims,
        data_type: DataType::Int64 as i32,
        int64_data: values,
        ..Default::default()
    }
}
