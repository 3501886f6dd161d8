//! The integer-only network ([`QNetwork`]) and its engine.
//!
//! A `QNetwork` is what post-training quantization ([`crate::quant`]) produces and what the
//! evolutionary search mutates: u8 activation codes (per-tensor scale and zero point),
//! i8 weight codes (per-output-channel scale), i32 biases and accumulators, fixed-point
//! requantization. Inference starts from raw u8 pixels (the input normalisation is a
//! per-channel lookup table) and ends with i32 logits at one common scale; nothing in
//! between touches floating point, so the same input gives the same bits on every machine
//! and thread count. Only the loss (cross-entropy on the final logits) uses f64.
//!
//! The weight codes of all Conv/Linear layers form one flat vector of decision variables
//! ([`QNetwork::codes`], [`QNetwork::layers`]): layer by layer in graph order, each layer's
//! codes in OHWI order (`[out][kh][kw][in]`), the layout the kernels read.
//!
//! With channel scales ([`QNetwork::add_channel_scales`]) the vector goes on, after every
//! weight code, with one scale code per output channel of each hidden layer
//! ([`VarKind::Scales`]): a multiplier `1 + k * step` on that channel's weight scale,
//! applied exactly by recomputing the channel's fixed-point requantization.
//!
//! Forward passes keep every intermediate value ([`Activations`]) so that a candidate that
//! differs from the base network only from layer L on can be evaluated from L
//! ([`QNetwork::forward_from`]) — the reuse cooperative coevolution relies on.

use serde::{Deserialize, Serialize};

use crate::kernels::{
    self, AddParams, ConvGeom, MulParams, OutputStage, PackedConv, PoolGeom, Requant,
};
use crate::model::{Pad, Slice, Unary};
use crate::{Error, Result};

/// Per-tensor quantization of one activation value, NHWC shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QValue {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    /// Real value = `(code - zp) * scale`.
    pub scale: f64,
    pub zp: u8,
}

impl QValue {
    pub fn len(&self) -> usize {
        self.h * self.w * self.c
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Raw u8 pixels (CHW planar, as datasets store them) to input codes (NHWC) through one
/// lookup table per channel, which folds `(pixel / 255 - mean) / std` and the input
/// quantization into a single step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputQuant {
    /// `channels * 256` entries.
    pub lut: Vec<u8>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// A Conv or Linear layer: the decision variables live here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QConv {
    pub geom: ConvGeom,
    pub weight_bits: u8,
    /// OHWI weight codes, each in `[-2^(b-1), 2^(b-1) - 1]`.
    pub codes: Vec<i8>,
    /// Per output channel, at scale `s_in * w_scale[oc]`.
    pub bias: Vec<i32>,
    pub input_zp: u8,
    /// Metadata only (reports, export): the float weight scale of each output channel.
    pub w_scale: Vec<f64>,
    /// How accumulators become output codes; `None` for the logits layer, whose output
    /// is i32 (see [`QNetwork::logit_requant`]). With [`QConv::scales`] this is the stage
    /// at the current scale codes (what the kernels run).
    pub stage: Option<OutputStage>,
    /// Searched per-channel scale multipliers, when the network has them.
    #[serde(default)]
    pub scales: Option<ChannelScales>,
    /// Where the layer reads or writes an activation with a searched clipping level
    /// ([`crate::actclip`]): its stage and bias at every clip code 0, and the multipliers
    /// of its input's and output's scales.
    #[serde(default)]
    pub clip: Option<ConvClip>,
    #[serde(skip)]
    packed: Option<PackedConv>,
}

/// Per-output-channel multipliers of a layer's weight scales, searched like codes: channel
/// `oc` at code `k` has weight scale `w_scale[oc] * (1 + k * step)`, its bias codes
/// unchanged (they are at scale `s_in * weight scale`), so its whole pre-activation is
/// multiplied by `1 + k * step`. Only the requantization changes; accumulators do not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelScales {
    pub step: f64,
    /// Per output channel, the requantization at code 0 (as quantized).
    pub base: Vec<Requant>,
    /// Per output channel, the scale code `k`.
    pub codes: Vec<i8>,
}

impl ChannelScales {
    /// The largest scale code; the smallest is its negative unless that would make the multiplier
    /// zero or negative.
    pub const MAX_CODE: i8 = 7;

    /// Whether `step` can define scale codes: finite, in `(0, 0.5]`.
    pub fn valid_step(step: f64) -> bool {
        step > 0.0 && step <= 0.5
    }

    /// The code range for `step`: `[-min(7, ceil(1/step) - 1), 7]`, so every multiplier is
    /// positive.
    pub fn code_range(step: f64) -> (i8, i8) {
        let below = ((1.0 / step).ceil() - 1.0).min(f64::from(Self::MAX_CODE));
        (-(below as i8), Self::MAX_CODE)
    }

    /// The multiplier of code `k`: `1 + k * step` (IEEE arithmetic, the same bits everywhere).
    pub fn multiplier(&self, k: i8) -> f64 {
        1.0 + f64::from(k) * self.step
    }

    /// Channel `oc`'s requantization at code `k`: the base multiplier times `1 + k * step`,
    /// represented again by [`Requant::from_real`] (exact inputs, one rounding).
    pub fn requant(&self, oc: usize, k: i8) -> Requant {
        Requant::from_real(self.base[oc].to_real() * self.multiplier(k))
    }
}

impl QConv {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        geom: ConvGeom,
        weight_bits: u8,
        codes: Vec<i8>,
        bias: Vec<i32>,
        input_zp: u8,
        w_scale: Vec<f64>,
        stage: Option<OutputStage>,
    ) -> QConv {
        let mut conv = QConv {
            geom,
            weight_bits,
            codes,
            bias,
            input_zp,
            w_scale,
            stage,
            scales: None,
            clip: None,
            packed: None,
        };
        conv.repack();
        conv
    }

    /// Rebuilds the kernel's packed weights after the codes changed.
    pub fn repack(&mut self) {
        self.packed = Some(PackedConv::new(
            self.geom,
            &self.codes,
            &self.bias,
            self.input_zp,
        ));
    }

    pub fn packed(&self) -> &PackedConv {
        self.packed
            .as_ref()
            .expect("QConv is always packed by its constructors")
    }

    /// Heap bytes held (capacities): codes, bias, scales and the packed kernel weights.
    pub fn heap_bytes(&self) -> usize {
        self.codes.capacity()
            + self.bias.capacity() * std::mem::size_of::<i32>()
            + self.w_scale.capacity() * std::mem::size_of::<f64>()
            + self.packed.as_ref().map_or(0, PackedConv::heap_bytes)
    }

    /// Allowed code range of this layer's variables.
    pub fn code_range(&self) -> (i8, i8) {
        code_range(self.weight_bits)
    }

    /// Each output channel's weight scale as the network runs it: `w_scale` times the
    /// channel's scale multiplier, if it has one.
    pub fn weight_scales(&self) -> Vec<f64> {
        match &self.scales {
            None => self.w_scale.clone(),
            Some(s) => (self.w_scale.iter().zip(&s.codes))
                .map(|(&w, &k)| w * s.multiplier(k))
                .collect(),
        }
    }

    /// The code of variable `i` of this layer's `kind`.
    pub fn var_code(&self, kind: VarKind, i: usize) -> i8 {
        match kind {
            VarKind::Weights => self.codes[i],
            VarKind::Scales => self.scales.as_ref().map_or(0, |s| s.codes[i]),
            VarKind::Clip => unreachable!("clip variables belong to the network, not a layer"),
        }
    }

    /// Sets variable `i` of this layer's `kind`. A weight code leaves the packed kernel
    /// weights stale until [`QConv::repack`]; a scale code updates the output stage at once.
    /// The caller has checked the code against the variable's range.
    pub fn set_var(&mut self, kind: VarKind, i: usize, code: i8) {
        match kind {
            VarKind::Weights => self.codes[i] = code,
            VarKind::Scales => {
                let Some(s) = &mut self.scales else {
                    unreachable!("scale variables exist only on layers with scales")
                };
                s.codes[i] = code;
                self.restage_channel(i);
            }
            VarKind::Clip => unreachable!("clip variables belong to the network, not a layer"),
        }
    }

    /// Output channel `oc`'s requantization as its searched multipliers make it, or `None`
    /// when the layer has none (its stage is what quantization made). Channel scales
    /// alone: the base times `1 + k * step`; with clips also times the input's and divided
    /// by the output's scale multiplier. Exact inputs, one rounding, the same bits
    /// everywhere.
    pub fn rescaled_requant(&self, oc: usize) -> Option<Requant> {
        let base = match (&self.clip, &self.scales) {
            (Some(c), _) => c.base_requant[oc],
            (None, Some(s)) => return Some(s.requant(oc, s.codes[oc])),
            (None, None) => return None,
        };
        let mut m = base.to_real();
        if let Some(s) = &self.scales {
            m *= s.multiplier(s.codes[oc]);
        }
        if let Some(c) = &self.clip {
            m = m * c.input / c.output;
        }
        Some(Requant::from_real(m))
    }

    /// Output channel `oc`'s bias codes as the input's clip multiplier makes them (its
    /// accumulator scale is the input's): `base / input`, rounded.
    pub fn rescaled_bias(&self, oc: usize) -> i32 {
        match &self.clip {
            None => self.bias[oc],
            Some(c) => (f64::from(c.base_bias[oc]) / c.input)
                .round()
                .clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32,
        }
    }

    /// Recomputes channel `oc`'s stage (and, under clips, its bias; the packed weights
    /// hold the bias, so a bias change needs [`QConv::repack`]) from the multipliers.
    pub(crate) fn restage_channel(&mut self, oc: usize) {
        if let (Some(rq), Some(stage)) = (self.rescaled_requant(oc), &mut self.stage) {
            stage.requant[oc] = rq;
        }
        self.bias[oc] = self.rescaled_bias(oc);
    }
}

/// How a layer's stage and bias follow the searched clipping levels of its input and
/// output ([`crate::actclip::ActClip`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvClip {
    /// Per output channel, the requantization with every channel-scale and clip code 0.
    pub base_requant: Vec<Requant>,
    /// Per output channel, the bias codes at the input's base scale.
    pub base_bias: Vec<i32>,
    /// Multiplier of the input's scale (1 unless the input has a clip).
    pub input: f64,
    /// Multiplier of the output's scale (1 unless the output has a clip).
    pub output: f64,
}

