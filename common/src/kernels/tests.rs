//! Tests of the kernels: the reference against hand-computed values and an independent
//! formulation, and every fast path against the reference, bit for bit.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A u8 code, at an extreme a quarter of the time.
fn code(rng: &mut ChaCha8Rng) -> u8 {
    match rng.random_range(0..8) {
        0 => 0,
        1 => 255,
        _ => rng.random(),
    }
}

/// An i8 weight, at an extreme a quarter of the time.
fn weight(rng: &mut ChaCha8Rng) -> i8 {
    match rng.random_range(0..8) {
        0 => -128,
        1 => 127,
        _ => rng.random(),
    }
}

/// `len` weights: i8 codes half the time, otherwise codes of 1 to 7 bits, the low-bit
/// weights the narrow AVX2 tile takes (up to `max|w| = 64`), at an extreme a quarter of
/// the time.
fn weights(rng: &mut ChaCha8Rng, len: usize) -> Vec<i8> {
    if rng.random() {
        return (0..len).map(|_| weight(rng)).collect();
    }
    let bits = rng.random_range(1..=7u32);
    let (lo, hi) = (-(1i8 << (bits - 1)), ((1i16 << (bits - 1)) - 1) as i8);
    (0..len)
        .map(|_| match rng.random_range(0..8) {
            0 => lo,
            1 => hi,
            _ => rng.random_range(lo..=hi),
        })
        .collect()
}

fn geom(
    in_hw: (usize, usize),
    in_c: usize,
    out_c: usize,
    k: (usize, usize),
    stride: usize,
    pad: usize,
) -> ConvGeom {
    ConvGeom {
        in_h: in_hw.0,
        in_w: in_hw.1,
        in_c,
        out_c,
        k_h: k.0,
        k_w: k.1,
        stride_h: stride,
        stride_w: stride,
        dil_h: 1,
        dil_w: 1,
        pad_t: pad,
        pad_l: pad,
        pad_b: pad,
        pad_r: pad,
        groups: 1,
    }
}

fn random_geom(rng: &mut ChaCha8Rng) -> ConvGeom {
    let mut g = ConvGeom {
        in_h: 0,
        in_w: 0,
        in_c: rng.random_range(1..70),
        out_c: rng.random_range(1..70),
        k_h: rng.random_range(1..=5),
        k_w: rng.random_range(1..=5),
        stride_h: rng.random_range(1..=3),
        stride_w: rng.random_range(1..=3),
        dil_h: rng.random_range(1..=2),
        dil_w: rng.random_range(1..=2),
        pad_t: rng.random_range(0..=2),
        pad_l: rng.random_range(0..=2),
        pad_b: rng.random_range(0..=2),
        pad_r: rng.random_range(0..=2),
        groups: 1,
    };
    // At least one output pixel; sometimes exactly one (the fully connected tiling).
    let min_h = (g.dil_h * (g.k_h - 1) + 1)
        .saturating_sub(g.pad_t + g.pad_b)
        .max(1);
    let min_w = (g.dil_w * (g.k_w - 1) + 1)
        .saturating_sub(g.pad_l + g.pad_r)
        .max(1);
    g.in_h = min_h + rng.random_range(0..8);
    g.in_w = min_w + rng.random_range(0..8);
    g
}

/// [`random_geom`] with channel groups: depthwise half the time (up to 70 channels, the
/// direct kernel), otherwise 2–6 groups of 1–9 input and 1–9 output channels each (the
/// per-group blocked path, including depthwise with a channel multiplier).
fn random_grouped_geom(rng: &mut ChaCha8Rng) -> ConvGeom {
    let mut g = random_geom(rng);
    if rng.random() {
        g.groups = rng.random_range(1..70);
        (g.in_c, g.out_c) = (g.groups, g.groups);
    } else {
        g.groups = rng.random_range(2..=6);
        g.in_c = g.groups * rng.random_range(1..=9);
        g.out_c = g.groups * rng.random_range(1..=9);
    }
    g
}

fn random_requant(rng: &mut ChaCha8Rng) -> Requant {
    match rng.random_range(0..10) {
        0 => Requant::ZERO,
        1 => Requant::MAX,
        2 => Requant {
            multiplier: rng.random_range(0..=i32::MAX),
            shift: rng.random_range(1..=62),
        },
        _ => Requant::from_real(2f64.powf(rng.random_range(-20.0..4.0))),
    }
}

fn random_stage(rng: &mut ChaCha8Rng, out_c: usize) -> OutputStage {
    let out_zp = match rng.random_range(0..8) {
        0 => i32::MIN,
        1 => i32::MAX,
        2 => rng.random(),
        _ => rng.random_range(0..=255),
    };
    let (a, b) = (code(rng), code(rng));
    // Mostly min <= max; sometimes inverted, which must not panic and must agree too.
    let (min, max) = if rng.random_range(0..8) == 0 {
        (a.max(b), a.min(b))
    } else {
        (a.min(b), a.max(b))
    };
    OutputStage {
        requant: (0..out_c).map(|_| random_requant(rng)).collect(),
        out_zp,
        min,
        max,
    }
}

struct ConvCase {
    geom: ConvGeom,
    weights: Vec<i8>,
    bias: Vec<i32>,
    zp: u8,
    n: usize,
    input: Vec<u8>,
}

impl ConvCase {
    fn random(rng: &mut ChaCha8Rng, geom: ConvGeom) -> ConvCase {
        let bias_range = if rng.random_range(0..4) == 0 {
            1 << 30
        } else {
            1 << 16
        };
        let n = rng.random_range(1..=3);
        ConvCase {
            weights: weights(rng, geom.out_c * geom.k_len()),
            bias: (0..geom.out_c)
                .map(|_| rng.random_range(-bias_range..bias_range))
                .collect(),
            zp: code(rng),
            n,
            input: (0..n * geom.in_len()).map(|_| code(rng)).collect(),
            geom,
        }
    }

    fn packed(&self) -> PackedConv {
        PackedConv::new(self.geom, &self.weights, &self.bias, self.zp)
    }

    fn acc(&self, path: KernelPath) -> Vec<i32> {
        let mut out = vec![0; self.n * self.geom.out_len()];
        self.packed()
            .run_acc_with(path, &self.input, self.n, &mut out);
        out
    }

    /// Every fast path's accumulators and codes against the reference's, bit for bit;
    /// `label` says which case failed.
    fn assert_fast_paths_match(&self, stage: &OutputStage, label: &str) {
        let (acc, codes) = (
            self.acc(KernelPath::Reference),
            self.codes(KernelPath::Reference, stage),
        );
        for path in KernelPath::available().into_iter().skip(1) {
            assert_eq!(self.acc(path), acc, "{label}, {path}, acc");
            assert_eq!(self.codes(path, stage), codes, "{label}, {path}, codes");
        }
    }

