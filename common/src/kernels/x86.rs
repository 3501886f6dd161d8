//! x86-64 micro-kernels for the blocked convolution ([`super::blocked`]) and SIMD builds of
//! the elementwise add. Each is compiled with `#[target_feature]` and only called after
//! [`super::KernelPath::is_available`] confirmed the CPU has the features.
//!
//! - [`Vnni`]: AVX-512 VNNI. `VPDPBUSD` multiplies 4 u8 activations by 4 i8 weights and
//!   adds the 4 products to an i32 lane, exactly and without saturation (wrapping, like
//!   every accumulator here). A tile holds `P x J` zmm accumulators (pixels x blocks of
//!   16 output channels); VPDPBUSD has a latency of about 5 cycles and two issue ports,
//!   so a tile needs at least ~10 independent accumulators to keep both busy.
//! - [`Avx2`]: for weights of at most 7 bits (`max|w| <= 64`), `VPMADDUBSW`, the u8 x i8
//!   instruction, whose i16 pair sums then cannot saturate, summed in i16 for as many
//!   steps as the weights' range allows and widened once ([`avx2_narrow_tile`]); for
//!   wider weights, where `VPMADDUBSW` would saturate, `VPMADDWD` on values widened to i16
//!   ([`avx2_tile`]). Both exact.
//!
//! The fused output stage computes the i64 products of the fixed-point multiplier on even
//! and odd lanes separately (`VPMULDQ` multiplies the low 32 bits of each 64-bit lane).
//! A residual add fused into the store runs on the codes while they are still in
//! registers, in i32 as [`NarrowAdd`] defines it.

use std::arch::x86_64::*;

use super::blocked::{MicroKernel, Stage, StageBlock, Tile, TileKind, TileOut, LANES};
use super::eltwise::NarrowAdd;
use super::AddParams;

pub(super) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
}

pub(super) fn has_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Mask of the first `lanes` (<= 16) lanes.
fn lane_mask(lanes: usize) -> u16 {
    ((1u32 << lanes) - 1) as u16
}

/// Output channels of block `block` that a group of `width` channels writes.
fn block_lanes(width: usize, block: usize) -> usize {
    width.saturating_sub(block * LANES).min(LANES)
}

pub(super) struct Vnni;

impl Vnni {
    /// Whether [`vnni_row3_tile`] computes tiles of this kind.
    fn row3(kind: TileKind) -> bool {
        kind.blocks == 1 && kind.k_w == 3 && kind.dense_rows
    }
}

/// Calls `$f::<P, J>` for the runtime `(blocks, pixels)` (or `$f::<P>` for `pixels`), over
/// every size `Vnni::max_pixels` allows.
macro_rules! vnni_dispatch {
    ($f:ident, $blocks:expr, $pixels:expr, $args:tt;
     $($j:literal => [$($p:literal)*]),*) => {
        match ($blocks, $pixels) {
            $($(($j, $p) => $f::<$p, $j> $args,)*)*
            (j, p) => unreachable!("no VNNI tile for {j} blocks x {p} pixels"),
        }
    };
    ($f:ident, $pixels:expr, $args:tt; [$($p:literal)*]) => {
        match $pixels {
            $($p => $f::<$p> $args,)*
            p => unreachable!("no VNNI tile for {p} pixels"),
        }
    };
}

impl MicroKernel for Vnni {
    fn max_pixels(kind: TileKind) -> usize {
        if Vnni::row3(kind) {
            // The longest tile whose loops the compiler still unrolls fully.
            12
        } else {
            // At most 24 accumulators, leaving registers for the weights and broadcasts.
            [16, 12, 8, 6][kind.blocks - 1]
        }
    }

    unsafe fn tile(t: &Tile, out: TileOut) {
        // SAFETY: `MicroKernel::tile`'s contract gives the features of `has_vnni()` and
        // the tile geometry `vnni_tile` and `vnni_row3_tile` require. The dispatch passes
        // `P == t.pixels` and `J == t.kind.blocks`, and picks `vnni_row3_tile` only when
        // `Vnni::row3(t.kind)` holds, as its contract requires.
        unsafe {
            if Vnni::row3(t.kind) {
                return vnni_dispatch!(vnni_row3_tile, t.pixels, (t, out);
                    [1 2 3 4 5 6 7 8 9 10 11 12]);
            }
            vnni_dispatch!(vnni_tile, t.kind.blocks, t.pixels, (t, out);
                1 => [1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16],
                2 => [1 2 3 4 5 6 7 8 9 10 11 12],
                3 => [1 2 3 4 5 6 7 8],
                4 => [1 2 3 4 5 6])
        }
    }
}

