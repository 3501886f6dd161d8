//! Checkpointing a large network: peak memory and time of writing and reading
//! `checkpoint.ccqck` for a synthetic network of ~25 M decision variables (issue 17: "a
//! 25 M-weight network must checkpoint with peak memory ≤ 1.5× its steady state and in
//! ≤ 10 s").
//!
//! ```text
//! cargo bench -p ccq-coordinator --bench checkpoint [-- --variables N] [--dir DIR]
//! ```
//!
//! The process holds what the coordinator's event loop holds for the search: the trainer
//! (the network with its packed kernel weights, the context codes, the EDA state, a
//! cycle's group queue, a few generations in) and the best network's codes. Its resident
//! set then is the steady state. Peak resident set (VmHWM, reset through
//! `/proc/self/clear_refs` before each phase) is measured for:
//! * write, quiet: snapshot + encode + write + fsync + rename, nothing else running;
//! * write, loop running: the same with the write on its own thread (as the coordinator's
//!   `spawn_blocking`) while this thread keeps completing generations, as the event loop
//!   does, so that whatever the snapshot shares with the live state is changed under it;
//! * read: load + decode + restore of the trainer, from a process holding the rebuilt
//!   network (as `--resume` does).
//!
//! It also times the whole-network sync message (`QNetwork::to_bytes`) and prints its size.
//!
//! Figures are printed as a table; Linux only (VmRSS/VmHWM).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ccq_common::model::{Graph, Linear, Node, Normalization, Op, Shape};
use ccq_common::qnet::{EvalStats, QNetwork};
use ccq_common::quant::{quantize, QuantConfig};
use ccq_coordinator::checkpoint::{self, Checkpoint};
use ccq_coordinator::checkpoint::{LoopSnapshot, Phase};
use ccq_coordinator::config::RunConfig;
use ccq_coordinator::history::EvalPoint;
use ccq_search::trainer::Trainer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[path = "../src/bench/host.rs"]
mod host;
use host::{cpu_model, loadavg, proc_status_bytes, trim_heap};

const SEARCH_LEN: usize = 10_000;

