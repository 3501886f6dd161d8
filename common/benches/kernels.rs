//! Throughput of the integer kernels on ResNet-20's layer shapes, per kernel path.
//!
//! `cargo bench -p ccq-common --bench kernels` reports each fused conv (u8 in, u8 out) at
//! batch 64 in MAC/s (criterion's "elem/s"), the elementwise add in elements/s, and then a
//! per-path table of each layer's best-of-20 throughput (robust to other load on the
//! machine) and the resulting conv-only ResNet-20 images/s. The reference path runs at
//! batch 4 (it is ~100x slower). Pass `-- vnni` etc. to filter the criterion benchmarks,
//! `-- table` (matching none) to print only the table, `-- peak` to print only the
//! machine's `VPDPBUSD` peak (the roof for every fraction of peak quoted).

use std::hint::black_box;
use std::time::{Duration, Instant};

use ccq_common::kernels::{
    self, AddParams, ConvGeom, KernelPath, OutputStage, PackedConv, Requant,
};
use criterion::{BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 64;

/// A ResNet-20 layer shape and how many times it occurs in the network.
struct Layer {
    name: &'static str,
    geom: ConvGeom,
    count: usize,
}

fn conv3x3(hw: usize, in_c: usize, out_c: usize, stride: usize) -> ConvGeom {
    ConvGeom {
        in_h: hw,
        in_w: hw,
        in_c,
        out_c,
        k_h: 3,
        k_w: 3,
        stride_h: stride,
        stride_w: stride,
        dil_h: 1,
        dil_w: 1,
        pad_t: 1,
        pad_l: 1,
        pad_b: 1,
        pad_r: 1,
        groups: 1,
    }
}

/// A 1×1 convolution, stride 1, no padding.
fn conv1x1(hw: usize, in_c: usize, out_c: usize) -> ConvGeom {
    ConvGeom {
        k_h: 1,
        k_w: 1,
        pad_t: 0,
        pad_l: 0,
        pad_b: 0,
        pad_r: 0,
        ..conv3x3(hw, in_c, out_c, 1)
    }
}

fn layers() -> Vec<Layer> {
    let linear = conv1x1(1, 64, 10);
    vec![
        Layer {
            name: "stem_32x32_3to16",
            geom: conv3x3(32, 3, 16, 1),
            count: 1,
        },
        Layer {
            name: "s1_32x32_16to16",
            geom: conv3x3(32, 16, 16, 1),
            count: 6,
        },
        Layer {
            name: "s2_32x32_16to32_s2",
            geom: conv3x3(32, 16, 32, 2),
            count: 1,
        },
        Layer {
            name: "s2_16x16_32to32",
            geom: conv3x3(16, 32, 32, 1),
            count: 5,
        },
        Layer {
            name: "s3_16x16_32to64_s2",
            geom: conv3x3(16, 32, 64, 2),
            count: 1,
        },
        Layer {
            name: "s3_8x8_64to64",
            geom: conv3x3(8, 64, 64, 1),
            count: 5,
        },
        Layer {
            name: "fc_64to10",
            geom: linear,
            count: 1,
        },
    ]
}

/// Layers of mobile networks (not part of the ResNet-20 estimate): depthwise 3x3 at the
/// widths of an inverted-residual block, and a grouped 1x1.
fn mobile_layers() -> Vec<Layer> {
    let depthwise = |hw, c, stride| ConvGeom {
        groups: c,
        ..conv3x3(hw, c, c, stride)
    };
    vec![
        Layer {
            name: "dw_28x28_96",
            geom: depthwise(28, 96, 1),
            count: 1,
        },
        Layer {
            name: "dw_28x28_144_s2",
            geom: depthwise(28, 144, 2),
            count: 1,
        },
        Layer {
            name: "grouped1x1_14x14_64to64_g4",
            geom: ConvGeom {
                groups: 4,
                ..conv1x1(14, 64, 64)
            },
            count: 1,
        },
    ]
}

struct Prepared {
    conv: PackedConv,
    stage: OutputStage,
    input: Vec<u8>,
}

/// A layer of `g` with 4-bit weight codes.
fn prepare(g: ConvGeom, batch: usize, rng: &mut ChaCha8Rng) -> Prepared {
    prepare_bits(g, batch, 4, rng)
}

/// A layer of `g` with weight codes of `bits` bits (the AVX2 path runs 8-bit weights on
/// its wide tile, fewer bits on its narrow one).
fn prepare_bits(g: ConvGeom, batch: usize, bits: u32, rng: &mut ChaCha8Rng) -> Prepared {
    let half = 1i16 << (bits - 1);
    let weights: Vec<i8> = (0..g.out_c * g.k_len())
        .map(|_| rng.random_range(-half..half) as i8)
        .collect();
    let bias: Vec<i32> = (0..g.out_c)
        .map(|_| rng.random_range(-1000..1000))
        .collect();
    let stage = OutputStage {
        requant: (0..g.out_c)
            .map(|_| Requant::from_real(rng.random_range(0.001..0.01)))
            .collect(),
        out_zp: 0,
        min: 0,
        max: 255,
    };
    Prepared {
        conv: PackedConv::new(g, &weights, &bias, 3),
        stage,
        input: (0..batch * g.in_len()).map(|_| rng.random()).collect(),
    }
}

fn batch_for(path: KernelPath) -> usize {
    if path == KernelPath::Reference {
        4
    } else {
        BATCH
    }
}

fn bench_convs(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut group = c.benchmark_group("conv");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for layer in layers().into_iter().chain(mobile_layers()) {
        for path in KernelPath::available() {
            let batch = batch_for(path);
            let p = prepare(layer.geom, batch, &mut rng);
            let mut out = vec![0u8; batch * layer.geom.out_len()];
            group.throughput(Throughput::Elements((batch * layer.geom.macs()) as u64));
            group.bench_function(BenchmarkId::new(layer.name, path), |b| {
                b.iter(|| {
                    p.conv
                        .run_with(path, &p.stage, black_box(&p.input), batch, &mut out)
                })
            });
            if path == KernelPath::best() {
                // The same without the output stage: the cost of requantization.
                let mut acc = vec![0i32; batch * layer.geom.out_len()];
                group.bench_function(BenchmarkId::new(layer.name, format!("{path}-acc")), |b| {
                    b.iter(|| {
                        p.conv
                            .run_acc_with(path, black_box(&p.input), batch, &mut acc)
                    })
                });
            }
        }
    }
    group.finish();
}

/// Packing cost: the search repacks a layer whenever its weight codes change.
fn bench_pack(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut group = c.benchmark_group("pack");
    group
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300));
    for layer in layers() {
        let g = layer.geom;
        let weights: Vec<i8> = (0..g.out_c * g.k_len()).map(|_| rng.random()).collect();
        let bias: Vec<i32> = (0..g.out_c)
            .map(|_| rng.random_range(-1000..1000))
            .collect();
        group.throughput(Throughput::Elements(weights.len() as u64));
        group.bench_function(layer.name, |b| {
            b.iter(|| PackedConv::new(g, black_box(&weights), &bias, 3))
        });
    }
    group.finish();
}