/// One tile of `P` pixels x `J` blocks.
///
/// # Safety
/// The CPU has the enabled features, and `t` obeys its documented invariants: every read
/// `p * step + tap + c` (`c < c4`) lies in `t.x`, `t.weights` holds `k4 * J` blocks and
/// `t.bias` `J * 16` entries. Stores are masked to `t.width` channels, so `out` needs only
/// `(P - 1) * out_stride + width` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_tile<const P: usize, const J: usize>(t: &Tile, out: TileOut) {
    debug_assert!(t.pixels == P && t.kind.blocks == J);
    debug_assert!(t.weights.len() == t.taps.len() * t.c4 / 4 * J * 4 * LANES);
    let x = t.x.as_ptr();
    let mut w = t.weights.as_ptr();
    // SAFETY: this function's contract is `vnni_bias`'s and `vnni_store`'s (same
    // features, `t.bias` of `J * 16` entries, `out` long enough).
    let mut acc = unsafe { vnni_bias::<P, J>(t) };
    // SAFETY: every pointer stays inside its slice. Taps ascend, so the last pixel's last
    // tap is the furthest window: pixel `p < P`, tap `tap`, channel step `c < c4` (a
    // multiple of 4) reads the 4 bytes at `p * step + tap + c`, which end at most at
    // `(P - 1) * step + taps.last() + c4 == t.x.len()` (how `Plan::segment` cuts `t.x`).
    // `w` moves by `J` blocks of 64 bytes per (tap, channel step), `k4 * J * 64 ==
    // t.weights.len()` bytes in all (the debug assertion above), so every 64-byte load is
    // inside `t.weights` and `w` ends one past its end. All loads are unaligned ones.
    unsafe {
        for &tap in t.taps {
            let xt = x.add(tap);
            let mut c = 0;
            while c < t.c4 {
                let mut wv = [_mm512_setzero_si512(); J];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(w.add(j * 4 * LANES).cast());
                }
                w = w.add(J * 4 * LANES);
                for (p, row) in acc.iter_mut().enumerate() {
                    let xb =
                        _mm512_set1_epi32(xt.add(p * t.step + c).cast::<i32>().read_unaligned());
                    for (a, &v) in row.iter_mut().zip(&wv) {
                        *a = _mm512_dpbusd_epi32(*a, xb, v);
                    }
                }
                c += 4;
            }
        }
    }
    // SAFETY: as for `vnni_bias` above.
    unsafe { vnni_store(t, out, &acc) };
}

/// One tile of `P` pixels x one block, for kernels 3 taps wide with stride and dilation 1
/// along the row ([`TileKind::dense_rows`]): there pixel `p`'s tap `kx` reads the same input
/// as pixel `p + 1`'s tap `kx - 1`, so each input dword is broadcast once and fed to up
/// to 3 accumulators, with the 3 taps' weights held in registers. That cuts the loads per
/// `VPDPBUSD` from about 1 to 0.4, which matters when one block leaves nothing else to
/// amortise them over.
///
/// # Safety
/// As for [`vnni_tile`], with `Vnni::row3(t.kind)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_row3_tile<const P: usize>(t: &Tile, out: TileOut) {
    debug_assert!(t.pixels == P && Vnni::row3(t.kind));
    let x = t.x.as_ptr();
    let block = 4 * LANES;
    let cpt = t.c4 / 4;
    // SAFETY: as in `vnni_tile`.
    let mut acc = unsafe { vnni_bias::<P, 1>(t) };
    // SAFETY: every pointer stays inside its slice. `row3` means 3 taps per kernel row,
    // `step == c4` and dilation 1, so a row's taps are `r, r + c4, r + 2 c4` and the
    // reads of row `ky` end at most at `r + c * 4 + (P + 1) * c4 + 4 <= r + (P + 2) *
    // c4`, the end of pixel `P - 1`'s tap `r + 2 c4`, which is within `t.x` (it ends
    // after the last pixel's last, largest, tap). Weights are `[tap][c step][64 bytes]`
    // with `taps.len() * cpt` steps: row `ky` reads steps `(3 ky + kx) * cpt + c` for
    // `kx < 3`, `c < cpt`, all below `taps.len() * cpt`. All loads are unaligned ones.
    unsafe {
        for (ky, row_taps) in t.taps.chunks_exact(3).enumerate() {
            let row = x.add(row_taps[0]);
            let w_row = t.weights.as_ptr().add(ky * 3 * cpt * block);
            for c in 0..cpt {
                let w = [0, 1, 2]
                    .map(|kx| _mm512_loadu_si512(w_row.add((kx * cpt + c) * block).cast()));
                let xc = row.add(c * 4);
                for i in 0..P + 2 {
                    let xb = _mm512_set1_epi32(xc.add(i * t.c4).cast::<i32>().read_unaligned());
                    for (kx, &wv) in w.iter().enumerate() {
                        // Input position i is pixel i - kx's tap kx.
                        if let Some(a) = i.checked_sub(kx).and_then(|p| acc.get_mut(p)) {
                            a[0] = _mm512_dpbusd_epi32(a[0], xb, wv);
                        }
                    }
                }
            }
        }
    }
    // SAFETY: as in `vnni_tile`.
    unsafe { vnni_store(t, out, &acc) };
}