    fn codes(&self, path: KernelPath, stage: &OutputStage) -> Vec<u8> {
        let mut out = vec![0; self.n * self.geom.out_len()];
        self.packed()
            .run_with(path, stage, &self.input, self.n, &mut out);
        out
    }
}

/// An independent formulation of the convolution: materialise the zero-point-padded image,
/// then sum `(x - zp) * w` in i64 with no bounds logic at all.
fn naive_conv(c: &ConvCase, img: usize) -> Vec<i64> {
    let g = &c.geom;
    let (ph, pw) = (g.in_h + g.pad_t + g.pad_b, g.in_w + g.pad_l + g.pad_r);
    let mut padded = vec![i64::from(c.zp); ph * pw * g.in_c];
    for y in 0..g.in_h {
        for x in 0..g.in_w {
            for ch in 0..g.in_c {
                padded[((y + g.pad_t) * pw + x + g.pad_l) * g.in_c + ch] =
                    i64::from(c.input[img * g.in_len() + (y * g.in_w + x) * g.in_c + ch]);
            }
        }
    }
    let mut out = Vec::new();
    for oy in 0..g.out_h() {
        for ox in 0..g.out_w() {
            for oc in 0..g.out_c {
                let mut sum = i64::from(c.bias[oc]);
                // Output channel `oc` of group `oc / opg` reads that group's `ipg` inputs.
                let (ipg, opg) = (g.in_c / g.groups, g.out_c / g.groups);
                let first = oc / opg * ipg;
                for ky in 0..g.k_h {
                    for kx in 0..g.k_w {
                        for ch in 0..ipg {
                            let (y, x) = (
                                oy * g.stride_h + ky * g.dil_h,
                                ox * g.stride_w + kx * g.dil_w,
                            );
                            let w = c.weights[((oc * g.k_h + ky) * g.k_w + kx) * ipg + ch];
                            sum += (padded[(y * pw + x) * g.in_c + first + ch] - i64::from(c.zp))
                                * i64::from(w);
                        }
                    }
                }
                out.push(sum);
            }
        }
    }
    out
}

#[test]
fn reference_conv_1x1_by_hand() {
    // One image of 1x2 pixels, 2 channels: pixel 0 = (10, 20), pixel 1 = (0, 255); zp 5.
    // oc 0: w = (1, -2), bias 100; oc 1: w = (3, 4), bias -7.
    let g = geom((1, 2), 2, 2, (1, 1), 1, 0);
    let c = ConvCase {
        geom: g,
        weights: vec![1, -2, 3, 4],
        bias: vec![100, -7],
        zp: 5,
        n: 1,
        input: vec![10, 20, 0, 255],
    };
    let expected = vec![
        100 + 5 - 2 * 15,     // (10-5)*1 + (20-5)*(-2)
        -7 + 3 * 5 + 4 * 15,  // (10-5)*3 + (20-5)*4
        100 - 5 - 2 * 250,    // (0-5)*1 + (255-5)*(-2)
        -7 - 3 * 5 + 4 * 250, // (0-5)*3 + (255-5)*4
    ];
    assert_eq!(c.acc(KernelPath::Reference), expected);
}

#[test]
fn reference_conv_3x3_padded_by_hand() {
    // 2x2 single-channel image [[1, 2], [3, 4]], zp 1, 3x3 kernel of ones except the
    // centre weight 2, pad 1: each output sums (x - 1) over the image (padding adds 0),
    // plus one extra (x - 1) for the pixel under the centre.
    let g = geom((2, 2), 1, 1, (3, 3), 1, 1);
    let c = ConvCase {
        geom: g,
        weights: vec![1, 1, 1, 1, 2, 1, 1, 1, 1],
        bias: vec![0],
        zp: 1,
        n: 1,
        input: vec![1, 2, 3, 4],
    };
    // Sum of (x - 1) = 0 + 1 + 2 + 3 = 6; plus the centre pixel's (x - 1) once more.
    assert_eq!(c.acc(KernelPath::Reference), vec![6, 6 + 1, 6 + 2, 6 + 3]);

    // Stride 2 with the same padding: output 1x1 at the top-left, centre pixel 1.
    let c = ConvCase {
        geom: geom((2, 2), 1, 1, (3, 3), 2, 1),
        ..c
    };
    assert_eq!(c.geom.out_len(), 1);
    assert_eq!(c.acc(KernelPath::Reference), vec![6]);
}

#[test]
fn reference_conv_fused_stage_by_hand() {
    // acc = 2 * (x - 0) over a 1x1 conv; requant 0.5, out_zp 10, clamp to [12, 200].
    let c = ConvCase {
        geom: geom((1, 3), 1, 1, (1, 1), 1, 0),
        weights: vec![2],
        bias: vec![0],
        zp: 0,
        n: 1,
        input: vec![0, 7, 255],
    };
    let stage = OutputStage {
        requant: vec![Requant::from_real(0.5)],
        out_zp: 10,
        min: 12,
        max: 200,
    };
    // 10 + 0 -> clamped up to 12; 10 + 7 = 17; 10 + 255 -> clamped down to 200.
    assert_eq!(c.codes(KernelPath::Reference, &stage), vec![12, 17, 200]);
}

/// The reference against [`naive_conv`] on 40 geometries from `geom`.
fn reference_matches_independent_formula(seed: u64, geom: fn(&mut ChaCha8Rng) -> ConvGeom) {
    let mut rng = rng(seed);
    for _ in 0..40 {
        let g = geom(&mut rng);
        let c = ConvCase::random(&mut rng, g);
        let got = c.acc(KernelPath::Reference);
        for img in 0..c.n {
            let expected: Vec<i32> = naive_conv(&c, img).into_iter().map(|v| v as i32).collect();
            assert_eq!(
                &got[img * g.out_len()..][..g.out_len()],
                &expected[..],
                "{g:?}"
            );
        }
    }
}

#[test]
fn reference_conv_matches_independent_formula() {
    reference_matches_independent_formula(1, |rng| {
        let mut g = random_geom(rng);
        g.in_c = g.in_c.min(9);
        g.out_c = g.out_c.min(9);
        g
    });
}

#[test]
fn reference_grouped_conv_matches_independent_formula() {
    reference_matches_independent_formula(3, random_grouped_geom);
}

