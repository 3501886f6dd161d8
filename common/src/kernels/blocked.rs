//! The blocked convolution shared by the fast paths: weight packing, input padding, tiling,
//! and the portable micro-kernel. The x86 micro-kernels ([`super::x86`]) plug into the same
//! driver through [`MicroKernel`].
//!
//! The convolution is computed directly, without im2col: the input image is copied once
//! into a buffer with its spatial padding filled with `input_zp` and its channels padded
//! to a multiple of 4 (skipped when there is no padding to add), so that every window
//! reads in-bounds memory and the reduction advances in steps of 4 channels — the 4 bytes
//! one `VPDPBUSD` lane consumes. A tile is `P` consecutive output pixels of one row (or,
//! when the output is 1x1, as for a fully connected layer, `P` consecutive images), whose
//! window origins are equally spaced in the buffer. The micro-kernel holds `P x J` vectors
//! of 16 output channels as accumulators, and for each 4-channel step broadcasts each
//! pixel's 4 input bytes against `J` vectors of packed weights.
//!
//! Packed weights, per group of up to [`MAX_BLOCKS`] blocks of 16 output channels:
//! `[k4][block][16 oc][4]` i8, where `k4 = (tap, channel / 4)` in OHWI order. Channels past
//! `in_c` and output channels past `out_c` are zero weights, so they add nothing. The bias
//! is folded to `bias - input_zp * sum(w)` so the kernels multiply raw codes.
//!
//! A residual add that follows a convolution can be fused into its store
//! ([`Plan::run_residual`]): each output code is added to the code at the same position of
//! the other operand right after requantization, so the convolution's own output never goes
//! to memory and the add needs no pass of its own.

use super::eltwise::NarrowAdd;
use super::{ConvGeom, KernelPath, OutputStage};

/// Output channels per block: one 512-bit vector of i32.
pub(super) const LANES: usize = 16;
/// Blocks per group: how many weight vectors a micro-kernel keeps live per step.
pub(super) const MAX_BLOCKS: usize = 4;

/// One group of consecutive output-channel blocks.
#[derive(Debug, Clone)]
struct Group {
    oc0: usize,
    blocks: usize,
    /// Valid output channels (`<= blocks * LANES`).
    width: usize,
    /// Offset of the group's packed weights in [`Plan::weights`].
    weights: usize,
}

/// Everything the blocked paths precompute from the geometry and the weights.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    geom: ConvGeom,
    input_zp: u8,
    /// Channels padded to a multiple of 4.
    c4: usize,
    /// Whether the input must be copied into a padded buffer first.
    copy: bool,
    /// Padded image width and length in bytes.
    pad_w: usize,
    pad_len: usize,
    /// Byte offset of each kernel tap (row-major) from a window's origin.
    taps: Vec<usize>,
    groups: Vec<Group>,
    weights: Vec<i8>,
    /// `bias - input_zp * sum(w)` per output channel, zero-padded to whole blocks.
    bias: Vec<i32>,
    /// [`narrow_steps`] of the weights.
    narrow_steps: usize,
}

/// How many 4-channel steps of pairwise u8 x i8 products (`VPMADDUBSW`: `x0 w0 + x1 w1`
/// per i16 lane) can be summed in i16 lanes without leaving the i16 range, for any u8
/// inputs: each pair sum is at most `2 * 255 * max|w|` in magnitude. 0 when even one pair
/// sum may not fit (`max|w| > 64`, 8-bit weights), where a kernel must widen first; low-bit
/// weights give many (4-bit codes, `max|w| = 8`: 8 steps; 2-bit: 32). Capped at `k4`, the
/// steps there are, and at least 1 when the weights fit.
pub(super) fn narrow_steps(weights: &[i8], k4: usize) -> usize {
    let max = weights
        .iter()
        .map(|w| w.unsigned_abs() as usize)
        .max()
        .unwrap_or(0);
    let pair = 2 * 255 * max;
    match pair {
        0 => k4.max(1),
        p if p > i16::MAX as usize => 0,
        p => (i16::MAX as usize / p).min(k4.max(1)),
    }
}