/// Accumulators initialised to the bias.
///
/// # Safety
/// The CPU has AVX-512 F (callers are the tile functions, which enable it and into which
/// this is inlined), and `t.bias` holds `J * 16` entries.
#[inline(always)]
unsafe fn vnni_bias<const P: usize, const J: usize>(t: &Tile) -> [[__m512i; J]; P] {
    // SAFETY: AVX-512 F by the contract; load `j < J` reads entries `16 j .. 16 j + 16` of
    // `t.bias`, which holds `J * 16`. The load is an unaligned one.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); J]; P];
        for j in 0..J {
            let bias = _mm512_loadu_si512(t.bias.as_ptr().add(j * LANES).cast());
            for row in acc.iter_mut() {
                row[j] = bias;
            }
        }
        acc
    }
}

/// Writes a tile's accumulators, or their codes.
///
/// # Safety
/// The CPU has AVX-512 F and BW (callers are the tile functions, which enable them and
/// into which this is inlined); `out` holds `(P - 1) * t.out_stride + t.width` elements and
/// every one of the `J` blocks has at least one of the `t.width` channels (a group holds
/// `width.div_ceil(16)` blocks).
#[inline(always)]
unsafe fn vnni_store<const P: usize, const J: usize>(
    t: &Tile,
    out: TileOut,
    acc: &[[__m512i; J]; P],
) {
    debug_assert!(t.width > (J - 1) * LANES && t.width <= J * LANES);
    // Park the accumulators in memory with a loop simple enough to be fully unrolled: had
    // the (long, not unrolled) output loops below indexed `acc` directly, the compiler would
    // keep `acc` in memory and store it on every step of the reduction loop.
    let mut sums = [[[0i32; LANES]; J]; P];
    for p in 0..P {
        for j in 0..J {
            // SAFETY: AVX-512 F by the contract; `sums[p][j]` is 16 i32, one unaligned
            // 64-byte store.
            unsafe { _mm512_storeu_si512(sums[p][j].as_mut_ptr().cast(), acc[p][j]) };
        }
    }

    // Stores of block `j` of pixel `p` start at `p * out_stride + 16 j`, which is below
    // `p * out_stride + width` because block `j` has a channel, and write the block's
    // `block_lanes(width, j)` channels only (masked), so they end at most at
    // `(P - 1) * out_stride + width`: inside `out` by the contract.
    match out {
        TileOut::Acc(o) => {
            debug_assert!(o.len() >= (P - 1) * t.out_stride + t.width);
            for (p, row) in sums.iter().enumerate() {
                for (j, block) in row.iter().enumerate() {
                    let mask = lane_mask(block_lanes(t.width, j));
                    // SAFETY: AVX-512 F; the load reads one parked block (16 i32), the
                    // masked store is in `o` as shown above.
                    unsafe {
                        let v = _mm512_loadu_si512(block.as_ptr().cast());
                        _mm512_mask_storeu_epi32(
                            o.as_mut_ptr().add(p * t.out_stride + j * LANES).cast(),
                            mask,
                            v,
                        );
                    }
                }
            }
        }
        TileOut::Codes {
            out: o,
            stage,
            oc0,
            residual,
        } => {
            debug_assert!(o.len() >= (P - 1) * t.out_stride + t.width);
            // SAFETY: AVX-512 F by the contract, the one feature `new` enables.
            let consts = unsafe { ClampConsts::new(stage) };
            // SAFETY: as above.
            let add = residual.as_ref().map(|r| unsafe { VnniAdd::new(r.add) });
            for j in 0..J {
                // SAFETY: AVX-512 F by the contract, the one feature `load` enables.
                let block = unsafe { VnniBlock::load(&stage.blocks[oc0 / LANES + j]) };
                let mask = lane_mask(block_lanes(t.width, j));
                for (p, row) in sums.iter().enumerate() {
                    let at = p * t.out_stride + j * LANES;
                    // SAFETY: AVX-512 F and BW by the contract (`requant`, `VnniAdd::apply`,
                    // the byte store); the load reads one parked block (16 i32), unaligned;
                    // the masked store is inside `o` as shown above, and the residual's
                    // masked load reads the same positions of `r.codes`, which is as long
                    // as `o` (`TileOut::Codes`).
                    unsafe {
                        let mut codes =
                            block.requant(_mm512_loadu_si512(row[j].as_ptr().cast()), &consts);
                        if let (Some(r), Some(add)) = (&residual, &add) {
                            debug_assert!(r.codes.len() == o.len());
                            codes = add.apply(codes, r.codes.as_ptr().add(at), mask);
                        }
                        _mm512_mask_cvtepi32_storeu_epi8(
                            o.as_mut_ptr().add(at).cast(),
                            mask,
                            codes,
                        );
                    }
                }
            }
        }
    }
}