#[test]
fn reference_grouped_conv_by_hand() {
    // 1x1 image, 4 channels (10, 20, 30, 40), zp 0, 2 groups of 2 inputs -> 1 output each:
    // oc 0 reads channels 0-1 with w (1, 2), oc 1 reads channels 2-3 with w (3, -1).
    let c = ConvCase {
        geom: ConvGeom {
            groups: 2,
            ..geom((1, 1), 4, 2, (1, 1), 1, 0)
        },
        weights: vec![1, 2, 3, -1],
        bias: vec![5, 0],
        zp: 0,
        n: 1,
        input: vec![10, 20, 30, 40],
    };
    assert_eq!(c.acc(KernelPath::Reference), vec![5 + 10 + 40, 90 - 40]);
    // Depthwise 3x1 over a 1x3 image, 2 channels, zp 1, padding 1 on the left and right:
    // channel 0 (x - 1 = 0, 1, 2) with w (1, 1, 1), channel 1 (x - 1 = 4, 5, 6) with
    // w (0, 2, 0), i.e. twice the centre pixel.
    let mut g = geom((1, 3), 2, 2, (1, 3), 1, 0);
    (g.groups, g.pad_l, g.pad_r) = (2, 1, 1);
    let c = ConvCase {
        geom: g,
        weights: vec![1, 1, 1, 0, 2, 0],
        bias: vec![0, 0],
        zp: 1,
        n: 1,
        input: vec![1, 5, 2, 6, 3, 7],
    };
    let want = vec![1, 8, 3, 10, 3, 12];
    for path in KernelPath::available() {
        assert_eq!(c.acc(path), want, "{path}");
    }
}

/// Every fast path against the reference, accumulators and codes, on 150 geometries from
/// `geom` with random output stages.
fn every_path_matches_reference(seed: u64, geom: fn(&mut ChaCha8Rng) -> ConvGeom) {
    let paths = KernelPath::available();
    println!("testing paths {paths:?}");
    let mut rng = rng(seed);
    for case in 0..150 {
        let g = geom(&mut rng);
        let c = ConvCase::random(&mut rng, g);
        let stage = random_stage(&mut rng, g.out_c);
        c.assert_fast_paths_match(&stage, &format!("case {case}, {g:?} {stage:?}"));
    }
}

#[test]
fn every_path_matches_reference_on_random_convs() {
    every_path_matches_reference(2, random_geom);
}

#[test]
fn every_path_matches_reference_on_random_grouped_convs() {
    every_path_matches_reference(4, random_grouped_geom);
}

#[test]
fn narrow_steps_keep_every_i16_sum_in_range() {
    use super::blocked::narrow_steps;
    // 2 * 255 * max|w| per pair sum; i16::MAX / that many steps.
    assert_eq!(narrow_steps(&[1, -2, 0], 1000), 32767 / (510 * 2));
    assert_eq!(narrow_steps(&[-8, 7], 1000), 8);
    assert_eq!(narrow_steps(&[4, -3], 1000), 16);
    assert_eq!(narrow_steps(&[64, -64], 1000), 1);
    assert_eq!(narrow_steps(&[65], 1000), 0);
    assert_eq!(narrow_steps(&[-128, 0], 1000), 0);
    assert_eq!(narrow_steps(&[127], 1000), 0);
    // Never more steps than there are, and all of them when every weight is 0.
    assert_eq!(narrow_steps(&[1], 5), 5);
    assert_eq!(narrow_steps(&[0, 0], 7), 7);
    assert_eq!(narrow_steps(&[], 0), 1);
}

/// The narrow AVX2 tile sums pairwise products in i16 lanes for as many steps as the
/// weights allow: at that bound, with every input 255 and every weight at the extreme of
/// its range (both signs), each i16 sum comes as close to the i16 range as it can. Every
/// path must still give the reference's accumulators and codes, for weight ranges on
/// both sides of each bound, over a reduction long enough (64 channels, 3 x 3 taps: 144
/// steps) to flush many times.
#[test]
fn every_path_matches_reference_at_the_narrow_sums_bound() {
    let g = geom((5, 6), 64, 20, (3, 3), 1, 1);
    let mut rng = rng(12);
    for max in [1i16, 2, 3, 8, 9, 16, 32, 33, 63, 64, 65, 127, 128] {
        for sign in [-1i16, 1] {
            let w = (sign * max).clamp(-128, 127) as i8;
            for (zp, mixed) in [(0u8, false), (255, false), (0, true)] {
                let c = ConvCase {
                    geom: g,
                    // All at the extreme, or some of the other sign so sums cancel.
                    weights: (0..g.out_c * g.k_len())
                        .map(|i| match mixed && i % 7 == 3 {
                            true => w.saturating_neg(),
                            false => w,
                        })
                        .collect(),
                    bias: (0..g.out_c)
                        .map(|_| rng.random_range(-1000..1000))
                        .collect(),
                    zp,
                    n: 2,
                    input: vec![255; 2 * g.in_len()],
                };
                let stage = random_stage(&mut rng, g.out_c);
                c.assert_fast_paths_match(&stage, &format!("weights {w}, zp {zp}"));
            }
        }
    }
}

#[test]
fn every_path_matches_reference_on_network_shapes() {
    // ResNet-20's layer shapes (incl. the 3-channel stem and the 64 -> 10 linear) and
    // batch sizes that leave partial tiles; plus a linear layer over many images.
    let shapes = [
        (geom((32, 32), 3, 16, (3, 3), 1, 1), 2),
        (geom((32, 32), 16, 16, (3, 3), 1, 1), 1),
        (geom((32, 32), 16, 32, (3, 3), 2, 1), 1),
        (geom((16, 16), 32, 32, (3, 3), 1, 1), 2),
        (geom((16, 16), 32, 64, (3, 3), 2, 1), 1),
        (geom((8, 8), 64, 64, (3, 3), 1, 1), 3),
        (geom((1, 1), 64, 10, (1, 1), 1, 0), 37),
        (geom((1, 1), 784, 100, (1, 1), 1, 0), 19),
        (geom((7, 7), 8, 8, (7, 7), 1, 0), 5),
    ];
    let mut rng = rng(3);
    for (g, n) in shapes {
        let mut c = ConvCase::random(&mut rng, g);
        c.n = n;
        c.input = (0..n * g.in_len()).map(|_| code(&mut rng)).collect();
        let mut stage = random_stage(&mut rng, g.out_c);
        stage.out_zp = rng.random_range(0..=255);
        stage.min = 0;
        stage.max = 255;
        c.assert_fast_paths_match(&stage, &format!("{g:?}"));
    }
}

#[test]
fn every_path_matches_reference_on_dense_three_tap_rows() {
    // Stride and dilation 1 along rows with 3-tap rows and at most 16 output channels: the
    // shape the VNNI path shares broadcasts across taps for. Wide rows give several tiles
    // per row, of every length up to the maximum.
    let mut rng = rng(9);
    for case in 0..60 {
        let mut g = random_geom(&mut rng);
        g.k_w = 3;
        g.stride_w = 1;
        g.dil_w = 1;
        g.out_c = rng.random_range(1..=16);
        g.in_c = rng.random_range(1..=40);
        g.in_w = (3usize.saturating_sub(g.pad_l + g.pad_r)).max(1) + rng.random_range(0..40);
        let c = ConvCase::random(&mut rng, g);
        let stage = random_stage(&mut rng, g.out_c);
        c.assert_fast_paths_match(&stage, &format!("case {case}, {g:?}"));
    }
}