/// A layer's [`ChannelScales`] against the layer: one per output channel, codes in range,
/// and the output stage exactly what the base requantization and the codes give.
fn validate_scales(sc: &ChannelScales, c: &QConv) -> std::result::Result<(), String> {
    if !ChannelScales::valid_step(sc.step) {
        return Err(format!("step {} outside (0, 0.5]", sc.step));
    }
    let out_c = c.geom.out_c;
    if sc.base.len() != out_c || sc.codes.len() != out_c {
        return Err(format!(
            "{} bases and {} codes for {out_c} channels",
            sc.base.len(),
            sc.codes.len()
        ));
    }
    let (lo, hi) = ChannelScales::code_range(sc.step);
    if sc.codes.iter().any(|&k| k < lo || k > hi) || sc.base.iter().any(|r| !r.is_valid()) {
        return Err(format!(
            "a code outside [{lo}, {hi}] or an invalid base requantization"
        ));
    }
    let Some(stage) = &c.stage else {
        return Err("a layer without an output stage cannot have scales".into());
    };
    if (0..out_c).any(|oc| Some(stage.requant[oc]) != c.rescaled_requant(oc)) {
        return Err("the output stage does not match the scale codes".into());
    }
    Ok(())
}

/// Signed code range of a `bits`-bit weight: `[-2^(b-1), 2^(b-1) - 1]`.
pub fn code_range(bits: u8) -> (i8, i8) {
    let half = 1i16 << (bits - 1);
    ((-half) as i8, (half - 1) as i8)
}

// A network has a few dozen nodes; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum QOp {
    Conv(QConv),
    Add(AddParams),
    MaxPool(PoolGeom),
    AvgPool {
        geom: PoolGeom,
        count_include_pad: bool,
    },
    GlobalAvgPool,
    /// Strided crop in CHW axis order (applied to NHWC data).
    Slice {
        start: [usize; 3],
        step: [usize; 3],
    },
    /// Padding with the zero point, CHW axis order.
    Pad {
        before: [usize; 3],
    },
    /// `[H, W, C] -> [H*W*C]`: a no-op on NHWC memory (the next Linear's weights were
    /// permuted from CHW order at quantization time).
    Flatten,
    /// An activation that could not be fused into the layer before it.
    Clamp {
        min: u8,
        max: u8,
    },
    /// An elementwise function as a table over the input codes, `out = table[x]`, built
    /// at quantization time from the input's and the output's quantization; `func` is
    /// what it tabulates (for reports and export).
    Lut {
        func: Unary,
        /// 256 entries.
        table: Vec<u8>,
    },
    /// Elementwise product; the second input has the first's shape or is `[1, 1, C]`.
    Mul(MulParams),
    /// Concatenation along channels, each input's codes through its own table into the
    /// output's quantization.
    Concat {
        /// One 256-entry table per input.
        tables: Vec<Vec<u8>>,
    },
}

/// A 256-entry table of a node that [`QNetwork::validate`] has checked.
fn table(t: &[u8]) -> &[u8; 256] {
    t.try_into()
        .expect("validated networks hold 256-entry tables")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QNode {
    pub name: String,
    pub op: QOp,
    /// Value ids: 0 is the quantized input, `i >= 1` the output of `nodes[i - 1]`.
    pub inputs: Vec<usize>,
    pub out: QValue,
}

/// What the variables of one [`LayerVars`] entry set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarKind {
    /// The layer's weight codes, OHWI.
    #[default]
    Weights,
    /// One scale code per output channel ([`ChannelScales`]).
    Scales,
    /// One clipping code per searched activation ([`crate::actclip::ActClip`]); one
    /// entry, the last, whose `node` is the first clip's producer.
    Clip,
}

/// Where one layer's codes sit in the flat decision vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerVars {
    /// Index into [`QNetwork::nodes`].
    pub node: usize,
    /// What the variables set; entries of [`VarKind::Scales`] follow every weight entry.
    #[serde(default)]
    pub kind: VarKind,
    pub name: String,
    /// First variable of this layer in the flat vector.
    pub offset: usize,
    pub len: usize,
    pub lo: i8,
    pub hi: i8,
    /// `[out, kh, kw, in]` (`[out, 1, 1, 1]` for scales).
    pub dims: [usize; 4],
}

/// Everything about one decision variable, for reports and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct VarInfo {
    /// Index into [`QNetwork::layers`].
    pub layer: usize,
    pub kind: VarKind,
    /// `(out_channel, kh, kw, in_channel)`.
    pub position: [usize; 4],
    pub lo: i8,
    pub hi: i8,
}

/// The integer network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QNetwork {
    pub input: InputQuant,
    /// Quantization of value 0 (the input codes).
    pub input_value: QValue,
    pub nodes: Vec<QNode>,
    /// Node whose i32 output are the logits (always the last node).
    pub num_classes: usize,
    /// Per class: accumulator to common logit scale (per-channel weight scales differ).
    pub logit_requant: Vec<Requant>,
    /// Real logit = `logit * logit_scale`.
    pub logit_scale: f64,
    pub weight_bits: u8,
    pub act_bits: u8,
    pub layers: Vec<LayerVars>,
    /// Searched activation clipping levels, in network order ([`crate::actclip`]).
    #[serde(default)]
    pub clips: Vec<crate::actclip::ActClip>,
}

/// Per-batch fitness statistics, exact and order-independent: the loss is summed in fixed
/// point so that adding shard results in any grouping gives the same bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalStats {
    /// Sum of per-image cross-entropy, each rounded to a multiple of 2^-[`LOSS_FRAC_BITS`].
    pub loss_fixed: u64,
    pub correct: u64,
    pub images: u64,
    /// Sum over the images of the squared difference between this network's loss and
    /// the job's base network's (the context's) on the same image, each difference
    /// rounded to a multiple of 2^-[`PAIRED_FRAC_BITS`] and clamped to
    /// ±[`MAX_PAIRED_DIFF`]: the spread of a candidate's paired gain, which
    /// `search.margin` weighs the gain against. 0 for the base network itself and for
    /// measurements.
    #[serde(default)]
    pub paired_sq: u64,
}

/// Fractional bits of [`EvalStats::loss_fixed`]: 2^-24 ≈ 6e-8 per image; 2^40 images of
/// loss 64 would still fit in a u64.
pub const LOSS_FRAC_BITS: u32 = 24;

/// The largest loss one image can have, in real units: [`cross_entropy`] clamps there.
pub const MAX_IMAGE_LOSS: f64 = 1e6;
/// [`MAX_IMAGE_LOSS`] in [`EvalStats::loss_fixed`] units: no honest sum over `n` images
/// exceeds `n` times this.
pub const MAX_IMAGE_LOSS_FIXED: u64 = 1_000_000 << LOSS_FRAC_BITS;

/// Fractional bits of a paired loss difference in [`EvalStats::paired_sq`] (2^-12 ≈
/// 2.4e-4 nats, far below any gain that matters), so its square has
/// [`LOSS_FRAC_BITS`] of them.
pub const PAIRED_FRAC_BITS: u32 = 12;
/// The largest paired difference of one image counted in [`EvalStats::paired_sq`], in
/// 2^-[`PAIRED_FRAC_BITS`] units (64 nats): one absurd image cannot swamp the spread,
/// and 2^27 images of it still fit a u64.
pub const MAX_PAIRED_DIFF: i64 = 64 << PAIRED_FRAC_BITS;
/// The largest term of [`EvalStats::paired_sq`].
pub const MAX_PAIRED_SQ: u64 = (MAX_PAIRED_DIFF * MAX_PAIRED_DIFF) as u64;

impl EvalStats {
    /// The statistics of per-image `(loss, correct)` results; with the base network's
    /// losses of the same images (`base`, same order), also their paired spread.
    pub fn tally(results: &[(u64, bool)], base: Option<&[u64]>) -> EvalStats {
        let mut s = EvalStats::default();
        for (i, &(loss, ok)) in results.iter().enumerate() {
            s.loss_fixed += loss;
            s.correct += ok as u64;
            s.images += 1;
            if let Some(base) = base {
                s.paired_sq += paired_term(loss, base[i]);
            }
        }
        s
    }

    pub fn add(&mut self, other: &EvalStats) {
        self.loss_fixed += other.loss_fixed;
        self.correct += other.correct;
        self.images += other.images;
        self.paired_sq += other.paired_sq;
    }
    /// The sum of both, or None if any count would overflow (sums from the network are
    /// checked: a worker's numbers are not trusted to be small).
    pub fn checked_add(&self, other: &EvalStats) -> Option<EvalStats> {
        Some(EvalStats {
            loss_fixed: self.loss_fixed.checked_add(other.loss_fixed)?,
            correct: self.correct.checked_add(other.correct)?,
            images: self.images.checked_add(other.images)?,
            paired_sq: self.paired_sq.checked_add(other.paired_sq)?,
        })
    }

    /// Could an honest evaluation of `images` images give these figures? Exactly that
    /// many images, no more correct than images, and no more loss than every image at
    /// the largest loss [`cross_entropy`] gives.
    pub fn plausible_for(&self, images: u64) -> bool {
        self.images == images
            && self.correct <= images
            && images
                .checked_mul(MAX_IMAGE_LOSS_FIXED)
                .is_some_and(|max| self.loss_fixed <= max)
            && images
                .checked_mul(MAX_PAIRED_SQ)
                .is_some_and(|max| self.paired_sq <= max)
    }

    /// Whether these statistics (a candidate's) beat `context`'s on the same images by
    /// more than `margin` standard errors of the mean paired loss difference: the mean
    /// difference `d` must be negative and `d^2 > margin^2 * var / n`, with `var` the
    /// sample variance of the per-image differences from [`EvalStats::paired_sq`].
    /// With `margin` 0 this is just a lower loss. A gain within the batch's noise is not
    /// credible: the best of many candidates on one batch beats the context by chance.
    pub fn beats_by_margin(&self, context: &EvalStats, margin: f64) -> bool {
        if self.loss_fixed >= context.loss_fixed {
            return false;
        }
        let n = self.images;
        if margin <= 0.0 || n < 2 {
            return true;
        }
        let unit = (1u64 << LOSS_FRAC_BITS) as f64;
        let n = n as f64;
        let mean = (context.loss_fixed - self.loss_fixed) as f64 / unit / n;
        let mean_sq = self.paired_sq as f64 / unit / n;
        let var = ((mean_sq - mean * mean) * n / (n - 1.0)).max(0.0);
        mean * mean * n > margin * margin * var
    }

