//! Bad input, with the real binaries: every wrong file, setting or request named in the
//! reliability issue gets its own specific error (naming the file, field, node or shard
//! at fault), a non-zero exit, and damages nothing — a failed `coordinator run` leaves
//! its output directory exactly as it found it, and a refused worker leaves the run it
//! knocked on unaffected. Also SIGTERM: the run stops cleanly, writes its outputs and a
//! checkpoint, and `--resume` finishes it with the same network as an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use ccq_common::onnx::proto::ModelProto;
use prost::Message;

mod support;
use support::{
    assert_workers_leave, coordinator, free_addr, generation, history_without_times, read_report,
    repo, shared_tiny_mnist, status, wait_for, worker, write_tiny_mnist, Killed,
};

/// One small dataset for every test that does not damage it.
fn data_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    shared_tiny_mnist(&DIR, 300, 50)
}

fn fixture(name: &str) -> PathBuf {
    repo().join("common/tests/fixtures").join(name)
}

/// A small valid run: 2 shards, 8 candidates per generation, 800 evaluations. Tests
/// make it bad by replacing one exact line of it.
fn config_text(model: &Path, data: &Path, out: &Path) -> String {
    format!(
        "seed = 7\n\
         out = \"{}\"\n\
         [model]\n\
         onnx = \"{}\"\n\
         mean = [0.13]\n\
         std = [0.31]\n\
         [data]\n\
         source = \"mnist:{}\"\n\
         validation = 50\n\
         [quant]\n\
         weight_bits = 2\n\
         calib_images = 64\n\
         [eda]\n\
         population = 8\n\
         group_size = 32\n\
         [search]\n\
         batch_size = 32\n\
         [budget]\n\
         evaluations = 800\n\
         [eval]\n\
         every_generations = 25\n\
         threads = 1\n\
         [cluster]\n\
         shards = 2\n\
         heartbeat_ms = 100\n\
         [checkpoint]\n\
         every_generations = 5\n\
         every_secs = 0\n",
        out.display(),
        model.display(),
        data.display()
    )
}

/// Writes `text` as `dir/run.toml`, with the line `edit.0` replaced by `edit.1` (the
/// line must be there).
fn write_config(dir: &Path, text: &str, edit: Option<(&str, &str)>) -> PathBuf {
    let edited = match edit {
        None => text.to_string(),
        Some((line, with)) => {
            assert!(
                text.lines().any(|l| l == line),
                "the base config has no line {line:?}"
            );
            text.lines()
                .map(|l| if l == line { with } else { l })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        }
    };
    let path = dir.join("run.toml");
    std::fs::write(&path, edited).unwrap();
    path
}

/// The output directory of an earlier, finished run: a failed run must leave it as is.
fn previous_outputs(out: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("model.ccq"), b"the previous run's network").unwrap();
    std::fs::write(out.join("report.json"), b"{\"previous\": true}").unwrap();
    snapshot(out)
}

/// Every file under `dir` (one level) with its bytes; empty if `dir` does not exist.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// What a finished process left: its exit status and stderr.
struct Exited {
    success: bool,
    stderr: String,
}

/// Runs `cmd` to its end (killed after `secs`), stderr captured to a file so that a
/// chatty process can never block on a full pipe.
fn run_to_end(mut cmd: Command, secs: u64) -> Exited {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Killed(
        cmd.stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start process"),
    );
    let ended = wait_for(Duration::from_secs(secs), || {
        child.0.try_wait().unwrap().is_some()
    });
    assert!(ended, "{cmd:?} still running after {secs} s");
    let status = child.0.wait().unwrap();
    Exited {
        success: status.success(),
        stderr: std::fs::read_to_string(log.path()).unwrap(),
    }
}

/// `coordinator run ARGS` on a free loopback port.
fn coordinator_run(args: &[&str]) -> Command {
    coordinator_run_on(args, &free_addr().to_string())
}

fn coordinator_run_on(args: &[&str], addr: &str) -> Command {
    let mut c = Command::new(coordinator());
    c.arg("run").args(args).args(["--listen", addr]);
    c
}