/// A random add: mostly as [`AddParams::new`] makes them from scales (the i32 route the
/// blocked paths fuse), else raw fields, many of which need i64 (run unfused).
fn random_add(rng: &mut ChaCha8Rng) -> AddParams {
    if rng.random_range(0..3) > 0 {
        let s = |rng: &mut ChaCha8Rng| 2f64.powf(rng.random_range(-12.0..4.0));
        let (s_a, s_b, s_out) = (s(rng), s(rng), s(rng));
        let (lo, hi) = (code(rng), code(rng));
        AddParams::new(
            s_a,
            code(rng).into(),
            s_b,
            code(rng).into(),
            s_out,
            code(rng).into(),
            lo.min(hi),
            lo.max(hi),
        )
    } else {
        AddParams {
            a_zp: rng.random_range(-300..300),
            a_mult: rng.random_range(-(1 << 30)..=(1 << 30)),
            b_zp: rng.random_range(0..256),
            b_mult: rng.random_range(-(1 << 30)..=(1 << 30)),
            shift: rng.random_range(1..=62),
            out_zp: rng.random_range(-1000..1000),
            min: code(rng),
            max: code(rng),
        }
    }
}

/// `run_residual` (the add fused into the VNNI store, elsewhere a pass after the convolution)
/// gives, on every path, exactly the
/// reference convolution followed by the reference add.
fn residual_matches_conv_then_add(seed: u64, geom: fn(&mut ChaCha8Rng) -> ConvGeom) {
    let mut rng = rng(seed);
    let mut narrow = 0;
    for case in 0..150 {
        let g = geom(&mut rng);
        let c = ConvCase::random(&mut rng, g);
        let stage = random_stage(&mut rng, g.out_c);
        let add = random_add(&mut rng);
        narrow += usize::from(eltwise::is_narrow(&add));
        let residual: Vec<u8> = (0..c.n * g.out_len()).map(|_| code(&mut rng)).collect();
        let codes = c.codes(KernelPath::Reference, &stage);
        let mut want = vec![0; codes.len()];
        reference::add(&add, &codes, &residual, &mut want);
        let packed = c.packed();
        for path in KernelPath::available() {
            let mut got = vec![0; want.len()];
            packed.run_residual_with(path, &stage, &c.input, c.n, &residual, &add, &mut got);
            assert_eq!(got, want, "case {case}, {path}, {g:?} {stage:?} {add:?}");
        }
    }
    assert!(narrow > 50, "{narrow} fused cases of 150");
}

#[test]
fn residual_add_in_the_store_matches_conv_then_add() {
    residual_matches_conv_then_add(21, random_geom);
    residual_matches_conv_then_add(22, random_grouped_geom);
    residual_matches_conv_then_add(23, |rng| {
        // ResNet shapes: 3x3 convolutions over 16-64 channels, the three-tap row kernel's
        // territory, plus 1x1 downsampling shortcuts.
        let c = [16, 32, 64][rng.random_range(0..3)];
        let (k, pad) = if rng.random_range(0..4) == 0 {
            (1, 0)
        } else {
            (3, 1)
        };
        let hw = rng.random_range(1..=12);
        geom(
            (hw, hw),
            c,
            c * rng.random_range(1..=2),
            (k, k),
            rng.random_range(1..=2),
            pad,
        )
    });
}

#[test]
fn swapped_add_is_the_same_add() {
    let mut rng = rng(24);
    for _ in 0..200 {
        let p = random_add(&mut rng);
        let (a, b) = (code(&mut rng), code(&mut rng));
        assert_eq!(p.swapped().apply(b, a), p.apply(a, b), "{p:?}");
    }
}

#[test]
fn empty_batch_writes_nothing() {
    let mut rng = rng(4);
    let c = ConvCase::random(&mut rng, geom((4, 4), 3, 5, (3, 3), 1, 1));
    for path in KernelPath::available() {
        c.packed().run_acc_with(path, &[], 0, &mut []);
    }
}

#[test]
fn accumulators_wrap_identically_on_every_path() {
    // Bias near i32::MAX plus positive products overflows: every path must wrap the same way.
    let g = geom((2, 2), 4, 3, (1, 1), 1, 0);
    let c = ConvCase {
        geom: g,
        weights: vec![127; 12],
        bias: vec![i32::MAX, i32::MIN, 0],
        zp: 0,
        n: 1,
        input: vec![255; 16],
    };
    let acc = c.acc(KernelPath::Reference);
    assert_eq!(acc[0], i32::MAX.wrapping_add(4 * 255 * 127));
    for path in KernelPath::available() {
        assert_eq!(c.acc(path), acc, "{path}");
    }
}

/// `round_half_up(acc * m / 2^s)` by exact i128 floor division, saturated.
fn exact_apply(r: Requant, acc: i32) -> i32 {
    let den = 1i128 << r.shift;
    let num = 2 * i128::from(acc) * i128::from(r.multiplier) + den;
    // floor(num / (2 * den)) == floor(x + 1/2) with x = acc * m / den.
    num.div_euclid(2 * den)
        .clamp(i128::from(i32::MIN), i128::from(i32::MAX)) as i32
}

#[test]
fn requant_rounds_half_up() {
    let half = Requant::from_real(0.5);
    assert_eq!(
        half,
        Requant {
            multiplier: 1 << 30,
            shift: 31
        }
    );
    let cases = [
        (5, 3),
        (-5, -2),
        (-7, -3),
        (-1, 0),
        (1, 1),
        (-3, -1),
        (0, 0),
        (4, 2),
    ];
    for (acc, expected) in cases {
        assert_eq!(half.apply(acc), expected, "{acc} * 0.5");
    }
    // -2 * 1.75 = -3.5 -> -3; 2 * 1.75 = 3.5 -> 4.
    let r = Requant::from_real(1.75);
    assert_eq!(r.apply(-2), -3, "-3.5 rounds to -3");
    assert_eq!(r.apply(2), 4, "3.5 rounds to 4");
}

#[test]
fn requant_zero_and_saturation() {
    assert_eq!(Requant::from_real(0.0), Requant::ZERO);
    for acc in [i32::MIN, -1, 0, 1, i32::MAX] {
        assert_eq!(Requant::ZERO.apply(acc), 0);
    }
    assert_eq!(Requant::MAX.apply(i32::MAX), i32::MAX);
    assert_eq!(Requant::MAX.apply(i32::MIN), i32::MIN);
    assert_eq!(Requant::MAX.apply(1), 1 << 30, "(2^31 - 1) / 2 rounds up");
    assert_eq!(
        Requant::MAX.apply(-1),
        -(1 << 30) + 1,
        "-(2^31 - 1) / 2 rounds up"
    );
    assert_eq!(Requant::from_real(2.0).apply(i32::MAX), i32::MAX);
    assert_eq!(Requant::from_real(2.0).apply(i32::MIN), i32::MIN);
    assert_eq!(Requant::from_real(2.0).apply(1 << 29), 1 << 30);
}

