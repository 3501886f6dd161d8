//! Integer kernels: everything the integer engine computes, on u8 activation codes and
//! i8 weight codes with i32 accumulation. No floating point is used at inference time;
//! floats appear only in the constructors that turn scales into fixed-point parameters.
//!
//! Layout is NHWC (channels innermost) so that a convolution's reduction runs over
//! contiguous bytes. Weights are OHWI: `[out_c][k_h][k_w][in_c]`. A batch of `n` images
//! is stored contiguously, image after image.
//!
//! As in tract, every fast kernel has a plain reference beside it
//! ([`reference`](mod@reference)); the tests run the same cases against both and require
//! bit-identical results.
//!
//! # Kernel paths
//!
//! The convolution and the elementwise add exist in several implementations
//! ([`KernelPath`]): the plain [`reference`](mod@reference) loops, a portable blocked kernel
//! that the compiler vectorises for whatever target it builds, an AVX2 kernel and an
//! AVX-512 VNNI kernel (`VPDPBUSD`: u8 activations x i8 weights, exactly the operand types
//! we have). All of them produce the same bits; they differ only in speed. The best path
//! the CPU supports is chosen at run time. The environment variable `CCQ_KERNEL`
//! (`reference`, `portable`, `avx2` or `vnni`) forces one, and [`set_kernel_path`] does the
//! same from code; [`PackedConv::run_with`] and [`add_with`] take the path explicitly,
//! which is what tests and benchmarks use. The blocked paths share the weight packing,
//! padding and tiling (`blocked`), and differ in their micro-kernels (`blocked`, `x86`);
//! `common/benches/kernels.rs` measures them.
//!
//! Kernels are single-threaded; callers split a batch across threads.
//!
//! [`DeltaBase`] (`delta`) updates a convolution's result for a few changed weights
//! instead of recomputing it — the incremental evaluation of search candidates. Its
//! reference is the full convolution: the tests require the same bits.
//!
//! # Arithmetic
//!
//! Convolution accumulators are i32 and computed exactly modulo 2^32, the same way in
//! every path. The true value fits in i32 (so nothing wraps) whenever
//! `|bias| + k_len * 255 * 128 < 2^31`, i.e. for any layer with `k_len` below about
//! 65,000 and a realistic bias; ResNet-20's largest `k_len` is 576.

mod blocked;
mod delta;
mod eltwise;
mod grouped;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use delta::{DeltaBase, WeightChange};

/// A non-negative real multiplier in fixed point: `real = multiplier / 2^shift`.
///
/// Applying it rounds half up (towards +inf) after one exact i64 product, so the result is
/// the same on every machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requant {
    pub multiplier: i32,
    pub shift: u8,
}

impl Requant {
    /// The multiplier that maps everything to 0.
    pub const ZERO: Requant = Requant {
        multiplier: 0,
        shift: 1,
    };
    /// The largest representable multiplier, `(2^31 - 1) / 2` (just under 2^30).
    pub const MAX: Requant = Requant {
        multiplier: i32::MAX,
        shift: 1,
    };

    /// Represents `m` (finite, >= 0). `multiplier` is normalised into `[2^30, 2^31)` and
    /// `shift` into `[1, 62]`; zero (or a value too small to represent) becomes `(0, 1)`;
    /// values too large saturate.
    ///
    /// The relative error is at most 2^-31. "Too small" means below 2^-32, where
    /// `apply` returns 0 for every i32 input anyway, so nothing is lost. Negative and NaN
    /// inputs, which have no meaning as a scale ratio, also give [`Requant::ZERO`].
    pub fn from_real(m: f64) -> Requant {
        if m.is_nan() || m <= 0.0 {
            return Requant::ZERO;
        }
        if m.is_infinite() {
            return Requant::MAX;
        }
        let bits = m.to_bits();
        let biased_exp = ((bits >> 52) & 0x7ff) as i32;
        if biased_exp == 0 {
            // Subnormal: far below 2^-32.
            return Requant::ZERO;
        }
        // m = mantissa * 2^(biased_exp - 1075) with a 53-bit mantissa; keep its top 31 bits,
        // rounding half up.
        let mantissa = (bits & ((1u64 << 52) - 1)) | (1u64 << 52);
        let mut multiplier = (mantissa + (1 << 21)) >> 22;
        let mut shift = 1053 - biased_exp;
        if multiplier == 1 << 31 {
            multiplier = 1 << 30;
            shift -= 1;
        }
        if shift > 62 {
            Requant::ZERO
        } else if shift < 1 {
            Requant::MAX
        } else {
            Requant {
                multiplier: multiplier as i32,
                shift: shift as u8,
            }
        }
    }