    pub fn loss_sum(&self) -> f64 {
        self.loss_fixed as f64 / (1u64 << LOSS_FRAC_BITS) as f64
    }
    pub fn mean_loss(&self) -> f64 {
        if self.images == 0 {
            0.0
        } else {
            self.loss_sum() / self.images as f64
        }
    }
    pub fn top1(&self) -> f64 {
        if self.images == 0 {
            0.0
        } else {
            100.0 * self.correct as f64 / self.images as f64
        }
    }
}

/// One image's term of [`EvalStats::paired_sq`]: the squared difference of two losses
/// in [`EvalStats::loss_fixed`] units, rounded (half up) to 2^-[`PAIRED_FRAC_BITS`] and
/// clamped to ±[`MAX_PAIRED_DIFF`] first.
fn paired_term(loss: u64, base: u64) -> u64 {
    let diff = loss as i128 - base as i128;
    let half = 1i128 << (LOSS_FRAC_BITS - PAIRED_FRAC_BITS - 1);
    let d = ((diff + half) >> (LOSS_FRAC_BITS - PAIRED_FRAC_BITS))
        .clamp(-MAX_PAIRED_DIFF as i128, MAX_PAIRED_DIFF as i128) as i64;
    (d * d) as u64
}

/// One image's block-local loss in [`EvalStats::loss_fixed`] units: the mean squared
/// difference between its block output codes `q` and the target codes `t` (same length,
/// not empty), rounded down. At most 255^2 per image, far below [`MAX_IMAGE_LOSS`].
pub fn block_loss(q: &[u8], t: &[u8]) -> u64 {
    let sse: u64 = (q.iter().zip(t))
        .map(|(&a, &b)| {
            let d = i64::from(a) - i64::from(b);
            (d * d) as u64
        })
        .sum();
    // sse <= 65,025 * len, so the shifted sum fits a u128 for any length.
    (((sse as u128) << LOSS_FRAC_BITS) / t.len().max(1) as u128) as u64
}

/// Cross-entropy of one image's integer logits (real value `logit * scale`), rounded to
/// fixed point; and whether the arg-max (first maximum) is the label.
pub fn image_loss(logits: &[i32], scale: f64, label: u8) -> (u64, bool) {
    let real: Vec<f64> = logits.iter().map(|&l| l as f64 * scale).collect();
    cross_entropy(&real, label)
}

/// Index of the first maximum.
fn argmax(logits: &[f64]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// Cross-entropy of real logits in [`EvalStats`] fixed point, and arg-max == label.
/// Computed in one fixed order, so it is reproducible bit for bit on a given platform.
pub fn cross_entropy(logits: &[f64], label: u8) -> (u64, bool) {
    let best = argmax(logits);
    // Shift by the max logit so exp never overflows.
    let max = logits.get(best).copied().unwrap_or(0.0);
    let sum: f64 = logits.iter().map(|&l| (l - max).exp()).sum();
    let target = logits
        .get(label as usize)
        .copied()
        .unwrap_or(f64::NEG_INFINITY);
    let loss = (max + sum.ln() - target).clamp(0.0, MAX_IMAGE_LOSS);
    let fixed = (loss * (1u64 << LOSS_FRAC_BITS) as f64).round() as u64;
    (fixed, best == label as usize)
}

/// `ln(sum(exp(x / t)))` and `x / t`, shifted by the maximum so exp never overflows.
fn log_softmax(x: impl Iterator<Item = f64>, t: f64) -> Vec<f64> {
    let z: Vec<f64> = x.map(|v| v / t).collect();
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + z.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
    z.into_iter().map(|v| v - lse).collect()
}

/// Distillation loss of real logits against the float teacher's, in [`EvalStats`] fixed
/// point: `T^2 * KL(softmax(teacher / T) || softmax(logits / T))`, zero when the
/// quantized network's softened outputs equal the teacher's. `T^2` keeps its size
/// comparable across temperatures (Hinton et al.); ranking does not depend on it.
/// Computed in one fixed order, so it is reproducible bit for bit on a given platform.
pub fn distillation(logits: &[f64], teacher: &[f32], temperature: f64) -> u64 {
    let lq = log_softmax(logits.iter().copied(), temperature);
    let lp = log_softmax(teacher.iter().map(|&v| v as f64), temperature);
    let kl: f64 = lp
        .iter()
        .zip(&lq)
        .map(|(&p, &q)| p.exp() * (p - q))
        .sum::<f64>()
        * temperature
        * temperature;
    // A NaN (a non-finite teacher logit that got past the checks) stays NaN here and
    // becomes 0 in the saturating cast below.
    let loss = kl.clamp(0.0, MAX_IMAGE_LOSS);
    (loss * (1u64 << LOSS_FRAC_BITS) as f64).round() as u64
}

/// What a batch's images are scored against: their labels, and, for distillation, the
/// float model's logits on the same images, or, for block-local fitness, the float
/// model's output of one block.
#[derive(Debug, Clone, Copy)]
pub struct Targets<'a> {
    pub labels: &'a [u8],
    pub teacher: Option<Teacher<'a>>,
    pub block: Option<BlockTarget<'a>>,
}

/// The float model's output of one block, quantized as the integer network quantizes
/// its value there (`crate::blocks`): with one, a forward pass stops at `node` and an
/// image's loss is the mean squared difference of the codes, in code units; no image
/// counts as correct. Integer throughout, so the sums stay exact.
#[derive(Debug, Clone, Copy)]
pub struct BlockTarget<'a> {
    /// The node whose output ends the block.
    pub node: usize,
    /// That output's codes (NHWC) for every image, image by image.
    pub codes: &'a [u8],
}

/// The float model's outputs a distillation fitness compares against.
#[derive(Debug, Clone, Copy)]
pub struct Teacher<'a> {
    /// `classes` logits per image, image by image.
    pub logits: &'a [f32],
    /// Softmax temperature (> 0).
    pub temperature: f32,
}

impl<'a> Targets<'a> {
    /// Score by cross-entropy against the labels.
    pub fn labels(labels: &'a [u8]) -> Self {
        Targets {
            labels,
            teacher: None,
            block: None,
        }
    }

    /// Images scored.
    pub(crate) fn len(&self) -> usize {
        self.labels.len()
    }

    /// Images `lo..hi` of these targets, for a network of `classes` outputs.
    pub fn slice(&self, lo: usize, hi: usize, classes: usize) -> Targets<'a> {
        Targets {
            labels: &self.labels[lo..hi],
            teacher: self.teacher.map(|t| Teacher {
                logits: &t.logits[lo * classes..hi * classes],
                temperature: t.temperature,
            }),
            block: self.block.map(|b| {
                let per = b.codes.len() / self.labels.len().max(1);
                BlockTarget {
                    node: b.node,
                    codes: &b.codes[lo * per..hi * per],
                }
            }),
        }
    }

    /// Checks that the teacher (if any) has `classes` finite logits per image and a
    /// positive finite temperature: they may come from the network.
    pub fn check(&self, classes: usize) -> Result<()> {
        if let Some(b) = &self.block {
            // Whole images only, so slicing keeps every image's codes together; their
            // number per image is checked against the network (`QNetwork::check_block`).
            if b.codes.len() % self.labels.len().max(1) != 0 {
                return Err(Error::setting(
                    "block targets",
                    b.codes.len(),
                    format!(
                        "is not a whole number of codes for {} images",
                        self.labels.len()
                    ),
                ));
            }
        }
        let Some(t) = &self.teacher else {
            return Ok(());
        };
        if t.logits.len() != self.labels.len() * classes {
            return Err(Error::setting(
                "teacher logits",
                t.logits.len(),
                format!("expected {} images x {classes} classes", self.labels.len()),
            ));
        }
        if let Some(i) = t.logits.iter().position(|v| !v.is_finite()) {
            return Err(Error::setting(
                "teacher logits",
                t.logits[i],
                format!("logit {i} is not finite"),
            ));
        }
        if !(t.temperature.is_finite() && t.temperature > 0.0) {
            return Err(Error::setting(
                "temperature",
                t.temperature,
                "must be a positive finite number",
            ));
        }
        Ok(())
    }
}

/// All values of one forward pass over `n` images.
#[derive(Debug, Clone, Default)]
pub struct Activations {
    pub n: usize,
    /// Indexed by value id; the logits node's slot is empty, and so is a convolution's
    /// when residual fusion wrote the add after it directly ([`Activations::fused`]).
    pub values: Vec<Vec<u8>>,
    /// `n * num_classes`.
    pub logits: Vec<i32>,
    /// Residual fusion: `None` keeps every value; `Some(keep)` fuses every residual add
    /// into the convolution before it except after the convolution nodes in `keep`.
    fusion: Option<Vec<usize>>,
    /// Forward passes run no node after this one (block-local fitness reads the
    /// block's output only); later values and the logits are left as they were.
    pub stop_after: Option<usize>,
}

impl Activations {
    /// Activations whose forward passes fuse each residual add into the store of the
    /// convolution before it ([`crate::kernels::PackedConv::run_residual`]) where that
    /// convolution's output feeds nothing else: the add's output is written at once and
    /// the convolution's own value is left empty. The convolution nodes in `keep` are not
    /// fused, so their outputs stay readable. Every other value, and the logits, are the
    /// same bits as without fusion. For callers that read the logits and block outputs
    /// (evaluation, candidate scoring), not every intermediate value (calibration).
    pub fn fused(keep: Vec<usize>) -> Activations {
        Activations {
            fusion: Some(keep),
            ..Activations::default()
        }
    }
}

impl QNetwork {
    /// Total number of decision variables.
    pub fn num_vars(&self) -> usize {
        self.layers.iter().map(|l| l.len).sum()
    }