impl Plan {
    /// Heap bytes held (capacities), for memory accounting.
    pub(super) fn heap_bytes(&self) -> usize {
        self.taps.capacity() * std::mem::size_of::<usize>()
            + self.groups.capacity() * std::mem::size_of::<Group>()
            + self.weights.capacity()
            + self.bias.capacity() * std::mem::size_of::<i32>()
    }

    pub(super) fn new(g: &ConvGeom, weights: &[i8], bias: &[i32], input_zp: u8) -> Plan {
        let c4 = g.in_c.div_ceil(4) * 4;
        let copy = c4 != g.in_c || g.pad_t + g.pad_l + g.pad_b + g.pad_r > 0;
        let pad_w = g.in_w + g.pad_l + g.pad_r;
        let pad_len = (g.in_h + g.pad_t + g.pad_b) * pad_w * c4;
        let taps: Vec<usize> = (0..g.k_h)
            .flat_map(|ky| (0..g.k_w).map(move |kx| (ky * g.dil_h * pad_w + kx * g.dil_w) * c4))
            .collect();
        let k4 = taps.len() * c4 / 4;

        let total_blocks = g.out_c.div_ceil(LANES);
        let mut groups = Vec::new();
        let mut block = 0;
        while block < total_blocks {
            let blocks = (total_blocks - block).min(MAX_BLOCKS);
            let oc0 = block * LANES;
            groups.push(Group {
                oc0,
                blocks,
                width: (g.out_c - oc0).min(blocks * LANES),
                weights: oc0 * k4 * 4,
            });
            block += blocks;
        }

        // Each 4-channel step of a group is one contiguous run of `width` dwords, dword `j`
        // from output channel `oc0 + j`: write in that order (the search repacks a layer
        // every time its codes change, so this is worth keeping cheap).
        let mut packed = vec![0i8; total_blocks * LANES * k4 * 4];
        let (k_len, cpt) = (g.k_len(), c4 / 4);
        for grp in &groups {
            let dst = &mut packed[grp.weights..][..grp.blocks * LANES * k4 * 4];
            let rows = &weights[grp.oc0 * k_len..][..grp.width * k_len];
            for (k, step) in dst.chunks_exact_mut(grp.blocks * LANES * 4).enumerate() {
                let (tap, ic0) = (k / cpt, k % cpt * 4);
                let src = tap * g.in_c + ic0;
                let n = (g.in_c - ic0).min(4);
                for (d, row) in step.chunks_exact_mut(4).zip(rows.chunks_exact(k_len)) {
                    if n == 4 {
                        // A fixed-length copy: one dword move rather than a memcpy call.
                        d.copy_from_slice(&row[src..src + 4]);
                    } else {
                        d[..n].copy_from_slice(&row[src..src + n]);
                    }
                }
            }
        }

        let mut folded = vec![0i32; total_blocks * LANES];
        for (oc, f) in folded.iter_mut().enumerate().take(g.out_c) {
            *f = super::folded_bias(&weights[oc * k_len..][..k_len], bias[oc], input_zp);
        }

        Plan {
            geom: *g,
            input_zp,
            c4,
            copy,
            pad_w,
            pad_len,
            taps,
            groups,
            narrow_steps: narrow_steps(weights, k4),
            weights: packed,
            bias: folded,
        }
    }

    /// Runs the convolution on one of the blocked paths (not `Reference`).
    pub(super) fn run(&self, path: KernelPath, input: &[u8], n: usize, dst: Dst) {
        self.run_inner(path, input, n, dst, None);
    }