    pub fn to_real(self) -> f64 {
        self.multiplier as f64 / (1u64 << self.shift) as f64
    }

    /// Whether `apply` is defined for these fields: `multiplier >= 0` and `shift` in
    /// `[1, 62]`. Everything [`Requant::from_real`] returns is valid; a loader of
    /// serialized networks should reject anything else.
    pub fn is_valid(self) -> bool {
        self.multiplier >= 0 && (1..=62).contains(&self.shift)
    }

    /// `round_half_up(acc * multiplier / 2^shift)`, saturated to the i32 range.
    ///
    /// `|acc * multiplier| <= 2^62`, so adding the rounding term cannot overflow i64.
    #[inline]
    pub fn apply(self, acc: i32) -> i32 {
        debug_assert!(self.is_valid(), "invalid {self:?}");
        let shift = u32::from(self.shift);
        let rounded =
            (i64::from(acc) * i64::from(self.multiplier) + (1i64 << (shift - 1))) >> shift;
        rounded.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
    }
}

/// Shape of one 2-D convolution over an NHWC image (dilation 1 is the common case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvGeom {
    pub in_h: usize,
    pub in_w: usize,
    pub in_c: usize,
    pub out_c: usize,
    pub k_h: usize,
    pub k_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub dil_h: usize,
    pub dil_w: usize,
    pub pad_t: usize,
    pub pad_l: usize,
    pub pad_b: usize,
    pub pad_r: usize,
    /// Channel groups (ONNX `group`): output channel `oc` reads only input channels
    /// `oc / out_per_group * in_per_group..` (`in_per_group` of them). 1 is a dense
    /// convolution; `in_c` groups with `out_c == in_c` a depthwise one. Networks written
    /// before grouped convolutions existed have no such field and are dense.
    #[serde(default = "one")]
    pub groups: usize,
}

fn one() -> usize {
    1
}

impl ConvGeom {
    /// A fully connected layer `in_features -> out_features` as a 1x1 convolution over a
    /// 1x1 image.
    pub fn dense(in_features: usize, out_features: usize) -> ConvGeom {
        ConvGeom {
            in_h: 1,
            in_w: 1,
            in_c: in_features,
            out_c: out_features,
            k_h: 1,
            k_w: 1,
            stride_h: 1,
            stride_w: 1,
            dil_h: 1,
            dil_w: 1,
            pad_t: 0,
            pad_l: 0,
            pad_b: 0,
            pad_r: 0,
            groups: 1,
        }
    }

    /// Input channels each output channel reads.
    pub fn in_per_group(&self) -> usize {
        self.in_c / self.groups
    }
    /// Output channels per group.
    pub fn out_per_group(&self) -> usize {
        self.out_c / self.groups
    }
    /// The first input channel output channel `oc` reads.
    pub fn first_input_of(&self, oc: usize) -> usize {
        oc / self.out_per_group() * self.in_per_group()
    }
    /// `[oc, ky, kx, ic]` of OHWI weight `i`, `ic` counted within the channel's group.
    pub fn weight_position(&self, i: usize) -> [usize; 4] {
        let ipg = self.in_per_group();
        let (oc, r) = (i / self.k_len(), i % self.k_len());
        [oc, r / (self.k_w * ipg), r / ipg % self.k_w, r % ipg]
    }

    pub fn out_h(&self) -> usize {
        crate::model::window_out(
            self.in_h,
            self.k_h,
            self.stride_h,
            self.pad_t,
            self.pad_b,
            self.dil_h,
        )
    }
    pub fn out_w(&self) -> usize {
        crate::model::window_out(
            self.in_w,
            self.k_w,
            self.stride_w,
            self.pad_l,
            self.pad_r,
            self.dil_w,
        )
    }
    /// Weights per output channel: `k_h * k_w * in_per_group`.
    pub fn k_len(&self) -> usize {
        self.k_h * self.k_w * self.in_per_group()
    }
    pub fn in_len(&self) -> usize {
        self.in_h * self.in_w * self.in_c
    }
    pub fn out_len(&self) -> usize {
        self.out_h() * self.out_w() * self.out_c
    }
    /// Multiply-accumulates per image: `out_h * out_w * out_c * k_len`.
    pub fn macs(&self) -> usize {
        self.out_h() * self.out_w() * self.out_c * self.k_len()
    }
}