/// The stage's clamp constants, broadcast to every i64 lane.
#[derive(Clone, Copy)]
struct ClampConsts {
    zp: __m512i,
    lo: __m512i,
    hi: __m512i,
}

impl ClampConsts {
    #[target_feature(enable = "avx512f")]
    fn new(stage: &Stage) -> ClampConsts {
        ClampConsts {
            zp: _mm512_set1_epi64(stage.zp),
            lo: _mm512_set1_epi64(stage.lo),
            hi: _mm512_set1_epi64(stage.hi),
        }
    }
}

/// One [`StageBlock`] in registers.
struct VnniBlock {
    mult: __m512i,
    mult_odd: __m512i,
    shift_even: __m512i,
    shift_odd: __m512i,
    round_even: __m512i,
    round_odd: __m512i,
}

impl VnniBlock {
    #[target_feature(enable = "avx512f")]
    fn load(b: &StageBlock) -> VnniBlock {
        // SAFETY: each array is 64 bytes (`[i32; 16]` or `[i64/u64; 8]`), read by one
        // unaligned 64-byte load; AVX-512 F is enabled on this function.
        unsafe {
            let mult = _mm512_loadu_si512(b.mult.as_ptr().cast());
            VnniBlock {
                mult,
                mult_odd: _mm512_srli_epi64::<32>(mult),
                shift_even: _mm512_loadu_si512(b.shift_even.as_ptr().cast()),
                shift_odd: _mm512_loadu_si512(b.shift_odd.as_ptr().cast()),
                round_even: _mm512_loadu_si512(b.round_even.as_ptr().cast()),
                round_odd: _mm512_loadu_si512(b.round_odd.as_ptr().cast()),
            }
        }
    }

    /// 16 accumulators to 16 codes (in the low byte of each i32 lane).
    #[target_feature(enable = "avx512f")]
    fn requant(&self, acc: __m512i, c: &ClampConsts) -> __m512i {
        let even = _mm512_mul_epi32(acc, self.mult);
        let odd = _mm512_mul_epi32(_mm512_srli_epi64::<32>(acc), self.mult_odd);
        let even = _mm512_srav_epi64(_mm512_add_epi64(even, self.round_even), self.shift_even);
        let odd = _mm512_srav_epi64(_mm512_add_epi64(odd, self.round_odd), self.shift_odd);
        let clamp = |v| _mm512_min_epi64(_mm512_max_epi64(_mm512_add_epi64(v, c.zp), c.lo), c.hi);
        // Both halves are now in [0, 255]: put the odd lanes' results in the high dwords.
        _mm512_mask_blend_epi32(0xAAAA, clamp(even), _mm512_slli_epi64::<32>(clamp(odd)))
    }
}

/// A [`NarrowAdd`] broadcast to 16 i32 lanes.
struct VnniAdd {
    a_mult: __m512i,
    b_mult: __m512i,
    offset: __m512i,
    shift: __m128i,
    out_zp: __m512i,
    min: __m512i,
    max: __m512i,
}