    /// Runs the convolution with `stage` and the residual add `add` fused into its store:
    /// `out[i] = add(code[i], residual[i])`, where `code` is what [`Plan::run`] would write.
    /// `residual` is as long as `out`. Only the VNNI store fuses the add (in registers);
    /// the others panic.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_residual(
        &self,
        path: KernelPath,
        input: &[u8],
        n: usize,
        stage: &OutputStage,
        out: &mut [u8],
        residual: &[u8],
        add: &NarrowAdd,
    ) {
        assert_eq!(residual.len(), out.len(), "residual length");
        let residual = Residual {
            codes: residual,
            add,
        };
        self.run_inner(path, input, n, Dst::Codes(out, stage), Some(residual));
    }

    fn run_inner(
        &self,
        path: KernelPath,
        input: &[u8],
        n: usize,
        dst: Dst,
        residual: Option<Residual>,
    ) {
        assert!(
            path.is_available(),
            "kernel path {path} is not available on this CPU"
        );
        match path {
            KernelPath::Reference => unreachable!("the reference path does not use the plan"),
            KernelPath::Portable => self.drive::<Portable>(input, n, dst, residual),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => self.drive::<super::x86::Avx2>(input, n, dst, residual),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Vnni => self.drive::<super::x86::Vnni>(input, n, dst, residual),
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 | KernelPath::Vnni => {
                unreachable!("x86 paths are never available here")
            }
        }
    }

    fn drive<K: MicroKernel>(&self, input: &[u8], n: usize, dst: Dst, residual: Option<Residual>) {
        let g = &self.geom;
        let (out_h, out_w) = (g.out_h(), g.out_w());
        let (out_c, out_len) = (g.out_c, g.out_len());
        if n == 0 || out_len == 0 {
            return;
        }
        let stage = match &dst {
            Dst::Acc(_) => None,
            Dst::Codes(_, stage) => Some(Stage::new(stage, out_c)),
        };
        let mut out = match dst {
            Dst::Acc(out) => {
                assert!(residual.is_none(), "a residual add needs an output stage");
                Out::Acc(out)
            }
            Dst::Codes(out, _) => Out::Codes(out, stage.as_ref().expect("built above"), residual),
        };
        let mut scratch = Vec::new();

        if out_h * out_w == 1 {
            // Fully connected (or a window as large as the padded image): the pixels of a
            // tile are images, `pad_len` bytes apart.
            let buf = if self.copy {
                scratch.resize(n * self.pad_len, self.input_zp);
                for (img, dst) in input
                    .chunks_exact(g.in_len())
                    .zip(scratch.chunks_exact_mut(self.pad_len))
                {
                    self.pad_image(img, dst);
                }
                &scratch[..]
            } else {
                input
            };
            self.segment::<K>(buf, 0, self.pad_len, n, &mut out, 0);
            return;
        }

        if self.copy {
            scratch.resize(self.pad_len, self.input_zp);
        }
        let row_step = g.stride_h * self.pad_w * self.c4;
        for (img, x) in input.chunks_exact(g.in_len()).enumerate() {
            let buf = if self.copy {
                self.pad_image(x, &mut scratch);
                &scratch[..]
            } else {
                x
            };
            for oy in 0..out_h {
                let first_out = (img * out_h + oy) * out_w;
                self.segment::<K>(
                    buf,
                    oy * row_step,
                    g.stride_w * self.c4,
                    out_w,
                    &mut out,
                    first_out,
                );
            }
        }
    }

    /// Computes `count` output pixels whose window origins are `origin + i * step` in
    /// `buf` and whose outputs are pixels `first_out + i` of `out`.
    fn segment<K: MicroKernel>(
        &self,
        buf: &[u8],
        origin: usize,
        step: usize,
        count: usize,
        out: &mut Out,
        first_out: usize,
    ) {
        let out_c = self.geom.out_c;
        for grp in &self.groups {
            let kind = TileKind {
                blocks: grp.blocks,
                k_w: self.geom.k_w,
                dense_rows: step == self.c4 && self.geom.dil_w == 1,
                narrow_steps: self.narrow_steps,
            };
            // Even tiles: 32 pixels with at most 12 per tile run as 11 + 11 + 10, not
            // 12 + 12 + 8, so no tile runs with few accumulators.
            let pmax = K::max_pixels(kind);
            let tiles = count.div_ceil(pmax);
            let per_tile = count.div_ceil(tiles);
            let mut start = 0;
            while start < count {
                let pixels = per_tile.min(count - start);
                let out_at = (first_out + start) * out_c + grp.oc0;
                let out_end = out_at + (pixels - 1) * out_c + grp.width;
                let last = origin
                    + (start + pixels - 1) * step
                    + self.taps.last().expect("k >= 1")
                    + self.c4;
                assert!(last <= buf.len(), "tile reads past the input buffer");
                let tile = Tile {
                    x: &buf[origin + start * step..last],
                    step,
                    pixels,
                    taps: &self.taps,
                    c4: self.c4,
                    weights: &self.weights[grp.weights..][..grp.blocks * LANES * self.k4() * 4],
                    kind,
                    width: grp.width,
                    bias: &self.bias[grp.oc0..][..grp.blocks * LANES],
                    out_stride: out_c,
                };
                // SAFETY: `drive` runs under `Plan::run`, which asserted that `K`'s path is
                // available. The tile is cut to the contract: `pixels <= pmax`; `tile.x`
                // ends at `last` (asserted in bounds above), where the last pixel's last
                // tap ends (taps ascend: row by row, and a row's taps span less than the
                // padded width since `out_w >= 1`); weights and bias are
                // the group's `blocks` blocks; groups hold `width.div_ceil(16)` blocks
                // (`Plan::new`); the output slice is `out_at..out_end`, exactly
                // `(pixels - 1) * out_c + width` long, and so is a residual's slice (cut at
                // the same range of a slice as long as the output, `run_residual`).
                unsafe {
                    match out {
                        Out::Acc(o) => K::tile(&tile, TileOut::Acc(&mut o[out_at..out_end])),
                        Out::Codes(o, stage, residual) => K::tile(
                            &tile,
                            TileOut::Codes {
                                out: &mut o[out_at..out_end],
                                stage,
                                oc0: grp.oc0,
                                residual: residual.as_ref().map(|r| Residual {
                                    codes: &r.codes[out_at..out_end],
                                    add: r.add,
                                }),
                            },
                        ),
                    }
                }
                start += pixels;
            }
        }
    }

    fn k4(&self) -> usize {
        self.taps.len() * self.c4 / 4
    }

    /// Copies one image into `dst` (`pad_len` bytes, already filled with `input_zp` where it
    /// is padding: only the interior is written).
    fn pad_image(&self, x: &[u8], dst: &mut [u8]) {
        let g = &self.geom;
        for iy in 0..g.in_h {
            let row =
                &mut dst[((iy + g.pad_t) * self.pad_w + g.pad_l) * self.c4..][..g.in_w * self.c4];
            let src = &x[iy * g.in_w * g.in_c..][..g.in_w * g.in_c];
            // Constant-length copies for the few-channel image inputs (RGB, grey), where a
            // per-pixel copy of variable length would cost more than the convolution.
            match g.in_c {
                c if c == self.c4 => row.copy_from_slice(src),
                1 => spread_pixels::<1>(src, row, self.c4),
                2 => spread_pixels::<2>(src, row, self.c4),
                3 => spread_pixels::<3>(src, row, self.c4),
                c => {
                    for (d, s) in row.chunks_exact_mut(self.c4).zip(src.chunks_exact(c)) {
                        d[..c].copy_from_slice(s);
                    }
                }
            }
        }
    }
}

