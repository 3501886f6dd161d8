//! Recovery, with real processes on loopback: workers SIGKILLed and replaced at random
//! moments, and the coordinator SIGKILLed and resumed from its checkpoint, must end with
//! exactly the network and history of the same run undisturbed. Also the refusals that
//! protect a checkpoint: another model, or a new run started over an unfinished one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

mod support;
use support::{
    assert_workers_leave, coordinator, finishes, free_addr, generation, history_without_times,
    read_report, repo, shared_tiny_mnist, spawn_worker, wait_for, Killed,
};

/// 750 generations of 8 candidates over 2 shards, measured every 25 generations and
/// checkpointed every 10: long enough to be interrupted many times.
fn write_config(dir: &Path, name: &str, model: &Path) -> PathBuf {
    write_config_with(dir, name, model, "")
}

/// [`write_config`] with `search` (TOML lines) added to its `[search]` section.
fn write_config_with(dir: &Path, name: &str, model: &Path, search: &str) -> PathBuf {
    let config = dir.join(name);
    std::fs::write(
        &config,
        format!(
            "seed = 5\nout = \"{}\"\n[model]\nonnx = \"{}\"\nmean = [0.13]\nstd = [0.31]\n\
             [data]\nsource = \"mnist:{}\"\nvalidation = 100\n[quant]\nweight_bits = 2\n\
             calib_images = 64\n[eda]\npopulation = 8\ngroup_size = 32\n\
             [search]\nbatch_size = 64\n{search}[budget]\nevaluations = 6000\n\
             [eval]\nevery_generations = 25\nthreads = 1\n\
             [cluster]\nshards = 2\nheartbeat_ms = 100\n\
             [checkpoint]\nevery_generations = 10\nevery_secs = 0\n",
            dir.join("unused").display(),
            model.display(),
            data_dir().display()
        ),
    )
    .unwrap();
    config
}

/// One dataset for every run of this file (results are compared across runs).
fn data_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    shared_tiny_mnist(&DIR, 600, 100)
}

fn fixture_model() -> PathBuf {
    repo().join("common/tests/fixtures/mnist_cnn.onnx")
}

/// What must be identical between runs: the network file, and the report's history and
/// counters without wall-clock times.
#[derive(Debug, PartialEq)]
struct Outcome {
    model: Vec<u8>,
    history: Vec<serde_json::Value>,
    evaluations: u64,
    generations: u64,
    accuracy_final: f64,
    workers_seen: u64,
    resumed_from_generation: Option<u64>,
}

fn outcome(out: &Path) -> Outcome {
    let report = read_report(out);
    let history = history_without_times(&report);
    Outcome {
        model: std::fs::read(out.join("model.ccq")).unwrap(),
        history,
        evaluations: report["evaluations"].as_u64().unwrap(),
        generations: report["generations"].as_u64().unwrap(),
        accuracy_final: report["accuracy"]["final"].as_f64().unwrap(),
        workers_seen: report["workers_seen"].as_u64().unwrap(),
        resumed_from_generation: report["resumed_from_generation"].as_u64(),
    }
}

/// The undisturbed run (two in-process workers), computed once per test binary.
fn reference() -> &'static Outcome {
    static REF: OnceLock<(tempfile::TempDir, Outcome)> = OnceLock::new();
    &REF.get_or_init(|| undisturbed("")).1
}

/// The undisturbed run with the distillation fitness.
fn reference_distill() -> &'static Outcome {
    static REF: OnceLock<(tempfile::TempDir, Outcome)> = OnceLock::new();
    &REF.get_or_init(|| undisturbed(DISTILL)).1
}

/// The undisturbed run with eight generations in flight (`search.window = 8`).
fn reference_windowed() -> &'static Outcome {
    static REF: OnceLock<(tempfile::TempDir, Outcome)> = OnceLock::new();
    &REF.get_or_init(|| undisturbed(WINDOWED)).1
}

/// The undisturbed run going back to its best network whenever a measurement reads below
/// it, with eight generations in flight.
fn reference_rollback() -> &'static (tempfile::TempDir, Outcome) {
    static REF: OnceLock<(tempfile::TempDir, Outcome)> = OnceLock::new();
    REF.get_or_init(|| undisturbed(ROLLBACK))
}

