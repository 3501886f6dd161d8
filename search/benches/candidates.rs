//! Candidate-evaluation throughput on the real ResNet-20 (W4A8) and CIFAR-10 (JPEG q75
//! copy) images from `../shared`, per [`Strategy`]: a full forward pass per candidate
//! (naive), prefix reuse + de-duplication, and prefix + de-duplication + sparse delta.
//!
//! Groups and candidates are what the search produces: the groups of one cycle of a fresh
//! [`EdaState`] with the default [`EdaParams`] (group size 128, population 16, radius 1,
//! p0 0.8), candidates from [`EdaState::sample`] against the post-training codes, one
//! batch of 256 training images.
//!
//! `cargo bench -p ccq-search --bench candidates` runs criterion on one group in an early,
//! a middle and a late layer (elem/s = candidate evaluations per second), then prints two
//! tables: the time of the delta against recomputing the layer on each layer shape (the
//! measurement behind `fitness::delta_pays_off`), and, per thread count, candidates per
//! second over one group of every layer weighted by how many groups that layer has in a
//! cycle (the mix the search actually runs), with the ratio to naive and the bound any
//! evaluation that recomputes the layers after the changed one must stay under. Pass
//! `-- table` to skip criterion, `-- sparsity` for the table of how much of each later
//! layer's input a candidate changes (what a sparse suffix evaluation would work on)
//! instead of the others. Skipped with a message when `../shared` is absent.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ccq_common::data::{self, DataFormat, DataSource, Split};
use ccq_common::fitness::{evaluate_candidates_with, Strategy};
use ccq_common::kernels::{DeltaBase, WeightChange};
use ccq_common::model::Normalization;
use ccq_common::qnet::{Activations, QNetwork, QOp};
use ccq_common::quant::{quantize, QuantConfig};
use ccq_search::eda::{EdaParams, EdaState, Group, Variable};
use criterion::{BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 256;

const STRATEGIES: [(Strategy, &str); 3] = [
    (Strategy::Naive, "naive"),
    (Strategy::Prefix, "prefix+dedupe"),
    (Strategy::Delta, "prefix+dedupe+delta"),
];

struct Setup {
    net: QNetwork,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    /// Per layer (index into `net.layers`): how many groups it has in one cycle, and one
    /// of them (the middle one) with its sampled candidates.
    layers: Vec<LayerJob>,
}

struct LayerJob {
    groups_in_cycle: usize,
    vars: Vec<u32>,
    candidates: Vec<Vec<i8>>,
}

fn shared() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared"));
    let model = dir.join("models/resnet20-cifar10.onnx");
    let data = dir.join("datasets/cifar10-jpeg/cifar-10-batches-bin/data_batch_1.bin");
    (model.is_file() && data.is_file()).then_some(dir)
}

fn setup(shared: &std::path::Path) -> Setup {
    let graph = ccq_common::onnx::load_onnx(&shared.join("models/resnet20-cifar10.onnx"))
        .expect("ResNet-20 loads");
    let source = DataSource::new(
        DataFormat::Cifar10,
        shared.join("datasets/cifar10-jpeg/cifar-10-batches-bin"),
    );
    // The headline configuration: W4A8, max calibration on 512 training images.
    let calib = data::load(&source, Split::Train, Some(0..512)).expect("CIFAR-10 loads");
    let norm = Normalization {
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    };
    let cfg = QuantConfig::new(4, 8);
    let net = quantize(&graph, &norm, &calib.images, calib.len(), &cfg).expect("quantizes");
    let batch = data::load(&source, Split::Train, Some(1000..1000 + BATCH)).expect("loads");

    let codes = net.codes();
    let vars = net.layers.iter().enumerate().flat_map(|(li, l)| {
        codes[l.offset..l.offset + l.len]
            .iter()
            .map(move |&c| Variable {
                initial: c,
                lo: l.lo,
                hi: l.hi,
                layer: li as u32,
            })
    });
    let eda = EdaState::new(EdaParams::default(), vars).expect("EDA state");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let groups = eda.groups(&mut rng);
    let layers = (0..net.layers.len() as u32)
        .map(|li| {
            let of_layer: Vec<&Group> = groups.iter().filter(|g| g.layer == li).collect();
            let vars = of_layer[of_layer.len() / 2].vars.clone();
            let candidates = eda.sample(&vars, &codes, &mut rng).expect("samples");
            LayerJob {
                groups_in_cycle: of_layer.len(),
                vars,
                candidates,
            }
        })
        .collect();
    Setup {
        net,
        pixels: batch.images,
        labels: batch.labels,
        layers,
    }
}