/// Copies pixels of `C` channels to the start of `stride`-byte cells.
fn spread_pixels<const C: usize>(src: &[u8], dst: &mut [u8], stride: usize) {
    for (d, s) in dst.chunks_exact_mut(stride).zip(src.chunks_exact(C)) {
        d[..C].copy_from_slice(s);
    }
}

/// Where a blocked conv writes.
pub(super) enum Dst<'a> {
    Acc(&'a mut [i32]),
    Codes(&'a mut [u8], &'a OutputStage),
}

enum Out<'a> {
    Acc(&'a mut [i32]),
    Codes(&'a mut [u8], &'a Stage<'a>, Option<Residual<'a>>),
}

/// The other operand of a residual add fused into a store: its codes at the same positions
/// as the output (and as long: the whole output's, or a tile's part), and the add, whose
/// `a` is the convolution's code.
pub(super) struct Residual<'a> {
    pub codes: &'a [u8],
    pub add: &'a NarrowAdd,
}

/// One tile: `pixels` output pixels x one group of output channels.
pub(super) struct Tile<'a> {
    /// The input from the first pixel's window origin to the end of the last pixel's
    /// window: every read of the tile lies inside.
    pub x: &'a [u8],
    /// Bytes between consecutive pixels' window origins.
    pub step: usize,
    pub pixels: usize,
    /// Byte offsets of the kernel taps from a window origin, row by row.
    pub taps: &'a [usize],
    /// Channels per tap, a multiple of 4.
    pub c4: usize,
    /// The group's packed weights, `[k4][blocks][16][4]`.
    pub weights: &'a [i8],
    pub kind: TileKind,
    /// Output channels to write (`<= blocks * 16`).
    pub width: usize,
    /// Folded bias, `blocks * 16` entries.
    pub bias: &'a [i32],
    /// Elements between consecutive pixels in the output.
    pub out_stride: usize,
}

