//! Post-training quantization: float [`Graph`] + calibration images -> [`QNetwork`].
//!
//! - Weights: symmetric, per output channel, round-to-nearest from max-abs scales
//!   (`s_w = max|w| / (2^(b-1) - 1)`) or least-squared-error scales; the float scales are
//!   kept only as metadata. Optionally ([`QuantConfig::rounding`]) the codes come from
//!   error-feedback rounding (GPTQ, in `rounding.rs`) instead of rounding each weight
//!   to its nearest code.
//! - Activations: per tensor, calibrated on a few training images by max, by a
//!   percentile of the observed range, or by the least squared quantization error. Values
//!   that are non-negative in calibration (after a ReLU) are unsigned with zero point 0;
//!   others are affine (min/max, zero point chosen so that 0.0 is exact, which makes zero
//!   padding exact).
//! - The network input is always 8-bit affine, and the normalisation `(p/255 - mean)/std`
//!   is folded into a per-channel lookup table from raw pixels.
//! - ReLU/Clip directly after a Conv, Linear or Add are fused into its output stage;
//!   pooling, slicing, padding and flattening keep their input's quantization.
//! - Biases become i32 at scale `s_in * s_w`; rescaling is a fixed-point multiplier.
//!   Optionally ([`QuantConfig::bias_correction`]) they are then corrected so that every
//!   layer's mean pre-activation per channel matches the float network's on the
//!   calibration images: rounding the weights shifts those means systematically, and at
//!   3-4 weight bits that shift costs more accuracy than the rounding noise itself.

use crate::float;
use crate::kernels::{AddParams, ConvGeom, MulParams, OutputStage, PoolGeom, Requant};
use crate::model::{Graph, Normalization, Op, Pool, Shape};
use crate::qnet::{
    self, code_range, ChannelScales, InputQuant, LayerVars, QConv, QNetwork, QNode, QOp, QValue,
    VarKind,
};
use crate::rounding;
use crate::{Error, Result};

/// How activation ranges are taken from calibration data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    /// The full observed range.
    Max,
    /// Clip the range to this percentile of observed values at each end (e.g. 99.99).
    Percentile(f64),
    /// Clip the range where the expected squared quantization error of the observed values
    /// (rounding inside the range, clipping outside it) at the activation bit width is least.
    Mse,
}

impl std::str::FromStr for Calibration {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "max" => return Ok(Calibration::Max),
            "mse" => return Ok(Calibration::Mse),
            _ => {}
        }
        let p = s
            .strip_prefix("percentile:")
            .or_else(|| s.strip_prefix('p'))
            .and_then(|p| p.parse::<f64>().ok());
        match p {
            Some(p) if p > 50.0 && p <= 100.0 => Ok(Calibration::Percentile(p)),
            _ => Err(Error::setting(
                "calibration",
                s,
                "expected 'max', 'mse' or 'percentile:P' with 50 < P <= 100",
            )),
        }
    }
}

/// How each output channel's weight scale is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightScale {
    /// The channel's largest magnitude maps to the largest code: nothing is clipped.
    Max,
    /// The scale whose round-to-nearest codes reconstruct the channel's weights with the
    /// least squared error ([`least_squared_error_scale`]): at 2-3 bits a few large
    /// weights are clipped so that the many small ones round finer.
    Mse,
}

impl std::str::FromStr for WeightScale {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "max" => Ok(WeightScale::Max),
            "mse" => Ok(WeightScale::Mse),
            _ => Err(Error::setting("weight_scale", s, "expected 'max' or 'mse'")),
        }
    }
}

/// How float weights become codes once each channel's scale is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Every weight to its nearest code, clamped to the symmetric range.
    Nearest,
    /// Error-feedback rounding (GPTQ, in `rounding.rs`): layer by layer, the codes
    /// that keep the layer's output on the calibration images close to the float
    /// layer's, each rounding error compensated by the weights not yet rounded. Codes may
    /// use the whole signed range (e.g. -2 at 2 bits).
    Gptq,
}