impl VnniAdd {
    #[target_feature(enable = "avx512f")]
    fn new(k: &NarrowAdd) -> VnniAdd {
        VnniAdd {
            a_mult: _mm512_set1_epi32(k.a_mult),
            b_mult: _mm512_set1_epi32(k.b_mult),
            offset: _mm512_set1_epi32(k.offset),
            shift: _mm_cvtsi32_si128(k.shift as i32),
            out_zp: _mm512_set1_epi32(k.out_zp),
            min: _mm512_set1_epi32(k.min),
            max: _mm512_set1_epi32(k.max),
        }
    }

    /// [`NarrowAdd::apply`] of 16 codes `a` (i32 lanes, as `VnniBlock::requant` gives
    /// them) and the 16 bytes at `b`, of which only the lanes in `mask` are read. Wrapping
    /// i32 multiplies and adds, an arithmetic shift, the clamp: the scalar arithmetic lane
    /// by lane.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW; the bytes at `b + i` for every lane `i` in `mask` are
    /// readable.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn apply(&self, a: __m512i, b: *const u8, mask: u16) -> __m512i {
        // SAFETY: a masked load reads (and may fault on) only the bytes in its mask: `b + i`
        // for `i` in `mask` (< 16), readable by the contract. The 512-bit form needs only
        // AVX-512 BW (the 128-bit one needs VL, which the tiles calling this don't enable,
        // so it could not be inlined into them).
        let b = unsafe { _mm512_maskz_loadu_epi8(u64::from(mask), b.cast()) };
        let b = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(b));
        let v = _mm512_add_epi32(
            _mm512_add_epi32(
                _mm512_mullo_epi32(a, self.a_mult),
                _mm512_mullo_epi32(b, self.b_mult),
            ),
            self.offset,
        );
        let v = _mm512_add_epi32(_mm512_sra_epi32(v, self.shift), self.out_zp);
        _mm512_min_epi32(_mm512_max_epi32(v, self.min), self.max)
    }
}

pub(super) struct Avx2;

impl MicroKernel for Avx2 {
    fn max_pixels(kind: TileKind) -> usize {
        if kind.narrow_steps > 0 {
            // 2 i16 partial sums per pixel, 2 weight vectors and a broadcast: 16 ymm
            // registers in all (the i32 sums wait in memory between flushes).
            6
        } else {
            // 4 accumulators and a broadcast per pixel, a weight vector and a product:
            // 12 of the 16 ymm registers. Three pixels would need 17, and the spilled
            // accumulator then went through memory on every step (as much as 1.6 times
            // slower where the spill slot straddled a cache line), for no fewer
            // multiplies per product.
            2
        }
    }

    unsafe fn tile(t: &Tile, out: TileOut) {
        // SAFETY: `MicroKernel::tile`'s contract gives AVX2 (`has_avx2()`) and the tile
        // geometry `avx2_tile` and `avx2_narrow_tile` require; `P == t.pixels`, and the
        // narrow tile runs only when `t.kind.narrow_steps > 0`, as its contract requires.
        unsafe {
            if t.kind.narrow_steps > 0 {
                return match t.pixels {
                    1 => avx2_narrow_tile::<1>(t, out),
                    2 => avx2_narrow_tile::<2>(t, out),
                    3 => avx2_narrow_tile::<3>(t, out),
                    4 => avx2_narrow_tile::<4>(t, out),
                    5 => avx2_narrow_tile::<5>(t, out),
                    6 => avx2_narrow_tile::<6>(t, out),
                    p => unreachable!("no narrow AVX2 tile of {p} pixels"),
                };
            }
            match t.pixels {
                1 => avx2_tile::<1>(t, out),
                2 => avx2_tile::<2>(t, out),
                p => unreachable!("no AVX2 tile of {p} pixels"),
            }
        }
    }
}