fn run(s: &Setup, job: &LayerJob, strategy: Strategy, threads: usize) {
    let stats = evaluate_candidates_with(
        &s.net,
        black_box(&s.pixels),
        &ccq_common::qnet::Targets::labels(&s.labels),
        &job.vars,
        &job.candidates,
        threads,
        strategy,
    )
    .expect("evaluates");
    black_box(stats);
}

fn thread_counts() -> Vec<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > 1 {
        vec![1, cores]
    } else {
        vec![1]
    }
}

/// One group in an early, a middle and a late layer (stage 1, 2 and 3 of ResNet-20).
fn bench_candidates(c: &mut Criterion, s: &Setup) {
    let count = s.net.layers.len();
    let picks = [
        ("early", count / 5),
        ("middle", count / 2),
        ("late", count * 4 / 5),
    ];
    let mut group = c.benchmark_group("candidates");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(500));
    for threads in thread_counts() {
        for &(position, li) in &picks {
            let job = &s.layers[li];
            group.throughput(Throughput::Elements(job.candidates.len() as u64));
            for (strategy, name) in STRATEGIES {
                let id = format!("{position}-{}-{threads}t", s.net.layers[li].name);
                group.bench_function(BenchmarkId::new(name, id), |b| {
                    b.iter(|| run(s, job, strategy, threads))
                });
            }
        }
    }
    group.finish();
}

fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Per layer shape, one thread: recomputing the layer (fused output stage) against the
/// sparse delta for `k` changed weights spread like a fresh group's (consecutive
/// variables, so over few output channels).
fn delta_table(s: &Setup) {
    let mut acts = Activations::default();
    let n = BATCH / 2; // what one of two threads holds
    s.net
        .forward(&s.pixels[..n * s.net.image_len()], n, &mut acts);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    println!(
        "\nSparse delta vs full layer recompute, batch {n}, one thread, best of 3-5 (ms). \
         'first' includes the per-batch setup, 'next' is each further candidate; 'rule' is \
         what fitness::delta_pays_off picks:"
    );
    for l in &s.net.layers {
        let node = &s.net.nodes[l.node];
        let conv = s.net.conv(l.node);
        let g = conv.geom;
        let input = &acts.values[node.inputs[0]];
        let base_out = acts.values[l.node + 1].clone();
        let mut out = vec![0u8; n * g.out_len()];
        let mut acc = vec![0i32; n * g.out_len()];
        let is_logits = l.node + 1 == s.net.nodes.len();
        let full = best_of(5, || match &conv.stage {
            Some(stage) if !is_logits => conv.packed().run(stage, input, n, &mut out),
            _ => conv.packed().run_acc(input, n, &mut acc),
        });
        let mut cells = Vec::new();
        for k in [8, 26, 64, 128, 512] {
            let start = rng.random_range(0..l.len.saturating_sub(k).max(1));
            let changes: Vec<WeightChange> = (start..(start + k).min(l.len))
                .map(|i| {
                    let (oc, r) = (i / g.k_len(), i % g.k_len());
                    WeightChange {
                        oc,
                        ky: r / (g.k_w * g.in_c),
                        kx: r / g.in_c % g.k_w,
                        ic: r % g.in_c,
                        delta: 1,
                    }
                })
                .collect();
            let mut scratch = Vec::new();
            // As in a generation: the previous candidate's channels are restored first.
            if !is_logits {
                out.copy_from_slice(&base_out);
            }
            let mut stale = Some(Vec::new());
            let mut step = |base: &mut DeltaBase| match &conv.stage {
                Some(stage) if !is_logits => base.run(
                    stage,
                    &changes,
                    &base_out,
                    &mut out,
                    &mut stale,
                    &mut scratch,
                ),
                _ => base.run_acc(&changes, &mut acc),
            };
            // The first candidate of a batch also builds the base (and the base planes of
            // the channels it touches); later ones reuse them.
            let first = best_of(3, || {
                let mut base = DeltaBase::new(conv.packed(), input, n);
                step(&mut base);
            });
            let mut base = DeltaBase::new(conv.packed(), input, n);
            let next = best_of(5, || step(&mut base));
            let rule = if ccq_common::fitness::delta_pays_off(&g, &changes) {
                "delta"
            } else {
                "full"
            };
            cells.push(format!(
                "k={k}: {:.3}/{:.3} ({rule})",
                first * 1e3,
                next * 1e3
            ));
        }
        println!(
            "  {:<24} full {:.3}; delta first/next: {}",
            l.name,
            full * 1e3,
            cells.join(", ")
        );
    }
}