/// How a conv's i32 accumulators become u8 output codes:
/// `clamp(out_zp + requant[oc].apply(acc), min, max)`. A fused ReLU is `min = out_zp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputStage {
    pub requant: Vec<Requant>,
    pub out_zp: i32,
    pub min: u8,
    pub max: u8,
}

impl OutputStage {
    /// The output code of channel `oc` for accumulator `acc`. The sum is taken in i64, so
    /// any `out_zp` is safe, and the clamp is `max(min)` then `min(max)`, so `min > max`
    /// gives `max` rather than a panic.
    #[inline]
    pub fn code(&self, oc: usize, acc: i32) -> u8 {
        let v = i64::from(self.out_zp) + i64::from(self.requant[oc].apply(acc));
        v.max(i64::from(self.min)).min(i64::from(self.max)) as u8
    }
}

/// A convolution (or, with a 1x1 geometry, a fully connected layer) ready to run:
/// weights OHWI, the input zero point, and the bias with the zero-point correction
/// `bias[oc] - input_zp * sum(w[oc])` folded in, plus whatever packing the fast path uses.
#[derive(Debug, Clone)]
pub struct PackedConv {
    pub geom: ConvGeom,
    pub input_zp: u8,
    /// OHWI weights and raw bias, for the reference path.
    weights: Vec<i8>,
    bias: Vec<i32>,
    /// Packed weights, corrected bias and tiling plan of the fast paths.
    fast: Fast,
}

/// `bias - input_zp * sum(row)` modulo 2^32 (like every accumulator, see the module docs):
/// the bias that lets the fast paths multiply raw codes, padding cells holding `input_zp`.
pub(super) fn folded_bias(row: &[i8], bias: i32, input_zp: u8) -> i32 {
    let sum: i64 = row.iter().map(|&w| i64::from(w)).sum();
    (i64::from(bias) - i64::from(input_zp) * sum) as i32
}

/// Panics unless `stage` has one valid [`Requant`] per output channel.
fn check_stage(stage: &OutputStage, out_c: usize) {
    assert_eq!(stage.requant.len(), out_c, "one requant per output channel");
    assert!(
        stage.requant.iter().all(|r| r.is_valid()),
        "invalid requant in {stage:?}"
    );
}

/// What the non-reference paths run.
#[derive(Debug, Clone)]
enum Fast {
    Dense(blocked::Plan),
    Grouped(grouped::GroupedPlan),
}

impl PackedConv {
    /// `weights`: OHWI, `geom.out_c * geom.k_len()` codes; `bias`: one i32 per output channel
    /// at scale `s_in * s_w[oc]`. Panics only on length mismatch or a degenerate geometry
    /// (zero input channels, kernel, stride or dilation): programming errors, since the geometry comes from
    /// a validated graph.
    pub fn new(geom: ConvGeom, weights: &[i8], bias: &[i32], input_zp: u8) -> PackedConv {
        assert!(
            geom.in_c > 0
                && geom.k_h > 0
                && geom.k_w > 0
                && geom.stride_h > 0
                && geom.stride_w > 0
                && geom.dil_h > 0
                && geom.dil_w > 0
                && geom.groups > 0
                && geom.in_c.is_multiple_of(geom.groups)
                && geom.out_c.is_multiple_of(geom.groups),
            "degenerate conv geometry {geom:?}"
        );
        assert_eq!(
            weights.len(),
            geom.out_c * geom.k_len(),
            "weights length for {geom:?}"
        );
        assert_eq!(bias.len(), geom.out_c, "bias length for {geom:?}");
        PackedConv {
            geom,
            input_zp,
            weights: weights.to_vec(),
            bias: bias.to_vec(),
            fast: if geom.groups == 1 {
                Fast::Dense(blocked::Plan::new(&geom, weights, bias, input_zp))
            } else {
                Fast::Grouped(grouped::GroupedPlan::new(&geom, weights, bias, input_zp))
            },
        }
    }

    /// Heap bytes held (capacities): the reference copy of the weights and bias plus the
    /// blocked paths' packed copy. For memory accounting (`coordinator bench`).
    pub fn heap_bytes(&self) -> usize {
        self.weights.capacity()
            + self.bias.capacity() * std::mem::size_of::<i32>()
            + match &self.fast {
                Fast::Dense(p) => p.heap_bytes(),
                Fast::Grouped(p) => p.heap_bytes(),
            }
    }

    /// Runs a non-reference path.
    fn run_fast(&self, path: KernelPath, input: &[u8], n: usize, dst: blocked::Dst) {
        assert!(
            path.is_available(),
            "kernel path {path} is not available on this CPU"
        );
        match &self.fast {
            Fast::Dense(p) => p.run(path, input, n, dst),
            Fast::Grouped(p) => p.run(&self.geom, path, input, n, dst),
        }
    }