/// `coordinator run --config CONFIG` must fail, leave `out` as `before`, and say all of
/// `expected` on stderr. Returns stderr.
fn run_refused(config: &Path, out: &Path, before: &BTreeMap<PathBuf, Vec<u8>>) -> String {
    let e = run_to_end(coordinator_run(&["--config", config.to_str().unwrap()]), 60);
    assert!(!e.success, "the run succeeded: {}", e.stderr);
    assert!(
        e.stderr.contains("error: "),
        "no error line on stderr: {}",
        e.stderr
    );
    assert!(
        snapshot(out) == *before,
        "the failed run changed its output directory: now {:?}",
        snapshot(out).keys().collect::<Vec<_>>()
    );
    e.stderr
}

/// A run of `config_text` over `model` and `data` (with `edit`, see `write_config`) in
/// a directory holding an earlier run's outputs is refused; returns stderr and the
/// config file.
fn refused(dir: &Path, model: &Path, data: &Path, edit: Option<(&str, &str)>) -> (String, PathBuf) {
    let out = dir.join("out");
    let before = previous_outputs(&out);
    let config = write_config(dir, &config_text(model, data, &out), edit);
    let err = run_refused(&config, &out, &before);
    (err, config)
}

fn assert_says(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "stderr lacks {p:?}:\n{err}");
    }
}

// ---- models ----------------------------------------------------------------------------

#[test]
fn random_bytes_as_the_model_are_not_a_valid_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("noise.onnx");
    let mut x = 0x853c_49e6_748f_ea9bu64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(&model, noise).unwrap();
    let (err, _) = refused(dir.path(), &model, data_dir(), None);
    assert_says(
        &err,
        &[&format!("{}: not a valid ONNX model", model.display())],
    );
}

#[test]
fn truncated_onnx_model_is_not_a_valid_onnx_model() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("mnist_cnn.onnx")).unwrap();
    let model = dir.path().join("half.onnx");
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let (err, _) = refused(dir.path(), &model, data_dir(), None);
    assert_says(
        &err,
        &[&format!("{}: not a valid ONNX model", model.display())],
    );
}

#[test]
fn onnx_model_with_an_unsupported_op_names_the_node_and_op() {
    let dir = tempfile::tempdir().unwrap();
    let mut m =
        ModelProto::decode(std::fs::read(fixture("mnist_cnn.onnx")).unwrap().as_slice()).unwrap();
    // A Relu turned into an Elu: a valid ONNX model that ccq cannot import.
    let node = m
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.op_type == "Relu")
        .expect("the fixture has a Relu");
    node.op_type = "Elu".into();
    let name = node.name.clone();
    assert!(!name.is_empty(), "the fixture's nodes are named");
    let model = dir.path().join("elu.onnx");
    std::fs::write(&model, m.encode_to_vec()).unwrap();
    let (err, _) = refused(dir.path(), &model, data_dir(), None);
    assert_says(&err, &[&format!("node '{name}' (op Elu)")]);
}

#[test]
fn three_channel_model_on_mnist_is_a_shape_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (err, _) = refused(dir.path(), &fixture("tiny_resnet.onnx"), data_dir(), None);
    // The model's 3-channel input against the data's [1, 28, 28], and which data.
    assert_says(
        &err,
        &[
            "shape mismatch: model input expects [3, ",
            "data has [1, 28, 28]",
            &format!("mnist:{}", data_dir().display()),
        ],
    );
}

// ---- data ------------------------------------------------------------------------------

#[test]
fn dataset_file_truncated_mid_record_names_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_tiny_mnist(&data, 300, 50);
    // Cut the training images in the middle of image 200 (16-byte header, 784 per image).
    let images = data.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&images).unwrap();
    let cut = 16 + 200 * 784 + 392;
    std::fs::write(&images, &bytes[..cut]).unwrap();
    let (err, _) = refused(dir.path(), &fixture("mnist_cnn.onnx"), &data, None);
    assert_says(&err, &[&format!("{} at byte {cut}", images.display())]);
    // The damaged dataset itself is left as it was.
    assert_eq!(std::fs::read(&images).unwrap().len(), cut);
}

// ---- workers ---------------------------------------------------------------------------

fn worker_cmd(addr: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(worker());
    c.args(["--coordinator", &format!("http://{addr}")])
        .args(["--give-up-after", "30"])
        .args(extra);
    c
}

