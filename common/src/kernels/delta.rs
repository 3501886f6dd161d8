//! Sparse weight deltas: a convolution's result when only a few of its weights differ from
//! weights whose accumulators are already known.
//!
//! A search candidate usually changes a few dozen weight codes of one layer. Its
//! accumulators are the base network's plus, for every changed weight
//! `(oc, ky, kx, ic)` with change `d = new - old`, `d * (x - input_zp)` at each output
//! position whose window puts that tap inside the image (padded cells count as `input_zp`,
//! so they contribute nothing). Only the changed output channels need work; the others
//! keep the base network's output.
//!
//! [`DeltaBase`] holds what one batch needs for that, computed once and shared by all
//! candidates: the base accumulators and the input (minus its zero point), both stored
//! channel-planar (`[channel][image][y][x]`) so that one changed weight updates contiguous
//! rows of one accumulator plane. Sums are taken modulo 2^32 like every other conv path,
//! so the result is bit-identical to a full recompute ([`super::reference::conv_acc`]).

use super::{kernel_path, ConvGeom, KernelPath, OutputStage, PackedConv};

/// One changed weight of a convolution: its OHWI position and `new - old`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightChange {
    pub oc: usize,
    pub ky: usize,
    pub kx: usize,
    pub ic: usize,
    pub delta: i32,
}

/// The base weights' accumulators and the input of one batch, channel-planar.
///
/// The input planes are stored zero-padded (`x - input_zp` is 0 in the padding, as the
/// convolution defines it), `ph x pw` per image. For a convolution with stride 1 the
/// accumulator planes use the same `ph x pw` pitch (rows and columns past the output are
/// unused), so that for every tap `(ky, kx)` the input cell of accumulator cell `i` is
/// cell `i + ky * dil_h * pw + kx * dil_w` of the input plane, across rows and images
/// alike: one weight is then a single contiguous multiply-add over a whole channel. That
/// also makes one channel's base accumulators cheap (`k_len` such passes), so they are
/// computed when a change first touches the channel: a search group usually touches a few
/// channels, and materialising all of them (most of a layer's cost, and memory the
/// system must fault in) would be wasted. Strided convolutions use dense
/// `out_h x out_w` planes, go row by row, and take all channels from one full run.
#[derive(Debug, Clone)]
pub struct DeltaBase {
    geom: ConvGeom,
    n: usize,
    /// OHWI base weights and raw bias.
    weights: Vec<i8>,
    bias: Vec<i32>,
    /// Padded input plane: rows and row pitch.
    ph: usize,
    pw: usize,
    /// `[ic][img][ph][pw]`: `x - input_zp`, 0 in the padding.
    input: Vec<i16>,
    /// Whether the accumulator planes share the input planes' pitch (stride 1).
    flat: bool,
    /// Accumulator plane: rows and row pitch.
    acc_rows: usize,
    acc_pitch: usize,
    /// Per output channel, once computed, `[img][acc_rows][acc_pitch]`: the base weights'
    /// accumulators.
    acc: Vec<Option<Vec<i32>>>,
    /// Instruction set the loops are compiled for.
    isa: Isa,
}

impl DeltaBase {
    /// Keeps what the delta updates of `conv` (the base weights) over `n` NHWC images
    /// need.
    pub fn new(conv: &PackedConv, input: &[u8], n: usize) -> DeltaBase {
        DeltaBase::new_with(kernel_path(), conv, input, n)
    }