    /// `out[n][oy][ox][oc] = bias[oc] + sum (x - input_zp) * w`, padded cells counting as
    /// `input_zp`. `input`: `n * geom.in_len()` codes; `out`: `n * geom.out_len()`.
    pub fn run_acc(&self, input: &[u8], n: usize, out: &mut [i32]) {
        self.run_acc_with(kernel_path(), input, n, out);
    }

    /// [`PackedConv::run_acc`] followed by `stage`, fused.
    pub fn run(&self, stage: &OutputStage, input: &[u8], n: usize, out: &mut [u8]) {
        self.run_with(kernel_path(), stage, input, n, out);
    }

    /// [`PackedConv::run_acc`] on an explicit path. Panics if `path` is not available on
    /// this CPU or on a length mismatch.
    pub fn run_acc_with(&self, path: KernelPath, input: &[u8], n: usize, out: &mut [i32]) {
        self.check_lengths(input.len(), n, out.len());
        match path {
            KernelPath::Reference => {
                reference::conv_acc(
                    &self.geom,
                    &self.weights,
                    &self.bias,
                    self.input_zp,
                    input,
                    n,
                    out,
                );
            }
            _ => self.run_fast(path, input, n, blocked::Dst::Acc(out)),
        }
    }

    /// [`PackedConv::run`] on an explicit path. Panics if `path` is not available on this
    /// CPU, on a length mismatch, or if `stage` does not have one valid [`Requant`] per
    /// output channel.
    pub fn run_with(
        &self,
        path: KernelPath,
        stage: &OutputStage,
        input: &[u8],
        n: usize,
        out: &mut [u8],
    ) {
        self.check_lengths(input.len(), n, out.len());
        check_stage(stage, self.geom.out_c);
        match path {
            KernelPath::Reference => {
                reference::conv(
                    &self.geom,
                    &self.weights,
                    &self.bias,
                    self.input_zp,
                    stage,
                    input,
                    n,
                    out,
                );
            }
            _ => self.run_fast(path, input, n, blocked::Dst::Codes(out, stage)),
        }
    }

    /// [`PackedConv::run`] with a residual add fused into its store:
    /// `out[i] = add.apply(code[i], residual[i])`, `code` being what `run` would write. For
    /// a convolution followed by a residual add (the convolution's output is the add's
    /// `a`, see [`AddParams::swapped`]) this is the add's output, without the
    /// convolution's own output ever going to memory.
    pub fn run_residual(
        &self,
        stage: &OutputStage,
        input: &[u8],
        n: usize,
        residual: &[u8],
        add: &AddParams,
        out: &mut [u8],
    ) {
        self.run_residual_with(kernel_path(), stage, input, n, residual, add, out);
    }

    /// [`PackedConv::run_residual`] on an explicit path. The VNNI path fuses the add into
    /// its store, in registers, when its arithmetic fits i32 (as for every add
    /// [`AddParams::new`] makes with 8-bit zero points); every other path, grouped
    /// convolutions and other adds run the convolution, then the add in place, vectorised
    /// as [`add_with`] is (lane by lane in the AVX2 or portable store the add cost more
    /// than that pass: a ResNet-20 forward on AVX2 ran 6.5 % slower). Panics as
    /// [`PackedConv::run_with`] does, if `residual` and `out` differ in length, or if `add`
    /// is not [valid](AddParams::is_valid).
    #[allow(clippy::too_many_arguments)]
    pub fn run_residual_with(
        &self,
        path: KernelPath,
        stage: &OutputStage,
        input: &[u8],
        n: usize,
        residual: &[u8],
        add: &AddParams,
        out: &mut [u8],
    ) {
        assert_eq!(residual.len(), out.len(), "residual length");
        assert!(add.is_valid(), "invalid {add:?}");
        let narrow = eltwise::NarrowAdd::new(add);
        match (&self.fast, narrow) {
            (Fast::Dense(plan), Some(k)) if path == KernelPath::Vnni => {
                self.check_lengths(input.len(), n, out.len());
                check_stage(stage, self.geom.out_c);
                assert!(
                    path.is_available(),
                    "kernel path {path} is not available on this CPU"
                );
                plan.run_residual(path, input, n, stage, out, residual, &k);
            }
            _ => {
                self.run_with(path, stage, input, n, out);
                add_in_place_with(path, add, out, residual);
            }
        }
    }