/// One tile of `P` pixels, one block of 16 output channels at a time. Per pixel and block
/// the 4 accumulators hold, for output channels `4q..4q + 4`, the two half sums
/// `x0 w0 + x1 w1` and `x2 w2 + x3 w3` of each 4-channel step; they are added pairwise at
/// the end.
///
/// # Safety
/// As for [`vnni_tile`], with AVX2.
#[target_feature(enable = "avx2")]
unsafe fn avx2_tile<const P: usize>(t: &Tile, mut out: TileOut) {
    let x = t.x.as_ptr();
    let k4 = t.taps.len() * t.c4 / 4;
    let block_bytes = 4 * LANES;
    for block in 0..t.kind.blocks {
        let mut acc = [[_mm256_setzero_si256(); 4]; P];
        // SAFETY: reads of `t.x` as in `vnni_tile`: pixel `p < P`, tap, channel step
        // `c < c4` read 4 bytes ending at most at `(P - 1) * step + taps.last() + c4 ==
        // t.x.len()`. Weights are `[k4][blocks][64 bytes]`: `w` starts at this block's 64
        // bytes of step 0 and moves by one step (`blocks * 64`) per (tap, channel step),
        // reading 4 x 16 bytes of the block each time, so the last read ends at
        // `(k4 - 1) * blocks * 64 + (block + 1) * 64 <= t.weights.len()`. All loads are
        // unaligned ones; AVX2 by this function's contract.
        let w = unsafe {
            let mut w = t.weights.as_ptr().add(block * block_bytes);
            for &tap in t.taps {
                let xt = x.add(tap);
                let mut c = 0;
                while c < t.c4 {
                    let mut xb = [_mm256_setzero_si256(); P];
                    for (p, v) in xb.iter_mut().enumerate() {
                        let bytes = xt.add(p * t.step + c).cast::<i32>().read_unaligned();
                        *v = _mm256_cvtepu8_epi16(_mm_set1_epi32(bytes));
                    }
                    for q in 0..4 {
                        let wq = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(q * 16).cast()));
                        for (row, &xv) in acc.iter_mut().zip(&xb) {
                            row[q] = _mm256_add_epi32(row[q], _mm256_madd_epi16(xv, wq));
                        }
                    }
                    w = w.add(t.kind.blocks * block_bytes);
                    c += 4;
                }
            }
            w
        };
        debug_assert_eq!(
            w as usize - t.weights.as_ptr() as usize,
            block * block_bytes + k4 * t.kind.blocks * block_bytes
        );

        // Parked for the same reason as in `vnni_store`.
        let mut parked = [[[0i32; 8]; 4]; P];
        for p in 0..P {
            for q in 0..4 {
                // SAFETY: one unaligned 32-byte store into `parked[p][q]`, 8 i32.
                unsafe { _mm256_storeu_si256(parked[p][q].as_mut_ptr().cast(), acc[p][q]) };
            }
        }
        let mut sums = [[0i32; LANES]; P];
        for (parked, sums) in parked.iter().zip(&mut sums) {
            // SAFETY: each load reads one parked `[i32; 8]`, unaligned; the two stores
            // fill `sums`' 16 i32.
            unsafe {
                let row = parked.map(|v| _mm256_loadu_si256(v.as_ptr().cast()));
                // hadd gives [oc0 oc1 oc4 oc5 | oc2 oc3 oc6 oc7]; the permute restores
                // order.
                let lo =
                    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(row[0], row[1]));
                let hi =
                    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(row[2], row[3]));
                _mm256_storeu_si256(sums.as_mut_ptr().cast(), lo);
                _mm256_storeu_si256(sums.as_mut_ptr().add(8).cast(), hi);
            }
        }
        avx2_store(t, &mut out, block, &sums);
    }
}