    /// [`DeltaBase::new`] with the base run, and the delta loops compiled, for an explicit
    /// path. Panics if `path` is not available on this CPU.
    pub fn new_with(path: KernelPath, conv: &PackedConv, input: &[u8], n: usize) -> DeltaBase {
        assert!(
            path.is_available(),
            "kernel path {path} is not available on this CPU"
        );
        let g = conv.geom;
        assert_eq!(input.len(), n * g.in_len(), "delta input length for {g:?}");
        let (out_h, out_w) = (g.out_h(), g.out_w());
        let (ph, pw) = (g.in_h + g.pad_t + g.pad_b, g.in_w + g.pad_l + g.pad_r);
        let isa = Isa::of(path);
        let mut planar_in = vec![0i16; g.in_c * n * ph * pw];
        if n > 0 {
            let x = (g.in_h, g.in_w, g.in_c);
            let pads = (g.pad_t, g.pad_l, ph, pw);
            let zp = i16::from(conv.input_zp);
            dispatch!(isa, planar_input(input, n, x, zp, pads, &mut planar_in));
        }
        let flat = g.stride_h == 1 && g.stride_w == 1;
        let (acc_rows, acc_pitch) = if flat { (ph, pw) } else { (out_h, out_w) };
        let mut acc = vec![None; g.out_c];
        if !flat {
            let mut nhwc = vec![0i32; n * g.out_len()];
            conv.run_acc_with(path, input, n, &mut nhwc);
            let mut planes = vec![0i32; g.out_c * n * out_h * out_w];
            if n > 0 {
                let y = (out_h, out_w, g.out_c);
                dispatch!(
                    isa,
                    planar_acc_from(&nhwc, n, y, (out_h, out_w), &mut planes)
                );
            }
            for (oc, slot) in acc.iter_mut().enumerate() {
                let len = n * out_h * out_w;
                *slot = Some(planes[oc * len..][..len].to_vec());
            }
        }
        DeltaBase {
            geom: g,
            n,
            weights: conv.weights.clone(),
            bias: conv.bias.clone(),
            ph,
            pw,
            input: planar_in,
            flat,
            acc_rows,
            acc_pitch,
            acc,
            isa,
        }
    }

    pub fn geom(&self) -> &ConvGeom {
        &self.geom
    }

    pub fn batch(&self) -> usize {
        self.n
    }

    /// Computes the base accumulator plane of channel `oc` if it is not there yet (only
    /// stride-1 layers start without them): the bias plus one contiguous multiply-add
    /// per non-zero weight, in the same modulo-2^32 arithmetic as every conv path.
    fn ensure_base(&mut self, oc: usize) {
        if self.acc[oc].is_some() {
            return;
        }
        debug_assert!(self.flat, "strided layers compute every channel up front");
        let g = self.geom;
        let (n, ph, pw) = (self.n, self.ph, self.pw);
        let mut plane = vec![self.bias[oc]; n * ph * pw];
        let row = &self.weights[oc * g.k_len()..][..g.k_len()];
        for (k, &w) in row.iter().enumerate() {
            if w == 0 {
                continue;
            }
            let ipg = g.in_per_group();
            let (ky, kx, ic) = (k / (g.k_w * ipg), k / ipg % g.k_w, k % ipg);
            let ic = g.first_input_of(oc) + ic;
            let x = &self.input[ic * n * ph * pw..][..n * ph * pw];
            let off = ky * g.dil_h * pw + kx * g.dil_w;
            dispatch!(self.isa, axpy(&mut plane, &x[off..], i32::from(w)));
        }
        self.acc[oc] = Some(plane);
    }

    /// Accumulator plane of output channel `oc` (internal layout) with `changes`, all of
    /// channel `oc`, applied.
    fn channel_acc(&mut self, oc: usize, changes: &[WeightChange], acc: &mut Vec<i32>) {
        self.ensure_base(oc);
        let g = &self.geom;
        let n = self.n;
        let (ph, pw) = (self.ph, self.pw);
        acc.clear();
        acc.extend_from_slice(self.acc[oc].as_deref().expect("ensured above"));
        for ch in changes {
            assert!(
                ch.oc == oc && ch.ky < g.k_h && ch.kx < g.k_w && ch.ic < g.in_per_group(),
                "change {ch:?} is not a weight of channel {oc} of {g:?}"
            );
            let d = ch.delta;
            // `ic` counts within the channel's group.
            let ic = g.first_input_of(oc) + ch.ic;
            let x = &self.input[ic * n * ph * pw..][..n * ph * pw];
            let (ky_off, kx_off) = (ch.ky * g.dil_h, ch.kx * g.dil_w);
            if self.flat {
                // Cells past the output (and the last `off` cells) are never read back.
                let off = ky_off * pw + kx_off;
                dispatch!(self.isa, axpy(acc, &x[off..], d));
                continue;
            }
            let (out_h, out_w) = (g.out_h(), g.out_w());
            for img in 0..n {
                let x_img = &x[img * ph * pw..][..ph * pw];
                let acc_img = &mut acc[img * out_h * out_w..][..out_h * out_w];
                for (oy, row) in acc_img.chunks_exact_mut(out_w).enumerate() {
                    let x_row = &x_img[(oy * g.stride_h + ky_off) * pw + kx_off..];
                    for (a, &x) in row.iter_mut().zip(x_row.iter().step_by(g.stride_w)) {
                        *a = a.wrapping_add(d.wrapping_mul(i32::from(x)));
                    }
                }
            }
        }
    }