    fn check_lengths(&self, input: usize, n: usize, out: usize) {
        assert_eq!(
            input,
            n * self.geom.in_len(),
            "conv input length for {:?}",
            self.geom
        );
        assert_eq!(
            out,
            n * self.geom.out_len(),
            "conv output length for {:?}",
            self.geom
        );
    }
}

/// Elementwise `clamp(out_zp + round((a - a_zp) * a_mult + (b - b_zp) * b_mult) / 2^shift), min, max)`.
///
/// The sum is computed exactly and rounded half up. With `|a_mult|, |b_mult| <= 2^30`
/// ([`AddParams::is_valid`]) it cannot overflow i64 for any i32 zero points; with the
/// parameters [`AddParams::new`] produces and zero points in `[0, 255]` it even fits i32,
/// which the fast paths exploit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddParams {
    pub a_zp: i32,
    pub a_mult: i32,
    pub b_zp: i32,
    pub b_mult: i32,
    pub shift: u8,
    pub out_zp: i32,
    pub min: u8,
    pub max: u8,
}

impl AddParams {
    /// Largest multiplier magnitude `new` chooses: `2 * 255 * 2^21 + 2^30 < 2^31`, so the
    /// rounded sum of two terms with 8-bit zero points fits i32.
    const MULT_LIMIT: f64 = (1u64 << 21) as f64;
    /// Largest shift `new` chooses (the rounding term `2^(shift - 1)` stays within 2^30).
    const MAX_SHIFT: u8 = 31;

    /// From the float scales of both inputs and the output.
    ///
    /// `shift` is the largest in `[1, 31]` that keeps both multipliers within 2^21, so the
    /// ratios `s_a / s_out` and `s_b / s_out` keep 21 significant bits when they are near 1
    /// (the usual case): an error below 2^-12 of a code over the full input range. An
    /// `s_out` that is zero, negative or not finite, and NaN input scales, give zero
    /// multipliers: the output is the constant `out_zp` (clamped), never a division by zero.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        s_a: f64,
        a_zp: i32,
        s_b: f64,
        b_zp: i32,
        s_out: f64,
        out_zp: i32,
        min: u8,
        max: u8,
    ) -> AddParams {
        let ratio = |s: f64| {
            let r = s / s_out;
            if s_out > 0.0 && s_out.is_finite() && !r.is_nan() {
                r
            } else {
                0.0
            }
        };
        let (ra, rb) = (ratio(s_a), ratio(s_b));
        let largest = ra.abs().max(rb.abs());
        let mut shift = Self::MAX_SHIFT;
        while shift > 1 && (largest * (1u64 << shift) as f64).round() > Self::MULT_LIMIT {
            shift -= 1;
        }
        let mult = |r: f64| {
            (r * (1u64 << shift) as f64)
                .round()
                .clamp(-Self::MULT_LIMIT, Self::MULT_LIMIT) as i32
        };
        AddParams {
            a_zp,
            a_mult: mult(ra),
            b_zp,
            b_mult: mult(rb),
            shift,
            out_zp,
            min,
            max,
        }
    }

    /// Whether [`add`] is defined for these fields: `shift` in `[1, 62]` and both
    /// multipliers within `±2^30`. A loader of serialized networks should reject anything
    /// else.
    pub fn is_valid(&self) -> bool {
        let limit = 1i64 << 30;
        (1..=62).contains(&self.shift)
            && i64::from(self.a_mult).abs() <= limit
            && i64::from(self.b_mult).abs() <= limit
    }

    /// The same add with its operands swapped: `swapped().apply(b, a) == apply(a, b)`.
    pub fn swapped(&self) -> AddParams {
        AddParams {
            a_zp: self.b_zp,
            a_mult: self.b_mult,
            b_zp: self.a_zp,
            b_mult: self.a_mult,
            ..*self
        }
    }

    /// The output code for one pair of input codes.
    #[inline(always)]
    pub fn apply(&self, a: u8, b: u8) -> u8 {
        let sum = (i64::from(a) - i64::from(self.a_zp)) * i64::from(self.a_mult)
            + (i64::from(b) - i64::from(self.b_zp)) * i64::from(self.b_mult);
        let shift = u32::from(self.shift);
        let v = i64::from(self.out_zp) + ((sum + (1i64 << (shift - 1))) >> shift);
        v.max(i64::from(self.min)).min(i64::from(self.max)) as u8
    }
}