fn bench_add(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let len = BATCH * 32 * 32 * 16;
    let a: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    let b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    let mut out = vec![0u8; len];
    let p = AddParams::new(0.02, 128, 0.03, 120, 0.04, 7, 7, 255);
    let mut group = c.benchmark_group("add");
    group
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300));
    group.throughput(Throughput::Elements(len as u64));
    for path in KernelPath::available() {
        group.bench_function(BenchmarkId::new("32x32x16", path), |bench| {
            bench.iter(|| kernels::add_with(path, &p, black_box(&a), black_box(&b), &mut out))
        });
    }
    group.finish();
}

/// Per layer and path, the best of several runs (robust to other load on the machine), and
/// the resulting conv-only ResNet-20 throughput.
fn network_estimate() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    println!(
        "\nBest of 20 runs, one thread, batch {BATCH} (reference: batch 4), fused output stage, \
         4-bit weights (and 8-bit where the path has a tile for each):"
    );
    let runs_of = |path| {
        [(path, 4), (path, 8)]
            .into_iter()
            .take(1 + usize::from(path == KernelPath::Avx2))
    };
    for (path, bits) in KernelPath::available().into_iter().flat_map(runs_of) {
        let batch = batch_for(path);
        let runs = if path == KernelPath::Reference { 3 } else { 20 };
        let mut seconds_per_image = 0.0;
        let mut macs_per_image = 0;
        let mut per_layer = Vec::new();
        for layer in layers() {
            let p = prepare_bits(layer.geom, batch, bits, &mut rng);
            let mut out = vec![0u8; batch * layer.geom.out_len()];
            let best = (0..runs)
                .map(|_| {
                    let start = Instant::now();
                    p.conv
                        .run_with(path, &p.stage, black_box(&p.input), batch, &mut out);
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            per_layer.push(format!(
                "{} {:.1}",
                layer.name,
                (batch * layer.geom.macs()) as f64 / best / 1e9
            ));
            seconds_per_image += layer.count as f64 * best / batch as f64;
            macs_per_image += layer.count * layer.geom.macs();
        }
        println!(
            "  {:>9}: ResNet-20 convs {:6.1} GMAC/s = {:6.0} images/s; per layer GMAC/s: {}",
            format!("{path} w{bits}"),
            macs_per_image as f64 / seconds_per_image / 1e9,
            1.0 / seconds_per_image,
            per_layer.join(", ")
        );
    }
}

/// The machine's multiply-accumulate peak on the VNNI instruction, the roof every fraction
/// of peak in docs/PERFORMANCE.md is taken against: `VPDPBUSD` on 24 independent
/// accumulators (enough to cover its latency on every core measured), registers only, one
/// thread, best of 20 runs; on zmm (16 lanes x 4 products) and on ymm (8 x 4), since a
/// core that splits 512-bit operations in two may reach the same rate on either.
#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    const ACCUMULATORS: usize = 24;
    const ITERATIONS: usize = 1 << 20;

    /// `ITERATIONS x ACCUMULATORS` zmm `VPDPBUSD`s.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn zmm() -> i32 {
        // Inputs the compiler cannot see, so nothing is folded away.
        let a = _mm512_set1_epi32(black_box(0x0101_0101));
        let b = _mm512_set1_epi32(black_box(0x0102_0304));
        let mut acc = [_mm512_setzero_si512(); ACCUMULATORS];
        for _ in 0..ITERATIONS {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_si512(), |s, &x| _mm512_add_epi32(s, x));
        _mm512_reduce_add_epi32(sum)
    }

    /// `ITERATIONS x ACCUMULATORS` ymm `VPDPBUSD`s.
    ///
    /// # Safety
    /// The CPU has AVX-512 VL and VNNI.
    #[target_feature(enable = "avx512f,avx512vl,avx512vnni")]
    unsafe fn ymm() -> i32 {
        let a = _mm256_set1_epi32(black_box(0x0101_0101));
        let b = _mm256_set1_epi32(black_box(0x0102_0304));
        let mut acc = [_mm256_setzero_si256(); ACCUMULATORS];
        for _ in 0..ITERATIONS {
            for x in acc.iter_mut() {
                *x = _mm256_dpbusd_epi32(*x, a, b);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm256_setzero_si256(), |s, &x| _mm256_add_epi32(s, x));
        _mm512_reduce_add_epi32(_mm512_zextsi256_si512(sum))
    }

    /// Best-of-20 GMAC/s of `f`, which does `macs` multiply-accumulates.
    fn best(f: impl Fn() -> i32, macs: f64) -> f64 {
        (0..20)
            .map(|_| {
                let start = Instant::now();
                black_box(f());
                macs / start.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    }

    pub fn report() {
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if !avx512 {
            println!("\nVPDPBUSD peak: no AVX-512 VNNI on this CPU");
            return;
        }
        let instructions = (ITERATIONS * ACCUMULATORS) as f64;
        // SAFETY: the features both functions need were detected just above.
        let z = best(|| unsafe { zmm() }, instructions * 64.0);
        // SAFETY: as above.
        let y = best(|| unsafe { ymm() }, instructions * 32.0);
        println!(
            "\nVPDPBUSD peak, one thread, {ACCUMULATORS} accumulators, best of 20: \
             zmm {z:.1} GMAC/s, ymm {y:.1} GMAC/s (one instruction is 64 and 32 \
             multiply-accumulates)"
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "peak") {
        // `cargo bench -p ccq-common --bench kernels -- peak`: the roof alone.
        #[cfg(target_arch = "x86_64")]
        peak::report();
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    bench_convs(&mut c);
    bench_pack(&mut c);
    bench_add(&mut c);
    c.final_summary();
    // Only under `cargo bench` (which passes --bench), not `cargo test --benches`.
    if std::env::args().any(|a| a == "--bench") {
        #[cfg(target_arch = "x86_64")]
        peak::report();
        network_estimate();
    }
}