    /// Calls `f(position, index)` for every NHWC output position (`(img * out_h + oy) *
    /// out_w + ox`) and its index in an accumulator plane of the internal layout.
    fn for_each_index(&self, mut f: impl FnMut(usize, usize)) {
        let g = &self.geom;
        let (out_h, out_w) = (g.out_h(), g.out_w());
        let mut p = 0;
        for img in 0..self.n {
            for oy in 0..out_h {
                let row = (img * self.acc_rows + oy) * self.acc_pitch;
                for i in row..row + out_w {
                    f(p, i);
                    p += 1;
                }
            }
        }
    }

    /// All NHWC accumulators with `changes` (sorted by output channel) applied: what
    /// [`PackedConv::run_acc`] gives for the changed weights. `out`: `n * out_len`.
    pub fn run_acc(&mut self, changes: &[WeightChange], out: &mut [i32]) {
        let g = self.geom;
        assert_eq!(
            out.len(),
            self.n * g.out_len(),
            "delta output length for {g:?}"
        );
        for oc in 0..g.out_c {
            self.ensure_base(oc);
            let acc = self.acc[oc].as_deref().expect("ensured above");
            self.for_each_index(|p, i| out[p * g.out_c + oc] = acc[i]);
        }
        let mut acc = Vec::new();
        for_each_channel(changes, |oc, chs| {
            self.channel_acc(oc, chs, &mut acc);
            self.for_each_index(|p, i| out[p * g.out_c + oc] = acc[i]);
        });
    }

    /// The output codes for the changed weights, what [`PackedConv::run`] gives for them:
    /// the base output `base_out` (NHWC) with the channels that `changes` (sorted by
    /// output channel) touch recomputed through `stage`.
    ///
    /// `out` is updated in place: it must already equal `base_out` except in the channels
    /// listed in `stale` (say, the ones an earlier call touched), which are restored
    /// first; `stale = None` copies all of `base_out`. The channels this call touched
    /// are left in `stale` for the next call. `scratch` is reused between calls.
    pub fn run(
        &mut self,
        stage: &OutputStage,
        changes: &[WeightChange],
        base_out: &[u8],
        out: &mut [u8],
        stale: &mut Option<Vec<usize>>,
        scratch: &mut Vec<i32>,
    ) {
        let g = self.geom;
        let c = g.out_c;
        assert_eq!(
            out.len(),
            self.n * g.out_len(),
            "delta output length for {g:?}"
        );
        assert_eq!(
            base_out.len(),
            out.len(),
            "delta base output length for {g:?}"
        );
        assert_eq!(stage.requant.len(), c, "one requant per output channel");
        match stale.as_mut() {
            Some(channels) => {
                for &oc in channels.iter() {
                    for (o, &b) in out[oc..]
                        .iter_mut()
                        .step_by(c)
                        .zip(base_out[oc..].iter().step_by(c))
                    {
                        *o = b;
                    }
                }
                channels.clear();
            }
            None => out.copy_from_slice(base_out),
        }
        let touched = stale.get_or_insert_with(Vec::new);
        let mut codes = Vec::new();
        for_each_channel(changes, |oc, chs| {
            self.channel_acc(oc, chs, scratch);
            codes.resize(scratch.len(), 0);
            dispatch!(self.isa, requant(stage, oc, scratch, &mut codes));
            // `codes` has the internal layout of `scratch`.
            self.for_each_index(|p, i| out[p * c + oc] = codes[i]);
            touched.push(oc);
        });
    }
}

/// Calls `f(oc, changes_of_oc)` for each run of equal output channels in `changes`.
/// Panics unless `changes` is sorted by channel: a channel split over two runs would be
/// recomputed from the base twice, losing the first run's changes.
fn for_each_channel(changes: &[WeightChange], mut f: impl FnMut(usize, &[WeightChange])) {
    assert!(
        changes.windows(2).all(|w| w[0].oc <= w[1].oc),
        "weight changes must be sorted by output channel"
    );
    let mut rest = changes;
    while let Some(first) = rest.first() {
        let len = rest.iter().take_while(|c| c.oc == first.oc).count();
        f(first.oc, &rest[..len]);
        rest = &rest[len..];
    }
}