/// Elementwise add of two equally long code tensors (see [`AddParams`]). Panics if the
/// lengths differ or `p` is not [valid](AddParams::is_valid).
pub fn add(p: &AddParams, a: &[u8], b: &[u8], out: &mut [u8]) {
    add_with(kernel_path(), p, a, b, out);
}

/// [`add`] on an explicit path. Panics if `path` is not available on this CPU.
pub fn add_with(path: KernelPath, p: &AddParams, a: &[u8], b: &[u8], out: &mut [u8]) {
    assert!(
        a.len() == out.len() && b.len() == out.len(),
        "add lengths {} {} {}",
        a.len(),
        b.len(),
        out.len()
    );
    assert!(p.is_valid(), "invalid {p:?}");
    assert!(
        path.is_available(),
        "kernel path {path} is not available on this CPU"
    );
    match path {
        KernelPath::Reference => reference::add(p, a, b, out),
        KernelPath::Portable => eltwise::add(p, a, b, out),
        // SAFETY: `path.is_available()` was asserted above: `has_avx2()`, the feature
        // `add_avx2` enables. It reads and writes through slices only.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => unsafe { x86::add_avx2(p, a, b, out) },
        // SAFETY: as above, `has_vnni()`, which includes the AVX-512 F/BW/DQ/VL that
        // `add_avx512` enables.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Vnni => unsafe { x86::add_avx512(p, a, b, out) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2 | KernelPath::Vnni => unreachable!("x86 paths are never available here"),
    }
}

/// [`add_with`] over its first operand: `a[i] = add(a[i], b[i])`, on the same route.
fn add_in_place_with(path: KernelPath, p: &AddParams, a: &mut [u8], b: &[u8]) {
    match path {
        KernelPath::Reference => {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = p.apply(*x, y);
            }
        }
        KernelPath::Portable => eltwise::add_in_place(p, a, b),
        // SAFETY: the caller ran a convolution on `path`, which asserted
        // `path.is_available()`: `has_avx2()`, the feature `add_in_place_avx2` enables.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => unsafe { x86::add_in_place_avx2(p, a, b) },
        // SAFETY: as above, `has_vnni()`, which includes the AVX-512 F/BW/DQ/VL that
        // `add_in_place_avx512` enables.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Vnni => unsafe { x86::add_in_place_avx512(p, a, b) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2 | KernelPath::Vnni => unreachable!("x86 paths are never available here"),
    }
}

/// Elementwise product of two quantized values (a squeeze-excitation block's scaling):
/// `out = clamp(out_zp + requant((a - a_zp) * (b - b_zp)), min, max)`. With u8 zero
/// points the product is below 2^16 in magnitude, so one i32 and one [`Requant`] are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MulParams {
    pub a_zp: i32,
    pub b_zp: i32,
    /// `s_a * s_b / s_out`.
    pub requant: Requant,
    pub out_zp: i32,
    pub min: u8,
    pub max: u8,
}

impl MulParams {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        s_a: f64,
        a_zp: u8,
        s_b: f64,
        b_zp: u8,
        s_out: f64,
        out_zp: u8,
        min: u8,
        max: u8,
    ) -> MulParams {
        MulParams {
            a_zp: a_zp.into(),
            b_zp: b_zp.into(),
            requant: Requant::from_real(s_a * s_b / s_out),
            out_zp: out_zp.into(),
            min,
            max,
        }
    }

    /// Whether [`MulParams::apply`] is exact for these fields: zero points in the u8 range
    /// and a valid requantization. A loader of serialized networks refuses anything else.
    pub fn is_valid(&self) -> bool {
        let u8_range = 0..=255;
        u8_range.contains(&self.a_zp)
            && u8_range.contains(&self.b_zp)
            && u8_range.contains(&self.out_zp)
            && self.requant.is_valid()
    }

    #[inline]
    pub fn apply(&self, a: u8, b: u8) -> u8 {
        let product = (i32::from(a) - self.a_zp) * (i32::from(b) - self.b_zp);
        let v = i64::from(self.out_zp) + i64::from(self.requant.apply(product));
        v.max(i64::from(self.min)).min(i64::from(self.max)) as u8
    }
}