/// One tile of `P` pixels for weights that [`super::blocked::narrow_steps`] allows:
/// `VPMADDUBSW` multiplies the u8 inputs by the i8 weights and adds adjacent pairs into
/// i16 lanes (exact, as the weights are narrow enough that no pair sum saturates), and up
/// to `narrow_steps` 4-channel steps of those are summed in i16 before one `VPMADDWD` by 1
/// widens them into the i32 sums: half the multiplies of [`avx2_tile`] per product, and no
/// widening of inputs or weights. The weights are read as the VNNI layout packs them,
/// `[k4][blocks][16 oc][4]`, 8 output channels to a vector, so each i32 lane ends as one
/// output channel's sum.
///
/// # Safety
/// As for [`avx2_tile`], with `t.kind.narrow_steps > 0` and every weight within the bound
/// [`super::blocked::narrow_steps`] computed it for.
#[target_feature(enable = "avx2")]
unsafe fn avx2_narrow_tile<const P: usize>(t: &Tile, mut out: TileOut) {
    debug_assert!(t.kind.narrow_steps > 0);
    let x = t.x.as_ptr();
    let block_bytes = 4 * LANES;
    let ones = _mm256_set1_epi16(1);
    for block in 0..t.kind.blocks {
        // The i32 sums in memory, 16 output channels per pixel; the i16 partial sums of
        // the steps since the last flush in registers.
        let mut sums = [[0i32; LANES]; P];
        let mut part = [[_mm256_setzero_si256(); 2]; P];
        let mut pending = 0;
        let flush = |sums: &mut [[i32; LANES]; P], part: &mut [[__m256i; 2]; P]| {
            for (s, part) in sums.iter_mut().zip(part.iter_mut()) {
                for (h, v) in part.iter_mut().enumerate() {
                    // SAFETY: `h < 2`: 8 i32 at `8 * h` of the 16 of `s`, unaligned.
                    unsafe {
                        let at = s.as_mut_ptr().add(8 * h).cast::<__m256i>();
                        let wide = _mm256_madd_epi16(*v, ones);
                        _mm256_storeu_si256(at, _mm256_add_epi32(_mm256_loadu_si256(at), wide));
                    }
                    *v = _mm256_setzero_si256();
                }
            }
        };
        // SAFETY: reads of `t.x` and of the weights exactly as in `avx2_tile` (the same
        // 64 bytes of the block per step, here as two 32-byte loads). AVX2 by this
        // function's contract.
        let w = unsafe {
            let mut w = t.weights.as_ptr().add(block * block_bytes);
            for &tap in t.taps {
                let xt = x.add(tap);
                let mut c = 0;
                while c < t.c4 {
                    let w0 = _mm256_loadu_si256(w.cast());
                    let w1 = _mm256_loadu_si256(w.add(32).cast());
                    for (p, part) in part.iter_mut().enumerate() {
                        let bytes = xt.add(p * t.step + c).cast::<i32>().read_unaligned();
                        let xb = _mm256_set1_epi32(bytes);
                        part[0] = _mm256_add_epi16(part[0], _mm256_maddubs_epi16(xb, w0));
                        part[1] = _mm256_add_epi16(part[1], _mm256_maddubs_epi16(xb, w1));
                    }
                    w = w.add(t.kind.blocks * block_bytes);
                    c += 4;
                    pending += 1;
                    if pending == t.kind.narrow_steps {
                        flush(&mut sums, &mut part);
                        pending = 0;
                    }
                }
            }
            w
        };
        debug_assert_eq!(
            w as usize - t.weights.as_ptr() as usize,
            block * block_bytes + t.taps.len() * t.c4 / 4 * t.kind.blocks * block_bytes
        );
        if pending > 0 {
            flush(&mut sums, &mut part);
        }
        avx2_store(t, &mut out, block, &sums);
    }
}

/// Adds the bias to one block's i32 sums of `P` pixels (16 output channels each, in
/// order) and writes them, or their requantized codes, to the tile's output.
#[target_feature(enable = "avx2")]
fn avx2_store<const P: usize>(t: &Tile, out: &mut TileOut, block: usize, sums: &[[i32; LANES]; P]) {
    let lanes = block_lanes(t.width, block);
    // SAFETY: `t.bias` holds `blocks * 16` entries; these read the 16 of this block
    // (8 each, unaligned).
    let (bias_lo, bias_hi) = unsafe {
        (
            _mm256_loadu_si256(t.bias.as_ptr().add(block * LANES).cast()),
            _mm256_loadu_si256(t.bias.as_ptr().add(block * LANES + 8).cast()),
        )
    };
    for (p, s) in sums.iter().enumerate() {
        // SAFETY: two unaligned 32-byte loads, the 16 i32 of `s`.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(s.as_ptr().cast()),
                _mm256_loadu_si256(s.as_ptr().add(8).cast()),
            )
        };
        let biased = [_mm256_add_epi32(lo, bias_lo), _mm256_add_epi32(hi, bias_hi)];
        let at = p * t.out_stride + block * LANES;
        // The stores below go through `tmp` and checked slices: only the SIMD side
        // needs pointers.
        let mut tmp = [0i32; LANES];
        match out {
            TileOut::Acc(o) => {
                // SAFETY: two unaligned 32-byte stores filling the 16 i32 of `tmp`.
                unsafe {
                    _mm256_storeu_si256(tmp.as_mut_ptr().cast(), biased[0]);
                    _mm256_storeu_si256(tmp.as_mut_ptr().add(8).cast(), biased[1]);
                }
                o[at..at + lanes].copy_from_slice(&tmp[..lanes]);
            }
            TileOut::Codes {
                out: o,
                stage,
                oc0,
                residual,
            } => {
                let sb = &stage.blocks[*oc0 / LANES + block];
                for (half, &s) in biased.iter().enumerate() {
                    let codes = avx2_requant(s, sb, half, stage);
                    // SAFETY: `half < 2`: an unaligned 32-byte store into `tmp`'s
                    // `8 * half ..` half.
                    unsafe { _mm256_storeu_si256(tmp.as_mut_ptr().add(half * 8).cast(), codes) };
                }
                for (o, &v) in o[at..at + lanes].iter_mut().zip(&tmp) {
                    *o = v as u8;
                }
                // Lane by lane the add would cost more here than the vectorised pass
                // after the convolution (`PackedConv::run_residual_with`).
                assert!(residual.is_none(), "the AVX2 store fuses no residual add");
            }
        }
    }
}