#[test]
fn requant_from_real_edge_cases() {
    for m in [1e10, 2f64.powi(30), f64::INFINITY, f64::MAX] {
        assert_eq!(Requant::from_real(m), Requant::MAX, "{m}");
    }
    for m in [
        -1.0,
        f64::NAN,
        f64::MIN_POSITIVE / 4.0,
        1e-20,
        2f64.powi(-33),
        f64::NEG_INFINITY,
    ] {
        assert_eq!(Requant::from_real(m), Requant::ZERO, "{m}");
    }
    // Just below 2^30 is still representable (shift 1).
    let r = Requant::from_real(2f64.powi(30) - 1.0);
    assert_eq!(r.shift, 1);
    assert!(r.is_valid());
    // Just above the "too small" limit is representable with shift 62.
    let r = Requant::from_real(2f64.powi(-32) * 1.5);
    assert_eq!(
        r,
        Requant {
            multiplier: 3 << 29,
            shift: 62
        }
    );
    // "Too small" loses nothing: 2^-32 * 0.999 applied to any i32 rounds to 0 anyway.
    let tiny = 2f64.powi(-32) * 0.999;
    assert_eq!(Requant::from_real(tiny), Requant::ZERO);
    assert_eq!((tiny * f64::from(i32::MIN) + 0.5).floor(), 0.0);
}

/// What a loader must refuse: a negative multiplier or a shift outside [1, 62].
#[test]
fn requant_validity_is_exactly_the_documented_range() {
    for (multiplier, shift, valid) in [
        (0, 1, true),
        (i32::MAX, 62, true),
        (1 << 30, 30, true),
        (-1, 30, false),
        (i32::MIN, 1, false),
        (1 << 30, 0, false),
        (1 << 30, 63, false),
        (-5, 0, false),
    ] {
        let r = Requant { multiplier, shift };
        assert_eq!(r.is_valid(), valid, "{r:?}");
    }
}

#[test]
fn requant_from_real_round_trips_across_magnitudes() {
    let mut rng = rng(5);
    for _ in 0..20_000 {
        let m = 2f64.powf(rng.random_range(-31.9..29.9));
        let r = Requant::from_real(m);
        assert!(
            (1 << 30..=i32::MAX).contains(&r.multiplier) && (1..=62).contains(&r.shift),
            "{m} -> {r:?}"
        );
        // Round to nearest: within half a unit of the 31-bit multiplier (>= 2^30), the
        // documented 2^-31; truncating would allow twice that.
        let rel = (r.to_real() - m).abs() / m;
        assert!(rel <= 2f64.powi(-31), "{m} -> {r:?}: relative error {rel}");
    }
    // Rounding up to 2^31 renormalises to 2^30 with one shift less: just under 2.0 is 2.0.
    assert_eq!(
        Requant::from_real(2.0 - 2f64.powi(-40)),
        Requant {
            multiplier: 1 << 30,
            shift: 29
        }
    );
    assert_eq!(
        Requant::from_real(2.0 - 2f64.powi(-40)),
        Requant::from_real(2.0)
    );
    // Half a unit rounds up, less rounds down.
    assert_eq!(
        Requant::from_real(1.0 + 2f64.powi(-31)),
        Requant {
            multiplier: (1 << 30) + 1,
            shift: 30
        }
    );
    assert_eq!(
        Requant::from_real(1.0 + 2f64.powi(-32)),
        Requant {
            multiplier: 1 << 30,
            shift: 30
        }
    );
    // Exact powers of two are exact.
    for e in -32..30 {
        let m = 2f64.powi(e);
        assert_eq!(Requant::from_real(m).to_real(), m);
    }
}

#[test]
fn requant_apply_matches_exact_arithmetic() {
    let mut rng = rng(6);
    for _ in 0..50_000 {
        let r = random_requant(&mut rng);
        let acc = match rng.random_range(0..6) {
            0 => i32::MIN,
            1 => i32::MAX,
            2 => rng.random_range(-1000..1000),
            _ => rng.random(),
        };
        assert_eq!(r.apply(acc), exact_apply(r, acc), "{r:?} {acc}");
    }
}

#[test]
fn output_stage_code_clamps() {
    let stage = OutputStage {
        requant: vec![Requant::from_real(1.0)],
        out_zp: 100,
        min: 100,
        max: 150,
    };
    assert_eq!(
        stage.code(0, -5),
        100,
        "fused ReLU: below zero point clamps to it"
    );
    assert_eq!(stage.code(0, 20), 120);
    assert_eq!(stage.code(0, i32::MAX), 150);
    let extreme = OutputStage {
        out_zp: i32::MIN,
        ..stage.clone()
    };
    assert_eq!(
        extreme.code(0, i32::MIN),
        100,
        "no i32 overflow in out_zp + v"
    );
    let inverted = OutputStage {
        min: 200,
        max: 10,
        ..stage
    };
    assert_eq!(inverted.code(0, 50), 10, "min > max gives max");
}

fn f64_add(p: &AddParams, s_a: f64, s_b: f64, s_out: f64, a: u8, b: u8) -> f64 {
    let real = (f64::from(a) - f64::from(p.a_zp)) * s_a + (f64::from(b) - f64::from(p.b_zp)) * s_b;
    (real / s_out + f64::from(p.out_zp)).clamp(f64::from(p.min), f64::from(p.max))
}

#[test]
fn add_matches_float_math_within_one_code() {
    let mut rng = rng(7);
    for _ in 0..300 {
        let s_a = 2f64.powf(rng.random_range(-12.0..2.0));
        let s_b = 2f64.powf(rng.random_range(-12.0..2.0));
        let s_out = (s_a + s_b) * rng.random_range(0.3..1.5);
        let p = AddParams::new(
            s_a,
            code(&mut rng).into(),
            s_b,
            code(&mut rng).into(),
            s_out,
            code(&mut rng).into(),
            0,
            255,
        );
        assert!(p.is_valid(), "{p:?}");
        let a: Vec<u8> = (0..64).map(|_| code(&mut rng)).collect();
        let b: Vec<u8> = (0..64).map(|_| code(&mut rng)).collect();
        let mut out = vec![0; 64];
        add(&p, &a, &b, &mut out);
        for i in 0..64 {
            let want = f64_add(&p, s_a, s_b, s_out, a[i], b[i]);
            assert!(
                (f64::from(out[i]) - want).abs() <= 1.0,
                "{p:?} a={} b={}: {} vs {want}",
                a[i],
                b[i],
                out[i]
            );
        }
    }
}