    /// Heap bytes of the weight layers (codes, bias, scales, packed kernel weights): the
    /// part of a network that grows with its number of variables. Activation tables and
    /// node metadata are not counted. For memory accounting (`coordinator bench`).
    pub fn weight_heap_bytes(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.kind == VarKind::Weights)
            .map(|l| self.conv(l.node).heap_bytes())
            .sum()
    }

    /// The flat decision vector: all layers' weight codes in order, then their scale
    /// codes if the network has channel scales.
    pub fn codes(&self) -> Vec<i8> {
        let mut out = Vec::with_capacity(self.num_vars());
        for l in &self.layers {
            match l.kind {
                VarKind::Weights => out.extend_from_slice(&self.conv(l.node).codes),
                VarKind::Scales => {
                    let conv = self.conv(l.node);
                    (0..l.len).for_each(|i| out.push(conv.var_code(l.kind, i)))
                }
                VarKind::Clip => out.extend(self.clips.iter().map(|c| c.code)),
            }
        }
        out
    }

    /// The code of variable `var` (which must exist).
    pub fn var_code(&self, var: usize) -> i8 {
        let l = &self.layers[self.layer_of(var)];
        match l.kind {
            VarKind::Clip => self.clips[var - l.offset].code,
            kind => self.conv(l.node).var_code(kind, var - l.offset),
        }
    }

    /// The nodes after which the network has one value live, its own output: the ends of
    /// its blocks, where a prefix of the network can be compared with the float model's
    /// (a residual block's add; every layer of a plain chain). The logits node is not one.
    pub fn block_ends(&self) -> Vec<usize> {
        // Per value, the last node that reads it (None: no node does). One pass, so that
        // `block_end`, asked per job, stays linear in the nodes.
        let mut last_read: Vec<Option<usize>> = vec![None; self.nodes.len() + 1];
        for (i, n) in self.nodes.iter().enumerate() {
            for &v in &n.inputs {
                if let Some(r) = last_read.get_mut(v) {
                    *r = Some(i);
                }
            }
        }
        // After node i every value before its own is done with when the furthest read of
        // any of them is node i at the latest. Then node i + 1 can read only node i's
        // output, so that value is live (and the only one).
        let mut furthest = 0;
        let mut ends = Vec::new();
        let hidden = self.nodes.len().saturating_sub(1);
        for (i, read) in last_read.iter().take(hidden).enumerate() {
            furthest = furthest.max(read.unwrap_or(0));
            if furthest <= i {
                ends.push(i);
            }
        }
        ends
    }

    /// The end of the block holding node `node`: the first of [`QNetwork::block_ends`] at
    /// or after it, or `None` for nodes in the last block (which ends at the logits).
    pub fn block_end(&self, node: usize) -> Option<usize> {
        self.block_ends().into_iter().find(|&e| e >= node)
    }

    /// Checks a block target against this network: a hidden node at or after `last`
    /// (the last node a candidate changes), and one output's codes per image of `n`.
    pub fn check_block(&self, b: &BlockTarget, n: usize, last: usize) -> Result<()> {
        if b.node + 1 >= self.nodes.len() || b.node < last {
            return Err(Error::setting(
                "block end",
                b.node,
                format!(
                    "must be a hidden node at or after node {last}, the last the group changes ({} nodes)",
                    self.nodes.len()
                ),
            ));
        }
        let per = self.nodes[b.node].out.len();
        if b.codes.len() != n * per {
            return Err(Error::setting(
                "block targets",
                b.codes.len(),
                format!("expected {n} images x {per} codes of node {}", b.node),
            ));
        }
        Ok(())
    }

    /// The first node whose computation variable `var` (which must exist) enters: its
    /// layer, or for a clip its producer. A candidate is recomputed from there.
    pub fn first_node(&self, var: usize) -> usize {
        let l = &self.layers[self.layer_of(var)];
        match l.kind {
            VarKind::Clip => self.clips[var - l.offset].producer(),
            _ => l.node,
        }
    }

    /// Replaces every variable; `codes.len()` must equal [`QNetwork::num_vars`] and every
    /// code must lie in its layer's range.
    pub fn set_codes(&mut self, codes: &[i8]) -> Result<()> {
        if codes.len() != self.num_vars() {
            return Err(Error::setting(
                "codes",
                codes.len(),
                format!("the network has {} variables", self.num_vars()),
            ));
        }
        for l in &self.layers {
            let slice = &codes[l.offset..l.offset + l.len];
            if let Some(pos) = slice.iter().position(|&c| c < l.lo || c > l.hi) {
                return Err(Error::setting(
                    "codes",
                    slice[pos],
                    format!(
                        "variable {} of layer '{}' must lie in [{}, {}]",
                        l.offset + pos,
                        l.name,
                        l.lo,
                        l.hi
                    ),
                ));
            }
        }
        for li in 0..self.layers.len() {
            let l = self.layers[li].clone();
            let slice = &codes[l.offset..l.offset + l.len];
            if l.kind == VarKind::Clip {
                let changes: Vec<(usize, i8)> = slice.iter().copied().enumerate().collect();
                self.set_clips(&changes);
                continue;
            }
            let conv = self.conv_mut(l.node);
            match l.kind {
                VarKind::Weights if conv.codes != slice => {
                    conv.codes.copy_from_slice(slice);
                    conv.repack();
                }
                VarKind::Weights | VarKind::Clip => {}
                VarKind::Scales => {
                    for (i, &c) in slice.iter().enumerate() {
                        conv.set_var(l.kind, i, c);
                    }
                }
            }
        }
        Ok(())
    }

    /// Sets individual variables (e.g. a search's adopted changes) and repacks the layers
    /// whose weights they touch. Checks every index and code before changing anything.
    pub fn apply_changes(&mut self, changes: &[(u32, i8)]) -> Result<()> {
        let n = self.num_vars();
        for &(var, code) in changes {
            let l = self
                .layers
                .get(self.layer_of(var as usize))
                .filter(|_| (var as usize) < n);
            match l {
                Some(l) if code >= l.lo && code <= l.hi => {}
                _ => {
                    return Err(Error::setting(
                        "change",
                        format!("var {var} = {code}"),
                        format!("outside the network's {n} variables or their code range"),
                    ))
                }
            }
        }
        let mut touched = vec![false; self.layers.len()];
        let mut clips = Vec::new();
        for &(var, code) in changes {
            let li = self.layer_of(var as usize);
            let (node, offset, kind) = (
                self.layers[li].node,
                self.layers[li].offset,
                self.layers[li].kind,
            );
            if kind == VarKind::Clip {
                clips.push((var as usize - offset, code));
                continue;
            }
            self.conv_mut(node)
                .set_var(kind, var as usize - offset, code);
            if kind == VarKind::Weights {
                touched[li] = true;
            }
        }
        for (li, t) in touched.into_iter().enumerate() {
            if t {
                let node = self.layers[li].node;
                self.conv_mut(node).repack();
            }
        }
        self.set_clips(&clips);
        Ok(())
    }

    /// Adds a searched scale multiplier per output channel of every hidden weight layer
    /// (not the logits layer, whose output is not requantized): one more [`LayerVars`] of
    /// [`VarKind::Scales`] per layer, after all weight codes, every code 0 (the network
    /// computes exactly what it did). `step` is the multiplier's step, in `(0, 0.5]`.
    pub fn add_channel_scales(&mut self, step: f64) -> Result<()> {
        if !ChannelScales::valid_step(step) {
            return Err(Error::setting(
                "channel_scale_step",
                step,
                "must lie in (0, 0.5]",
            ));
        }
        if self.layers.iter().any(|l| l.kind == VarKind::Scales) {
            return Err(Error::setting(
                "channel_scale_step",
                step,
                "the network already has channel scales",
            ));
        }
        let (lo, hi) = ChannelScales::code_range(step);
        let weights = self.layers.clone();
        for l in weights {
            let conv = self.conv_mut(l.node);
            let Some(stage) = &conv.stage else { continue };
            let out_c = conv.geom.out_c;
            conv.scales = Some(ChannelScales {
                step,
                base: stage.requant.clone(),
                codes: vec![0; out_c],
            });
            let offset = self.layers.last().map_or(0, |l| l.offset + l.len);
            self.layers.push(LayerVars {
                node: l.node,
                kind: VarKind::Scales,
                name: format!("{}.scale", l.name),
                offset,
                len: out_c,
                lo,
                hi,
                dims: [out_c, 1, 1, 1],
            });
        }
        Ok(())
    }

    /// The layer (index into [`QNetwork::layers`]) holding variable `var`.
    pub fn layer_of(&self, var: usize) -> usize {
        self.layers.partition_point(|l| l.offset + l.len <= var)
    }

    pub fn var_info(&self, var: usize) -> Option<VarInfo> {
        let layer = self.layer_of(var);
        let l = self.layers.get(layer)?;
        let mut r = var - l.offset;
        let [_, kh, kw, ic] = l.dims;
        let i = r % ic;
        r /= ic;
        let x = r % kw;
        r /= kw;
        let y = r % kh;
        let o = r / kh;
        Some(VarInfo {
            layer,
            kind: l.kind,
            position: [o, y, x, i],
            lo: l.lo,
            hi: l.hi,
        })
    }

    pub fn conv(&self, node: usize) -> &QConv {
        match &self.nodes[node].op {
            QOp::Conv(c) => c,
            _ => unreachable!("layers only point at Conv nodes"),
        }
    }

    pub fn conv_mut(&mut self, node: usize) -> &mut QConv {
        match &mut self.nodes[node].op {
            QOp::Conv(c) => c,
            _ => unreachable!("layers only point at Conv nodes"),
        }
    }

    pub fn input_channels(&self) -> usize {
        self.input_value.c
    }

    /// Pixels per image (CHW).
    pub fn image_len(&self) -> usize {
        self.input_value.len()
    }

    /// Weight bits of each Conv/Linear layer, in network order (they differ from
    /// `weight_bits` only under `first_last_bits`).
    pub fn layer_bits(&self) -> Vec<u8> {
        self.layers
            .iter()
            .filter(|l| l.kind == VarKind::Weights)
            .map(|l| self.conv(l.node).weight_bits)
            .collect()
    }

    /// Human precision tag, e.g. `w4a8`; `w3a8-fl8` when the first weight layer and the
    /// logits layer have 8-bit weights (`first_last_bits`), `w3a8-mixed` for any other mix.
    pub fn precision(&self) -> String {
        let base = format!("w{}a{}", self.weight_bits, self.act_bits);
        let bits = self.layer_bits();
        if bits.iter().all(|&b| b == self.weight_bits) {
            return base;
        }
        let (first, last) = (bits[0], bits[bits.len() - 1]);
        // A one-layer network has no inner layers (and its first layer is its last).
        let inner = bits.get(1..bits.len() - 1).unwrap_or(&[]);
        if first == last && inner.iter().all(|&b| b == self.weight_bits) {
            format!("{base}-fl{first}")
        } else {
            format!("{base}-mixed")
        }
    }

    /// Converts `n` CHW u8 images into NHWC input codes.
    pub fn quantize_input(&self, pixels: &[u8], n: usize, out: &mut Vec<u8>) {
        let QValue { h, w, c, .. } = self.input_value;
        let plane = h * w;
        out.clear();
        out.resize(n * plane * c, 0);
        for img in 0..n {
            let src = &pixels[img * plane * c..(img + 1) * plane * c];
            let dst = &mut out[img * plane * c..(img + 1) * plane * c];
            for ch in 0..c {
                let lut = &self.input.lut[ch * 256..(ch + 1) * 256];
                for p in 0..plane {
                    dst[p * c + ch] = lut[src[ch * plane + p] as usize];
                }
            }
        }
    }

    /// Full forward pass over `n` CHW u8 images, keeping every value.
    pub fn forward(&self, pixels: &[u8], n: usize, acts: &mut Activations) {
        self.forward_patched(pixels, n, &[], acts);
    }

    /// [`QNetwork::forward`] with the nodes named in `patches` (node index, replacement
    /// op of the same kind and shape) swapped in.
    pub fn forward_patched(
        &self,
        pixels: &[u8],
        n: usize,
        patches: &[(usize, QOp)],
        acts: &mut Activations,
    ) {
        acts.n = n;
        acts.values.resize_with(self.nodes.len() + 1, Vec::new);
        let mut input = std::mem::take(&mut acts.values[0]);
        self.quantize_input(pixels, n, &mut input);
        acts.values[0] = input;
        self.run_nodes(0, patches, acts);
    }

    /// Recomputes nodes `first..` of `acts` (which must hold a forward pass of the same
    /// images), with the nodes named in `patches` (node index, replacement op) swapped in.
    /// Values computed before node `first` are reused untouched.
    pub fn forward_from(&self, first: usize, patches: &[(usize, QOp)], acts: &mut Activations) {
        self.run_nodes(first, patches, acts);
    }

    /// The convolution whose store add node `add` can take over: the add reads a hidden
    /// convolution's output, which nothing else reads, and another value. Returns the
    /// convolution's node, the other value, and whether the convolution's output is the
    /// add's `b` (so its parameters are used [`AddParams::swapped`]).
    fn fusable_conv(&self, add: usize) -> Option<(usize, usize, bool)> {
        let QOp::Add(_) = &self.nodes[add].op else {
            return None;
        };
        let [a, b] = self.nodes[add].inputs[..] else {
            return None;
        };
        let hidden_conv = |v: usize| {
            (1..self.nodes.len()).contains(&v) && matches!(self.nodes[v - 1].op, QOp::Conv(_))
        };
        let readers = |v: usize| {
            (self.nodes.iter())
                .flat_map(|n| &n.inputs)
                .filter(|&&x| x == v)
                .count()
        };
        [(a, b, false), (b, a, true)]
            .into_iter()
            .find(|&(c, other, _)| c != other && hidden_conv(c) && readers(c) == 1)
            .map(|(c, other, swapped)| (c - 1, other, swapped))
    }

    /// The op node `idx` runs: its patch if it has one.
    fn op_at<'a>(&'a self, idx: usize, patches: &'a [(usize, QOp)]) -> &'a QOp {
        match patches.iter().find(|(p, _)| *p == idx) {
            Some((_, op)) => op,
            None => &self.nodes[idx].op,
        }
    }

    /// The layer node `idx` runs: its patch if it has one.
    fn conv_at<'a>(&'a self, idx: usize, patches: &'a [(usize, QOp)]) -> &'a QConv {
        match self.op_at(idx, patches) {
            QOp::Conv(c) => c,
            _ => unreachable!("a convolution is patched by a convolution"),
        }
    }

    fn run_nodes(&self, first: usize, patches: &[(usize, QOp)], acts: &mut Activations) {
        let n = acts.n;
        // Per add node, the convolution fused into it. That convolution is skipped where
        // it stands and run by the add, so it runs even when `first` lies between the
        // two (its input is earlier still, so it is there).
        let fused: Vec<Option<(usize, usize, bool)>> = match &acts.fusion {
            None => Vec::new(),
            Some(keep) => (0..self.nodes.len())
                .map(|j| self.fusable_conv(j).filter(|(c, ..)| !keep.contains(c)))
                .collect(),
        };
        let end = acts.stop_after.map_or(self.nodes.len(), |s| s + 1);
        for (idx, node) in self.nodes.iter().enumerate().take(end).skip(first) {
            // Take the output buffer out so inputs (strictly earlier values) can be borrowed.
            let mut out = std::mem::take(&mut acts.values[idx + 1]);
            let is_logits = idx + 1 == self.nodes.len();
            if fused.iter().flatten().any(|&(c, ..)| c == idx) {
                // Left empty, so a reader of it fails loudly rather than reading stale codes.
                out.clear();
                acts.values[idx + 1] = out;
                continue;
            }
            if let Some(&Some((c, other, swapped))) = fused.get(idx) {
                let QOp::Add(p) = self.op_at(idx, patches) else {
                    unreachable!("an add is patched by an add")
                };
                let add = if swapped { p.swapped() } else { *p };
                let conv = self.conv_at(c, patches);
                let stage = (conv.stage.as_ref()).expect("hidden layers have an output stage");
                out.resize(n * node.out.len(), 0);
                let (input, b) = (&acts.values[self.nodes[c].inputs[0]], &acts.values[other]);
                conv.packed()
                    .run_residual(stage, input, n, b, &add, &mut out);
                acts.values[idx + 1] = out;
                continue;
            }
            match self.op_at(idx, patches) {
                QOp::Conv(conv) => {
                    let input = &acts.values[node.inputs[0]];
                    if is_logits {
                        acts.logits.resize(n * self.num_classes, 0);
                        conv.packed().run_acc(input, n, &mut acts.logits);
                        self.requant_logits(&mut acts.logits);
                    } else {
                        out.resize(n * node.out.len(), 0);
                        let stage = conv
                            .stage
                            .as_ref()
                            .expect("hidden layers have an output stage");
                        conv.packed().run(stage, input, n, &mut out);
                    }
                }
                QOp::Add(p) => {
                    out.resize(n * node.out.len(), 0);
                    let (a, b) = (&acts.values[node.inputs[0]], &acts.values[node.inputs[1]]);
                    kernels::add(p, a, b, &mut out);
                }
                QOp::MaxPool(g) => {
                    out.resize(n * node.out.len(), 0);
                    kernels::max_pool(g, &acts.values[node.inputs[0]], n, &mut out);
                }
                QOp::AvgPool {
                    geom,
                    count_include_pad,
                } => {
                    out.resize(n * node.out.len(), 0);
                    let zp = self.value(node.inputs[0]).zp;
                    kernels::avg_pool(
                        geom,
                        *count_include_pad,
                        zp,
                        &acts.values[node.inputs[0]],
                        n,
                        &mut out,
                    );
                }
                QOp::GlobalAvgPool => {
                    out.resize(n * node.out.len(), 0);
                    let v = self.value(node.inputs[0]);
                    kernels::global_avg_pool(
                        v.h,
                        v.w,
                        v.c,
                        &acts.values[node.inputs[0]],
                        n,
                        &mut out,
                    );
                }
                QOp::Slice { start, step } => {
                    let src = self.value(node.inputs[0]);
                    slice_nhwc(
                        &acts.values[node.inputs[0]],
                        n,
                        &src,
                        &node.out,
                        *start,
                        *step,
                        &mut out,
                    );
                }
                QOp::Pad { before } => {
                    let src = self.value(node.inputs[0]);
                    pad_nhwc(
                        &acts.values[node.inputs[0]],
                        n,
                        &src,
                        &node.out,
                        *before,
                        &mut out,
                    );
                }
                QOp::Flatten => {
                    out.clear();
                    out.extend_from_slice(&acts.values[node.inputs[0]]);
                }
                QOp::Clamp { min, max } => {
                    out.clear();
                    out.extend(
                        acts.values[node.inputs[0]]
                            .iter()
                            .map(|&x| x.clamp(*min, *max)),
                    );
                }
                QOp::Lut { table: t, .. } => {
                    out.resize(n * node.out.len(), 0);
                    kernels::lookup(table(t), &acts.values[node.inputs[0]], &mut out);
                }
                QOp::Mul(p) => {
                    out.resize(n * node.out.len(), 0);
                    let (a, b) = (&acts.values[node.inputs[0]], &acts.values[node.inputs[1]]);
                    kernels::mul(p, a, b, n, &mut out);
                }
                QOp::Concat { tables } => {
                    let inputs: Vec<(&[u8], &[u8; 256])> = node
                        .inputs
                        .iter()
                        .zip(tables)
                        .map(|(&v, t)| (&acts.values[v][..], table(t)))
                        .collect();
                    let channels: Vec<usize> =
                        node.inputs.iter().map(|&v| self.value(v).c).collect();
                    kernels::concat(&inputs, &channels, &mut out);
                }
            }
            acts.values[idx + 1] = out;
        }
    }

    /// Logits-layer accumulators (`n * num_classes`) to logits at the common scale.
    pub(crate) fn requant_logits(&self, logits: &mut [i32]) {
        for row in logits.chunks_exact_mut(self.num_classes) {
            for (l, rq) in row.iter_mut().zip(&self.logit_requant) {
                *l = rq.apply(*l);
            }
        }
    }

    /// Quantization of value `v`.
    pub fn value(&self, v: usize) -> QValue {
        if v == 0 {
            self.input_value
        } else {
            self.nodes[v - 1].out
        }
    }

    /// Loss and accuracy of the logits in `acts` against `targets`: cross-entropy on the
    /// labels, or the distillation loss against the teacher when there is one; accuracy
    /// is always against the labels. `targets` must have passed [`Targets::check`].
    pub fn stats(&self, acts: &Activations, targets: &Targets) -> EvalStats {
        EvalStats::tally(&self.image_results(acts, targets), None)
    }

    /// Per image of `acts`, in order: its loss (as [`QNetwork::stats`] sums it) and
    /// whether its arg-max is the label.
    pub fn image_results(&self, acts: &Activations, targets: &Targets) -> Vec<(u64, bool)> {
        if let Some(b) = &targets.block {
            let codes = &acts.values[b.node + 1];
            let per = self.nodes[b.node].out.len();
            return (codes.chunks_exact(per).zip(b.codes.chunks_exact(per)))
                .map(|(q, t)| (block_loss(q, t), false))
                .collect();
        }
        let rows = acts.logits.chunks_exact(self.num_classes);
        let mut out = Vec::with_capacity(targets.labels.len());
        for (i, (row, &label)) in rows.zip(targets.labels).enumerate() {
            let (loss, ok) = match &targets.teacher {
                None => image_loss(row, self.logit_scale, label),
                Some(t) => {
                    let real: Vec<f64> = row.iter().map(|&l| l as f64 * self.logit_scale).collect();
                    let c = self.num_classes;
                    let teacher = &t.logits[i * c..(i + 1) * c];
                    let loss = distillation(&real, teacher, t.temperature as f64);
                    (loss, argmax(&real) == label as usize)
                }
            };
            out.push((loss, ok));
        }
        out
    }

    /// Evaluates the network on `n` CHW images in chunks of `batch`, with `threads`
    /// threads, each taking a contiguous part of every chunk. Per-image results do not
    /// depend on the split, so neither does the total.
    pub fn evaluate(
        &self,
        pixels: &[u8],
        labels: &[u8],
        batch: usize,
        threads: usize,
    ) -> EvalStats {
        let n = labels.len();
        let il = self.image_len();
        let threads = threads.max(1);
        let per = n.div_ceil(threads).max(1);
        let batch = batch.max(1);
        let mut total = EvalStats::default();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .filter_map(|t| {
                    let lo = (t * per).min(n);
                    let hi = ((t + 1) * per).min(n);
                    (lo < hi).then(|| {
                        scope.spawn(move || {
                            let mut acts = Activations::fused(Vec::new());
                            let mut s = EvalStats::default();
                            let mut i = lo;
                            while i < hi {
                                let m = batch.min(hi - i);
                                self.forward(&pixels[i * il..(i + m) * il], m, &mut acts);
                                s.add(&self.stats(&acts, &Targets::labels(&labels[i..i + m])));
                                i += m;
                            }
                            s
                        })
                    })
                })
                .collect();
            for h in handles {
                total.add(&h.join().expect("evaluation thread panicked"));
            }
        });
        total
    }

    /// Checks internal consistency (after loading from a file): lengths, ranges, ids.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| Error::NetworkFile {
            path: origin.to_string(),
            reason,
        };
        if self.input_value.c == 0 || self.input.lut.len() != self.input_value.c * 256 {
            return Err(bad(
                "input lookup table does not match the input channels".into()
            ));
        }
        if !(2..=8).contains(&self.weight_bits) || !(2..=8).contains(&self.act_bits) {
            return Err(bad(format!(
                "bit widths w{} a{} outside 2..=8",
                self.weight_bits, self.act_bits
            )));
        }
        if self.nodes.is_empty() || self.logit_requant.len() != self.num_classes {
            return Err(bad("no logits layer".into()));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if node.inputs.iter().any(|&v| v > i) || node.inputs.is_empty() {
                return Err(bad(format!(
                    "node '{}' reads a value that is not computed before it",
                    node.name
                )));
            }
            self.validate_elementwise(node)
                .map_err(|why| bad(format!("node '{}' is inconsistent: {why}", node.name)))?;
            if let QOp::Conv(c) = &node.op {
                let g = &c.geom;
                let src = self.value(node.inputs[0]);
                let sizes = checked_conv_sizes(g);
                if (src.h, src.w, src.c) != (g.in_h, g.in_w, g.in_c)
                    || sizes.is_none_or(|(out_h, out_w, weights)| {
                        c.codes.len() != weights || (node.out.h, node.out.w) != (out_h, out_w)
                    })
                    || node.out.c != g.out_c
                    || c.bias.len() != g.out_c
                {
                    return Err(bad(format!(
                        "layer '{}' has inconsistent dimensions",
                        node.name
                    )));
                }
                if let Some(s) = &c.stage {
                    if s.requant.len() != g.out_c
                        || s.requant.iter().any(|r| !(1..=62).contains(&r.shift))
                    {
                        return Err(bad(format!("layer '{}' has a bad output stage", node.name)));
                    }
                } else if i + 1 != self.nodes.len() {
                    return Err(bad(format!("layer '{}' has no output stage", node.name)));
                }
                let (lo, hi) = code_range(c.weight_bits.clamp(2, 8));
                if !(2..=8).contains(&c.weight_bits) || c.codes.iter().any(|&x| x < lo || x > hi) {
                    return Err(bad(format!(
                        "layer '{}' has codes outside [{lo}, {hi}]",
                        node.name
                    )));
                }
                if let Some(sc) = &c.scales {
                    validate_scales(sc, c)
                        .map_err(|why| bad(format!("layer '{}' scales: {why}", node.name)))?;
                }
            }
        }
        let mut offset = 0;
        for l in &self.layers {
            if l.kind == VarKind::Clip {
                // Checked against the clips by `validate_clips`.
                if l.offset != offset {
                    return Err(bad(format!(
                        "variable map entry '{}' is inconsistent",
                        l.name
                    )));
                }
                offset += l.len;
                continue;
            }
            if l.node >= self.nodes.len()
                || !matches!(self.nodes[l.node].op, QOp::Conv(_))
                || l.offset != offset
            {
                return Err(bad(format!(
                    "variable map entry '{}' is inconsistent",
                    l.name
                )));
            }
            let conv = self.conv(l.node);
            let (len, range) = match (l.kind, &conv.scales) {
                (VarKind::Weights, _) => {
                    (conv.codes.len(), code_range(conv.weight_bits.clamp(2, 8)))
                }
                (VarKind::Scales, Some(sc)) => (sc.codes.len(), ChannelScales::code_range(sc.step)),
                (VarKind::Scales, None) | (VarKind::Clip, _) => (usize::MAX, (0, 0)),
            };
            if len != l.len || (l.lo, l.hi) != range {
                return Err(bad(format!(
                    "variable map entry '{}' has the wrong length or code range",
                    l.name
                )));
            }
            offset += l.len;
        }
        // Weight entries first (the flat vector's documented order), and every layer with
        // scales has exactly one scale entry, so `codes()` covers every scale code.
        let kinds: Vec<VarKind> = self.layers.iter().map(|l| l.kind).collect();
        if kinds
            .windows(2)
            .any(|w| w == [VarKind::Scales, VarKind::Weights] || w[0] == VarKind::Clip)
        {
            return Err(bad(
                "variable map entries out of order (weights, then scales, then clips)".into(),
            ));
        }
        self.validate_clips().map_err(bad)?;
        let scaled = (0..self.nodes.len())
            .filter(|&i| matches!(&self.nodes[i].op, QOp::Conv(c) if c.scales.is_some()));
        for node in scaled {
            let entries = (self.layers.iter())
                .filter(|l| l.node == node && l.kind == VarKind::Scales)
                .count();
            if entries != 1 {
                return Err(bad(format!(
                    "layer '{}' has scales but {entries} scale entries in the variable map",
                    self.nodes[node].name
                )));
            }
        }
        Ok(())
    }

    /// Shapes, arities and parameters of the lookup, product and concatenation nodes,
    /// whose kernels would otherwise index out of bounds on a damaged network.
    fn validate_elementwise(&self, node: &QNode) -> std::result::Result<(), String> {
        let arity = |k: usize| {
            if node.inputs.len() == k {
                Ok(())
            } else {
                Err(format!("{} inputs, expected {k}", node.inputs.len()))
            }
        };
        let plane = |v: &QValue| (v.h, v.w);
        match &node.op {
            QOp::Lut { table, .. } => {
                arity(1)?;
                let src = self.value(node.inputs[0]);
                if table.len() != 256 {
                    return Err(format!("a table of {} entries", table.len()));
                }
                if (src.h, src.w, src.c) != (node.out.h, node.out.w, node.out.c) {
                    return Err("output shape differs from the input's".into());
                }
            }
            QOp::Mul(p) => {
                arity(2)?;
                let (a, b) = (self.value(node.inputs[0]), self.value(node.inputs[1]));
                if !p.is_valid() {
                    return Err(format!("invalid parameters {p:?}"));
                }
                let same = (a.h, a.w, a.c) == (b.h, b.w, b.c);
                let per_channel = (b.h, b.w, b.c) == (1, 1, a.c);
                if !(same || per_channel) || (a.h, a.w, a.c) != (node.out.h, node.out.w, node.out.c)
                {
                    return Err("operand shapes do not match".into());
                }
            }
            QOp::Concat { tables } => {
                if node.inputs.len() < 2 || tables.len() != node.inputs.len() {
                    return Err(format!(
                        "{} inputs and {} tables",
                        node.inputs.len(),
                        tables.len()
                    ));
                }
                if tables.iter().any(|t| t.len() != 256) {
                    return Err("a table without 256 entries".into());
                }
                let values: Vec<QValue> = node.inputs.iter().map(|&v| self.value(v)).collect();
                let channels: usize = values.iter().map(|v| v.c).sum();
                if values
                    .iter()
                    .any(|v| plane(v) != plane(&node.out) || v.c == 0)
                    || channels != node.out.c
                {
                    return Err("input shapes do not add up to the output's".into());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The `.ccq` file format (what `coordinator run` writes as `model.ccq`): JSON, for
    /// people and other tools (see the README). Serialised from a borrow, never a copy.
    pub fn to_json(&self) -> Vec<u8> {
        let file = NetworkFileRef {
            format: FORMAT_TAG,
            version: FORMAT_VERSION,
            network: self,
        };
        serde_json::to_vec(&file).expect("a QNetwork always serialises")
    }

    /// Parses and validates a `.ccq` (JSON) network; `origin` names it in errors.
    pub fn from_json(bytes: &[u8], origin: &str) -> Result<QNetwork> {
        let bad = |reason: String| Error::NetworkFile {
            path: origin.to_string(),
            reason,
        };
        let file: NetworkFile = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        check_header(&file.format, file.version, FORMAT_VERSION, origin)?;
        file.network.finish_loading(origin)
    }

    /// The compact binary form the coordinator sends workers (`SyncNetworkResponse.full`):
    /// a postcard header `("ccq-network", BINARY_VERSION)` then the network in postcard.
    /// About a byte per weight, against ~4 in JSON, and an order of magnitude faster to
    /// encode and decode; a 25 M-weight network's sync must not cost 100 MB of text.
    pub fn to_bytes(&self) -> Vec<u8> {
        let file = NetworkFileRef {
            format: FORMAT_TAG,
            version: BINARY_VERSION,
            network: self,
        };
        postcard::to_stdvec(&file).expect("a QNetwork always serialises")
    }

    /// Writes [`QNetwork::to_bytes`]'s form to `w` without building it in memory (for
    /// hashing the network, see the coordinator's fingerprint).
    pub fn write_bytes<W: std::io::Write>(&self, w: W) -> std::io::Result<W> {
        let file = NetworkFileRef {
            format: FORMAT_TAG,
            version: BINARY_VERSION,
            network: self,
        };
        postcard::to_io(&file, w).map_err(std::io::Error::other)
    }

    /// Parses and validates the binary form of [`QNetwork::to_bytes`]. The header is read
    /// first, so a network of another format or version is refused by name rather than
    /// as a garbled body. Never panics on bad bytes.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<QNetwork> {
        let bad = |reason: String| Error::NetworkFile {
            path: origin.to_string(),
            reason,
        };
        let ((format, version), rest): ((String, u32), &[u8]) = postcard::take_from_bytes(bytes)
            .map_err(|e| {
                bad(format!(
                    "not a binary ccq network (unreadable header: {e}; a .ccq file is JSON: \
                     read it with QNetwork::load)"
                ))
            })?;
        check_header(&format, version, BINARY_VERSION, origin)?;
        let (net, trailing): (QNetwork, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|e| bad(format!("unreadable body: {e}")))?;
        if !trailing.is_empty() {
            return Err(bad(format!(
                "{} bytes after the network (truncated or concatenated data)",
                trailing.len()
            )));
        }
        net.finish_loading(origin)
    }

    /// Validates a network read from outside and builds its packed kernel weights.
    fn finish_loading(mut self, origin: &str) -> Result<QNetwork> {
        self.validate(origin)?;
        for node in &mut self.nodes {
            if let QOp::Conv(c) = &mut node.op {
                c.repack();
            }
        }
        Ok(self)
    }

    /// Writes the `.ccq` file (JSON, [`QNetwork::to_json`]).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        std::fs::write(path, self.to_json()).map_err(|e| Error::io(path, e))
    }

    /// Reads a `.ccq` file (JSON, [`QNetwork::from_json`]).
    pub fn load(path: &std::path::Path) -> Result<QNetwork> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        QNetwork::from_json(&bytes, &path.display().to_string())
    }
}