fn main() {
    let mut variables = 25_000_000usize;
    let mut dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    // `cargo bench` passes `--bench`; anything else unknown is ignored the same way.
    while let Some(a) = args.next() {
        match a.as_str() {
            "--variables" => {
                variables = args
                    .next()
                    .and_then(|v| v.replace('_', "").parse().ok())
                    .expect("--variables N")
            }
            "--dir" => dir = args.next().map(PathBuf::from),
            _ => {}
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("ccq-checkpoint-bench")
        .tempdir_in(dir.unwrap_or_else(std::env::temp_dir))
        .expect("a temporary directory for the checkpoint");
    run(variables, tmp.path());
}

fn run(variables: usize, dir: &Path) {
    println!(
        "checkpoint bench: {} | {} cores | load {}",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let rss_empty = proc_status_bytes("VmRSS:").unwrap_or(0);
    let t = Instant::now();
    let net = synthetic_network(variables);
    trim_heap();
    println!(
        "network: {} variables in {} layers, built in {:.1} s",
        net.num_vars(),
        net.layers.len(),
        t.elapsed().as_secs_f64()
    );

    // The steady state: the trainer a few generations into its first cycle, the best
    // network's codes.
    let cfg = config();
    let mut trainer = Trainer::new(
        net,
        cfg.eda.clone(),
        cfg.search.clone(),
        cfg.seed,
        SEARCH_LEN,
    )
    .expect("trainer");
    for _ in 0..4 {
        generation(&mut trainer);
    }
    let best = trainer.network().codes();
    trim_heap();
    let steady = proc_status_bytes("VmRSS:").unwrap_or(0);
    reset_peak();
    for _ in 0..4 {
        generation(&mut trainer);
    }
    let steady_peak = proc_status_bytes("VmHWM:").unwrap_or(0);
    println!(
        "steady state: {} resident ({:.1} B/variable above the empty process), {} peak over 4 generations",
        mb(steady),
        steady.saturating_sub(rss_empty) as f64 / variables as f64,
        mb(steady_peak)
    );

    // Write, nothing else running.
    reset_peak();
    let t = Instant::now();
    let ck = checkpoint_of(&trainer, &best, &cfg);
    let snapshot_s = t.elapsed().as_secs_f64();
    checkpoint::write_atomic(dir, &ck.encode()).expect("checkpoint written");
    drop(ck);
    let write_s = t.elapsed().as_secs_f64();
    let write_peak = proc_status_bytes("VmHWM:").unwrap_or(0);
    let size = std::fs::metadata(checkpoint::path(dir)).map_or(0, |m| m.len());
    trim_heap();

    // Write on its own thread while generations go on, as in the coordinator.
    reset_peak();
    let t = Instant::now();
    let ck = checkpoint_of(&trainer, &best, &cfg);
    let owned_dir = dir.to_path_buf();
    let writer = std::thread::spawn(move || {
        checkpoint::write_atomic(&owned_dir, &ck.encode()).expect("checkpoint written")
    });
    let mut during = 0;
    while !writer.is_finished() {
        generation(&mut trainer);
        during += 1;
    }
    writer.join().expect("writer thread");
    let concurrent_s = t.elapsed().as_secs_f64();
    let concurrent_peak = proc_status_bytes("VmHWM:").unwrap_or(0);
    trim_heap();

    // Read: a resumed coordinator holds the rebuilt network, loads, restores.
    let net = trainer.network().clone();
    drop(trainer);
    drop(best);
    trim_heap();
    let before_read = proc_status_bytes("VmRSS:").unwrap_or(0);
    reset_peak();
    let t = Instant::now();
    let ck = Checkpoint::load(dir).expect("checkpoint read back");
    let decode_s = t.elapsed().as_secs_f64();
    let trainer = Trainer::restore(
        net,
        cfg.search.clone(),
        cfg.seed,
        SEARCH_LEN,
        ck.trainer,
        "bench",
    )
    .expect("trainer restored");
    let state = ck.state;
    let read_s = t.elapsed().as_secs_f64();
    let read_peak = proc_status_bytes("VmHWM:").unwrap_or(0);
    let best_len = state.best.as_ref().map(|(c, _)| c.len());
    assert_eq!(
        best_len,
        Some(trainer.network().num_vars()),
        "read back whole"
    );

    // The whole-network message a new worker receives (SyncNetworkResponse.full).
    let t = Instant::now();
    let sync = trainer.network().to_bytes();
    let sync_encode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let synced = QNetwork::from_bytes(&sync, "sync").expect("sync form read back");
    let sync_decode_s = t.elapsed().as_secs_f64();
    assert_eq!(synced.num_vars(), trainer.network().num_vars());
    drop(synced);

    let ratio = |peak: u64| peak as f64 / steady as f64;
    println!();
    println!("| phase | seconds | peak resident | peak / steady |");
    println!("|---|---|---|---|");
    println!(
        "| steady state (trainer + best codes) | — | {} | 1.00 (generations alone: {:.2}) |",
        mb(steady),
        ratio(steady_peak)
    );
    println!(
        "| write, quiet: snapshot {snapshot_s:.2} s + encode/write/fsync/rename | {write_s:.2} | {} | {:.2} |",
        mb(write_peak),
        ratio(write_peak)
    );
    println!(
        "| write on a thread, {during} generations completed meanwhile | {concurrent_s:.2} | {} | {:.2} |",
        mb(concurrent_peak),
        ratio(concurrent_peak)
    );
    println!(
        "| read: load + CRC + decode {decode_s:.2} s, + restore | {read_s:.2} | {} | {:.2} (from {} with the network) |",
        mb(read_peak),
        ratio(read_peak),
        mb(before_read)
    );
    println!(
        "\ncheckpoint file: {} ({:.2} B/variable)",
        mb(size),
        size as f64 / variables as f64
    );
    println!(
        "whole-network sync message: {} ({:.2} B/variable), encoded in {sync_encode_s:.2} s, decoded and repacked in {sync_decode_s:.2} s",
        mb(sync.len() as u64),
        sync.len() as f64 / variables as f64
    );
}

/// What the event loop's `checkpoint()` builds: the trainer's snapshot and the loop's.
fn checkpoint_of(trainer: &Trainer, best: &[i8], cfg: &RunConfig) -> Checkpoint {
    let point = EvalPoint {
        generation: trainer.progress().generations,
        evaluations: trainer.progress().evaluations,
        wall_seconds: 1.0,
        best_fitness: Some(2.0),
        train_top1: Some(10.0),
        val_top1: 10.0,
        val_loss: 2.3,
        test_top1: 10.0,
        network_version: 1,
        is_final: false,
    };
    Checkpoint {
        network_fingerprint: "0".repeat(16),
        run_id: "bench".into(),
        config: cfg.clone(),
        search_len: SEARCH_LEN,
        float_top1: 10.0,
        search_seconds: 1.0,
        trainer: trainer.snapshot(),
        state: LoopSnapshot {
            phase: Phase::Training,
            in_flight_versions: Vec::new(),
            recent_changes: Vec::new(),
            pending_evals: Vec::new(),
            history: vec![point.clone()],
            best: Some((best.to_vec(), point)),
            network_version: 1,
            last_best_loss: Some(2.0),
            last_train_top1: Some(10.0),
            last_train_secs: Some(0.1),
            stop_reason: None,
            ptq_top1: Some(10.0),
            workers_seen: 1,
        },
    }
}

/// One generation with made-up fitness (no evaluation: the bench is about the state).
fn generation(trainer: &mut Trainer) {
    let Some(g) = trainer.next_generation().expect("generation") else {
        return;
    };
    let stats: Vec<EvalStats> = (0..g.candidates.len())
        .map(|i| EvalStats {
            loss_fixed: 1_000_000 - (i as u64 * 7919) % 1000,
            correct: 3,
            images: g.images.len() as u64,
            paired_sq: 0,
        })
        .collect();
    trainer.complete(&g, &stats).expect("complete");
}

fn config() -> RunConfig {
    toml::from_str(
        "[model]\nonnx = \"synthetic.onnx\"\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n\
         [data]\nsource = \"cifar10:none\"\n[budget]\nevaluations = 1000000\n",
    )
    .expect("bench config")
}

/// A three-layer perceptron on 3x32x32 inputs with about `v` weights (seeded random),
/// quantized W4A8: two big hidden layers and the logits layer.
fn synthetic_network(v: usize) -> QNetwork {
    let input = Shape::new(3, 32, 32);
    let classes = 10;
    let inp = input.len();
    // Two hidden layers of equal width h: inp*h + h*h + h*classes = v.
    let b = (inp + classes) as f64;
    let hidden = (((b * b + 4.0 * v as f64).sqrt() - b) / 2.0).max(1.0) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut linear = |i: usize, o: usize| {
        let bound = (1.0 / i as f32).sqrt();
        Linear {
            out_features: o,
            in_features: i,
            weight: (0..i * o)
                .map(|_| rng.random_range(-bound..bound))
                .collect(),
            bias: vec![0.0; o],
        }
    };
    let (l1, l2, l3) = (
        linear(inp, hidden),
        linear(hidden, hidden),
        linear(hidden, classes),
    );
    let node = |name: &str, op: Op, input: usize, shape: Shape| Node {
        name: name.into(),
        op,
        inputs: vec![input],
        shape,
    };
    let graph = Graph {
        input_name: "input".into(),
        input_shape: input,
        nodes: vec![
            node("flatten", Op::Flatten, 0, Shape::new(inp, 1, 1)),
            node("fc1", Op::Linear(l1), 1, Shape::new(hidden, 1, 1)),
            node("relu1", Op::Relu, 2, Shape::new(hidden, 1, 1)),
            node("fc2", Op::Linear(l2), 3, Shape::new(hidden, 1, 1)),
            node("relu2", Op::Relu, 4, Shape::new(hidden, 1, 1)),
            node("fc3", Op::Linear(l3), 5, Shape::new(classes, 1, 1)),
        ],
        output: 6,
    };
    let n = 4;
    let pixels: Vec<u8> = (0..n * inp).map(|_| rng.random()).collect();
    let q = QuantConfig::new(4, 8);
    quantize(&graph, &Normalization::identity(3), &pixels, n, &q).expect("synthetic network")
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

/// Resets VmHWM to the current resident set (Linux >= 4.0), so each phase's peak is its own.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