#[test]
fn add_by_hand_with_saturation_and_zero_points() {
    // Equal scales, output scale 1: out = out_zp + (a - a_zp) + (b - b_zp).
    let p = AddParams::new(1.0, 10, 1.0, 20, 1.0, 5, 0, 255);
    let mut out = [0u8; 4];
    add(&p, &[10, 110, 255, 0], &[20, 30, 255, 0], &mut out);
    assert_eq!(
        out,
        [5, 5 + 100 + 10, 255, 0],
        "exact, saturated high, saturated low"
    );
    // Halving the output scale rounds half up: (1 + 0) * 0.5 -> 0.5 -> 1; (-1) * 0.5 -> 0.
    let p = AddParams::new(0.5, 0, 0.5, 0, 1.0, 0, 0, 255);
    let mut out = [0u8; 3];
    add(&p, &[1, 3, 4], &[0, 0, 1], &mut out);
    assert_eq!(out, [1, 2, 3]);
    let p = AddParams::new(0.5, 2, 0.5, 0, 1.0, 10, 0, 255);
    let mut out = [0u8; 2];
    add(&p, &[1, 0], &[0, 1], &mut out);
    assert_eq!(out, [10, 10], "-0.5 rounds to 0 and -1 + 0.5 = -0.5 too");
    // A narrower clamp.
    let p = AddParams::new(1.0, 0, 1.0, 0, 1.0, 0, 50, 60);
    let mut out = [0u8; 3];
    add(&p, &[10, 27, 200], &[10, 28, 0], &mut out);
    assert_eq!(out, [50, 55, 60]);
}

#[test]
fn add_with_degenerate_output_scale_is_constant() {
    for s_out in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let p = AddParams::new(1.0, 0, 2.0, 3, s_out, 42, 0, 255);
        assert_eq!((p.a_mult, p.b_mult), (0, 0), "{s_out}");
        let mut out = [0u8; 3];
        add(&p, &[0, 100, 255], &[255, 7, 0], &mut out);
        assert_eq!(out, [42; 3]);
    }
    // A huge ratio saturates the multiplier rather than overflowing.
    let p = AddParams::new(1e30, 0, 1.0, 0, 1e-30, 100, 0, 255);
    assert!(p.is_valid());
    let mut out = [0u8; 3];
    add(&p, &[0, 1, 2], &[0, 0, 0], &mut out);
    assert_eq!(out, [100, 255, 255]);
}

#[test]
fn add_paths_match_reference_near_the_i32_limit() {
    // The fast paths compute in i32 when the parameters guarantee the result fits and fall
    // back to i64 otherwise; straddle that limit from both sides.
    let mut rng = rng(10);
    let limit_mult = (i32::MAX - 1) / 255; // 255 * m + 1 just fits
    let (mut narrow, mut wide) = (0, 0);
    for _ in 0..400 {
        let mut p = AddParams {
            a_zp: rng.random_range(-2..=2),
            a_mult: limit_mult + rng.random_range(-2..=2),
            b_zp: rng.random_range(-2..=2),
            b_mult: rng.random_range(-2..=2),
            shift: rng.random_range(1..=3),
            out_zp: 0,
            min: 0,
            max: 255,
        };
        if rng.random_range(0..2) == 0 {
            p.a_mult = -p.a_mult;
        }
        // Sometimes push `out_zp + (sum >> shift)` to the edge of i32 instead.
        if rng.random_range(0..3) == 0 {
            let top = (i64::from(limit_mult) * 255) >> p.shift;
            p.out_zp = (i64::from(i32::MAX) - top + rng.random_range(-3..=3))
                .clamp(0, i64::from(i32::MAX)) as i32;
        }
        if eltwise::is_narrow(&p) {
            narrow += 1;
        } else {
            wide += 1;
        }
        let a: Vec<u8> = (0..64).map(|_| code(&mut rng)).collect();
        let b: Vec<u8> = (0..64).map(|_| code(&mut rng)).collect();
        let mut want = vec![0; 64];
        reference::add(&p, &a, &b, &mut want);
        for path in KernelPath::available() {
            let mut got = vec![0; 64];
            add_with(path, &p, &a, &b, &mut got);
            assert_eq!(got, want, "{path} {p:?}");
        }
    }
    assert!(
        narrow > 50 && wide > 50,
        "both routes covered: {narrow} narrow, {wide} wide"
    );
}

#[test]
fn add_params_from_scales_take_the_i32_route() {
    let mut rng = rng(11);
    for _ in 0..200 {
        let s = |rng: &mut ChaCha8Rng| 2f64.powf(rng.random_range(-12.0..4.0));
        let (s_a, s_b, s_out) = (s(&mut rng), s(&mut rng), s(&mut rng));
        let p = AddParams::new(
            s_a,
            code(&mut rng).into(),
            s_b,
            code(&mut rng).into(),
            s_out,
            code(&mut rng).into(),
            0,
            255,
        );
        assert!(eltwise::is_narrow(&p), "{p:?}");
    }
}

#[test]
fn add_paths_match_reference() {
    let mut rng = rng(8);
    for _ in 0..200 {
        let p = AddParams {
            a_zp: rng.random_range(-300..300),
            a_mult: rng.random_range(-(1 << 30)..=(1 << 30)),
            b_zp: if rng.random_range(0..4) == 0 {
                i32::MIN
            } else {
                rng.random_range(0..256)
            },
            b_mult: rng.random_range(-(1 << 30)..=(1 << 30)),
            shift: rng.random_range(1..=62),
            out_zp: rng.random_range(-1000..1000),
            min: code(&mut rng),
            max: code(&mut rng),
        };
        let len = rng.random_range(0..300);
        let a: Vec<u8> = (0..len).map(|_| code(&mut rng)).collect();
        let b: Vec<u8> = (0..len).map(|_| code(&mut rng)).collect();
        let mut want = vec![0; len];
        reference::add(&p, &a, &b, &mut want);
        for path in KernelPath::available() {
            let mut got = vec![0; len];
            add_with(path, &p, &a, &b, &mut got);
            assert_eq!(got, want, "{path} {p:?}");
        }
    }
}

fn pool(k: usize, stride: usize, pads: [usize; 4], in_hw: (usize, usize), c: usize) -> PoolGeom {
    PoolGeom {
        in_h: in_hw.0,
        in_w: in_hw.1,
        c,
        k_h: k,
        k_w: k,
        stride_h: stride,
        stride_w: stride,
        pad_t: pads[0],
        pad_l: pads[1],
        pad_b: pads[2],
        pad_r: pads[3],
    }
}

#[test]
fn max_pool_by_hand() {
    // 4x4 single channel, 2x2 stride 2.
    #[rustfmt::skip]
    let x = [
        1, 5, 2, 0,
        3, 4, 9, 8,
        0, 0, 7, 7,
        0, 6, 7, 255,
    ];
    let g = pool(2, 2, [0; 4], (4, 4), 1);
    assert_eq!((g.out_h(), g.out_w()), (2, 2));
    let mut out = [0; 4];
    max_pool(&g, &x, 1, &mut out);
    assert_eq!(out, [5, 9, 6, 255]);

    // 3x3 stride 1 pad 1 on 2x2, two channels (second = 255 - first): padding is ignored,
    // so channel 2's max is over real cells only.
    let x = [10, 245, 20, 235, 30, 225, 40, 215];
    let g = pool(3, 1, [1; 4], (2, 2), 2);
    let mut out = [0; 8];
    max_pool(&g, &x, 1, &mut out);
    assert_eq!(out, [40, 245, 40, 245, 40, 245, 40, 245]);

    // Batch of two, asymmetric padding (only bottom/right), 2x2 stride 2 on 3x3.
    let x: Vec<u8> = (1..=18).collect();
    let g = pool(2, 2, [0, 0, 1, 1], (3, 3), 1);
    let mut out = [0; 8];
    max_pool(&g, &x, 2, &mut out);
    assert_eq!(out, [5, 6, 8, 9, 14, 15, 17, 18]);
}