impl std::str::FromStr for Rounding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nearest" => Ok(Rounding::Nearest),
            "gptq" => Ok(Rounding::Gptq),
            _ => Err(Error::setting(
                "rounding",
                s,
                "expected 'nearest' or 'gptq'",
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    pub weight_bits: u8,
    pub act_bits: u8,
    pub calibration: Calibration,
    /// How each output channel's weight scale is chosen.
    pub weight_scale: WeightScale,
    /// How weights are rounded to codes at those scales.
    pub rounding: Rounding,
    /// Shift each layer's integer biases so that its mean pre-activation on the
    /// calibration images matches the float network's ([`correct_biases`]).
    pub bias_correction: bool,
    /// Weight bits of the first weight layer and the logits layer, when they differ from
    /// `weight_bits` (mixed precision as commonly practised: the first convolution and the
    /// classifier are small and sensitive, so they are often kept at 8 bits).
    pub first_last_bits: Option<u8>,
    /// Searched per-channel weight-scale multipliers `1 + k * step` on every hidden
    /// layer ([`QNetwork::add_channel_scales`]), when set.
    pub channel_scale_step: Option<f64>,
    /// Searched clipping levels, scale times `1 + k * step`, of every activation that can
    /// carry one ([`QNetwork::add_act_clips`]), when set.
    pub act_clip_step: Option<f64>,
}

impl QuantConfig {
    /// `weight_bits` / `act_bits` with every other setting at its default: max
    /// calibration, max weight scales, round to nearest, no bias correction, uniform bits.
    pub fn new(weight_bits: u8, act_bits: u8) -> QuantConfig {
        QuantConfig {
            weight_bits,
            act_bits,
            calibration: Calibration::Max,
            weight_scale: WeightScale::Max,
            rounding: Rounding::Nearest,
            bias_correction: false,
            first_last_bits: None,
            channel_scale_step: None,
            act_clip_step: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(2..=8).contains(&self.weight_bits) {
            return Err(Error::setting(
                "weight_bits",
                self.weight_bits,
                "must be 2..=8",
            ));
        }
        if !(2..=8).contains(&self.act_bits) {
            return Err(Error::setting("act_bits", self.act_bits, "must be 2..=8"));
        }
        if let Some(b) = self.first_last_bits.filter(|b| !(2..=8).contains(b)) {
            return Err(Error::setting("first_last_bits", b, "must be 2..=8"));
        }
        if let Some(s) = self
            .channel_scale_step
            .filter(|&s| !ChannelScales::valid_step(s))
        {
            return Err(Error::setting(
                "channel_scale_step",
                s,
                "must lie in (0, 0.5]",
            ));
        }
        if let Some(s) = self
            .act_clip_step
            .filter(|&s| !ChannelScales::valid_step(s))
        {
            return Err(Error::setting("act_clip_step", s, "must lie in (0, 0.5]"));
        }
        Ok(())
    }
}

/// How one float value is represented in the integer network.
#[derive(Clone, Copy)]
enum Role {
    /// Not materialised (a Conv/Add output whose ReLU was fused).
    Fused,
    /// Materialised as q value `id`.
    At(usize),
}

/// Quantizes `graph`. `calib` holds `n` CHW u8 images (the first training images).
pub fn quantize(
    graph: &Graph,
    norm: &Normalization,
    calib: &[u8],
    n: usize,
    cfg: &QuantConfig,
) -> Result<QNetwork> {
    cfg.validate()?;
    let ishape = graph.input_shape;
    if norm.mean.len() != ishape.c || norm.std.len() != ishape.c {
        return Err(Error::setting(
            "mean/std",
            norm.mean.len(),
            format!("the model input has {} channels", ishape.c),
        ));
    }
    if let Some(c) = norm.std.iter().position(|&s| s.is_nan() || s <= 0.0) {
        return Err(Error::setting("std", norm.std[c], "must be > 0"));
    }
    if n == 0 || calib.len() != n * ishape.len() {
        return Err(Error::setting(
            "calib_images",
            n,
            "need at least one calibration image",
        ));
    }
    let last = graph.nodes.len();
    if graph.output != last
        || !matches!(
            graph.nodes.last().map(|n| &n.op),
            Some(Op::Conv(_) | Op::Linear(_))
        )
    {
        return Err(Error::InvalidModel {
            node: graph.nodes.last().map_or("<none>".into(), |n| n.name.clone()),
            reason: "the integer engine needs the graph to end with the logits layer (Gemm, MatMul or Conv)".into(),
        });
    }

    // Bits per weight layer: the first weight layer and the logits layer may differ.
    let first_weights = graph
        .nodes
        .iter()
        .position(|n| matches!(n.op, Op::Conv(_) | Op::Linear(_)));
    let bits_of = |i: usize| match cfg.first_last_bits {
        Some(b) if Some(i) == first_weights || i + 1 == last => b,
        _ => cfg.weight_bits,
    };

    // Which Conv/Linear/Add outputs are consumed only by a ReLU/Clip (fused)?
    let mut consumers = vec![Vec::new(); last + 1];
    for (i, node) in graph.nodes.iter().enumerate() {
        for &v in &node.inputs {
            consumers[v].push(i);
        }
    }
    let fusable = |i: usize| -> Option<usize> {
        let node = &graph.nodes[i];
        if !matches!(node.op, Op::Conv(_) | Op::Linear(_) | Op::Add) || i + 1 == last {
            return None;
        }
        match consumers[i + 1].as_slice() {
            [c] if matches!(graph.nodes[*c].op, Op::Relu | Op::Clip { .. }) => Some(*c),
            _ => None,
        }
    };
    // producer node -> activation node, and activation nodes folded into their producer
    let fused_act: Vec<Option<usize>> = (0..last).map(fusable).collect();
    let mut absorbed = vec![false; last];
    for a in fused_act.iter().flatten() {
        absorbed[*a] = true;
    }

    // Which float values need calibration statistics: every value that gets its own scale.
    let mut wanted = vec![false; last + 1];
    for i in 0..last {
        if absorbed[i] || i + 1 == last {
            continue;
        }
        if matches!(
            graph.nodes[i].op,
            Op::Conv(_) | Op::Linear(_) | Op::Add | Op::Unary(_) | Op::Mul | Op::Concat
        ) {
            wanted[fused_act[i].map_or(i + 1, |a| a + 1)] = true;
        }
    }
    let ranges = calibrate(
        graph,
        norm,
        calib,
        n,
        &wanted,
        cfg.calibration,
        cfg.act_bits,
    );

    // The input: 8-bit affine over the exact range of normalised pixel values.
    let (mut lo, mut hi) = (0f64, 0f64);
    for c in 0..ishape.c {
        for p in [0u8, 255] {
            let x = norm.apply(c, p) as f64;
            lo = lo.min(x);
            hi = hi.max(x);
        }
    }
    let input_value = affine(ishape, lo, hi, 8);
    let mut lut = Vec::with_capacity(ishape.c * 256);
    for c in 0..ishape.c {
        for p in 0..=255u8 {
            lut.push(quantize_real(norm.apply(c, p) as f64, &input_value, 255));
        }
    }
    let input = InputQuant {
        lut,
        mean: norm.mean.clone(),
        std: norm.std.clone(),
    };

    // Error-feedback rounding needs each weight layer's input statistics.
    let mut stats = (cfg.rounding == Rounding::Gptq).then(|| {
        let mut stats = rounding::InputStats::new(graph, 0..last);
        float_chunks(graph, norm, calib, n, &mut |vals| {
            stats.add(graph, vals, vals[0].len() / ishape.len())
        });
        stats
    });
    // Node `i`'s statistics, reordered like its weights (`perm[a]` is the float graph's
    // index of the layer's own weight index `a`).
    let mut hessian = |i: usize, perm: &[usize]| -> Option<Vec<f64>> {
        let h = stats.as_mut()?.take(i)?;
        Some(rounding::permuted(&h, perm))
    };

    let amax = ((1u32 << cfg.act_bits) - 1) as u8;
    let mut roles = vec![Role::At(0); last + 1];
    let mut qvals: Vec<QValue> = vec![input_value];
    // Pre-flatten shape of q values produced by Flatten (for Linear weight permutation).
    let mut flat_from: Vec<Option<Shape>> = vec![None];
    let mut nodes: Vec<QNode> = Vec::new();
    let mut layers: Vec<LayerVars> = Vec::new();
    let mut logits = None;
    // Per entry of `layers`: the float value holding that layer's output before any
    // activation (for bias correction).
    let mut pre_act: Vec<usize> = Vec::new();

    for (i, node) in graph.nodes.iter().enumerate() {
        if absorbed[i] {
            // Its producer already mapped this node's output to its materialised value.
            continue;
        }
        let q_in: Vec<usize> = node
            .inputs
            .iter()
            .map(|&v| match roles[v] {
                Role::At(q) => q,
                Role::Fused => unreachable!("fused values are never read"),
            })
            .collect();
        let src = qvals[q_in[0]];
        let own_scale = |i: usize| -> QValue {
            let (v, act) = match fused_act[i] {
                Some(a) => (a + 1, Some(&graph.nodes[a].op)),
                None => (i + 1, None),
            };
            let (mut lo, mut hi) = ranges[v].unwrap_or((0.0, 0.0));
            if let Some(Op::Relu) = act {
                lo = lo.max(0.0);
            }
            if let Some(Op::Clip { min, max }) = act {
                lo = lo.max(*min as f64);
                hi = hi.min(*max as f64);
            }
            affine(graph.shape(v), lo, hi, cfg.act_bits)
        };
        let fused_bounds = |out: &QValue| -> (u8, u8) {
            let (lo, hi) = match fused_act[i].map(|a| &graph.nodes[a].op) {
                Some(Op::Relu) => (0.0, f64::INFINITY),
                Some(Op::Clip { min, max }) => (*min as f64, *max as f64),
                _ => (f64::NEG_INFINITY, f64::INFINITY),
            };
            (quantize_real(lo, out, amax), quantize_real(hi, out, amax))
        };
        let is_logits = i + 1 == last;
        let (op, out, flat) = match &node.op {
            Op::Conv(c) => {
                let geom = ConvGeom {
                    in_h: src.h,
                    in_w: src.w,
                    in_c: src.c,
                    out_c: c.out_channels,
                    k_h: c.kernel[0],
                    k_w: c.kernel[1],
                    stride_h: c.stride[0],
                    stride_w: c.stride[1],
                    dil_h: c.dilation[0],
                    dil_w: c.dilation[1],
                    pad_t: c.pads[0],
                    pad_l: c.pads[1],
                    pad_b: c.pads[2],
                    pad_r: c.pads[3],
                    groups: c.group,
                };
                // ONNX OIHW -> OHWI (I = input channels per group): `perm[a]` is the IHW
                // index of the HWI index `a`. Grouped layers get no error-feedback
                // statistics (`rounding::InputStats` covers dense layers), so they are
                // rounded to nearest.
                let (kh, kw, ic) = (c.kernel[0], c.kernel[1], geom.in_per_group());
                let mut perm = vec![0; kh * kw * ic];
                for ci in 0..ic {
                    for y in 0..kh {
                        for x in 0..kw {
                            perm[(y * kw + x) * ic + ci] = (ci * kh + y) * kw + x;
                        }
                    }
                }
                let k = perm.len();
                let mut w = vec![0f32; c.weight.len()];
                for o in 0..c.out_channels {
                    for (a, &g) in perm.iter().enumerate() {
                        w[o * k + a] = c.weight[o * k + g];
                    }
                }
                let out = if is_logits { src } else { own_scale(i) };
                let bounds = fused_bounds(&out);
                (
                    QOp::Conv(layer(
                        geom,
                        &w,
                        &c.bias,
                        &src,
                        &out,
                        (bits_of(i), cfg.weight_scale),
                        hessian(i, &perm).as_deref(),
                        bounds,
                        is_logits,
                    )),
                    out,
                    None,
                )
            }
            Op::Linear(l) => {
                // Columns follow the float (CHW) flattening; the integer engine flattens
                // NHWC, so permute them when the input was a flattened feature map.
                let mut w = l.weight.clone();
                let mut perm: Vec<usize> = (0..l.in_features).collect();
                if let Some(s) = flat_from[q_in[0]] {
                    let hw = s.h * s.w;
                    for c in 0..s.c {
                        for p in 0..hw {
                            perm[p * s.c + c] = c * hw + p;
                        }
                    }
                    for o in 0..l.out_features {
                        let row = &l.weight[o * l.in_features..(o + 1) * l.in_features];
                        let dst = &mut w[o * l.in_features..(o + 1) * l.in_features];
                        for (d, &g) in dst.iter_mut().zip(&perm) {
                            *d = row[g];
                        }
                    }
                } else if src.h * src.w != 1 {
                    return Err(Error::InvalidModel {
                        node: node.name.clone(),
                        reason: "a fully connected layer must read a flattened or 1x1 value".into(),
                    });
                }
                let geom = ConvGeom::dense(l.in_features, l.out_features);
                let out = if is_logits { src } else { own_scale(i) };
                let bounds = fused_bounds(&out);
                (
                    QOp::Conv(layer(
                        geom,
                        &w,
                        &l.bias,
                        &src,
                        &out,
                        (bits_of(i), cfg.weight_scale),
                        hessian(i, &perm).as_deref(),
                        bounds,
                        is_logits,
                    )),
                    out,
                    None,
                )
            }
            Op::Add => {
                let b = qvals[q_in[1]];
                let out = own_scale(i);
                let (min, max) = fused_bounds(&out);
                let p = AddParams::new(
                    src.scale,
                    src.zp as i32,
                    b.scale,
                    b.zp as i32,
                    out.scale,
                    out.zp as i32,
                    min,
                    max,
                );
                (QOp::Add(p), out, None)
            }
            // Zero is exactly the zero point, so a ReLU is a clamp at it.
            // Elementwise ops keep a flattened value's element order, so the layer after
            // them needs the same column permutation as one reading the Flatten.
            Op::Relu => (
                QOp::Clamp {
                    min: src.zp,
                    max: 255,
                },
                src,
                flat_from[q_in[0]],
            ),
            Op::Clip { min, max } => {
                let lo = quantize_real(*min as f64, &src, 255);
                let hi = quantize_real(*max as f64, &src, 255);
                (QOp::Clamp { min: lo, max: hi }, src, flat_from[q_in[0]])
            }
            // Any function of one code is a table over the 2^act_bits input codes.
            Op::Unary(f) => {
                let out = own_scale(i);
                let table = table(&src, &out, amax, |x| f.apply(x));
                (QOp::Lut { func: *f, table }, out, flat_from[q_in[0]])
            }
            Op::Mul | Op::Concat if q_in.iter().any(|&q| flat_from[q].is_some()) => {
                return Err(Error::UnsupportedOp {
                    node: node.name.clone(),
                    op: if matches!(node.op, Op::Mul) {
                        "Mul"
                    } else {
                        "Concat"
                    }
                    .into(),
                    reason: "an input is a flattened feature map (the integer engine keeps \
                             channels last, so its element order differs from ONNX's); \
                             apply it before the Flatten"
                        .into(),
                });
            }
            Op::Mul => {
                let b = qvals[q_in[1]];
                let out = own_scale(i);
                let p =
                    MulParams::new(src.scale, src.zp, b.scale, b.zp, out.scale, out.zp, 0, amax);
                (QOp::Mul(p), out, None)
            }
            // Each input is re-quantized to the output's scale by a table (the identity
            // when they already share it).
            Op::Concat => {
                let out = own_scale(i);
                let tables = q_in
                    .iter()
                    .map(|&q| table(&qvals[q], &out, amax, |x| x))
                    .collect();
                (QOp::Concat { tables }, out, None)
            }
            Op::MaxPool(p) => {
                let g = pool_geom(&src, p);
                (QOp::MaxPool(g), pooled(&src, &g), None)
            }
            Op::AveragePool(p) => {
                let g = pool_geom(&src, p);
                let out = pooled(&src, &g);
                (
                    QOp::AvgPool {
                        geom: g,
                        count_include_pad: p.count_include_pad,
                    },
                    out,
                    None,
                )
            }
            Op::GlobalAveragePool => (QOp::GlobalAvgPool, QValue { h: 1, w: 1, ..src }, None),
            Op::Flatten => {
                let s = graph.shape(node.inputs[0]);
                let out = QValue {
                    h: 1,
                    w: 1,
                    c: s.len(),
                    ..src
                };
                (QOp::Flatten, out, (s.h * s.w > 1).then_some(s))
            }
            Op::Slice(s) => (
                QOp::Slice {
                    start: s.start,
                    step: s.step,
                },
                qnet::slice_value(&src, s),
                None,
            ),
            Op::Pad(p) => (
                QOp::Pad { before: p.before },
                qnet::pad_value(&src, p),
                None,
            ),
        };
        if let QOp::Conv(c) = &op {
            let (lo, hi) = code_range(c.weight_bits);
            let g = c.geom;
            layers.push(LayerVars {
                kind: VarKind::Weights,
                node: nodes.len(),
                name: node.name.clone(),
                offset: layers.last().map_or(0, |l: &LayerVars| l.offset + l.len),
                len: c.codes.len(),
                lo,
                hi,
                dims: [g.out_c, g.k_h, g.k_w, g.in_per_group()],
            });
            pre_act.push(i + 1);
            if is_logits {
                logits = Some(c.w_scale.clone());
            }
        }
        nodes.push(QNode {
            name: node.name.clone(),
            op,
            inputs: q_in,
            out,
        });
        qvals.push(out);
        flat_from.push(flat);
        let q = Role::At(qvals.len() - 1);
        match fused_act[i] {
            Some(a) => {
                roles[i + 1] = Role::Fused;
                roles[a + 1] = q;
            }
            None => roles[i + 1] = q,
        }
    }

    // Logits: bring every class to the scale of the largest weight scale.
    let w_scale = logits.expect("the last node is a layer");
    let s_in = nodes
        .last()
        .map(|n| qvals[n.inputs[0]].scale)
        .unwrap_or(1.0);
    let wmax = w_scale.iter().cloned().fold(0.0, f64::max);
    let wmax = if wmax > 0.0 { wmax } else { 1.0 };
    let logit_requant = w_scale
        .iter()
        .map(|&s| Requant::from_real(s / wmax))
        .collect();
    let num_classes = w_scale.len();
    if let Some(n) = nodes.last_mut() {
        n.out = QValue {
            h: 1,
            w: 1,
            c: num_classes,
            scale: s_in * wmax,
            zp: 0,
        };
    }
    let mut net = QNetwork {
        input,
        input_value,
        nodes,
        num_classes,
        logit_requant,
        logit_scale: s_in * wmax,
        weight_bits: cfg.weight_bits,
        act_bits: cfg.act_bits,
        layers,
        clips: Vec::new(),
    };
    if cfg.bias_correction {
        correct_biases(&mut net, graph, norm, calib, n, &pre_act);
    }
    if let Some(step) = cfg.channel_scale_step {
        net.add_channel_scales(step)?;
    }
    if let Some(step) = cfg.act_clip_step {
        net.add_act_clips(step)?;
    }
    net.validate("<quantizer output>")?;
    Ok(net)
}

/// Empirical bias correction: layer by layer in network order, shifts each output
/// channel's integer bias by the rounded difference between the float network's mean
/// pre-activation and the integer network's (in accumulator units), both over the
/// calibration images. Each layer is measured with the earlier layers already corrected,
/// so what it corrects is its own error, not theirs. Afterwards every channel's mean
/// accumulator is within half a unit of the float mean. `pre_act[l]` is the float value
/// holding layer `l`'s output before any activation.
fn correct_biases(
    net: &mut QNetwork,
    graph: &Graph,
    norm: &Normalization,
    calib: &[u8],
    n: usize,
    pre_act: &[usize],
) {
    let float = float_channel_means(graph, norm, calib, n, pre_act);
    let mut acts = qnet::Activations::default();
    net.forward(calib, n, &mut acts);
    for (l, target) in float.iter().enumerate() {
        let node = net.layers[l].node;
        let s_in = net.value(net.nodes[node].inputs[0]).scale;
        let have = acc_channel_means(net, l, &acts);
        let conv = net.conv_mut(node);
        for (c, b) in conv.bias.iter_mut().enumerate() {
            let want = target[c] / (s_in * conv.w_scale[c]);
            let corrected = *b as f64 + (want - have[c]).round();
            *b = corrected.clamp(i32::MIN as f64, i32::MAX as f64) as i32;
        }
        conv.repack();
        net.forward_from(node, &[], &mut acts);
    }
}

/// Runs the float graph over `n` calibration images a chunk at a time (every value of
/// a whole calibration set would not fit in memory) and hands each chunk's values to `f`.
fn float_chunks(
    graph: &Graph,
    norm: &Normalization,
    pixels: &[u8],
    n: usize,
    f: &mut dyn FnMut(&[Vec<f32>]),
) {
    const CHUNK: usize = 32;
    let il = graph.input_shape.len();
    let mut i = 0;
    while i < n {
        let m = CHUNK.min(n - i);
        let x = normalize(norm, graph.input_shape, &pixels[i * il..(i + m) * il], m);
        f(&float::forward_all(graph, &x, m));
        i += m;
    }
}

/// Per entry of `pre_act` (a float value id): the mean of each channel over `n`
/// calibration images and all positions.
fn float_channel_means(
    graph: &Graph,
    norm: &Normalization,
    calib: &[u8],
    n: usize,
    pre_act: &[usize],
) -> Vec<Vec<f64>> {
    let mut sums: Vec<Vec<f64>> = pre_act
        .iter()
        .map(|&v| vec![0.0; graph.shape(v).c])
        .collect();
    float_chunks(graph, norm, calib, n, &mut |vals| {
        for (sum, &v) in sums.iter_mut().zip(pre_act) {
            // NCHW: the channel of element j is (j / hw) % c.
            let s = graph.shape(v);
            let hw = s.h * s.w;
            for (j, &x) in vals[v].iter().enumerate() {
                sum[(j / hw) % s.c] += x as f64;
            }
        }
    });
    for (sum, &v) in sums.iter_mut().zip(pre_act) {
        let s = graph.shape(v);
        let count = (n * s.h * s.w) as f64;
        sum.iter_mut().for_each(|x| *x /= count);
    }
    sums
}

/// The mean accumulator (bias included) of each output channel of layer `l`, on the
/// forward pass in `acts`.
fn acc_channel_means(net: &QNetwork, l: usize, acts: &qnet::Activations) -> Vec<f64> {
    let node = net.layers[l].node;
    let conv = net.conv(node);
    let oc = conv.geom.out_c;
    let mut acc = vec![0i32; acts.n * conv.geom.out_len()];
    conv.packed()
        .run_acc(&acts.values[net.nodes[node].inputs[0]], acts.n, &mut acc);
    // NHWC: the channel of element j is j % oc.
    let mut sums = vec![0f64; oc];
    for (j, &a) in acc.iter().enumerate() {
        sums[j % oc] += a as f64;
    }
    let count = (acc.len() / oc) as f64;
    sums.iter().map(|s| s / count).collect()
}

/// Quantizes one Conv/Linear with OHWI float weights, symmetric per output channel:
/// rounded to nearest, or by error feedback against `hessian` (the layer's input
/// statistics in the same HWI order) when given.
#[allow(clippy::too_many_arguments)]
fn layer(
    geom: ConvGeom,
    w: &[f32],
    bias: &[f32],
    src: &QValue,
    out: &QValue,
    (bits, how): (u8, WeightScale),
    hessian: Option<&[f64]>,
    (min, max): (u8, u8),
    is_logits: bool,
) -> QConv {
    let k = geom.k_len();
    let qmax = ((1i32 << (bits - 1)) - 1) as f64;
    let w_scale: Vec<f64> = w
        .chunks_exact(k)
        .map(|row| {
            let m = row.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            // An all-zero channel gets scale 1: its codes are 0 either way, and its bias
            // stays representable.
            match how {
                _ if m.is_nan() || m <= 0.0 => 1.0,
                WeightScale::Max => m / qmax,
                WeightScale::Mse => least_squared_error_scale(row, m, qmax),
            }
        })
        .collect();
    let codes = match hessian {
        Some(h) => {
            let (lo, hi) = code_range(bits);
            rounding::round_rows(w, &w_scale, h, lo, hi)
        }
        None => w
            .chunks_exact(k)
            .zip(&w_scale)
            .flat_map(|(row, &s)| {
                row.iter()
                    .map(move |&x| ((x as f64) / s).round().clamp(-qmax, qmax) as i8)
            })
            .collect(),
    };
    let mut b = Vec::with_capacity(geom.out_c);
    let mut requant = Vec::with_capacity(geom.out_c);
    for (o, &s) in w_scale.iter().enumerate() {
        let acc_scale = src.scale * s;
        let bq = (bias.get(o).copied().unwrap_or(0.0) as f64 / acc_scale).round();
        b.push(bq.clamp(i32::MIN as f64, i32::MAX as f64) as i32);
        requant.push(Requant::from_real(acc_scale / out.scale));
    }
    let stage = (!is_logits).then_some(OutputStage {
        requant,
        out_zp: out.zp as i32,
        min,
        max,
    });
    QConv::new(geom, bits, codes, b, src.zp, w_scale, stage)
}

/// The scale `t * max_abs / qmax`, for `t` in `(0, 1]` in steps of 1/200, whose
/// round-to-nearest codes (clamped to `[-qmax, qmax]`) reconstruct `row` with the least
/// squared error. Ties go to the larger scale (the one that clips less), so a row that
/// the full range already represents exactly keeps it.
fn least_squared_error_scale(row: &[f32], max_abs: f64, qmax: f64) -> f64 {
    const STEPS: u32 = 200;
    let error = |s: f64| -> f64 {
        row.iter()
            .map(|&x| {
                let x = f64::from(x);
                let q = (x / s).round().clamp(-qmax, qmax);
                (x - q * s) * (x - q * s)
            })
            .sum()
    };
    let mut best = (f64::INFINITY, max_abs / qmax);
    for k in (1..=STEPS).rev() {
        let s = max_abs * f64::from(k) / f64::from(STEPS) / qmax;
        let e = error(s);
        if e < best.0 {
            best = (e, s);
        }
    }
    best.1
}

/// Affine quantization of a value with real range `[lo, hi]` at `bits` bits; unsigned
/// (zero point 0) when `lo >= 0`. Zero is always exactly representable.
fn affine(shape: Shape, lo: f64, hi: f64, bits: u8) -> QValue {
    let levels = ((1u32 << bits) - 1) as f64;
    let lo = lo.min(0.0);
    let hi = hi.max(0.0);
    let range = hi - lo;
    let (scale, zp) = if range > 0.0 && range.is_finite() {
        let s = range / levels;
        (s, (-lo / s).round().clamp(0.0, levels) as u8)
    } else {
        (1.0, 0)
    };
    QValue {
        h: shape.h,
        w: shape.w,
        c: shape.c,
        scale,
        zp,
    }
}

/// The code of real value `x` in `v`, clamped to `[0, max]`.
/// The 256 output codes of `f` applied to each input code's real value: what a lookup
/// table (an activation, or a change of quantization when `f` is the identity) holds.
fn table(from: &QValue, to: &QValue, max: u8, f: impl Fn(f64) -> f64) -> Vec<u8> {
    (0..=255u8)
        .map(|x| quantize_real(f((f64::from(x) - f64::from(from.zp)) * from.scale), to, max))
        .collect()
}

fn quantize_real(x: f64, v: &QValue, max: u8) -> u8 {
    let q = (x / v.scale).round() + v.zp as f64;
    if q.is_nan() {
        v.zp
    } else {
        q.clamp(0.0, max as f64) as u8
    }
}

fn pool_geom(src: &QValue, p: &Pool) -> PoolGeom {
    PoolGeom {
        in_h: src.h,
        in_w: src.w,
        c: src.c,
        k_h: p.kernel[0],
        k_w: p.kernel[1],
        stride_h: p.stride[0],
        stride_w: p.stride[1],
        pad_t: p.pads[0],
        pad_l: p.pads[1],
        pad_b: p.pads[2],
        pad_r: p.pads[3],
    }
}

fn pooled(src: &QValue, g: &PoolGeom) -> QValue {
    QValue {
        h: crate::model::window_out(g.in_h, g.k_h, g.stride_h, g.pad_t, g.pad_b, 1),
        w: crate::model::window_out(g.in_w, g.k_w, g.stride_w, g.pad_l, g.pad_r, 1),
        ..*src
    }
}

/// Normalised float input (NCHW) for `n` CHW u8 images.
pub fn normalize(norm: &Normalization, shape: Shape, pixels: &[u8], n: usize) -> Vec<f32> {
    let plane = shape.h * shape.w;
    let mut out = Vec::with_capacity(n * shape.len());
    for img in 0..n {
        for c in 0..shape.c {
            let base = img * shape.len() + c * plane;
            out.extend(pixels[base..base + plane].iter().map(|&p| norm.apply(c, p)));
        }
    }
    out
}

/// Per wanted value: the calibrated real range `(lo, hi)`.
fn calibrate(
    graph: &Graph,
    norm: &Normalization,
    pixels: &[u8],
    n: usize,
    wanted: &[bool],
    how: Calibration,
    bits: u8,
) -> Vec<Option<(f64, f64)>> {
    let mut minmax: Vec<Option<(f64, f64)>> = vec![None; wanted.len()];
    let for_each_chunk = |f: &mut dyn FnMut(&[Vec<f32>])| float_chunks(graph, norm, pixels, n, f);
    for_each_chunk(&mut |vals| {
        for (v, vals) in vals.iter().enumerate() {
            if !wanted.get(v).copied().unwrap_or(false) {
                continue;
            }
            let (lo, hi) = vals
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x as f64), hi.max(x as f64))
                });
            let e = minmax[v].get_or_insert((lo, hi));
            *e = (e.0.min(lo), e.1.max(hi));
        }
    });
    if how == Calibration::Max {
        return minmax;
    }
    // Second pass: histogram over [lo, hi] per value, then clip each range by it.
    const BINS: usize = 2048;
    let mut hist: Vec<Vec<u64>> = wanted
        .iter()
        .map(|&w| if w { vec![0; BINS] } else { Vec::new() })
        .collect();
    for_each_chunk(&mut |vals| {
        for (v, vals) in vals.iter().enumerate() {
            let Some((lo, hi)) = minmax.get(v).copied().flatten() else {
                continue;
            };
            if hist[v].is_empty() || hi <= lo {
                continue;
            }
            let k = BINS as f64 / (hi - lo);
            for &x in vals {
                let b = (((x as f64 - lo) * k) as usize).min(BINS - 1);
                hist[v][b] += 1;
            }
        }
    });
    minmax
        .iter()
        .zip(&hist)
        .map(|(mm, h)| {
            let (lo, hi) = (*mm)?;
            let total: u64 = h.iter().sum();
            if total == 0 || hi <= lo {
                return Some((lo, hi));
            }
            Some(match how {
                Calibration::Percentile(p) => cut_tails(h, lo, hi, total, p),
                Calibration::Mse => least_squared_error(h, lo, hi, bits),
                Calibration::Max => unreachable!("max returned before the histograms"),
            })
        })
        .collect()
}