/// A conv's output height and width and its number of weights, with every size the
/// kernels derive from the geometry (padded input, tap offsets) computed without overflow;
/// `None` for a geometry no real layer has (a zero stride, dilation, kernel or channel
/// count, groups that do not divide the channels, or sizes beyond `usize`), which a damaged file or message may carry.
fn checked_conv_sizes(g: &ConvGeom) -> Option<(usize, usize, usize)> {
    if [
        g.in_c, g.out_c, g.k_h, g.k_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w,
    ]
    .contains(&0)
    {
        return None;
    }
    if g.groups == 0 || !g.in_c.is_multiple_of(g.groups) || !g.out_c.is_multiple_of(g.groups) {
        return None;
    }
    let weights = g
        .out_c
        .checked_mul(g.k_h)?
        .checked_mul(g.k_w)?
        .checked_mul(g.in_per_group())?;
    let c4 = g.in_c.checked_add(3)? / 4 * 4;
    let padded_h = g.in_h.checked_add(g.pad_t)?.checked_add(g.pad_b)?;
    let padded_w = g.in_w.checked_add(g.pad_l)?.checked_add(g.pad_r)?;
    padded_h.checked_mul(padded_w)?.checked_mul(c4)?;
    let span = |k: usize, dil: usize| dil.checked_mul(k - 1)?.checked_add(1);
    let (span_h, span_w) = (span(g.k_h, g.dil_h)?, span(g.k_w, g.dil_w)?);
    // The last tap's offset into the padded input.
    span_h.checked_mul(padded_w)?.checked_mul(c4)?;
    let out = |padded: usize, span: usize, stride: usize| {
        padded.checked_sub(span).map_or(0, |d| d / stride + 1)
    };
    Some((
        out(padded_h, span_h, g.stride_h),
        out(padded_w, span_w, g.stride_w),
        weights,
    ))
}