#[test]
fn worker_asking_for_a_shard_out_of_range_is_refused_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let config = write_config(
        dir.path(),
        &config_text(&fixture("mnist_cnn.onnx"), data_dir(), &out),
        None,
    );
    let addr = free_addr().to_string();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut coord = Killed(
        coordinator_run_on(&["--config", config.to_str().unwrap()], &addr)
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start coordinator"),
    );
    // Workers wait out the coordinator's setup (it answers "retry"), so the refusal comes
    // from the running event loop.
    assert!(
        wait_for(Duration::from_secs(60), || status(&addr)
            .is_some_and(|v| v["phase"] == "training")),
        "the coordinator never started training"
    );

    // Shard 2 of a run with shards 0 and 1: the coordinator refuses it by name.
    let e = run_to_end(worker_cmd(&addr, &["--shard", "2/3"]), 60);
    assert!(!e.success, "the worker was accepted: {}", e.stderr);
    assert_says(
        &e.stderr,
        &[
            "coordinator refused registration",
            "shard 2/3",
            "this run has 2 shard(s)",
        ],
    );
    // 5/2 is no shard at all: the worker refuses it before connecting.
    let e = run_to_end(worker_cmd(&addr, &["--shard", "5/2"]), 60);
    assert!(!e.success, "the worker was accepted: {}", e.stderr);
    assert_says(&e.stderr, &["invalid shard 5/2"]);
    // Neither holds a place in the run.
    let v = status(&addr).expect("the coordinator still serves");
    assert_eq!(v["phase"], "training", "{v}");
    assert_eq!(v["workers"].as_array().map(Vec::len), Some(0), "{v}");

    // A worker whose --data reads the same directory in another format would compute
    // fitness on other pixels: it stops before taking a job, naming both sources.
    let other = format!("folder:{}", data_dir().display());
    let e = run_to_end(worker_cmd(&addr, &["--data", &other]), 60);
    assert!(!e.success, "the worker ran: {}", e.stderr);
    assert_says(
        &e.stderr,
        &[
            &other,
            "the coordinator reads mnist:",
            "not another format or other options",
        ],
    );
    // It registered before it could compare; the coordinator drops it when its
    // heartbeats stop.
    assert!(
        wait_for(Duration::from_secs(30), || status(&addr).is_some_and(|v| v
            ["workers"]
            .as_array()
            .map(Vec::len)
            == Some(0))),
        "the stopped worker was never dropped"
    );

    // The run is unaffected: two ordinary workers finish it...
    let workers: Vec<Killed> = (0..2)
        .map(|_| {
            Killed(
                worker_cmd(&addr, &[])
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start worker"),
            )
        })
        .collect();
    let ended = wait_for(Duration::from_secs(120), || {
        coord.0.try_wait().unwrap().is_some()
    });
    assert!(ended, "the run did not finish");
    assert!(
        coord.0.wait().unwrap().success(),
        "the coordinator failed: {}",
        std::fs::read_to_string(log.path()).unwrap()
    );
    assert_workers_leave(workers);
    let report = read_report(&out);
    assert_eq!(report["evaluations"], 800);
    assert_eq!(report["stop_reason"], "evaluation budget (800) spent");
    // ...with exactly the network and history of the same run that no stray worker
    // ever knocked on.
    let clean_out = dir.path().join("clean");
    let e = run_to_end(
        coordinator_run(&[
            "--config",
            config.to_str().unwrap(),
            "--out",
            clean_out.to_str().unwrap(),
            "--local-workers",
            "2",
        ]),
        120,
    );
    assert!(e.success, "the clean run failed: {}", e.stderr);
    assert_same_run(&out, &clean_out);
}

/// Two runs of one config ended with the same network and history.
fn assert_same_run(a: &Path, b: &Path) {
    assert!(
        std::fs::read(a.join("model.ccq")).unwrap() == std::fs::read(b.join("model.ccq")).unwrap(),
        "the networks of {a:?} and {b:?} differ"
    );
    let (ra, rb) = (read_report(a), read_report(b));
    assert_eq!(
        history_without_times(&ra),
        history_without_times(&rb),
        "histories differ"
    );
    assert_eq!(ra["evaluations"], rb["evaluations"]);
    assert_eq!(ra["accuracy"]["final"], rb["accuracy"]["final"]);
}