/// The range of a histogram over `[lo, hi]` holding `total` values with the `100 - p`
/// percent tail cut at each end.
fn cut_tails(h: &[u64], lo: f64, hi: f64, total: u64, p: f64) -> (f64, f64) {
    let bins = h.len();
    let tail = ((1.0 - p / 100.0) * total as f64) as u64;
    let width = (hi - lo) / bins as f64;
    let (mut acc, mut b_lo) = (0, 0);
    while b_lo < bins && acc + h[b_lo] <= tail {
        acc += h[b_lo];
        b_lo += 1;
    }
    let (mut acc, mut b_hi) = (0, bins);
    while b_hi > 0 && acc + h[b_hi - 1] <= tail {
        acc += h[b_hi - 1];
        b_hi -= 1;
    }
    // A non-negative range keeps its lower end so post-ReLU tensors stay unsigned.
    let new_lo = if lo >= 0.0 {
        lo
    } else {
        lo + b_lo as f64 * width
    };
    (new_lo, (lo + b_hi as f64 * width).min(hi))
}

/// The clipped range of a histogram over `[lo, hi]` whose `bits`-bit affine quantization
/// ([`affine`]) has the least expected squared error: each bin counts as its centre, inside
/// the range with the uniform rounding error `step²/12`, outside it with its distance to the
/// nearest end squared. Candidates shrink both ends by the same factor, 1/512 apart, so a
/// non-negative range stays unsigned; the first of equal errors (the widest) wins.
fn least_squared_error(hist: &[u64], lo: f64, hi: f64, bits: u8) -> (f64, f64) {
    const STEPS: u32 = 512;
    let levels = ((1u32 << bits) - 1) as f64;
    let width = (hi - lo) / hist.len() as f64;
    let error = |a: f64, b: f64| -> f64 {
        let step = (b - a) / levels;
        let inside = step * step / 12.0;
        hist.iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                let x = lo + (i as f64 + 0.5) * width;
                let e = if x < a {
                    (a - x) * (a - x)
                } else if x > b {
                    (x - b) * (x - b)
                } else {
                    inside
                };
                c as f64 * e
            })
            .sum()
    };
    let (a0, b0) = (lo.min(0.0), hi.max(0.0));
    let mut best = (f64::INFINITY, (lo, hi));
    for k in (1..=STEPS).rev() {
        let t = f64::from(k) / f64::from(STEPS);
        let (a, b) = (a0 * t, b0 * t);
        let e = error(a, b);
        if e < best.0 {
            // Keep an observed lower end above zero: affine() widens it to zero anyway.
            best = (e, (if lo >= 0.0 { lo.min(b) } else { a }, b));
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qnet::Activations;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn fixture() -> Graph {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist_cnn.onnx");
        crate::onnx::load_onnx(&path).unwrap()
    }

    fn images(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n * 784).map(|_| rng.random()).collect()
    }

    fn cfg(w: u8, a: u8) -> QuantConfig {
        QuantConfig::new(w, a)
    }

    fn norm() -> Normalization {
        Normalization {
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }

    /// Max |integer logit - float logit| relative to the float logits' spread, on images
    /// not used for calibration.
    fn logit_error(w: u8, a: u8) -> f64 {
        let g = fixture();
        let net = quantize(&g, &norm(), &images(64, 1), 64, &cfg(w, a)).unwrap();
        logit_error_of(&g, &net)
    }

    fn logit_error_of(g: &Graph, net: &QNetwork) -> f64 {
        relative_logit_error(g, &norm(), net, &images(32, 2), 32)
    }

    /// Max |integer logit - float logit| over `n` images, relative to the largest float
    /// logit's magnitude.
    fn relative_logit_error(
        g: &Graph,
        norm: &Normalization,
        net: &QNetwork,
        test: &[u8],
        n: usize,
    ) -> f64 {
        let float = float::forward(g, &normalize(norm, g.input_shape, test, n), n);
        let mut acts = Activations::default();
        net.forward(test, n, &mut acts);
        let spread = float.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
        let err = acts.logits.iter().zip(&float).fold(0f64, |m, (&q, &f)| {
            m.max((q as f64 * net.logit_scale - f as f64).abs())
        });
        err / spread
    }

    #[test]
    fn integer_logits_track_float_logits_and_improve_with_bits() {
        let e8 = logit_error(8, 8);
        let e4 = logit_error(4, 8);
        let e2 = logit_error(2, 8);
        assert!(e8 < 0.05, "w8a8 relative logit error {e8}");
        assert!(
            e8 < e4 && e4 < e2,
            "errors should grow as bits shrink: {e8} {e4} {e2}"
        );
    }

    #[test]
    fn input_lut_is_the_normalisation_quantized() {
        let g = fixture();
        let net = quantize(&g, &norm(), &images(8, 1), 8, &cfg(4, 8)).unwrap();
        let v = net.input_value;
        for p in 0..=255u8 {
            let code = net.input.lut[p as usize];
            let real = (code as f64 - v.zp as f64) * v.scale;
            assert!(
                (real - norm().apply(0, p) as f64).abs() <= v.scale / 2.0 + 1e-9,
                "pixel {p}"
            );
        }
    }

    #[test]
    fn first_last_bits_widen_the_first_and_the_logits_layer_only() {
        let g = fixture();
        let mixed = QuantConfig {
            first_last_bits: Some(8),
            ..cfg(2, 8)
        };
        let net = quantize(&g, &norm(), &images(64, 1), 64, &mixed).unwrap();
        let uniform = quantize(&g, &norm(), &images(64, 1), 64, &cfg(2, 8)).unwrap();
        let n = net.layers.len();
        assert!(n >= 3, "the fixture has inner layers");
        for (i, l) in net.layers.iter().enumerate() {
            let bits = if i == 0 || i + 1 == n { 8 } else { 2 };
            assert_eq!(net.conv(l.node).weight_bits, bits, "layer {i}");
            assert_eq!((l.lo, l.hi), code_range(bits), "layer {i}: search range");
            // Inner layers are exactly the uniform network's.
            if bits == 2 {
                assert_eq!(net.conv(l.node).codes, uniform.conv(l.node).codes);
            }
        }
        assert!(net.codes()[..net.layers[0].len]
            .iter()
            .any(|&c| c.abs() > 1));
        assert_eq!(net.precision(), "w2a8-fl8");
        assert_eq!(uniform.precision(), "w2a8");
        assert!(
            logit_error_of(&g, &net) < logit_error_of(&g, &uniform),
            "8-bit ends should track the float logits better"
        );
        let bad = QuantConfig {
            first_last_bits: Some(9),
            ..cfg(2, 8)
        };
        assert!(bad.validate().is_err());
    }

    /// Channel scales add one variable per output channel of every hidden layer, after the
    /// weight codes, all at code 0 (the network computes what it did). A scale code moves
    /// exactly its channel's requantization by `1 + k * step` and nothing else; files keep
    /// it, and a stage that disagrees with the codes is refused.
    #[test]
    fn channel_scales_move_one_channel_requantization_exactly() {
        let g = fixture();
        let plain = quantize(&g, &norm(), &images(64, 1), 64, &cfg(3, 8)).unwrap();
        let scaled_cfg = QuantConfig {
            channel_scale_step: Some(0.125),
            act_clip_step: None,
            ..cfg(3, 8)
        };
        let mut net = quantize(&g, &norm(), &images(64, 1), 64, &scaled_cfg).unwrap();
        let hidden: Vec<&LayerVars> = (plain.layers.iter())
            .filter(|l| plain.conv(l.node).stage.is_some())
            .collect();
        let extra: usize = hidden.iter().map(|l| l.dims[0]).sum();
        assert!(extra > 0);
        assert_eq!(net.num_vars(), plain.num_vars() + extra);
        let weights = plain.num_vars();
        assert_eq!(net.codes()[..weights], plain.codes()[..]);
        assert!(net.codes()[weights..].iter().all(|&k| k == 0));
        let scale_layers: Vec<LayerVars> = net.layers[plain.layers.len()..].to_vec();
        assert!(scale_layers
            .iter()
            .all(|l| l.kind == VarKind::Scales && (l.lo, l.hi) == (-7, 7)));
        let (mut a, mut b) = (Activations::default(), Activations::default());
        let test = images(16, 2);
        plain.forward(&test, 16, &mut a);
        net.forward(&test, 16, &mut b);
        assert_eq!(a.logits, b.logits, "code 0 changes nothing");

        // Channel 1 of the first layer up by 2 steps: x1.25.
        let first = &scale_layers[0];
        let before = net.conv(first.node).stage.clone().unwrap();
        net.apply_changes(&[(first.offset as u32 + 1, 2)]).unwrap();
        let conv = net.conv(first.node);
        let after = conv.stage.as_ref().unwrap();
        assert_eq!(
            after.requant[1],
            Requant::from_real(before.requant[1].to_real() * 1.25)
        );
        for oc in (0..after.requant.len()).filter(|&oc| oc != 1) {
            assert_eq!(after.requant[oc], before.requant[oc], "channel {oc}");
        }
        let w = conv.weight_scales();
        assert_eq!(w[1], conv.w_scale[1] * 1.25);
        assert_eq!(w[0], conv.w_scale[0]);
        assert_eq!(net.var_code(first.offset + 1), 2);
        net.forward(&test, 16, &mut b);
        let (oc_of, out_c) = (|i: usize| i % first.dims[0], first.dims[0]);
        let first_out = &b.values[first.node + 1];
        let plain_out = &a.values[first.node + 1];
        assert_eq!(first_out.len(), plain_out.len());
        let differ: Vec<usize> = (0..first_out.len())
            .filter(|&i| first_out[i] != plain_out[i])
            .map(oc_of)
            .collect();
        assert!(
            !differ.is_empty() && differ.iter().all(|&oc| oc == 1),
            "{out_c} channels"
        );

        // Out-of-range scale codes are refused before anything changes.
        assert!(net.apply_changes(&[(first.offset as u32, 8)]).is_err());
        assert_eq!(net.var_code(first.offset), 0);
        // Both file forms keep the scales; a stage that disagrees with them is refused.
        let back = QNetwork::from_json(&net.to_json(), "scaled.ccq").unwrap();
        assert_eq!((back.codes(), &back.layers), (net.codes(), &net.layers));
        let back = QNetwork::from_bytes(&net.to_bytes(), "scaled").unwrap();
        assert_eq!(back.codes(), net.codes());
        let mut broken = net.clone();
        broken.conv_mut(first.node).stage.as_mut().unwrap().requant[1] = before.requant[1];
        let err = broken.validate("broken.ccq").unwrap_err().to_string();
        assert!(err.contains("scales"), "{err}");
        // set_codes reaches the scales too.
        let mut codes = net.codes();
        codes[first.offset + 1] = -3;
        net.set_codes(&codes).unwrap();
        assert_eq!(net.var_code(first.offset + 1), -3);
        net.validate("after set_codes").unwrap();

        assert_eq!(ChannelScales::code_range(0.0625), (-7, 7));
        assert_eq!(ChannelScales::code_range(0.25), (-3, 7));
        assert_eq!(ChannelScales::code_range(0.5), (-1, 7));
        for bad in [0.0, -0.1, 0.75, f64::NAN] {
            let q = QuantConfig {
                channel_scale_step: Some(bad),
                act_clip_step: None,
                ..cfg(3, 8)
            };
            assert!(q.validate().is_err(), "step {bad}");
        }
    }

    #[test]
    fn weight_codes_are_round_to_nearest_within_range() {
        let g = fixture();
        for bits in 2..=8u8 {
            let net = quantize(&g, &norm(), &images(8, 1), 8, &cfg(bits, 8)).unwrap();
            let (lo, hi) = code_range(bits);
            let codes = net.codes();
            assert_eq!(codes.len(), net.num_vars());
            assert!(codes.iter().all(|&c| c >= lo && c <= hi));
            // RTN from max-abs uses the symmetric range and reaches its end in every
            // channel that has a nonzero weight.
            let qmax = ((1i16 << (bits - 1)) - 1) as i8;
            assert!(codes.iter().all(|&c| c >= -qmax));
            let first = net.conv(net.layers[0].node);
            let k = first.geom.k_len();
            for row in first.codes.chunks(k) {
                assert_eq!(row.iter().map(|c| c.abs()).max(), Some(qmax));
            }
        }
    }

    #[test]
    fn bias_correction_puts_every_channel_mean_within_half_a_unit_of_the_float_mean() {
        let g = fixture();
        let n = 24;
        let calib = images(n, 1);
        for bits in [2u8, 3, 4] {
            let q = QuantConfig {
                bias_correction: true,
                first_last_bits: None,
                ..cfg(bits, 8)
            };
            let net = quantize(&g, &norm(), &calib, n, &q).unwrap();
            let plain = quantize(&g, &norm(), &calib, n, &cfg(bits, 8)).unwrap();
            let pre_act: Vec<usize> = net
                .layers
                .iter()
                .map(|l| g.nodes.iter().position(|x| x.name == l.name).unwrap() + 1)
                .collect();
            let float = float_channel_means(&g, &norm(), &calib, n, &pre_act);
            let (mut corrected, mut uncorrected) = (Activations::default(), Activations::default());
            net.forward(&calib, n, &mut corrected);
            plain.forward(&calib, n, &mut uncorrected);
            let mut worst_before = 0f64;
            for (l, target) in float.iter().enumerate() {
                let node = net.layers[l].node;
                let s_in = net.value(net.nodes[node].inputs[0]).scale;
                let conv = net.conv(node);
                let after = acc_channel_means(&net, l, &corrected);
                let before = acc_channel_means(&plain, l, &uncorrected);
                for c in 0..conv.geom.out_c {
                    let want = target[c] / (s_in * conv.w_scale[c]);
                    assert!(
                        (after[c] - want).abs() <= 0.5 + 1e-6,
                        "{bits} bits, layer {l}, channel {c}: mean {} vs float {want}",
                        after[c]
                    );
                    worst_before = worst_before.max((before[c] - want).abs());
                }
            }
            // The uncorrected network was off by more, and only biases moved.
            assert!(worst_before > 0.5, "{bits} bits: nothing to correct?");
            assert_eq!(net.codes(), plain.codes());
        }
    }

    #[test]
    fn impossible_settings_are_refused() {
        let g = fixture();
        for (w, a) in [(1, 8), (9, 8), (4, 1), (4, 9), (0, 0)] {
            let e = quantize(&g, &norm(), &images(4, 1), 4, &cfg(w, a)).unwrap_err();
            assert!(matches!(e, Error::InvalidSetting { .. }), "{e}");
        }
        let bad_norm = Normalization {
            mean: vec![0.1, 0.2],
            std: vec![1.0, 1.0],
        };
        assert!(quantize(&g, &bad_norm, &images(4, 1), 4, &cfg(4, 8)).is_err());
        let zero_std = Normalization {
            mean: vec![0.1],
            std: vec![0.0],
        };
        assert!(quantize(&g, &zero_std, &images(4, 1), 4, &cfg(4, 8)).is_err());
        assert!(quantize(&g, &norm(), &[], 0, &cfg(4, 8)).is_err());
        assert!("percentile:30".parse::<Calibration>().is_err());
        assert!("median".parse::<Calibration>().is_err());
        assert_eq!(
            "percentile:99.9".parse::<Calibration>().unwrap(),
            Calibration::Percentile(99.9)
        );
        assert_eq!("mse".parse::<Calibration>().unwrap(), Calibration::Mse);
        assert_eq!("max".parse::<Calibration>().unwrap(), Calibration::Max);
        assert_eq!("mse".parse::<WeightScale>().unwrap(), WeightScale::Mse);
        assert_eq!("max".parse::<WeightScale>().unwrap(), WeightScale::Max);
        assert!("percentile:99".parse::<WeightScale>().is_err());
    }

    /// Quantizes the fixture with max calibration and with `how` at `act_bits`: no
    /// activation scale of `how` is wider than max's, and at least one is narrower.
    fn assert_narrows_ranges(how: Calibration, act_bits: u8) {
        let g = fixture();
        let max = quantize(&g, &norm(), &images(64, 1), 64, &cfg(4, act_bits)).unwrap();
        let mut c = cfg(4, act_bits);
        c.calibration = how;
        let clipped = quantize(&g, &norm(), &images(64, 1), 64, &c).unwrap();
        let mut narrower = 0;
        for (a, b) in max.nodes.iter().zip(&clipped.nodes) {
            assert!(b.out.scale <= a.out.scale * (1.0 + 1e-12), "{}", a.name);
            narrower += (b.out.scale < a.out.scale) as usize;
        }
        assert!(narrower > 0);
    }

    #[test]
    fn percentile_calibration_never_widens_ranges() {
        assert_narrows_ranges(Calibration::Percentile(99.0), 8);
    }

    /// `QNetwork::stats` counts every image and every right answer, with labels and with a
    /// teacher alike, and its loss is the sum of the per-image losses.
    #[test]
    fn stats_count_images_and_right_answers() {
        use crate::qnet::{image_loss, Targets, Teacher};
        let net = quantize(&fixture(), &norm(), &images(8, 1), 8, &cfg(4, 8)).unwrap();
        let c = net.num_classes;
        assert!(c >= 2);
        // Image i scores class i % c highest; labels make images 0, 1 and 4 right.
        let n = 5;
        let mut logits = vec![0i32; n * c];
        for i in 0..n {
            logits[i * c + i % c] = 50;
        }
        let labels: Vec<u8> = (0..n)
            .map(|i| {
                if [0, 1, 4].contains(&i) {
                    (i % c) as u8
                } else {
                    ((i + 1) % c) as u8
                }
            })
            .collect();
        let mut acts = Activations::default();
        (acts.n, acts.logits) = (n, logits);
        let s = net.stats(&acts, &Targets::labels(&labels));
        assert_eq!((s.images, s.correct), (n as u64, 3));
        let loss: u64 = (0..n)
            .map(|i| image_loss(&acts.logits[i * c..(i + 1) * c], net.logit_scale, labels[i]).0)
            .sum();
        assert_eq!(s.loss_fixed, loss);
        let teacher = vec![0f32; n * c];
        let targets = Targets {
            block: None,
            labels: &labels,
            teacher: Some(Teacher {
                logits: &teacher,
                temperature: 1.0,
            }),
        };
        let s = net.stats(&acts, &targets);
        assert_eq!((s.images, s.correct), (n as u64, 3));
    }

    #[test]
    fn mse_calibration_clips_rare_tails_and_never_widens_ranges() {
        assert_narrows_ranges(Calibration::Mse, 4);
    }

    #[test]
    fn least_squared_error_trades_rounding_against_clipping() {
        // 10,200 values in [0, 5), one outlier at 100. The expected error is about
        // 10,200 (b/15)²/12 + (100 - b)² for a range [0, b], least at b ≈ 21 with 4 bits;
        // with 8 bits (b/255) the steps are fine enough to keep almost all of it.
        let mut tail = vec![0u64; 2048];
        for c in &mut tail[..102] {
            *c = 100;
        }
        tail[2047] = 1;
        let (lo4, hi4) = least_squared_error(&tail, 0.0, 100.0, 4);
        assert_eq!(lo4, 0.0);
        assert!((19.0..23.0).contains(&hi4), "{hi4}");
        let (_, hi8) = least_squared_error(&tail, 0.0, 100.0, 8);
        assert!((97.0..=100.0).contains(&hi8), "{hi8}");
        // Spread evenly over the range, every value is as likely as any other: clipping
        // the ends costs more than the finer step gains.
        let flat = vec![7u64; 2048];
        let (_, hi) = least_squared_error(&flat, 0.0, 100.0, 4);
        assert!(hi >= 95.0, "{hi}");
        // A signed range shrinks at both ends by the same factor, so zero stays inside.
        let mut signed = vec![0u64; 2048];
        for c in &mut signed[900..1100] {
            *c = 50;
        }
        signed[0] = 1;
        signed[2047] = 1;
        let (lo, hi) = least_squared_error(&signed, -50.0, 50.0, 4);
        assert!(lo < 0.0 && hi > 0.0 && hi < 25.0, "({lo}, {hi})");
        assert!((lo + hi).abs() < 1e-9, "({lo}, {hi})");
    }

    #[test]
    fn mse_weight_scale_clips_outliers_and_keeps_exact_rows() {
        // One weight of 1.0 among 100 of ±0.1, 2-bit codes (-1, 0, 1). With the full range
        // every small weight rounds to 0 (error 100 × 0.01 = 1); near s = 0.11 they round
        // to ±s and the outlier clips to s: 100 (0.1 - s)² + (1 - s)², about 0.80.
        let mut row = vec![0.1f32; 100];
        for x in row.iter_mut().step_by(2) {
            *x = -0.1;
        }
        row.push(1.0);
        let s = least_squared_error_scale(&row, 1.0, 1.0);
        assert!((0.105..0.115).contains(&s), "{s}");
        // A row on the full range's own grid is exact there: the full range stays.
        let exact: Vec<f32> = (-3..=3).map(|c| c as f32 * 0.25).collect();
        assert_eq!(least_squared_error_scale(&exact, 0.75, 3.0), 0.25);
    }

    #[test]
    fn mse_weight_scales_shrink_and_bring_two_bit_logits_closer() {
        let g = fixture();
        let calib = images(64, 1);
        let max = quantize(&g, &norm(), &calib, 64, &cfg(2, 8)).unwrap();
        let mse = QuantConfig {
            weight_scale: WeightScale::Mse,
            ..cfg(2, 8)
        };
        let mse = quantize(&g, &norm(), &calib, 64, &mse).unwrap();
        let (mut smaller, mut channels) = (0, 0);
        for l in &max.layers {
            let (a, b) = (&max.conv(l.node).w_scale, &mse.conv(l.node).w_scale);
            for (a, b) in a.iter().zip(b) {
                assert!(b <= a, "layer {}: {b} > {a}", l.name);
                smaller += usize::from(b < a);
                channels += 1;
            }
        }
        assert!(
            smaller * 2 > channels,
            "{smaller} of {channels} scales shrank"
        );
        let (e_max, e_mse) = (logit_error_of(&g, &max), logit_error_of(&g, &mse));
        assert!(
            e_mse < e_max,
            "relative logit error: mse {e_mse}, max {e_max}"
        );
    }

    /// Top-1 (%) of `net` on `n` digits of the committed MNIST test split.
    fn mnist_top1(net: &QNetwork, test: &crate::data::Dataset) -> f64 {
        let mut acts = Activations::default();
        net.forward(&test.images, test.len(), &mut acts);
        let k = net.num_classes;
        let correct = acts
            .logits
            .chunks_exact(k)
            .zip(&test.labels)
            .filter(|(row, &y)| {
                let best = (0..k).fold(0, |b, i| if row[i] > row[b] { i } else { b });
                best == usize::from(y)
            })
            .count();
        100.0 * correct as f64 / test.len() as f64
    }

    #[test]
    fn gptq_rounding_recovers_two_bit_accuracy_and_changes_only_codes() {
        use crate::data::{self, DataFormat, DataSource, Split};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let g = crate::onnx::load_onnx(&root.join("examples/mnist/mnist-cnn.onnx")).unwrap();
        let source = DataSource::new(DataFormat::Mnist, root.join("examples/data/mnist-10k"));
        let calib = data::load(&source, Split::Train, Some(0..256)).unwrap();
        let test = data::load(&source, Split::Test, Some(0..1000)).unwrap();
        let q = |rounding| QuantConfig {
            rounding,
            ..cfg(2, 8)
        };
        let quant = |r| quantize(&g, &norm(), &calib.images, calib.len(), &q(r)).unwrap();
        let (near, gptq) = (quant(Rounding::Nearest), quant(Rounding::Gptq));
        let mut moved = 0;
        for l in &near.layers {
            let (a, b) = (near.conv(l.node), gptq.conv(l.node));
            // Same scales and biases: only the codes differ.
            assert_eq!(a.w_scale, b.w_scale, "layer {}", l.name);
            assert_eq!(a.bias, b.bias, "layer {}", l.name);
            assert!(b.codes.iter().all(|&q| (l.lo..=l.hi).contains(&q)));
            moved += a.codes.iter().zip(&b.codes).filter(|(x, y)| x != y).count();
        }
        assert!(moved > 0, "error feedback changed no code");
        let (a_near, a_gptq) = (mnist_top1(&near, &test), mnist_top1(&gptq, &test));
        assert!(
            a_gptq > a_near + 20.0,
            "2-bit top-1 on 1,000 test digits: gptq {a_gptq} %, nearest {a_near} %"
        );
        // The same inputs give the same network.
        assert_eq!(quant(Rounding::Gptq).to_json(), gptq.to_json());
    }

    #[test]
    fn rounding_names_parse_and_unknown_ones_are_refused() {
        assert_eq!("gptq".parse::<Rounding>().unwrap(), Rounding::Gptq);
        assert_eq!("nearest".parse::<Rounding>().unwrap(), Rounding::Nearest);
        let e = "adaround".parse::<Rounding>().unwrap_err().to_string();
        assert!(e.contains("rounding") && e.contains("gptq"), "{e}");
    }

    #[test]
    fn network_files_round_trip_byte_for_byte_and_bad_ones_are_refused() {
        let g = fixture();
        let net = quantize(&g, &norm(), &images(16, 1), 16, &cfg(3, 8)).unwrap();
        let bytes = net.to_json();
        let back = QNetwork::from_json(&bytes, "mem").unwrap();
        let again = back.to_json();
        if let Some(i) = again.iter().zip(&bytes).position(|(a, b)| a != b) {
            let ctx = |b: &[u8]| {
                String::from_utf8_lossy(&b[i.saturating_sub(60)..(i + 40).min(b.len())]).to_string()
            };
            panic!(
                "re-serialised file differs at byte {i}:\n{}\n{}",
                ctx(&bytes),
                ctx(&again)
            );
        }
        assert_eq!(again.len(), bytes.len());
        let x = images(10, 4);
        let labels = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 0];
        assert_eq!(
            back.evaluate(&x, &labels, 4, 2),
            net.evaluate(&x, &labels, 3, 1)
        );

        let text = String::from_utf8(bytes.clone()).unwrap();
        let cases = [
            (bytes[..bytes.len() / 2].to_vec(), "EOF"),
            (
                text.replacen("ccq-network", "onnx", 1).into_bytes(),
                "format tag",
            ),
            (
                text.replacen("\"version\":1", "\"version\":7", 1)
                    .into_bytes(),
                "format version 7",
            ),
            (b"\x00\x01garbage".to_vec(), "expected value"),
        ];
        for (bad, why) in cases {
            let e = QNetwork::from_json(&bad, "bad.ccq").unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("bad.ccq") && msg.contains(why), "{msg}");
        }
        // A code outside the layer's range.
        let mut broken = net.clone();
        let node = broken.layers[0].node;
        broken.conv_mut(node).codes[0] = 100;
        let e = QNetwork::from_json(&broken.to_json(), "range.ccq").unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        // The binary (sync) form validates the same way.
        let e = QNetwork::from_bytes(&broken.to_bytes(), "range.bin").unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }

    /// The binary form workers receive: the same network back (same JSON, same results),
    /// re-encoding gives the same bytes, and it is much smaller than the JSON.
    #[test]
    fn the_binary_network_form_round_trips_and_is_compact() {
        let g = fixture();
        let net = quantize(&g, &norm(), &images(16, 1), 16, &cfg(3, 8)).unwrap();
        let bytes = net.to_bytes();
        let back = QNetwork::from_bytes(&bytes, "sync").unwrap();
        assert_eq!(back.to_bytes(), bytes, "re-encoding changes nothing");
        assert_eq!(
            back.to_json(),
            net.to_json(),
            "the same network as the file holds"
        );
        let mut streamed = net.write_bytes(Vec::new()).unwrap();
        assert_eq!(streamed, bytes, "the streamed form is the same bytes");
        let x = images(10, 4);
        let labels = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 0];
        assert_eq!(
            back.evaluate(&x, &labels, 4, 2),
            net.evaluate(&x, &labels, 3, 1)
        );
        let json = net.to_json().len();
        assert!(
            bytes.len() * 2 < json,
            "binary {} bytes vs JSON {json}",
            bytes.len()
        );
        assert!(
            bytes.len() < net.num_vars() * 2 + 4096,
            "about a byte per weight: {} bytes for {} weights",
            bytes.len(),
            net.num_vars()
        );
        // A JSON file handed to the binary reader (or the reverse) is refused by name.
        let e = QNetwork::from_bytes(&net.to_json(), "sync")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sync") && e.contains("format tag"), "{e}");
        let e = QNetwork::from_json(&bytes, "m.ccq")
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.ccq"), "{e}");
        // Another version of the binary form is refused before its body is read.
        let mut v1 = bytes.clone();
        let tag_len = 1 + "ccq-network".len();
        assert_eq!(v1[tag_len], 3, "the version follows the tag");
        v1[tag_len] = 1;
        let e = QNetwork::from_bytes(&v1, "sync").unwrap_err().to_string();
        assert!(e.contains("format version 1"), "{e}");
        streamed.push(0);
        let e = QNetwork::from_bytes(&streamed, "sync")
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 bytes after the network"), "{e}");
    }

    /// Whatever arrives as `full` — truncated at any byte, or with a byte changed — the
    /// worker gets a network or an error, never a panic; no truncation is ever accepted.
    #[test]
    fn damaged_binary_networks_never_panic() {
        let g = fixture();
        let scaled = QuantConfig {
            channel_scale_step: Some(0.25),
            act_clip_step: None,
            ..cfg(3, 8)
        };
        for q in [cfg(3, 8), scaled] {
            damaged_network_never_panics(&quantize(&g, &norm(), &images(16, 1), 16, &q).unwrap());
        }
    }

    fn damaged_network_never_panics(net: &QNetwork) {
        let bytes = net.to_bytes();
        for cut in 0..bytes.len() {
            assert!(
                QNetwork::from_bytes(&bytes[..cut], "cut").is_err(),
                "truncated at {cut} of {}",
                bytes.len()
            );
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut refused = 0;
        for _ in 0..3000 {
            let mut b = bytes.clone();
            let i = rng.random_range(0..b.len());
            b[i] ^= rng.random_range(1..=255u8);
            refused += QNetwork::from_bytes(&b, "flip").is_err() as usize;
        }
        // Most flips land in weight codes and stay valid networks; the header, lengths and
        // ranges must still catch some.
        assert!(refused > 30, "only {refused} of 3000 flips refused");
    }

    #[test]
    fn variables_map_to_layers_and_changes_are_checked() {
        let g = fixture();
        let mut net = quantize(&g, &norm(), &images(16, 1), 16, &cfg(4, 8)).unwrap();
        let n = net.num_vars();
        let mut seen = 0;
        for (li, l) in net.layers.iter().enumerate() {
            assert_eq!(l.offset, seen);
            assert_eq!(l.len, l.dims.iter().product::<usize>());
            assert_eq!(net.var_info(l.offset).unwrap().layer, li);
            let last = net.var_info(l.offset + l.len - 1).unwrap();
            assert_eq!(
                last.position,
                [l.dims[0] - 1, l.dims[1] - 1, l.dims[2] - 1, l.dims[3] - 1]
            );
            seen += l.len;
        }
        assert_eq!(seen, n);
        assert!(net.var_info(n).is_none());
        let before = net.codes();
        assert!(net.apply_changes(&[(0, 7), (n as u32, 0)]).is_err());
        assert!(net.apply_changes(&[(0, 8)]).is_err());
        assert_eq!(net.codes(), before, "a refused change set changes nothing");
        net.apply_changes(&[(0, 7), (n as u32 - 1, -8)]).unwrap();
        let after = net.codes();
        assert_eq!((after[0], after[n - 1]), (7, -8));
        assert_eq!(after[1..n - 1], before[1..n - 1]);
    }

    /// A hand-built graph with every op of mobile networks: dense, grouped and depthwise
    /// convolutions, each table activation, a squeeze-excitation product and a channel
    /// concatenation of two branches with different ranges.
    fn mobile_graph() -> Graph {
        use crate::model::{Conv, Linear, Node, Unary};
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut nodes: Vec<Node> = Vec::new();
        let push = |nodes: &mut Vec<Node>, op: Op, inputs: Vec<usize>, shape: Shape| {
            nodes.push(Node {
                name: format!("n{}", nodes.len()),
                op,
                inputs,
                shape,
            });
            nodes.len()
        };
        let mut conv = |cin: usize, cout: usize, k: usize, group: usize| {
            let fan_in = cin / group * k * k;
            let sd = (2.0 / fan_in as f64).sqrt();
            Op::Conv(Conv {
                out_channels: cout,
                in_channels: cin,
                kernel: [k, k],
                stride: [1, 1],
                pads: [k / 2; 4],
                dilation: [1, 1],
                group,
                weight: (0..cout * fan_in)
                    .map(|_| (rng.random::<f64>() * 2.0 - 1.0) as f32 * sd as f32 * 1.7)
                    .collect(),
                bias: (0..cout).map(|_| rng.random::<f32>() * 0.2 - 0.1).collect(),
            })
        };
        let sh = |c| Shape::new(c, 6, 6);
        let stem = push(&mut nodes, conv(2, 8, 3, 1), vec![0], sh(8));
        let hs = push(&mut nodes, Op::Unary(Unary::HardSwish), vec![stem], sh(8));
        let dw = push(&mut nodes, conv(8, 8, 3, 8), vec![hs], sh(8));
        let silu = push(&mut nodes, Op::Unary(Unary::Silu), vec![dw], sh(8));
        // Branch a: grouped 1x1 then LeakyRelu; branch b: dense then Tanh (range [-1, 1]).
        let grp = push(&mut nodes, conv(8, 8, 1, 4), vec![silu], sh(8));
        let a = push(
            &mut nodes,
            Op::Unary(Unary::LeakyRelu { alpha: 0.1 }),
            vec![grp],
            sh(8),
        );
        let dense = push(&mut nodes, conv(8, 4, 3, 1), vec![silu], sh(4));
        let b = push(&mut nodes, Op::Unary(Unary::Tanh), vec![dense], sh(4));
        let cat = push(&mut nodes, Op::Concat, vec![a, b], sh(12));
        // Squeeze-excitation over the concatenation.
        let sq = push(
            &mut nodes,
            Op::GlobalAveragePool,
            vec![cat],
            Shape::new(12, 1, 1),
        );
        let fc1 = push(&mut nodes, conv(12, 4, 1, 1), vec![sq], Shape::new(4, 1, 1));
        let r = push(&mut nodes, Op::Relu, vec![fc1], Shape::new(4, 1, 1));
        let fc2 = push(&mut nodes, conv(4, 12, 1, 1), vec![r], Shape::new(12, 1, 1));
        let gate = push(
            &mut nodes,
            Op::Unary(Unary::HardSigmoid {
                alpha: 1.0 / 6.0,
                beta: 0.5,
            }),
            vec![fc2],
            Shape::new(12, 1, 1),
        );
        let scaled = push(&mut nodes, Op::Mul, vec![cat, gate], sh(12));
        let sig = push(&mut nodes, Op::Unary(Unary::Sigmoid), vec![scaled], sh(12));
        let prod = push(&mut nodes, Op::Mul, vec![sig, scaled], sh(12));
        let pool = push(
            &mut nodes,
            Op::GlobalAveragePool,
            vec![prod],
            Shape::new(12, 1, 1),
        );
        let flat = push(&mut nodes, Op::Flatten, vec![pool], Shape::new(12, 1, 1));
        let out = push(
            &mut nodes,
            Op::Linear(Linear {
                out_features: 5,
                in_features: 12,
                weight: (0..60).map(|_| rng.random::<f32>() - 0.5).collect(),
                bias: vec![0.0; 5],
            }),
            vec![flat],
            Shape::new(5, 1, 1),
        );
        Graph {
            input_name: "x".into(),
            input_shape: Shape::new(2, 6, 6),
            nodes,
            output: out,
        }
    }

    fn mobile_error(g: &Graph, w: u8, a: u8) -> f64 {
        let norm = Normalization::identity(2);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let pixels = |rng: &mut ChaCha8Rng, n: usize| -> Vec<u8> {
            (0..n * 72).map(|_| rng.random()).collect()
        };
        let calib = pixels(&mut rng, 64);
        let net = quantize(g, &norm, &calib, 64, &cfg(w, a)).unwrap();
        relative_logit_error(g, &norm, &net, &pixels(&mut rng, 32), 32)
    }

    #[test]
    fn mobile_ops_run_in_integers_and_track_the_float_graph() {
        let g = mobile_graph();
        let norm = Normalization::identity(2);
        let net = quantize(&g, &norm, &images(1, 3)[..72], 1, &cfg(8, 8)).unwrap();
        // Every op became its integer form, the grouped layers with their group count
        // and codes per group as decision variables.
        let kinds: Vec<&str> = net
            .nodes
            .iter()
            .map(|n| match &n.op {
                QOp::Conv(c) if c.geom.groups > 1 => "grouped",
                QOp::Conv(_) => "conv",
                QOp::Lut { .. } => "lut",
                QOp::Mul(_) => "mul",
                QOp::Concat { .. } => "concat",
                QOp::Clamp { .. } => "clamp",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "conv", "lut", "grouped", "lut", "grouped", "lut", "conv", "lut", "concat",
                "other", "conv", "conv", "lut", "mul", "lut", "mul", "other", "other", "conv"
            ]
        );
        let dw = &net.layers[1];
        assert_eq!((dw.dims, dw.len), ([8, 3, 3, 1], 72));
        assert_eq!(net.layers[2].dims, [8, 1, 1, 2]);

        let (e8, e6, e4) = (
            mobile_error(&g, 8, 8),
            mobile_error(&g, 6, 6),
            mobile_error(&g, 4, 4),
        );
        assert!(e8 < 0.03, "w8a8 relative logit error {e8}");
        assert!(
            e8 < e6 && e6 < e4,
            "errors should grow as bits shrink: {e8} {e6} {e4}"
        );

        // The network file carries the new ops and reloads to the same logits.
        let back = QNetwork::from_bytes(&net.to_bytes(), "test").unwrap();
        let json = QNetwork::from_json(&net.to_json(), "test").unwrap();
        let test = images(1, 5)[..4 * 72].to_vec();
        let mut acts = [
            Activations::default(),
            Activations::default(),
            Activations::default(),
        ];
        for (n, a) in [&net, &back, &json].iter().zip(&mut acts) {
            n.forward(&test, 4, a);
        }
        assert_eq!(acts[0].logits, acts[1].logits);
        assert_eq!(acts[0].logits, acts[2].logits);
    }

    #[test]
    fn tables_are_the_function_between_the_two_quantizations() {
        let g = mobile_graph();
        let net = quantize(
            &g,
            &Normalization::identity(2),
            &images(1, 3)[..72],
            1,
            &cfg(8, 8),
        )
        .unwrap();
        let mut checked = 0;
        for node in &net.nodes {
            let QOp::Lut { func, table } = &node.op else {
                continue;
            };
            let (src, out) = (net.value(node.inputs[0]), node.out);
            for x in 0..=255u8 {
                let y = func.apply((f64::from(x) - f64::from(src.zp)) * src.scale);
                let code = (y / out.scale + f64::from(out.zp))
                    .round()
                    .clamp(0.0, 255.0);
                assert_eq!(f64::from(table[x as usize]), code, "{func:?} at {x}");
            }
            checked += 1;
        }
        assert_eq!(checked, 6);
    }

    #[test]
    fn damaged_mobile_nodes_are_refused_by_name() {
        let g = mobile_graph();
        let net = quantize(
            &g,
            &Normalization::identity(2),
            &images(1, 3)[..72],
            1,
            &cfg(8, 8),
        )
        .unwrap();
        let find = |f: &dyn Fn(&QOp) -> bool| net.nodes.iter().position(|n| f(&n.op)).unwrap();
        let lut = find(&|op| matches!(op, QOp::Lut { .. }));
        let mul = find(&|op| matches!(op, QOp::Mul(_)));
        let cat = find(&|op| matches!(op, QOp::Concat { .. }));
        let dw = find(&|op| matches!(op, QOp::Conv(c) if c.geom.groups > 1));
        type Damage = Box<dyn Fn(&mut QNetwork)>;
        let damages: Vec<(usize, Damage)> = vec![
            (
                lut,
                Box::new(move |n| {
                    if let QOp::Lut { table, .. } = &mut n.nodes[lut].op {
                        table.pop();
                    }
                }),
            ),
            (
                mul,
                Box::new(move |n| {
                    if let QOp::Mul(p) = &mut n.nodes[mul].op {
                        p.b_zp = 300;
                    }
                }),
            ),
            (mul, Box::new(move |n| n.nodes[mul].inputs.truncate(1))),
            (
                cat,
                Box::new(move |n| {
                    if let QOp::Concat { tables } = &mut n.nodes[cat].op {
                        tables.pop();
                    }
                }),
            ),
            (cat, Box::new(move |n| n.nodes[cat].out.c += 1)),
            (
                dw,
                Box::new(move |n| {
                    if let QOp::Conv(c) = &mut n.nodes[dw].op {
                        c.geom.groups = 3;
                    }
                }),
            ),
        ];
        for (node, damage) in damages {
            let mut bad = net.clone();
            damage(&mut bad);
            let name = &net.nodes[node].name;
            for err in [
                QNetwork::from_json(&bad.to_json(), "t.ccq").unwrap_err(),
                QNetwork::from_bytes(&bad.to_bytes(), "t.bin").unwrap_err(),
            ] {
                let msg = err.to_string();
                assert!(msg.contains(&format!("'{name}'")), "{msg}");
            }
        }
    }

    /// An activation between a Flatten of a 2 x 2 map and the fully connected layer keeps
    /// the column permutation; a Concat of flattened maps is refused by name.
    #[test]
    fn activations_after_a_flatten_keep_its_column_order() {
        use crate::model::{Linear, Node, Unary};
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let node = |name: &str, op: Op, inputs: Vec<usize>, shape: Shape| Node {
            name: name.into(),
            op,
            inputs,
            shape,
        };
        let linear = |rng: &mut ChaCha8Rng, inputs: usize| Linear {
            out_features: 3,
            in_features: inputs,
            weight: (0..3 * inputs).map(|_| rng.random::<f32>() - 0.5).collect(),
            bias: vec![0.0; 3],
        };
        let flat = Shape::new(8, 1, 1);
        for act in [Op::Relu, Op::Unary(Unary::Tanh)] {
            let g = Graph {
                input_name: "x".into(),
                input_shape: Shape::new(2, 2, 2),
                nodes: vec![
                    node("flatten", Op::Flatten, vec![0], flat),
                    node("act", act, vec![1], flat),
                    node(
                        "fc",
                        Op::Linear(linear(&mut rng, 8)),
                        vec![2],
                        Shape::new(3, 1, 1),
                    ),
                ],
                output: 3,
            };
            let norm = Normalization::identity(2);
            let calib: Vec<u8> = (0..64 * 8).map(|_| rng.random()).collect();
            let net = quantize(&g, &norm, &calib, 64, &cfg(8, 8)).unwrap();
            let test: Vec<u8> = (0..16 * 8).map(|_| rng.random()).collect();
            let err = relative_logit_error(&g, &norm, &net, &test, 16);
            assert!(
                err < 0.03,
                "{:?}: relative logit error {err}",
                g.nodes[1].op
            );
        }
        let g = Graph {
            input_name: "x".into(),
            input_shape: Shape::new(2, 2, 2),
            nodes: vec![
                node("flatten", Op::Flatten, vec![0], flat),
                node("cat", Op::Concat, vec![1, 1], Shape::new(16, 1, 1)),
                node(
                    "fc",
                    Op::Linear(linear(&mut rng, 16)),
                    vec![2],
                    Shape::new(3, 1, 1),
                ),
            ],
            output: 3,
        };
        let calib = vec![7u8; 8];
        let err = quantize(&g, &Normalization::identity(2), &calib, 1, &cfg(8, 8)).unwrap_err();
        assert!(err.to_string().contains("'cat'"), "{err}");
    }
}