/// Refuses a network of another format or version, naming both.
fn check_header(format: &str, version: u32, expected: u32, origin: &str) -> Result<()> {
    let bad = |reason: String| Error::NetworkFile {
        path: origin.to_string(),
        reason,
    };
    if format != FORMAT_TAG {
        return Err(bad(format!("format tag '{format}' is not '{FORMAT_TAG}'")));
    }
    if version != expected {
        return Err(bad(format!(
            "format version {version} (this build reads version {expected})"
        )));
    }
    Ok(())
}

const FORMAT_TAG: &str = "ccq-network";
/// Version of the `.ccq` JSON file. Version-1 files written before grouped convolutions
/// and table activations existed read unchanged (a missing `groups` is 1).
const FORMAT_VERSION: u32 = 1;
/// Version of the binary form ([`QNetwork::to_bytes`]); independent of the JSON's.
/// 2: convolutions carry `groups` (postcard has no defaults, so version 1 cannot be read).
/// 3: channel scales and activation clips (`QConv.scales`, `QConv.clip`, `QNetwork.clips`).
const BINARY_VERSION: u32 = 3;

#[derive(Deserialize)]
struct NetworkFile {
    format: String,
    version: u32,
    network: QNetwork,
}

/// [`NetworkFile`] by reference: serialising a network must not copy it.
#[derive(Serialize)]
struct NetworkFileRef<'a> {
    format: &'a str,
    version: u32,
    network: &'a QNetwork,
}