#[test]
fn avg_pool_by_hand_with_and_without_padding_count() {
    // 2x2 image [[1, 2], [3, 5]], 3x3 window stride 1 pad 1, pad value 7.
    let x = [1, 2, 3, 5];
    let g = pool(3, 1, [1; 4], (2, 2), 1);
    let mut out = [0; 4];
    // Excluding padding: every window covers all 4 cells: 11 / 4 = 2.75 -> 3.
    avg_pool(&g, false, 7, &x, 1, &mut out);
    assert_eq!(out, [3; 4]);
    // Including padding: (11 + 5 * 7) / 9 = 46 / 9 = 5.11 -> 5.
    avg_pool(&g, true, 7, &x, 1, &mut out);
    assert_eq!(out, [5; 4]);

    // 2x2 stride 2 without padding, round half up: (1 + 2 + 3 + 4) / 4 = 2.5 -> 3.
    let g = pool(2, 2, [0; 4], (2, 4), 1);
    let mut out = [0; 2];
    avg_pool(&g, false, 0, &[1, 2, 0, 0, 3, 4, 0, 2], 1, &mut out);
    assert_eq!(out, [3, 1], "2.5 -> 3 and 0.5 -> 1");

    // Corner windows with padding excluded count only real cells: 2x2 stride 1 pad 1 on 1x1.
    let g = pool(2, 1, [1; 4], (1, 1), 1);
    let mut out = [0; 4];
    avg_pool(&g, false, 9, &[200], 1, &mut out);
    assert_eq!(out, [200; 4]);
    avg_pool(&g, true, 0, &[200], 1, &mut out);
    assert_eq!(out, [50; 4]);
}

#[test]
fn global_avg_pool_by_hand() {
    // Two images of 2x2x2: channel means 2.5 -> 3, 1.25 -> 1; 255 and 0.
    let x = [1, 0, 2, 1, 3, 1, 4, 3, 255, 0, 255, 0, 255, 0, 255, 0];
    let mut out = [0; 4];
    global_avg_pool(2, 2, 2, &x, 2, &mut out);
    assert_eq!(out, [3, 1, 255, 0]);
}

#[test]
fn kernel_path_names_parse() {
    for path in KernelPath::ALL {
        assert_eq!(path.name().parse::<KernelPath>().unwrap(), path);
    }
    assert_eq!(" VNNI ".parse::<KernelPath>().unwrap(), KernelPath::Vnni);
    let err = "sse9".parse::<KernelPath>().unwrap_err().to_string();
    assert!(err.contains("CCQ_KERNEL") && err.contains("sse9"), "{err}");
    let available = KernelPath::available();
    assert_eq!(
        &available[..2],
        &[KernelPath::Reference, KernelPath::Portable]
    );
    assert_eq!(KernelPath::best(), *available.last().unwrap());
}

// ---- sparse weight deltas ------------------------------------------------------------------

/// `count` distinct random weights of `c` changed to random other codes, half of them at
/// the kernel's border taps (the ones that fall into the padding at the image edges);
/// returns the changed weights and the changes sorted by output channel.
fn random_changes(
    rng: &mut ChaCha8Rng,
    c: &ConvCase,
    count: usize,
) -> (Vec<i8>, Vec<WeightChange>) {
    let g = &c.geom;
    let mut weights = c.weights.clone();
    let mut changes = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..count {
        let oc = rng.random_range(0..g.out_c);
        let (ky, kx) = if rng.random() {
            let edge = |rng: &mut ChaCha8Rng, k: usize| {
                if rng.random() {
                    0
                } else {
                    k - 1
                }
            };
            (edge(rng, g.k_h), edge(rng, g.k_w))
        } else {
            (rng.random_range(0..g.k_h), rng.random_range(0..g.k_w))
        };
        let ic = rng.random_range(0..g.in_per_group());
        let i = ((oc * g.k_h + ky) * g.k_w + kx) * g.in_per_group() + ic;
        if !seen.insert(i) {
            continue;
        }
        let new = weight(rng);
        changes.push(WeightChange {
            oc,
            ky,
            kx,
            ic,
            delta: i32::from(new) - i32::from(weights[i]),
        });
        weights[i] = new;
    }
    changes.sort_by_key(|ch| ch.oc);
    (weights, changes)
}

/// The delta update equals a full recompute with the changed weights, accumulators and
/// codes, on random geometries (strides, dilations, asymmetric padding, zero points,
/// extreme weights) and random sparse changes, including changes at the border taps.
#[test]
fn sparse_delta_matches_full_recompute_on_random_convs() {
    let mut rng = rng(41);
    for case in 0..400 {
        // Every fourth case grouped or depthwise: changes index within the group.
        let g = if case % 4 == 3 {
            random_grouped_geom(&mut rng)
        } else {
            random_geom(&mut rng)
        };
        let c = ConvCase::random(&mut rng, g);
        let count = match case % 3 {
            0 => 1,
            1 => rng.random_range(1..=8),
            _ => rng.random_range(1..=g.out_c * g.k_len()),
        };
        let (new_weights, changes) = random_changes(&mut rng, &c, count);
        let changed = ConvCase {
            weights: new_weights,
            bias: c.bias.clone(),
            input: c.input.clone(),
            ..c
        };
        let path = KernelPath::available()[case % KernelPath::available().len()];
        let mut base = DeltaBase::new_with(path, &c.packed(), &c.input, c.n);

        let mut want_acc = vec![0i32; c.n * g.out_len()];
        reference::conv_acc(
            &g,
            &changed.weights,
            &changed.bias,
            changed.zp,
            &changed.input,
            changed.n,
            &mut want_acc,
        );
        let mut got_acc = vec![0i32; c.n * g.out_len()];
        base.run_acc(&changes, &mut got_acc);
        assert_eq!(
            got_acc, want_acc,
            "case {case} ({path}): {g:?}, {changes:?}"
        );
        for path in KernelPath::available() {
            assert_eq!(changed.acc(path), want_acc, "case {case}: {path}");
        }

        let stage = random_stage(&mut rng, g.out_c);
        let base_out = c.codes(KernelPath::Reference, &stage);
        let want = changed.codes(KernelPath::Reference, &stage);
        let mut got = vec![0u8; want.len()];
        base.run(
            &stage,
            &changes,
            &base_out,
            &mut got,
            &mut None,
            &mut Vec::new(),
        );
        assert_eq!(got, want, "case {case}: {g:?}, {changes:?}");
        // Updating in place from an output that differs from the base in the channels
        // of an earlier update restores those channels.
        let (other_weights, other_changes) = random_changes(&mut rng, &c, count);
        let mut stale = None;
        base.run(
            &stage,
            &other_changes,
            &base_out,
            &mut got,
            &mut stale,
            &mut Vec::new(),
        );
        let other = ConvCase {
            weights: other_weights,
            bias: c.bias.clone(),
            input: c.input.clone(),
            ..c
        };
        assert_eq!(
            got,
            other.codes(KernelPath::Reference, &stage),
            "case {case}"
        );
        base.run(
            &stage,
            &changes,
            &base_out,
            &mut got,
            &mut stale,
            &mut Vec::new(),
        );
        assert_eq!(got, want, "case {case}: {g:?}, {changes:?}");
    }
}