/// The undisturbed run with a block-local phase over the first half of the budget.
fn reference_local() -> &'static Outcome {
    static REF: OnceLock<(tempfile::TempDir, Outcome)> = OnceLock::new();
    &REF.get_or_init(|| undisturbed(LOCAL)).1
}

const WINDOW: usize = 8;
const WINDOWED: &str = "window = 8\n";
const DISTILL: &str = "fitness = \"distill\"\n";
const LOCAL: &str = "local_evaluations = 3000\nlocal_images = 128\n";
const ROLLBACK: &str = "window = 8\nrollback = 0.0\n";

fn undisturbed(search: &str) -> (tempfile::TempDir, Outcome) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "ref.toml", &fixture_model(), search);
    let out = dir.path().join("ref");
    let o = Command::new(coordinator())
        .args(["run", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .args(["--local-workers", "2", "--listen", &free_addr().to_string()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "reference run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !out.join("checkpoint.ccqck").exists(),
        "a finished run leaves no checkpoint to resume"
    );
    for kept in ["teacher.bin", "blocks.bin"] {
        assert!(!out.join(kept).exists(), "a finished run leaves no {kept}");
    }
    let r = outcome(&out);
    assert_eq!(r.evaluations, 6_000);
    (dir, r)
}

fn spawn_coordinator(args: &[&str], config: Option<&Path>, addr: &str) -> Killed {
    let mut c = Command::new(coordinator());
    c.arg("run").args(args).args(["--listen", addr]);
    if let Some(config) = config {
        c.arg("--config").arg(config);
    }
    Killed(
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start coordinator"),
    )
}

#[test]
fn workers_killed_and_restarted_at_random_moments_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "run.toml", &fixture_model());
    kill_workers_at_random_moments(reference(), &config, &dir.path().join("run"));
}

/// The same with a window of generations in flight: jobs of several generations are lost
/// mid-flight, results come back in another order, and the run still ends identical.
#[test]
fn a_windowed_run_with_workers_killed_changes_nothing() {
    let expected = reference_windowed();
    assert_ne!(
        expected.history,
        reference().history,
        "a window searches differently"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "run.toml", &fixture_model(), WINDOWED);
    kill_workers_at_random_moments(expected, &config, &dir.path().join("run"));
}

/// Runs `config` in `out` with three separate workers, SIGKILLs a random one at six
/// random moments and starts a fresh one in its place; the run must end as `expected`.
fn kill_workers_at_random_moments(expected: &Outcome, config: &Path, out: &Path) {
    let addr = free_addr().to_string();
    let mut workers: Vec<Killed> = (0..3).map(|_| spawn_worker(&addr)).collect();
    let mut coord = spawn_coordinator(&["--out", out.to_str().unwrap()], Some(config), &addr);

    // Random moments, drawn from a fixed seed so a failure can be replayed: after these
    // generations, SIGKILL a random worker (jobs it held are lost mid-flight) and start
    // a fresh one in its place.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut moments: Vec<u64> = (0..6).map(|_| 40 + next(460)).collect();
    moments.sort_unstable();
    let mut kills = 0;
    for &m in &moments {
        let reached = wait_for(Duration::from_secs(120), || {
            generation(&addr).is_some_and(|g| g >= m)
        });
        assert!(reached, "the run never reached generation {m}");
        let victim = next(workers.len() as u64) as usize;
        drop(workers.swap_remove(victim)); // SIGKILL
        workers.push(spawn_worker(&addr));
        kills += 1;
    }
    assert_eq!(kills, moments.len());
    assert!(
        finishes(&mut coord, 180),
        "the disturbed run did not finish"
    );
    let got = outcome(out);
    assert_eq!(got.evaluations, expected.evaluations);
    assert_eq!(
        got.history, expected.history,
        "history differs from the undisturbed run"
    );
    assert!(
        got.model == expected.model,
        "the final network differs from the undisturbed run"
    );
    // The replacements really joined (3 at the start, one more per kill; a worker moved
    // to a shard nobody serves registers again, so there can be more).
    assert!(
        got.workers_seen >= 3 + kills as u64,
        "{} registrations for 3 workers and {kills} replacements",
        got.workers_seen
    );
}