/// NHWC strided crop; `start`/`step` are in CHW axis order.
fn slice_nhwc(
    src: &[u8],
    n: usize,
    s: &QValue,
    d: &QValue,
    start: [usize; 3],
    step: [usize; 3],
    out: &mut Vec<u8>,
) {
    out.clear();
    out.reserve(n * d.len());
    for img in 0..n {
        let base = img * s.len();
        for y in 0..d.h {
            let sy = start[1] + y * step[1];
            for x in 0..d.w {
                let sx = start[2] + x * step[2];
                let pix = base + (sy * s.w + sx) * s.c;
                out.extend((0..d.c).map(|c| src[pix + start[0] + c * step[0]]));
            }
        }
    }
}

/// NHWC padding with the zero point; `before` is in CHW axis order.
fn pad_nhwc(src: &[u8], n: usize, s: &QValue, d: &QValue, before: [usize; 3], out: &mut Vec<u8>) {
    out.clear();
    out.resize(n * d.len(), d.zp);
    for img in 0..n {
        for y in 0..s.h {
            for x in 0..s.w {
                let from = img * s.len() + (y * s.w + x) * s.c;
                let to = img * d.len() + ((y + before[1]) * d.w + x + before[2]) * d.c + before[0];
                out[to..to + s.c].copy_from_slice(&src[from..from + s.c]);
            }
        }
    }
}

/// Output shape helpers shared with the quantizer.
pub(crate) fn slice_value(src: &QValue, s: &Slice) -> QValue {
    let len = |a: usize| (s.end[a].saturating_sub(s.start[a])).div_ceil(s.step[a]);
    QValue {
        c: len(0),
        h: len(1),
        w: len(2),
        ..*src
    }
}

