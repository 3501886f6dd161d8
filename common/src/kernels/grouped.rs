//! Grouped and depthwise convolution on the fast paths.
//!
//! A depthwise convolution (one input and one output channel per group) has no reduction
//! over channels for the blocked kernels to vectorise, so it gets its own direct kernel:
//! the image is copied once into a buffer padded with the input zero point, and each
//! output pixel adds, tap by tap, one contiguous row of `C` input bytes times the tap's
//! `C` weights — a loop over channels the compiler vectorises on every target. Like the
//! blocked kernels it multiplies raw codes against a bias folded to
//! `bias - input_zp * sum(w)`, so padding cells (which hold `input_zp`) add nothing net.
//!
//! Any other grouping runs each group as its own dense convolution through the blocked
//! kernels ([`super::blocked`]): the group's input channels are gathered into a contiguous
//! NHWC buffer, convolved, and the group's output channels scattered back. Arithmetic is
//! the same modulo-2^32 sum as [`super::reference::conv_acc`], so every path gives the
//! same bits.

use super::blocked::{self, Dst};
use super::{ConvGeom, KernelPath, OutputStage};

/// The fast-path form of a grouped convolution.
#[derive(Debug, Clone)]
pub(super) enum GroupedPlan {
    Depthwise(Depthwise),
    /// One dense plan per group, in group order.
    PerGroup(Vec<blocked::Plan>),
}

impl GroupedPlan {
    pub(super) fn new(g: &ConvGeom, weights: &[i8], bias: &[i32], input_zp: u8) -> GroupedPlan {
        let (ipg, opg) = (g.in_per_group(), g.out_per_group());
        if ipg == 1 && opg == 1 {
            return GroupedPlan::Depthwise(Depthwise::new(g, weights, bias, input_zp));
        }
        let sub = ConvGeom {
            in_c: ipg,
            out_c: opg,
            groups: 1,
            ..*g
        };
        let k_len = g.k_len();
        let plans = (0..g.groups)
            .map(|grp| {
                let w = &weights[grp * opg * k_len..][..opg * k_len];
                let b = &bias[grp * opg..][..opg];
                blocked::Plan::new(&sub, w, b, input_zp)
            })
            .collect();
        GroupedPlan::PerGroup(plans)
    }

    pub(super) fn heap_bytes(&self) -> usize {
        match self {
            GroupedPlan::Depthwise(d) => d.heap_bytes(),
            GroupedPlan::PerGroup(plans) => plans.iter().map(blocked::Plan::heap_bytes).sum(),
        }
    }

    pub(super) fn run(&self, g: &ConvGeom, path: KernelPath, input: &[u8], n: usize, dst: Dst) {
        match self {
            GroupedPlan::Depthwise(d) => d.run(path, input, n, dst),
            GroupedPlan::PerGroup(plans) => per_group(g, plans, path, input, n, dst),
        }
    }
}

/// Gathers each group's input channels, runs its dense plan, scatters its output channels.
fn per_group(
    g: &ConvGeom,
    plans: &[blocked::Plan],
    path: KernelPath,
    input: &[u8],
    n: usize,
    dst: Dst,
) {
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    let pixels_in = n * g.in_h * g.in_w;
    let pixels_out = n * g.out_h() * g.out_w();
    let mut x = vec![0u8; pixels_in * ipg];
    match dst {
        Dst::Acc(out) => {
            let mut y = vec![0i32; pixels_out * opg];
            for (grp, plan) in plans.iter().enumerate() {
                gather(input, g.in_c, grp * ipg, &mut x, ipg);
                plan.run(path, &x, n, Dst::Acc(&mut y));
                scatter(&y, opg, out, g.out_c, grp * opg);
            }
        }
        Dst::Codes(out, stage) => {
            let mut y = vec![0u8; pixels_out * opg];
            for (grp, plan) in plans.iter().enumerate() {
                let sub = OutputStage {
                    requant: stage.requant[grp * opg..][..opg].to_vec(),
                    ..stage.clone()
                };
                gather(input, g.in_c, grp * ipg, &mut x, ipg);
                plan.run(path, &x, n, Dst::Codes(&mut y, &sub));
                scatter(&y, opg, out, g.out_c, grp * opg);
            }
        }
    }
}