// ---- configs ---------------------------------------------------------------------------

/// A config whose one line is replaced is refused, naming the config file and `field`.
fn config_refused(line: &str, with: &str, field: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (err, config) = refused(
        dir.path(),
        &fixture("mnist_cnn.onnx"),
        data_dir(),
        Some((line, with)),
    );
    assert_says(&err, &[&config.display().to_string(), field]);
    err
}

#[test]
fn config_weight_bits_0_is_refused_naming_the_field() {
    let err = config_refused(
        "weight_bits = 2",
        "weight_bits = 0",
        "quant.weight_bits = 0",
    );
    assert_says(&err, &["2..=8"]);
}

#[test]
fn config_weight_bits_9_is_refused_naming_the_field() {
    let err = config_refused(
        "weight_bits = 2",
        "weight_bits = 9",
        "quant.weight_bits = 9",
    );
    assert_says(&err, &["2..=8"]);
}

#[test]
fn config_population_1_is_refused_naming_the_field() {
    let err = config_refused("population = 8", "population = 1", "eda.population = 1");
    assert_says(&err, &["at least 2"]);
}

#[test]
fn config_group_size_0_is_refused_naming_the_field() {
    let err = config_refused("group_size = 32", "group_size = 0", "eda.group_size = 0");
    assert_says(&err, &["at least 1"]);
}

#[test]
fn config_with_an_unknown_field_names_the_file_and_field() {
    // A typo: `populaton` would otherwise silently leave the default population.
    let err = config_refused("population = 8", "populaton = 8", "populaton");
    assert_says(&err, &["unknown field"]);
}

#[test]
fn config_with_a_wrong_type_names_the_file_and_field() {
    let err = config_refused("evaluations = 800", "evaluations = \"800\"", "evaluations");
    assert_says(&err, &["invalid type"]);
}

// ---- checkpoints and SIGTERM -----------------------------------------------------------

#[test]
fn resume_of_a_directory_without_a_checkpoint_says_nothing_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let before = previous_outputs(&out);
    let e = run_to_end(coordinator_run(&["--resume", out.to_str().unwrap()]), 60);
    assert!(!e.success, "{}", e.stderr);
    assert_says(
        &e.stderr,
        &[
            &out.join("checkpoint.ccqck").display().to_string(),
            "nothing to resume",
        ],
    );
    assert!(snapshot(&out) == before, "the directory was changed");
}

/// The config of the SIGTERM tests: 3000 generations of 8 candidates, checkpointed
/// every 5, and no variable frozen before its probability is exactly 1 (so the search
/// does not converge early). A generation of this tiny run takes about a millisecond:
/// generation 50 is early, the run is far from done when SIGTERM arrives, and the
/// whole run still takes only a few seconds.
const LONG_EVALUATIONS: u64 = 24_000;
fn long_config(dir: &Path, out: &Path) -> PathBuf {
    let text = config_text(&fixture("mnist_cnn.onnx"), data_dir(), out)
        .replace("[eda]\n", "[eda]\nfreeze_threshold = 1.0\n");
    write_config(
        dir,
        &text,
        Some((
            "evaluations = 800",
            &format!("evaluations = {LONG_EVALUATIONS}"),
        )),
    )
}

fn kill_term(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM {pid} failed");
}