/// The instruction set the hot loops below are compiled for, from the kernel path: the
/// loops are plain Rust, compiled once per set so the compiler can vectorise them with
/// the wider registers (the crate itself is built for baseline x86-64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    fn of(path: KernelPath) -> Isa {
        match path {
            KernelPath::Reference | KernelPath::Portable => Isa::Baseline,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => Isa::Avx2,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Vnni => Isa::Avx512,
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 | KernelPath::Vnni => Isa::Baseline,
        }
    }
}

/// Calls one of the loops below compiled for `isa`.
macro_rules! dispatch {
    ($isa:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $isa {
            Isa::Baseline => $f($($arg),*),
            // SAFETY: an `Isa` other than `Baseline` only comes from `Isa::of` in
            // `DeltaBase::new_with`, after it asserted `path.is_available()`: here AVX2
            // (`has_avx2()`), the feature the `avx2` copies enable. The loops touch memory
            // through slices only.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::$f($($arg),*) },
            // SAFETY: as above, for VNNI: `has_vnni()` includes the AVX-512 F/BW/DQ/VL
            // the `avx512` copies enable.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::$f($($arg),*) },
        }
    };
}
use dispatch;

/// Declares the loops and their per-instruction-set copies.
macro_rules! loops {
    ($( $(#[$doc:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block )*) => {
        $( $(#[$doc])* #[inline(always)] fn $name($($a: $t),*) $body )*

        #[cfg(target_arch = "x86_64")]
        mod avx2 {
            use super::*;
            $(
                #[target_feature(enable = "avx2")]
                pub(super) unsafe fn $name($($a: $t),*) { super::$name($($a),*) }
            )*
        }

        #[cfg(target_arch = "x86_64")]
        mod avx512 {
            use super::*;
            $(
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
                pub(super) unsafe fn $name($($a: $t),*) { super::$name($($a),*) }
            )*
        }
    };
}

loops! {
    /// `acc[i] += d * x[i]`, wrapping, over the shorter of the two.
    fn axpy(acc: &mut [i32], x: &[i16], d: i32) {
        for (a, &x) in acc.iter_mut().zip(x) {
            *a = a.wrapping_add(d.wrapping_mul(i32::from(x)));
        }
    }

    /// `codes[i] = stage.code(oc, acc[i])`.
    fn requant(stage: &OutputStage, oc: usize, acc: &[i32], codes: &mut [u8]) {
        for (c, &a) in codes.iter_mut().zip(acc) {
            *c = stage.code(oc, a);
        }
    }

    /// NHWC u8 images (`x = (h, w, c)`) to zero-padded planes `[c][img][ph][pw]` of
    /// `x - zp`; `pads = (pad_t, pad_l, ph, pw)`. `out` must be zeroed.
    fn planar_input(
        input: &[u8],
        n: usize,
        x: (usize, usize, usize),
        zp: i16,
        pads: (usize, usize, usize, usize),
        out: &mut [i16],
    ) {
        let (h, w, c) = x;
        let (pad_t, pad_l, ph, pw) = pads;
        // Source order (each pixel's channels read together), one write stream per plane.
        let plane = n * ph * pw;
        for img in 0..n {
            for iy in 0..h {
                for ix in 0..w {
                    let src = &input[((img * h + iy) * w + ix) * c..][..c];
                    let at = img * ph * pw + (iy + pad_t) * pw + ix + pad_l;
                    for (ic, &v) in src.iter().enumerate() {
                        out[ic * plane + at] = i16::from(v) - zp;
                    }
                }
            }
        }
    }

    /// NHWC i32 accumulators (`y = (out_h, out_w, out_c)`) to planes
    /// `[oc][img][rows][pitch]` (`shape = (rows, pitch)`).
    fn planar_acc_from(
        nhwc: &[i32],
        n: usize,
        y: (usize, usize, usize),
        shape: (usize, usize),
        out: &mut [i32],
    ) {
        let (h, w, c) = y;
        let (rows, pitch) = shape;
        let plane = n * rows * pitch;
        for img in 0..n {
            for oy in 0..h {
                for ox in 0..w {
                    let src = &nhwc[((img * h + oy) * w + ox) * c..][..c];
                    let at = (img * rows + oy) * pitch + ox;
                    for (oc, &a) in src.iter().enumerate() {
                        out[oc * plane + at] = a;
                    }
                }
            }
        }
    }
}