/// `out = a * b` elementwise over `n` images, where each image of `b` either has the
/// length of an image of `a` or holds one value per channel (`a`'s NHWC pixels each
/// multiplied by `b`'s channel vector). A plain loop: it is a small part of any network.
pub fn mul(p: &MulParams, a: &[u8], b: &[u8], n: usize, out: &mut [u8]) {
    assert!(p.is_valid(), "invalid {p:?}");
    assert_eq!(a.len(), out.len(), "mul output length");
    let (la, lb) = (a.len() / n.max(1), b.len() / n.max(1));
    assert!(
        n > 0 && la * n == a.len() && lb * n == b.len() && lb > 0 && la % lb == 0
            || a.is_empty() && b.is_empty(),
        "mul lengths {} and {} over {n} images",
        a.len(),
        b.len()
    );
    for ((a_img, b_img), o_img) in a
        .chunks_exact(la.max(1))
        .zip(b.chunks_exact(lb.max(1)))
        .zip(out.chunks_exact_mut(la.max(1)))
    {
        for (x, o) in a_img.chunks_exact(lb).zip(o_img.chunks_exact_mut(lb)) {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(b_img) {
                *o = p.apply(x, y);
            }
        }
    }
}

/// `out[i] = table[x[i]]`: every elementwise function of one u8 code.
pub fn lookup(table: &[u8; 256], x: &[u8], out: &mut [u8]) {
    assert_eq!(x.len(), out.len(), "lookup lengths");
    for (o, &x) in out.iter_mut().zip(x) {
        *o = table[usize::from(x)];
    }
}

/// Concatenates NHWC values along channels: pixel after pixel, each input's channels in
/// input order, each input's codes through its table (its quantization to the output's).
/// `inputs[k]` holds `n * pixels * channels[k]` codes.
pub fn concat(inputs: &[(&[u8], &[u8; 256])], channels: &[usize], out: &mut Vec<u8>) {
    let total: usize = channels.iter().sum();
    let pixels = inputs
        .first()
        .map_or(0, |(x, _)| x.len() / channels[0].max(1));
    out.clear();
    out.reserve(pixels * total);
    for p in 0..pixels {
        for ((x, table), &c) in inputs.iter().zip(channels) {
            out.extend(x[p * c..(p + 1) * c].iter().map(|&v| table[usize::from(v)]));
        }
    }
}

/// A pooling window over an NHWC image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolGeom {
    pub in_h: usize,
    pub in_w: usize,
    pub c: usize,
    pub k_h: usize,
    pub k_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub pad_t: usize,
    pub pad_l: usize,
    pub pad_b: usize,
    pub pad_r: usize,
}

impl PoolGeom {
    pub fn out_h(&self) -> usize {
        crate::model::window_out(
            self.in_h,
            self.k_h,
            self.stride_h,
            self.pad_t,
            self.pad_b,
            1,
        )
    }
    pub fn out_w(&self) -> usize {
        crate::model::window_out(
            self.in_w,
            self.k_w,
            self.stride_w,
            self.pad_l,
            self.pad_r,
            1,
        )
    }
    pub fn in_len(&self) -> usize {
        self.in_h * self.in_w * self.c
    }
    pub fn out_len(&self) -> usize {
        self.out_h() * self.out_w() * self.c
    }

    /// Panics on a degenerate window or a length mismatch: programming errors, since the
    /// geometry comes from a validated graph.
    fn check_lengths(&self, input: usize, n: usize, out: usize) {
        assert!(
            self.k_h > 0 && self.k_w > 0 && self.stride_h > 0 && self.stride_w > 0,
            "degenerate pool geometry {self:?}"
        );
        assert_eq!(input, n * self.in_len(), "pool input length for {self:?}");
        assert_eq!(out, n * self.out_len(), "pool output length for {self:?}");
    }
}

/// Max over each window; padded cells are ignored (ONNX MaxPool). A window that holds
/// only padding gives 0, the code that -inf saturates to. `input`: `n * g.in_len()`,
/// `out`: `n * g.out_len()`.
pub fn max_pool(g: &PoolGeom, input: &[u8], n: usize, out: &mut [u8]) {
    g.check_lengths(input.len(), n, out.len());
    reference::max_pool(g, input, n, out);
}

/// Average over each window: `(sum + cnt / 2) / cnt` in integers (round half up; codes are
/// non-negative). With `count_include_pad`, padded cells count and contribute `pad_value`
/// (the code of real zero); without, they are skipped and a window of padding only gives
/// `pad_value`.
pub fn avg_pool(
    g: &PoolGeom,
    count_include_pad: bool,
    pad_value: u8,
    input: &[u8],
    n: usize,
    out: &mut [u8],
) {
    g.check_lengths(input.len(), n, out.len());
    reference::avg_pool(g, count_include_pad, pad_value, input, n, out);
}