/// Starts the long run with two local workers, sends SIGTERM once it passed generation
/// 50 and returns the directory it stopped in, after checking how it stopped: exit 0,
/// model.ccq and report.json written with stop reason "interrupted", and a checkpoint.
fn interrupted_run(dir: &Path) -> PathBuf {
    let out = dir.join("out");
    let config = long_config(dir, &out);
    let addr = free_addr().to_string();
    let log = dir.join("interrupted.log");
    let mut coord = Killed(
        coordinator_run_on(
            &["--config", config.to_str().unwrap(), "--local-workers", "2"],
            &addr,
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start coordinator"),
    );
    let mid_run = wait_for(Duration::from_secs(120), || {
        generation(&addr).is_some_and(|g| g >= 50)
    });
    assert!(mid_run, "the run never reached generation 50");
    kill_term(coord.0.id());
    let ended = wait_for(Duration::from_secs(60), || {
        coord.0.try_wait().unwrap().is_some()
    });
    assert!(ended, "the coordinator ignored SIGTERM");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(coord.0.wait().unwrap().success(), "{log}");
    let report = read_report(&out);
    assert_eq!(report["stop_reason"], "interrupted", "{report}");
    let generations = report["generations"].as_u64().unwrap();
    assert!(
        generations >= 50 && generations * 8 < LONG_EVALUATIONS,
        "stopped after {generations} generations"
    );
    assert!(out.join("model.ccq").exists());
    assert!(
        out.join("checkpoint.ccqck").exists(),
        "SIGTERM left no checkpoint"
    );
    assert_says(&log, &["--resume"]);
    out
}

#[test]
fn corrupted_checkpoint_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let out = interrupted_run(dir.path());
    let ck = out.join("checkpoint.ccqck");
    let mut bytes = std::fs::read(&ck).unwrap();
    // One bit flipped in the middle of the body (the header line is the first ~60 bytes).
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x04;
    std::fs::write(&ck, &bytes).unwrap();
    let before = snapshot(&out);

    let e = run_to_end(coordinator_run(&["--resume", out.to_str().unwrap()]), 60);
    assert!(!e.success, "{}", e.stderr);
    assert_says(
        &e.stderr,
        &[&ck.display().to_string(), "corrupted: checksum"],
    );
    // Nothing was half-loaded or rewritten: the checkpoint, the interrupted run's outputs
    // and everything else in the directory are byte for byte as they were.
    assert!(
        snapshot(&out) == before,
        "the refused resume changed {out:?}"
    );
}

#[test]
fn sigterm_stops_cleanly_and_resume_ends_identical_to_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = interrupted_run(dir.path());
    let interrupted_at = read_report(&out)["generations"].as_u64().unwrap();

    let e = run_to_end(
        coordinator_run(&["--resume", out.to_str().unwrap(), "--local-workers", "2"]),
        180,
    );
    assert!(e.success, "the resumed run failed: {}", e.stderr);
    let resumed = read_report(&out);
    assert_eq!(
        resumed["stop_reason"],
        format!("evaluation budget ({LONG_EVALUATIONS}) spent")
    );
    assert_eq!(resumed["evaluations"], LONG_EVALUATIONS);
    // From the checkpoint SIGTERM wrote as it stopped, not an earlier periodic one.
    assert_eq!(resumed["resumed_from_generation"], interrupted_at);
    assert!(
        !out.join("checkpoint.ccqck").exists(),
        "the finished run removed its checkpoint"
    );

    // The same config run without interruption.
    let ref_dir = dir.path().join("reference");
    std::fs::create_dir(&ref_dir).unwrap();
    let ref_out = ref_dir.join("out");
    let config = long_config(&ref_dir, &ref_out);
    let e = run_to_end(
        coordinator_run(&["--config", config.to_str().unwrap(), "--local-workers", "2"]),
        180,
    );
    assert!(e.success, "the uninterrupted run failed: {}", e.stderr);
    assert_same_run(&out, &ref_out);
}

/// Resumed as the README shows but without `--local-workers` (local workers are a process
/// flag, not part of the checkpoint), the run has work and nobody to do it. It must say so
/// within a few seconds, in its log and in `coordinator status`, and say how to fix it —
/// not log "0.0/s" forever.
#[test]
fn resume_without_workers_says_it_is_waiting_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = interrupted_run(dir.path());
    let addr = free_addr().to_string();
    let log = dir.path().join("resumed.log");
    let _coord = Killed(
        coordinator_run_on(&["--resume", out.to_str().unwrap()], &addr)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start coordinator"),
    );
    let said = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("no worker is connected"))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(said, "no waiting message in the log:\n{text}");
    assert_says(&text, &["worker --coordinator", "--local-workers"]);
    let status = status(&addr).expect("status answers");
    let waiting = status["waiting_for_workers"].as_str().unwrap();
    assert!(waiting.contains("no worker is connected"), "{status}");
    assert_eq!(status["phase"], "training");
}