/// Starts the run in `out` with two separate workers and SIGKILLs the coordinator once
/// it is past generation 200 with a checkpoint. The workers outlive it: they keep
/// retrying and rejoin a resumed one.
fn start_and_kill_mid_run(config: &Path, out: &str, addr: &str) -> Vec<Killed> {
    let workers: Vec<Killed> = (0..2).map(|_| spawn_worker(addr)).collect();
    let coord = spawn_coordinator(&["--out", out], Some(config), addr);
    let ck = Path::new(out).join("checkpoint.ccqck");
    let mid_run = wait_for(Duration::from_secs(120), || {
        ck.exists() && generation(addr).is_some_and(|g| g >= 200)
    });
    assert!(
        mid_run,
        "the run never got past generation 200 with a checkpoint"
    );
    drop(coord); // SIGKILL, mid-generation
    workers
}

#[test]
fn coordinator_killed_and_resumed_ends_identical() {
    let expected = reference();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "run.toml", &fixture_model());
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap().to_string();
    let addr = free_addr().to_string();
    let workers = start_and_kill_mid_run(&config, &out_s, &addr);
    let ck = out.join("checkpoint.ccqck");
    let saved = std::fs::read(&ck).unwrap();

    // Guards that lose nothing: a new run over the unfinished one is refused...
    let o = Command::new(coordinator())
        .args(["run", "--config"])
        .arg(&config)
        .args(["--out", &out_s, "--listen", &free_addr().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("unfinished run"),
        "{err}"
    );
    // ...and so is resuming with another model.
    let other = write_config(
        dir.path(),
        "other.toml",
        &repo().join("examples/mnist/mnist-cnn.onnx"),
    );
    let o = Command::new(coordinator())
        .args(["run", "--config"])
        .arg(&other)
        .args(["--resume", &out_s, "--listen", &free_addr().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("written for a different model"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&ck).unwrap(),
        saved,
        "the checkpoint is intact"
    );

    // Resume with nothing but the directory: the checkpoint carries the config.
    let got = resume_to_the_end(&out, &addr, workers, expected);
    assert_eq!(got.evaluations, expected.evaluations);
    assert_eq!(got.generations, expected.generations);
    assert_eq!(got.accuracy_final, expected.accuracy_final);
    assert!(!ck.exists(), "the finished run removed its checkpoint");
    // It continued from a checkpoint (not from the start): the kill came after
    // generation 200 and checkpoints are 10 generations apart. (Not necessarily from 190
    // or later: on a loaded machine a due checkpoint is skipped while the previous write
    // is still syncing.)
    let from = got
        .resumed_from_generation
        .expect("the report names the resume point");
    assert!((10..750).contains(&from), "resumed from generation {from}");
}

/// Distillation: the resumed coordinator reads back the teacher logits the run started
/// with (teacher.bin beside the checkpoint) and ends exactly as the undisturbed run.
#[test]
fn a_distillation_run_killed_and_resumed_ends_identical() {
    let expected = reference_distill();
    assert_ne!(
        expected.history,
        reference().history,
        "the distillation fitness searches differently"
    );
    let KilledRun {
        dir: _dir,
        out,
        addr,
        workers,
    } = killed_mid_run(DISTILL);
    let teacher = std::fs::read(out.join("teacher.bin")).expect("teacher logits kept for resume");

    resume_to_the_end(&out, &addr, workers, expected);
    assert!(
        !out.join("teacher.bin").exists(),
        "removed with the checkpoint at the end"
    );
    assert!(teacher.starts_with(b"ccq-teacher 1 "));
}

/// Block-local phase: the resumed coordinator reads back the block targets the run started
/// with (blocks.bin beside the checkpoint; a damaged file is refused, naming it, not
/// silently recomputed) and ends exactly as the undisturbed run.
#[test]
fn a_block_local_run_killed_and_resumed_ends_identical() {
    let expected = reference_local();
    assert_ne!(
        expected.history,
        reference().history,
        "the block-local phase searches differently"
    );
    let KilledRun {
        dir: _dir,
        out,
        addr,
        workers,
    } = killed_mid_run(LOCAL);
    let file = out.join("blocks.bin");
    let blocks = std::fs::read(&file).expect("block targets kept for resume");
    assert!(blocks.starts_with(b"ccq-blocks 1 128 "));

    let mut damaged = blocks.clone();
    *damaged.last_mut().unwrap() ^= 1;
    std::fs::write(&file, &damaged).unwrap();
    let o = Command::new(coordinator())
        .args([
            "run",
            "--resume",
            out.to_str().unwrap(),
            "--listen",
            &free_addr().to_string(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("blocks.bin") && err.contains("corrupted"),
        "{err}"
    );

    std::fs::write(&file, &blocks).unwrap();
    resume_to_the_end(&out, &addr, workers, expected);
    assert!(!file.exists(), "removed with the checkpoint at the end");
}

/// A windowed run: the coordinator is killed with generations in flight, and the resumed
/// one evaluates them again on the networks they were sampled against (rebuilt from the
/// checkpoint's recent changes) and ends exactly as the undisturbed run.
#[test]
fn a_windowed_run_killed_and_resumed_ends_identical() {
    let expected = reference_windowed();
    let KilledRun {
        dir: _dir,
        out,
        addr,
        workers,
    } = killed_mid_run(WINDOWED);
    let ck = ccq_coordinator::checkpoint::Checkpoint::load(&out).unwrap();
    let in_flight = ck.trainer.in_flight.len();
    assert!(
        (2..=WINDOW).contains(&in_flight),
        "taken with generations in flight: {in_flight}"
    );
    assert_eq!(ck.state.in_flight_versions.len(), in_flight);

    resume_to_the_end(&out, &addr, workers, expected);
}

/// `search.rollback`: the search waits at each measured generation for its measurement
/// and may go back to the best network there; the resumed coordinator (killed wherever it
/// was, a measurement it waited for included) ends exactly as the undisturbed run.
#[test]
fn a_rollback_run_killed_and_resumed_ends_identical() {
    let (dir, expected) = reference_rollback();
    let report = read_report(&dir.path().join("ref"));
    let rollbacks = report["rollbacks"].as_u64().unwrap();
    assert!(
        rollbacks > 0,
        "the reference run went back to its best network"
    );
    assert_ne!(expected.history, reference_windowed().history);
    let KilledRun {
        dir: _dir,
        out,
        addr,
        workers,
    } = killed_mid_run(ROLLBACK);
    let got = resume_to_the_end(&out, &addr, workers, expected);
    assert_eq!(
        read_report(&out)["rollbacks"].as_u64(),
        Some(rollbacks),
        "{got:?}"
    );
}

/// A run with `search` in its config (as [`write_config_with`]), its coordinator killed
/// after generation 200 ([`start_and_kill_mid_run`]).
struct KilledRun {
    dir: tempfile::TempDir,
    out: PathBuf,
    addr: String,
    workers: Vec<Killed>,
}

fn killed_mid_run(search: &str) -> KilledRun {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "run.toml", &fixture_model(), search);
    let out = dir.path().join("run");
    let addr = free_addr().to_string();
    let workers = start_and_kill_mid_run(&config, out.to_str().unwrap(), &addr);
    KilledRun {
        dir,
        out,
        addr,
        workers,
    }
}

/// Resumes the run in `out` (its checkpoint carries the config), waits for it to finish
/// and for `workers` to leave, and checks that it ended as `expected`, from a checkpoint.
fn resume_to_the_end(out: &Path, addr: &str, workers: Vec<Killed>, expected: &Outcome) -> Outcome {
    let mut resumed = spawn_coordinator(&["--resume", out.to_str().unwrap()], None, addr);
    assert!(
        finishes(&mut resumed, 180),
        "the resumed run did not finish"
    );
    assert_workers_leave(workers);
    let got = outcome(out);
    assert_eq!(
        got.history, expected.history,
        "history differs from the uninterrupted run"
    );
    assert!(
        got.model == expected.model,
        "the final network differs from the uninterrupted run"
    );
    assert!(got.resumed_from_generation.is_some());
    got
}