/// Copies channels `first..first + dst_c` of every pixel of `src` (`src_c` channels per
/// pixel) into `dst` (`dst_c` channels per pixel).
fn gather(src: &[u8], src_c: usize, first: usize, dst: &mut [u8], dst_c: usize) {
    for (d, s) in dst.chunks_exact_mut(dst_c).zip(src.chunks_exact(src_c)) {
        d.copy_from_slice(&s[first..first + dst_c]);
    }
}

/// The inverse of [`gather`] for outputs: `src` (`src_c` channels per pixel) into channels
/// `first..first + src_c` of `dst` (`dst_c` channels per pixel).
fn scatter<T: Copy>(src: &[T], src_c: usize, dst: &mut [T], dst_c: usize, first: usize) {
    for (s, d) in src.chunks_exact(src_c).zip(dst.chunks_exact_mut(dst_c)) {
        d[first..first + src_c].copy_from_slice(s);
    }
}

/// A depthwise convolution's precomputed form.
#[derive(Debug, Clone)]
pub(super) struct Depthwise {
    geom: ConvGeom,
    input_zp: u8,
    /// `[tap][channel]`, widened once so the inner loop is a plain i32 multiply-add.
    weights: Vec<i32>,
    /// `bias - input_zp * sum(w)` per channel, modulo 2^32.
    bias: Vec<i32>,
    pad_w: usize,
    pad_h: usize,
}

impl Depthwise {
    fn new(g: &ConvGeom, weights: &[i8], bias: &[i32], input_zp: u8) -> Depthwise {
        let (c, taps) = (g.out_c, g.k_h * g.k_w);
        // OHWI with I = 1: channel `oc`'s taps are `weights[oc * taps..][..taps]`.
        let mut w = vec![0i32; taps * c];
        for oc in 0..c {
            for t in 0..taps {
                w[t * c + oc] = i32::from(weights[oc * taps + t]);
            }
        }
        let folded = (0..c)
            .map(|oc| super::folded_bias(&weights[oc * taps..][..taps], bias[oc], input_zp))
            .collect();
        Depthwise {
            geom: *g,
            input_zp,
            weights: w,
            bias: folded,
            pad_w: g.in_w + g.pad_l + g.pad_r,
            pad_h: g.in_h + g.pad_t + g.pad_b,
        }
    }

    fn heap_bytes(&self) -> usize {
        (self.weights.capacity() + self.bias.capacity()) * std::mem::size_of::<i32>()
    }

    fn run(&self, path: KernelPath, input: &[u8], n: usize, mut dst: Dst) {
        let g = &self.geom;
        let c = g.out_c;
        let (out_h, out_w) = (g.out_h(), g.out_w());
        if n == 0 || out_h * out_w == 0 {
            return;
        }
        // The output stage per channel, widened once per call so that the row loop is
        // plain lane-wise i64 arithmetic the compiler vectorises.
        let stage = match &dst {
            Dst::Acc(_) => None,
            Dst::Codes(_, s) => Some(RowStage::new(s)),
        };
        let mut buf = vec![self.input_zp; self.pad_h * self.pad_w * c];
        let mut acc = vec![0i32; out_w * c];
        for (img, x) in input.chunks_exact(g.in_len()).enumerate() {
            for iy in 0..g.in_h {
                let row = ((iy + g.pad_t) * self.pad_w + g.pad_l) * c;
                buf[row..row + g.in_w * c].copy_from_slice(&x[iy * g.in_w * c..][..g.in_w * c]);
            }
            for oy in 0..out_h {
                let at = (img * out_h + oy) * out_w * c;
                let row = Row {
                    dw: self,
                    buf: &buf,
                    oy,
                };
                match &mut dst {
                    Dst::Acc(out) => {
                        run_row(path, &row, &mut acc, None);
                        out[at..at + out_w * c].copy_from_slice(&acc);
                    }
                    Dst::Codes(out, _) => {
                        let stage = stage.as_ref().map(|s| (s, &mut out[at..at + out_w * c]));
                        run_row(path, &row, &mut acc, stage);
                    }
                }
            }
        }
    }
}