/// Candidates per second over a cycle's mix of groups, per strategy and thread count.
fn cycle_table(s: &Setup) {
    let cycle_groups: usize = s.layers.iter().map(|j| j.groups_in_cycle).sum();
    let population = s.layers[0].candidates.len();
    let to_evaluate: usize = (s.layers.iter())
        .map(|j| (distinct(j).len() - 1) * j.groups_in_cycle)
        .sum();
    println!(
        "\nOne cycle of a fresh EDA state: {cycle_groups} groups of up to {} variables, \
         population {population}, batch {BATCH}; {:.1} % of candidates need evaluating \
         (the rest equal the context or an earlier candidate).",
        EdaParams::default().group_size,
        100.0 * to_evaluate as f64 / (cycle_groups * population) as f64
    );
    // A job runs the context network once (it is candidate 0, and the other candidates
    // reuse its prefix) and every further distinct candidate from its group's layer on.
    // However fast each layer, a strategy that recomputes the layers after the changed
    // one in full costs at least that many multiply-accumulates per job, against the
    // population's worth of whole networks for naive.
    let macs: Vec<usize> = (s.net.nodes.iter())
        .map(|n| match &n.op {
            QOp::Conv(c) => c.geom.macs(),
            _ => 0,
        })
        .collect();
    let total: usize = macs.iter().sum();
    let (mut naive_macs, mut bound_macs) = (0.0, 0.0);
    for (l, j) in s.net.layers.iter().zip(&s.layers) {
        let suffix: usize = macs[l.node + 1..].iter().sum();
        let others = distinct(j).len() - 1;
        let w = j.groups_in_cycle as f64;
        naive_macs += w * (j.candidates.len() * total) as f64;
        bound_macs += w * (total + others * suffix) as f64;
    }
    println!(
        "Dense-suffix bound: recomputing every layer after the changed one (the changed layer \
         itself free), a cycle costs {:.2}x fewer multiply-accumulates than naive; no strategy \
         that recomputes the suffix densely can beat naive by more.",
        naive_macs / bound_macs
    );
    for threads in thread_counts() {
        println!(
            "{threads} thread(s): candidate evaluations per second (per layer, best of 3 \
             runs, the strategies interleaved so that load changes hit all alike)"
        );
        // best[strategy][layer]: seconds for the layer's group.
        let mut best = vec![vec![f64::INFINITY; s.layers.len()]; STRATEGIES.len()];
        for (li, job) in s.layers.iter().enumerate() {
            for _ in 0..3 {
                for (si, &(strategy, _)) in STRATEGIES.iter().enumerate() {
                    let t = best_of(1, || run(s, job, strategy, threads));
                    best[si][li] = best[si][li].min(t);
                }
            }
        }
        let mut naive = (0.0, 0.0);
        for (si, &(strategy, name)) in STRATEGIES.iter().enumerate() {
            let (mut weighted_time, mut uniform_time) = (0.0, 0.0);
            let mut per_layer = Vec::new();
            for ((l, job), &t) in s.net.layers.iter().zip(&s.layers).zip(&best[si]) {
                weighted_time += t * job.groups_in_cycle as f64;
                uniform_time += t;
                per_layer.push(format!("{} {:.0}", l.name, job.candidates.len() as f64 / t));
            }
            let weighted = (cycle_groups * population) as f64 / weighted_time;
            let uniform = (s.layers.len() * population) as f64 / uniform_time;
            if strategy == Strategy::Naive {
                naive = (weighted, uniform);
            }
            println!(
                "  {name:<20} cycle mix {weighted:7.1} cand/s ({:.2}x naive); one group per \
                 layer {uniform:7.1} cand/s ({:.2}x naive)\n    per layer cand/s: {}",
                weighted / naive.0,
                uniform / naive.1,
                per_layer.join(", ")
            );
        }
    }
}