/// What a micro-kernel may specialise on, besides the tile's size.
#[derive(Debug, Clone, Copy)]
// Only the x86 micro-kernels specialise.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct TileKind {
    /// Blocks of 16 output channels.
    pub blocks: usize,
    /// Taps per kernel row.
    pub k_w: usize,
    /// Whether consecutive pixels, and consecutive taps of a kernel row, are `c4` bytes
    /// apart (stride and dilation 1 along the row): then pixel `p`'s tap `kx` reads what
    /// pixel `p + 1`'s tap `kx - 1` reads.
    pub dense_rows: bool,
    /// [`narrow_steps`] of the layer's weights: 4-channel steps whose pairwise products
    /// may be summed in i16 lanes (0: none, the weights are too wide).
    pub narrow_steps: usize,
}

/// A tile's output, starting at its first pixel's first channel: `(pixels - 1) *
/// out_stride + width` elements.
pub(super) enum TileOut<'a> {
    Acc(&'a mut [i32]),
    Codes {
        out: &'a mut [u8],
        /// The prepared output stage.
        stage: &'a Stage<'a>,
        /// The group's first output channel.
        oc0: usize,
        /// A residual add fused into the store, cut like `out`.
        residual: Option<Residual<'a>>,
    },
}

/// A micro-kernel: computes one [`Tile`].
pub(super) trait MicroKernel {
    /// Largest tile (in pixels) for tiles of this kind.
    fn max_pixels(kind: TileKind) -> usize;
    /// # Safety
    /// The CPU has the kernel's features ([`KernelPath::is_available`] of its path), and
    /// `t` and `out` are cut as [`Plan::segment`] cuts them: `t.pixels <=
    /// max_pixels(t.kind)`; `t.x` ends where the last pixel's last (largest) tap ends;
    /// `t.weights` and `t.bias` hold exactly `t.kind.blocks` blocks of the group, whose
    /// `t.width` channels leave no block empty; `out` holds `(pixels - 1) * out_stride +
    /// width` elements, and so does a residual's `codes`. The SIMD kernels read and write
    /// through raw pointers on that basis.
    unsafe fn tile(t: &Tile, out: TileOut);
}

/// An output stage with the fixed-point constants laid out per 16-lane block for the SIMD
/// kernels, which split the 16 i32 lanes into even and odd lanes to get exact i64 products.
// Only the x86 micro-kernels use the SIMD layout.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct Stage<'a> {
    pub stage: &'a OutputStage,
    pub blocks: Vec<StageBlock>,
    /// `code = min(max(v + zp, lo), hi)` where `v` is the shifted i64 product, before
    /// saturation to i32. Equal to `OutputStage::code`: clamping to `[i32::MIN, i32::MAX]`,
    /// adding `zp` and clamping to `[min, max]` compose into one clamp of `v + zp` to
    /// `[lo, hi]` (max and min distribute over each other in a total order).
    pub zp: i64,
    pub lo: i64,
    pub hi: i64,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct StageBlock {
    pub mult: [i32; LANES],
    /// Shift and rounding term of lanes 0, 2, 4, ... and of lanes 1, 3, 5, ...
    pub shift_even: [u64; LANES / 2],
    pub shift_odd: [u64; LANES / 2],
    pub round_even: [i64; LANES / 2],
    pub round_odd: [i64; LANES / 2],
}