/// One output row of a depthwise convolution over one padded image.
struct Row<'a> {
    dw: &'a Depthwise,
    buf: &'a [u8],
    oy: usize,
}

/// [`OutputStage`] as per-channel lanes: `code = clamp(out_zp + clamp_i32((acc * m + r) >>
/// s), min, max)`, the arithmetic of [`super::Requant::apply`] and
/// [`OutputStage::code`].
struct RowStage {
    mult: Vec<i64>,
    round: Vec<i64>,
    shift: Vec<i64>,
    out_zp: i64,
    min: i64,
    max: i64,
}

impl RowStage {
    fn new(s: &OutputStage) -> RowStage {
        RowStage {
            mult: s.requant.iter().map(|r| i64::from(r.multiplier)).collect(),
            round: s
                .requant
                .iter()
                .map(|r| 1i64 << (u32::from(r.shift) - 1))
                .collect(),
            shift: s.requant.iter().map(|r| i64::from(r.shift)).collect(),
            out_zp: i64::from(s.out_zp),
            min: i64::from(s.min),
            max: i64::from(s.max),
        }
    }
}

/// Accumulators of `row` into `acc` (`out_w * C`), then, with a stage, its codes.
fn run_row(path: KernelPath, row: &Row, acc: &mut [i32], stage: Option<(&RowStage, &mut [u8])>) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `PackedConv::run_fast` asserted that the path is available, i.e. that
        // the CPU has the features these functions are compiled for.
        KernelPath::Avx2 => unsafe { x86::row_avx2(row, acc, stage) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Vnni => unsafe { x86::row_avx512(row, acc, stage) },
        _ => row_portable(row, acc, stage),
    }
}

#[inline(always)]
fn row_portable(row: &Row, acc: &mut [i32], stage: Option<(&RowStage, &mut [u8])>) {
    let dw = row.dw;
    let g = &dw.geom;
    let c = g.out_c;
    for (ox, a) in acc.chunks_exact_mut(c).enumerate() {
        a.copy_from_slice(&dw.bias);
        for ky in 0..g.k_h {
            let iy = row.oy * g.stride_h + ky * g.dil_h;
            for kx in 0..g.k_w {
                let ix = ox * g.stride_w + kx * g.dil_w;
                let src = &row.buf[(iy * dw.pad_w + ix) * c..][..c];
                let w = &dw.weights[(ky * g.k_w + kx) * c..][..c];
                for ((a, &x), &w) in a.iter_mut().zip(src).zip(w) {
                    *a = a.wrapping_add(i32::from(x).wrapping_mul(w));
                }
            }
        }
    }
    if let Some((s, out)) = stage {
        for (a, o) in acc.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            for ((((o, &a), &m), &r), &sh) in
                o.iter_mut().zip(a).zip(&s.mult).zip(&s.round).zip(&s.shift)
            {
                let v =
                    ((i64::from(a) * m + r) >> sh).clamp(i64::from(i32::MIN), i64::from(i32::MAX));
                *o = (s.out_zp + v).max(s.min).min(s.max) as u8;
            }
        }
    }
}

/// The row kernel compiled for the x86 paths' instruction sets (the blocked kernels'
/// intrinsics would buy little here: the loops are lane-wise and vectorise as written).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{row_portable, Row, RowStage};

    /// # Safety
    /// The CPU supports AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row_avx2(
        row: &Row,
        acc: &mut [i32],
        stage: Option<(&RowStage, &mut [u8])>,
    ) {
        row_portable(row, acc, stage)
    }

    /// # Safety
    /// The CPU supports the enabled AVX-512 features.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn row_avx512(
        row: &Row,
        acc: &mut [i32],
        stage: Option<(&RowStage, &mut [u8])>,
    ) {
        row_portable(row, acc, stage)
    }
}