/// Per image and channel, the average over the `h x w` plane, rounded half up like
/// [`avg_pool`]. `input`: `n * h * w * c`, `out`: `n * c`. An empty plane gives 0.
pub fn global_avg_pool(h: usize, w: usize, c: usize, input: &[u8], n: usize, out: &mut [u8]) {
    assert_eq!(input.len(), n * h * w * c, "global_avg_pool input length");
    assert_eq!(out.len(), n * c, "global_avg_pool output length");
    reference::global_avg_pool(h, w, c, input, n, out);
}

/// One implementation of the kernels. All produce identical bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// The plain loops of [`reference`](mod@reference).
    Reference,
    /// Blocked kernels in plain Rust, auto-vectorised for the build target.
    Portable,
    /// x86-64 AVX2 (`VPMADDWD` on widened values; exact).
    Avx2,
    /// x86-64 AVX-512 with VNNI (`VPDPBUSD`).
    Vnni,
}

impl KernelPath {
    pub const ALL: [KernelPath; 4] = [
        KernelPath::Reference,
        KernelPath::Portable,
        KernelPath::Avx2,
        KernelPath::Vnni,
    ];

    /// The name `CCQ_KERNEL` uses.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Reference => "reference",
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2",
            KernelPath::Vnni => "vnni",
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            KernelPath::Reference | KernelPath::Portable => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => x86::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Vnni => x86::has_vnni(),
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 | KernelPath::Vnni => false,
        }
    }

    /// Every path this CPU can run, slowest first.
    pub fn available() -> Vec<KernelPath> {
        KernelPath::ALL
            .into_iter()
            .filter(|p| p.is_available())
            .collect()
    }

    /// The fastest path this CPU can run.
    pub fn best() -> KernelPath {
        *KernelPath::available()
            .last()
            .expect("the reference path is always available")
    }

    /// The path forced by the `CCQ_KERNEL` environment variable, if set. Fails if the
    /// value names no path or one this CPU cannot run; binaries call this at startup so
    /// that a typo is an error rather than a silent fallback.
    pub fn from_env() -> Result<Option<KernelPath>> {
        match std::env::var("CCQ_KERNEL") {
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(v)) => Err(Error::setting(
                "CCQ_KERNEL",
                v.to_string_lossy(),
                "not valid UTF-8",
            )),
            Ok(v) => {
                let path: KernelPath = v.parse()?;
                if !path.is_available() {
                    return Err(Error::setting(
                        "CCQ_KERNEL",
                        v,
                        "this CPU does not support that kernel path",
                    ));
                }
                Ok(Some(path))
            }
        }
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KernelPath {
    type Err = Error;

    fn from_str(s: &str) -> Result<KernelPath> {
        KernelPath::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                Error::setting(
                    "CCQ_KERNEL",
                    s,
                    "expected one of reference, portable, avx2, vnni",
                )
            })
    }
}

/// 0 until the first [`kernel_path`] call; then the index in [`KernelPath::ALL`] plus one.
static SELECTED: AtomicU8 = AtomicU8::new(0);

/// The path [`PackedConv::run`], [`PackedConv::run_acc`] and [`add`] use: the one set by
/// [`set_kernel_path`], else `CCQ_KERNEL`, else [`KernelPath::best`]. An invalid
/// `CCQ_KERNEL` is logged and ignored here (use [`KernelPath::from_env`] to reject it).
pub fn kernel_path() -> KernelPath {
    let selected = SELECTED.load(Ordering::Relaxed);
    if selected != 0 {
        return KernelPath::ALL[usize::from(selected - 1)];
    }
    let path = match KernelPath::from_env() {
        Ok(Some(path)) => path,
        Ok(None) => KernelPath::best(),
        Err(e) => {
            let best = KernelPath::best();
            tracing::warn!("ignoring CCQ_KERNEL: {e}; using {best}");
            best
        }
    };
    // A concurrent set_kernel_path wins; otherwise every thread computes the same value.
    let _ = SELECTED.compare_exchange(0, encode(path), Ordering::Relaxed, Ordering::Relaxed);
    KernelPath::ALL[usize::from(SELECTED.load(Ordering::Relaxed) - 1)]
}

/// Forces the path of [`kernel_path`] for the whole process.
pub fn set_kernel_path(path: KernelPath) -> Result<()> {
    if !path.is_available() {
        return Err(Error::setting(
            "kernel path",
            path,
            "this CPU does not support it",
        ));
    }
    SELECTED.store(encode(path), Ordering::Relaxed);
    Ok(())
}

fn encode(path: KernelPath) -> u8 {
    KernelPath::ALL
        .iter()
        .position(|&p| p == path)
        .expect("listed") as u8
        + 1
}