/// A job's candidates without repeats, in order (the context, candidate 0, first).
fn distinct(j: &LayerJob) -> Vec<&Vec<i8>> {
    let mut seen: Vec<&Vec<i8>> = Vec::new();
    for c in &j.candidates {
        if !seen.contains(&c) {
            seen.push(c);
        }
    }
    seen
}

/// Per group layer: how much of each later convolution's input a candidate changes, on
/// 64 images, over the job's first 6 distinct candidates besides the context: the share of
/// input pixels (image, y, x) where some channel differs from the context's, and the share
/// of input codes that differ. A sparse update of a convolution touches, per changed code,
/// every output channel at every tap (as many multiply-accumulates as the code has in the
/// dense convolution, but without VPDPBUSD's four-per-lane packing), so its work is about
/// the code share times the dense layer's, several times less efficiently done.
fn sparsity_table(s: &Setup) {
    let n = 64;
    let pixels = &s.pixels[..n * s.net.image_len()];
    let mut base = Activations::default();
    s.net.forward(pixels, n, &mut base);
    let codes = s.net.codes();
    println!(
        "\nShare of each later convolution's input that a candidate changes (positions / \
         codes, %), {n} images, up to 6 distinct candidates per layer's group; 'next' is the \
         first convolution after the group's layer, 'suffix' all later ones weighted by \
         their multiply-accumulates:"
    );
    for (l, job) in s.net.layers.iter().zip(&s.layers) {
        let picked: Vec<&Vec<i8>> = distinct(job).into_iter().take(7).collect();
        let convs: Vec<usize> = (l.node + 1..s.net.nodes.len())
            .filter(|&i| matches!(s.net.nodes[i].op, QOp::Conv(_)))
            .collect();
        if convs.is_empty() || picked.len() < 2 {
            continue;
        }
        // Per later convolution: summed position and code shares over the candidates.
        let mut shares = vec![(0.0, 0.0); convs.len()];
        let mut acts = Activations::default();
        for cand in &picked[1..] {
            let mut c = codes.clone();
            for (&v, &x) in job.vars.iter().zip(cand.iter()) {
                c[v as usize] = x;
            }
            let mut net = s.net.clone();
            net.set_codes(&c).expect("candidate codes are in range");
            net.forward(pixels, n, &mut acts);
            for (share, &i) in shares.iter_mut().zip(&convs) {
                let input = s.net.nodes[i].inputs[0];
                let (a, b) = (&base.values[input], &acts.values[input]);
                let ch = s.net.value(input).c;
                let (mut pos, mut elems) = (0usize, 0usize);
                for (pa, pb) in a.chunks_exact(ch).zip(b.chunks_exact(ch)) {
                    let d = pa.iter().zip(pb).filter(|(x, y)| x != y).count();
                    elems += d;
                    pos += usize::from(d > 0);
                }
                share.0 += pos as f64 / (a.len() / ch) as f64;
                share.1 += elems as f64 / a.len() as f64;
            }
        }
        let runs = (picked.len() - 1) as f64;
        let weights: Vec<f64> = (convs.iter())
            .map(|&i| s.net.conv(i).geom.macs() as f64)
            .collect();
        let total: f64 = weights.iter().sum();
        let (sp, se) = (shares.iter().zip(&weights))
            .fold((0.0, 0.0), |(p, e), (sh, w)| (p + sh.0 * w, e + sh.1 * w));
        println!(
            "  {:<24} ({:>3} groups) next {:5.1} / {:4.1}   suffix {:5.1} / {:4.1}",
            l.name,
            job.groups_in_cycle,
            100.0 * shares[0].0 / runs,
            100.0 * shares[0].1 / runs,
            100.0 * sp / total / runs,
            100.0 * se / total / runs
        );
    }
}

fn main() {
    let Some(shared) = shared() else {
        println!(
            "candidates bench skipped: ../shared (ResNet-20 model and CIFAR-10 JPEG q75 copy) \
             not found next to the project"
        );
        return;
    };
    let s = setup(&shared);
    if std::env::args().any(|a| a == "sparsity") {
        sparsity_table(&s);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    bench_candidates(&mut c, &s);
    c.final_summary();
    // Only under `cargo bench` (which passes --bench), not `cargo test --benches`.
    if std::env::args().any(|a| a == "--bench") {
        delta_table(&s);
        cycle_table(&s);
    }
}