pub(crate) fn pad_value(src: &QValue, p: &Pad) -> QValue {
    QValue {
        c: src.c + p.before[0] + p.after[0],
        h: src.h + p.before[1] + p.after[1],
        w: src.w + p.before[2] + p.after[2],
        ..*src
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partial sums from shards and workers arrive in any order; their total must be the
    /// exact integer sum whatever the order. The values are chosen so that adding them in
    /// floating point (f64 has 53 bits, f32 24) would lose the small ones.
    #[test]
    fn eval_stats_add_exactly_in_any_order() {
        let parts = [
            EvalStats {
                loss_fixed: (1 << 60) + 1,
                correct: 7,
                images: 9,
                paired_sq: 1 << 58,
            },
            EvalStats {
                loss_fixed: 3,
                correct: 1,
                images: 2,
                paired_sq: 6,
            },
            EvalStats {
                loss_fixed: (1 << 54) + 5,
                correct: 0,
                images: 4,
                paired_sq: 0,
            },
        ];
        let expected = EvalStats {
            loss_fixed: (1 << 60) + (1 << 54) + 9,
            correct: 8,
            images: 15,
            paired_sq: (1 << 58) + 6,
        };
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]] {
            let mut s = EvalStats::default();
            for i in order {
                s.add(&parts[i]);
            }
            assert_eq!(s, expected, "order {order:?}");
        }
    }

    #[test]
    fn eval_stats_means() {
        let s = EvalStats {
            loss_fixed: 3 << LOSS_FRAC_BITS,
            correct: 3,
            images: 4,
            paired_sq: 0,
        };
        assert_eq!(s.loss_sum(), 3.0);
        assert_eq!(s.mean_loss(), 0.75);
        assert_eq!(s.top1(), 75.0);
        let empty = EvalStats::default();
        assert_eq!((empty.mean_loss(), empty.top1()), (0.0, 0.0));
    }

    /// The distillation loss is the temperature-scaled KL divergence: zero when the
    /// softened outputs match the teacher's (whatever the shift of the logits), and the
    /// hand-computed value for a known pair at T = 1 and T = 2.
    #[test]
    fn distillation_is_scaled_kl_to_the_teacher() {
        let real = |fixed: u64| fixed as f64 / (1u64 << LOSS_FRAC_BITS) as f64;
        // Same distribution, logits shifted by a constant: no loss.
        assert_eq!(distillation(&[1.0, 2.0, 3.0], &[11.0, 12.0, 13.0], 1.0), 0);
        // Teacher (ln 3, 0) -> p = (3/4, 1/4); student (0, 0) -> q = (1/2, 1/2).
        let kl = 0.75 * (1.5f64).ln() + 0.25 * (0.5f64).ln();
        let got = real(distillation(&[0.0, 0.0], &[3f32.ln(), 0.0], 1.0));
        assert!((got - kl).abs() < 1e-6, "{got} vs {kl}");
        // At T = 2 the teacher's logits (2 ln 3, 0) soften to the same p; times T^2.
        let got = real(distillation(&[0.0, 0.0], &[2.0 * 3f32.ln(), 0.0], 2.0));
        assert!((got - 4.0 * kl).abs() < 1e-5, "{got} vs {}", 4.0 * kl);
        // Disagreeing more costs more; a NaN costs nothing rather than wrapping.
        let near = distillation(&[1.0, 0.0], &[2.0, 0.0], 1.0);
        let far = distillation(&[0.0, 1.0], &[2.0, 0.0], 1.0);
        assert!(0 < near && near < far, "{near} {far}");
        assert_eq!(distillation(&[0.0, 0.0], &[f32::NAN, 0.0], 1.0), 0);
    }

    /// Slicing and padding change the shape on every axis they touch, channels included,
    /// and keep the quantization.
    #[test]
    fn slice_and_pad_shapes() {
        let v = QValue {
            h: 8,
            w: 6,
            c: 10,
            scale: 0.5,
            zp: 3,
        };
        let s = slice_value(
            &v,
            &Slice {
                start: [2, 0, 1],
                end: [8, 8, 6],
                step: [2, 2, 1],
            },
        );
        assert_eq!((s.c, s.h, s.w, s.scale, s.zp), (3, 4, 5, 0.5, 3));
        let p = pad_value(
            &v,
            &Pad {
                before: [1, 2, 3],
                after: [4, 5, 6],
            },
        );
        assert_eq!((p.c, p.h, p.w, p.scale, p.zp), (15, 15, 15, 0.5, 3));
    }

    /// Worker sums are checked: additions that would wrap are refused, and a result is
    /// plausible only within what the engine can produce.
    #[test]
    fn sums_from_the_network_are_checked() {
        let s = |loss_fixed, correct, images| EvalStats {
            loss_fixed,
            correct,
            images,
            paired_sq: 0,
        };
        assert_eq!(s(1, 2, 3).checked_add(&s(10, 20, 30)), Some(s(11, 22, 33)));
        // Exact at any size (no float in between).
        let big = (1u64 << 40) + 1;
        assert_eq!(
            s(big, 0, 0).checked_add(&s(1, 0, 0)),
            Some(s(big + 1, 0, 0))
        );
        assert_eq!(s(u64::MAX, 0, 0).checked_add(&s(1, 0, 0)), None);
        assert_eq!(s(0, u64::MAX, 0).checked_add(&s(0, 1, 0)), None);
        assert_eq!(s(0, 0, u64::MAX).checked_add(&s(0, 0, 1)), None);
        let p = |paired_sq| EvalStats {
            paired_sq,
            ..s(1, 1, 2)
        };
        assert_eq!(p(5).checked_add(&p(7)).map(|t| t.paired_sq), Some(12));
        assert_eq!(p(u64::MAX).checked_add(&p(1)), None);
        assert!(p(2 * MAX_PAIRED_SQ).plausible_for(2));
        assert!(!p(2 * MAX_PAIRED_SQ + 1).plausible_for(2), "paired spread");
        assert_eq!(
            s(u64::MAX - 1, 0, 0).checked_add(&s(1, 0, 0)),
            Some(s(u64::MAX, 0, 0))
        );

        let max = MAX_IMAGE_LOSS_FIXED;
        assert_eq!(
            max,
            (MAX_IMAGE_LOSS * (1u64 << LOSS_FRAC_BITS) as f64) as u64
        );
        // The largest loss cross_entropy gives is plausible, one unit more is not.
        let (worst, _) = cross_entropy(&[1e9, -1e9], 1);
        assert_eq!(worst, max);
        assert!(s(2 * max, 2, 2).plausible_for(2));
        assert!(s(0, 0, 2).plausible_for(2));
        assert!(!s(2 * max + 1, 0, 2).plausible_for(2));
        assert!(!s(0, 3, 2).plausible_for(2), "more correct than images");
        assert!(!s(0, 0, 2).plausible_for(3), "other images");
        assert!(!s(0, 0, 3).plausible_for(2));
        assert!(
            !s(0, 0, u64::MAX).plausible_for(u64::MAX),
            "no bound fits u64"
        );
        assert!(s(u64::MAX / max * max, 0, u64::MAX / max).plausible_for(u64::MAX / max));
    }

    /// The paired spread: each image's loss difference to the base, rounded half up to
    /// 2^-12 and clamped to 64 nats, squared and summed; the other sums as `stats`.
    #[test]
    fn tally_sums_the_squared_paired_differences() {
        let unit = 1u64 << (LOSS_FRAC_BITS - PAIRED_FRAC_BITS);
        let base = [10 * unit, 10 * unit, 10 * unit, 0, 5 * unit];
        let results = [
            (13 * unit, true),       // +3
            (8 * unit, false),       // -2
            (10 * unit, true),       // 0
            (1000 << 24, false),     // +1000 nats: clamped to 64
            (5 * unit + 2047, true), // just under half a unit: rounds to 0
        ];
        let s = EvalStats::tally(&results, Some(&base));
        let clamp = (64u64 << PAIRED_FRAC_BITS).pow(2);
        assert_eq!(s.paired_sq, 9 + 4 + clamp);
        assert_eq!((s.correct, s.images), (3, 5));
        assert_eq!(
            s.loss_fixed,
            results.iter().map(|r| r.0).sum::<u64>(),
            "losses are summed exactly, unclamped"
        );
        assert_eq!(EvalStats::tally(&results, None).paired_sq, 0);
        assert_eq!(
            EvalStats::tally(&[(5 * unit + 2048, true)], Some(&[5 * unit])).paired_sq,
            1
        );
        assert_eq!(
            EvalStats::tally(&[(5 * unit - 2049, true)], Some(&[5 * unit])).paired_sq,
            1
        );
        assert_eq!(
            EvalStats::tally(&[(5 * unit - 2048, true)], Some(&[5 * unit])).paired_sq,
            0
        );
        assert_eq!(paired_term(0, 1000 << 24), clamp, "clamped below as well");
    }

    /// A gain counts with a margin only when it is that many standard errors of the paired
    /// difference: the same mean gain passes with a small spread and fails with a large
    /// one, and never passes without a lower loss.
    #[test]
    fn margin_weighs_the_gain_against_its_spread() {
        let one = 1u64 << LOSS_FRAC_BITS;
        let n = 100u64;
        let context = EvalStats {
            loss_fixed: n * one,
            correct: 0,
            images: n,
            paired_sq: 0,
        };
        // Mean gain 0.1 nat per image. Per-image differences of sd `sd` give
        // sum d^2 = (n - 1) sd^2 + n 0.1^2 (in 2^-24 units: times 2^24).
        let cand = |sd: f64| EvalStats {
            loss_fixed: n * one - n * one / 10,
            paired_sq: (((n - 1) as f64 * sd * sd + n as f64 * 0.01) * one as f64) as u64,
            ..context
        };
        // Standard error = sd / 10: with sd 0.5, gain = 2 standard errors.
        assert!(cand(0.5).beats_by_margin(&context, 1.9));
        assert!(!cand(0.5).beats_by_margin(&context, 2.1));
        assert!(
            !cand(2.0).beats_by_margin(&context, 1.0),
            "gain within the noise"
        );
        assert!(
            cand(2.0).beats_by_margin(&context, 0.0),
            "no margin: any gain"
        );
        assert!(
            cand(0.0).beats_by_margin(&context, 10.0),
            "no spread at all"
        );
        for margin in [0.0, 1.0] {
            assert!(
                !context.beats_by_margin(&context, margin),
                "a tie is no gain"
            );
            assert!(
                !context.beats_by_margin(&cand(0.5), margin),
                "a loss is no gain"
            );
        }
        let single = EvalStats {
            images: 1,
            ..cand(2.0)
        };
        assert!(
            single.beats_by_margin(&context, 5.0),
            "one image: no spread to weigh"
        );

        // Exact, on four images: differences -3, -1, -1, +1 (in 2^-12 nats) have mean
        // -1, sample variance (12 - 4) / 3 and standard error sqrt(2/3): the gain is
        // 1.2247 standard errors.
        let unit = 1u64 << (LOSS_FRAC_BITS - PAIRED_FRAC_BITS);
        let base = EvalStats {
            loss_fixed: 400 * unit,
            correct: 0,
            images: 4,
            paired_sq: 0,
        };
        let cand = EvalStats::tally(
            &[97, 99, 99, 101].map(|l| (l * unit, false)),
            Some(&[100 * unit; 4]),
        );
        assert_eq!((cand.loss_fixed, cand.paired_sq), (396 * unit, 12));
        assert!(cand.beats_by_margin(&base, 1.22));
        assert!(!cand.beats_by_margin(&base, 1.23));
        // Two images are enough for a spread: -3 and +1 give a gain of 0.5 standard
        // errors.
        let two = EvalStats::tally(
            &[(97 * unit, false), (101 * unit, false)],
            Some(&[100 * unit; 2]),
        );
        let base = EvalStats {
            loss_fixed: 200 * unit,
            images: 2,
            ..base
        };
        assert!(two.beats_by_margin(&base, 0.49));
        assert!(!two.beats_by_margin(&base, 0.51));
        // Exactly 0.5 (every quantity a power of two): not more than the margin.
        assert!(!two.beats_by_margin(&base, 0.5));
    }

    /// Cross-entropy in fixed point: ln(10) for ten equal logits, about 0 for a confident
    /// right answer, the logit gap for a confident wrong one; the first maximum is the
    /// prediction.
    #[test]
    fn image_loss_is_cross_entropy_in_fixed_point() {
        let one = (1u64 << LOSS_FRAC_BITS) as f64;
        let (l, ok) = image_loss(&[5; 10], 1.0, 0);
        assert_eq!(l, (10f64.ln() * one).round() as u64);
        assert!(ok, "ties go to the first maximum");
        let (_, ok) = image_loss(&[5; 10], 1.0, 3);
        assert!(!ok);
        let (l, ok) = image_loss(&[0, 400, 0], 0.1, 1);
        assert!(ok && l < 10, "confident and right: {l}");
        let (l, ok) = image_loss(&[0, 400, 0], 0.1, 2);
        let expected = 40.0 + (1.0 + 2.0 * (-40f64).exp()).ln();
        assert!(!ok);
        assert_eq!(l, (expected * one).round() as u64);
    }
}