/// A change at a corner tap of a padded, strided conv only reaches the outputs whose
/// window keeps that tap inside the image; checked against the hand-derived positions.
#[test]
fn sparse_delta_skips_padded_taps_by_hand() {
    // 4x4 input, 3x3 kernel, stride 2, padding 1: outputs at (0,0), (0,1), (1,0), (1,1)
    // read input rows/cols {-1, 0, 1} and {1, 2, 3}. Tap (0, 0) is in the padding for every
    // output in row 0 or column 0, so only output (1, 1) sees it, at input (1, 1).
    let g = ConvGeom {
        stride_h: 2,
        stride_w: 2,
        ..geom((4, 4), 1, 1, (3, 3), 1, 1)
    };
    let input: Vec<u8> = (0..16).map(|i| 10 + i as u8).collect();
    let zp = 3;
    let conv = PackedConv::new(g, &[0; 9], &[100], zp);
    let mut base = DeltaBase::new(&conv, &input, 1);
    let change = WeightChange {
        oc: 0,
        ky: 0,
        kx: 0,
        ic: 0,
        delta: -2,
    };
    let mut acc = vec![0; 4];
    base.run_acc(&[change], &mut acc);
    let x11 = i32::from(input[4 + 1]) - i32::from(zp);
    assert_eq!(acc, vec![100, 100, 100, 100 - 2 * x11]);
}

#[test]
#[should_panic(expected = "sorted by output channel")]
fn sparse_delta_rejects_unsorted_changes() {
    let g = geom((2, 2), 1, 2, (1, 1), 1, 0);
    let conv = PackedConv::new(g, &[1, 2], &[0, 0], 0);
    let mut base = DeltaBase::new(&conv, &[1, 2, 3, 4], 1);
    let ch = |oc| WeightChange {
        oc,
        ky: 0,
        kx: 0,
        ic: 0,
        delta: 1,
    };
    base.run_acc(&[ch(1), ch(0)], &mut [0; 8]);
}

// ---- products, tables, concatenation -------------------------------------------------------

#[test]
fn mul_by_hand_with_broadcast_zero_points_and_clamp() {
    // Real a = (a - 10) * 0.5, b = (b - 0) * 0.25, out scale 0.125, zp 3: the product
    // (a - 10) * b * 0.125 / 0.125 = (a - 10) * b, plus 3, clamped to [0, 200].
    let p = MulParams::new(0.5, 10, 0.25, 0, 0.125, 3, 0, 200);
    // Two images of 2 pixels x 2 channels; b holds one value per channel per image.
    let a = [10, 12, 11, 20, 0, 255, 13, 14];
    let b = [1, 3, 0, 2];
    let mut out = [0; 8];
    mul(&p, &a, &b, 2, &mut out);
    assert_eq!(
        out,
        [3, 3 + 6, 3 + 1, 3 + 30, 3, 3 + 2 * 245, 3, 3 + 8].map(|v: i32| v.clamp(0, 200) as u8)
    );
    // Same shapes: elementwise.
    let mut out = [0; 2];
    mul(&p, &[12, 14], &[5, 1], 1, &mut out);
    assert_eq!(out, [3 + 10, 3 + 4]);
}

#[test]
fn mul_matches_exact_real_arithmetic_within_one_code() {
    let mut rng = rng(77);
    for _ in 0..200 {
        let s = |rng: &mut ChaCha8Rng| 2f64.powf(rng.random_range(-8.0..0.0));
        let (s_a, s_b, s_o) = (s(&mut rng), s(&mut rng), s(&mut rng));
        let (za, zb, zo) = (code(&mut rng), code(&mut rng), code(&mut rng));
        let p = MulParams::new(s_a, za, s_b, zb, s_o, zo, 0, 255);
        let (a, b) = (code(&mut rng), code(&mut rng));
        let mut out = [0];
        mul(&p, &[a], &[b], 1, &mut out);
        let real = (f64::from(a) - f64::from(za)) * s_a * (f64::from(b) - f64::from(zb)) * s_b;
        let want = (real / s_o + f64::from(zo)).round().clamp(0.0, 255.0);
        assert!(
            (f64::from(out[0]) - want).abs() <= 1.0,
            "{p:?} {a} {b}: {} vs {want}",
            out[0]
        );
    }
}

#[test]
fn lookup_and_concat_by_hand() {
    let mut table = [0u8; 256];
    for (i, t) in table.iter_mut().enumerate() {
        *t = (255 - i) as u8;
    }
    let mut out = [0; 3];
    lookup(&table, &[0, 7, 255], &mut out);
    assert_eq!(out, [255, 248, 0]);

    // Two pixels; input 0 has 1 channel (inverted by its table), input 1 has 2 (identity).
    let mut identity = [0u8; 256];
    for (i, t) in identity.iter_mut().enumerate() {
        *t = i as u8;
    }
    let mut out = Vec::new();
    concat(
        &[(&[1, 2], &table), (&[10, 11, 20, 21], &identity)],
        &[1, 2],
        &mut out,
    );
    assert_eq!(out, [254, 10, 11, 253, 20, 21]);
}

#[test]
fn weight_positions_follow_the_ohwi_layout_within_groups() {
    // 2 groups of 3 inputs -> 2 outputs each, 2x2 kernel: 12 weights per output channel.
    let g = ConvGeom {
        groups: 2,
        ..geom((4, 4), 6, 4, (2, 2), 1, 0)
    };
    assert_eq!(g.k_len(), 12);
    for i in 0..g.out_c * g.k_len() {
        let [oc, ky, kx, ic] = g.weight_position(i);
        assert_eq!(((oc * 2 + ky) * 2 + kx) * 3 + ic, i);
        assert!(ky < 2 && kx < 2 && ic < 3 && oc < 4);
    }
    assert_eq!(g.weight_position(12 * 3 + 7), [3, 1, 0, 1]);
    assert_eq!((g.first_input_of(1), g.first_input_of(2)), (0, 3));
}