/// Requantizes 8 accumulators (lanes `8 * half ..` of the block), giving codes in i32 lanes.
#[target_feature(enable = "avx2")]
fn avx2_requant(acc: __m256i, b: &StageBlock, half: usize, stage: &Stage) -> __m256i {
    debug_assert!(half < 2);
    // SAFETY: `half` is 0 or 1 (the two halves of a block), so the loads read i32 lanes
    // `8 half .. 8 half + 8` of the 16 of `mult`, and 64-bit lanes `4 half .. 4 half + 4`
    // of the 8 of each shift and rounding array: 32 bytes inside each 64-byte array,
    // unaligned loads. AVX2 is enabled on this function.
    let (mult, shift_even, shift_odd, round_even, round_odd) = unsafe {
        (
            _mm256_loadu_si256(b.mult.as_ptr().add(8 * half).cast()),
            _mm256_loadu_si256(b.shift_even.as_ptr().add(4 * half).cast()),
            _mm256_loadu_si256(b.shift_odd.as_ptr().add(4 * half).cast()),
            _mm256_loadu_si256(b.round_even.as_ptr().add(4 * half).cast()),
            _mm256_loadu_si256(b.round_odd.as_ptr().add(4 * half).cast()),
        )
    };
    let (zp, lo, hi) = (
        _mm256_set1_epi64x(stage.zp),
        _mm256_set1_epi64x(stage.lo),
        _mm256_set1_epi64x(stage.hi),
    );
    // AVX2 has no arithmetic 64-bit shift: shift the one's complement of negative values
    // logically instead (`!x >> s == !(x >> s)` for arithmetic shifts).
    let sra = |v: __m256i, s: __m256i| {
        let sign = _mm256_cmpgt_epi64(_mm256_setzero_si256(), v);
        _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(v, sign), s), sign)
    };
    let clamp = |v: __m256i| {
        let v = _mm256_add_epi64(v, zp);
        let v = _mm256_blendv_epi8(v, lo, _mm256_cmpgt_epi64(lo, v));
        _mm256_blendv_epi8(v, hi, _mm256_cmpgt_epi64(v, hi))
    };
    let even = _mm256_mul_epi32(acc, mult);
    let odd = _mm256_mul_epi32(_mm256_srli_epi64::<32>(acc), _mm256_srli_epi64::<32>(mult));
    let even = clamp(sra(_mm256_add_epi64(even, round_even), shift_even));
    let odd = clamp(sra(_mm256_add_epi64(odd, round_odd), shift_odd));
    _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd))
}

/// [`super::eltwise::add`] compiled for AVX2.
///
/// # Safety
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn add_avx2(p: &AddParams, a: &[u8], b: &[u8], out: &mut [u8]) {
    super::eltwise::add(p, a, b, out);
}

/// [`super::eltwise::add_in_place`] compiled for AVX2.
///
/// # Safety
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn add_in_place_avx2(p: &AddParams, a: &mut [u8], b: &[u8]) {
    super::eltwise::add_in_place(p, a, b);
}

/// [`super::eltwise::add_in_place`] compiled for AVX-512.
///
/// # Safety
/// The CPU supports the enabled features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn add_in_place_avx512(p: &AddParams, a: &mut [u8], b: &[u8]) {
    super::eltwise::add_in_place(p, a, b);
}

/// [`super::eltwise::add`] compiled for AVX-512.
///
/// # Safety
/// The CPU supports the enabled features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn add_avx512(p: &AddParams, a: &[u8], b: &[u8], out: &mut [u8]) {
    super::eltwise::add(p, a, b, out);
}