impl<'a> Stage<'a> {
    fn new(stage: &'a OutputStage, out_c: usize) -> Stage<'a> {
        let padding = super::Requant::ZERO;
        let blocks = (0..out_c.div_ceil(LANES))
            .map(|b| {
                let rq = |lane: usize| {
                    stage
                        .requant
                        .get(b * LANES + lane)
                        .copied()
                        .unwrap_or(padding)
                };
                let mut block = StageBlock {
                    mult: [0; LANES],
                    shift_even: [0; LANES / 2],
                    shift_odd: [0; LANES / 2],
                    round_even: [0; LANES / 2],
                    round_odd: [0; LANES / 2],
                };
                for lane in 0..LANES {
                    let r = rq(lane);
                    block.mult[lane] = r.multiplier;
                    let (shift, round) = (u64::from(r.shift), 1i64 << (r.shift - 1));
                    if lane % 2 == 0 {
                        block.shift_even[lane / 2] = shift;
                        block.round_even[lane / 2] = round;
                    } else {
                        block.shift_odd[lane / 2] = shift;
                        block.round_odd[lane / 2] = round;
                    }
                }
                block
            })
            .collect();
        let zp = i64::from(stage.out_zp);
        let (min, max) = (i64::from(stage.min), i64::from(stage.max));
        Stage {
            stage,
            blocks,
            zp,
            lo: (i64::from(i32::MIN) + zp).max(min),
            hi: (i64::from(i32::MAX) + zp).max(min).min(max),
        }
    }
}

/// Portable micro-kernel: plain Rust over `P` pixels x 16 lanes, which the compiler
/// vectorises for the build target. One block at a time keeps the accumulators small.
struct Portable;

impl MicroKernel for Portable {
    fn max_pixels(_kind: TileKind) -> usize {
        4
    }

    // Plain Rust on checked slices: sound on any input, the contract is not needed.
    unsafe fn tile(t: &Tile, mut out: TileOut) {
        match t.pixels {
            1 => portable_tile::<1>(t, &mut out),
            2 => portable_tile::<2>(t, &mut out),
            3 => portable_tile::<3>(t, &mut out),
            4 => portable_tile::<4>(t, &mut out),
            p => unreachable!("tile of {p} pixels"),
        }
    }
}

fn portable_tile<const P: usize>(t: &Tile, out: &mut TileOut) {
    let cpt = t.c4 / 4;
    for block in 0..t.kind.blocks {
        let mut acc = [[0i32; LANES]; P];
        for a in acc.iter_mut() {
            a.copy_from_slice(&t.bias[block * LANES..][..LANES]);
        }
        let mut k4 = 0;
        for &tap in t.taps {
            for c in 0..cpt {
                let w: &[i8; 4 * LANES] = t.weights[(k4 * t.kind.blocks + block) * 4 * LANES..]
                    [..4 * LANES]
                    .try_into()
                    .expect("one block of weights");
                for (p, a) in acc.iter_mut().enumerate() {
                    let x: &[u8; 4] = t.x[p * t.step + tap + c * 4..][..4]
                        .try_into()
                        .expect("4 bytes");
                    let x = x.map(i32::from);
                    for (lane, a) in a.iter_mut().enumerate() {
                        let w = &w[lane * 4..][..4];
                        // At most 4 * 255 * 128 in magnitude: no overflow before the add.
                        let dot = x[0] * i32::from(w[0])
                            + x[1] * i32::from(w[1])
                            + x[2] * i32::from(w[2])
                            + x[3] * i32::from(w[3]);
                        *a = a.wrapping_add(dot);
                    }
                }
                k4 += 1;
            }
        }
        let lanes = t.width.saturating_sub(block * LANES).min(LANES);
        for (p, a) in acc.iter().enumerate() {
            let at = p * t.out_stride + block * LANES;
            match out {
                TileOut::Acc(o) => o[at..at + lanes].copy_from_slice(&a[..lanes]),
                TileOut::Codes {
                    out: o,
                    stage,
                    oc0,
                    residual,
                } => {
                    for (lane, (o, &a)) in o[at..at + lanes].iter_mut().zip(a).enumerate() {
                        *o = stage.stage.code(*oc0 + block * LANES + lane, a);
                    }
                    // As for AVX2: lane by lane the add costs more than a pass of its own.
                    assert!(
                        residual.is_none(),
                        "the portable store fuses no residual add"
                    );
                }
            }
        }
    }
}
