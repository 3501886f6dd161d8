//! Helpers shared by the coordinator's process-level tests.
#![allow(dead_code)] // each test file uses a subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

pub fn coordinator() -> &'static str {
    env!("CARGO_BIN_EXE_coordinator")
}

/// The worker binary sits beside the coordinator's (both are built by `cargo test`).
pub fn worker() -> PathBuf {
    Path::new(coordinator()).with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX))
}

/// A child process that is SIGKILLed and reaped when dropped (a failing test leaves
/// nothing running).
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `worker` process dialing the coordinator at `addr`, its log discarded.
pub fn spawn_worker(addr: &str) -> Killed {
    Killed(
        std::process::Command::new(worker())
            .args(["--coordinator", &format!("http://{addr}")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start worker"),
    )
}

/// `coordinator status --json` of the run at `addr` (None while unreachable).
pub fn status(addr: &str) -> Option<serde_json::Value> {
    let o = std::process::Command::new(coordinator())
        .args(["status", "--json", "--addr", addr])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// The live generation count while the run at `addr` is training.
pub fn generation(addr: &str) -> Option<u64> {
    let v = status(addr)?;
    (v["phase"] == "training")
        .then(|| v["generation"].as_u64())
        .flatten()
}

/// Waits up to `secs` for the process to end; true if it ended successfully.
pub fn finishes(c: &mut Killed, secs: u64) -> bool {
    wait_for(Duration::from_secs(secs), || {
        c.0.try_wait().unwrap().is_some()
    }) && c.0.wait().unwrap().success()
}

/// Every worker leaves by itself, with exit code 0, once the run is done.
pub fn assert_workers_leave(workers: impl IntoIterator<Item = Killed>) {
    for mut w in workers {
        assert!(
            finishes(&mut w, 20),
            "a worker did not exit successfully after the run"
        );
    }
}

/// Polls `f` until it holds or `timeout` passes; true if it held.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// MNIST-format IDX files of random sparse digits and random labels.
pub fn write_tiny_mnist(dir: &Path, train: u32, test: u32) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) as u32
    };
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut images: Vec<u8> = [2051u32, n, 28, 28]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let mut labels: Vec<u8> = [2049u32, n].iter().flat_map(|v| v.to_be_bytes()).collect();
        for _ in 0..n {
            images.extend((0..784).map(|_| if rand() % 5 == 0 { rand() as u8 } else { 0 }));
            labels.push((rand() % 10) as u8);
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
    }
}

/// A tiny MNIST dataset written once into `cell` and shared by every test of a file that
/// compares runs on it (or does not damage it).
pub fn shared_tiny_mnist(
    cell: &'static std::sync::OnceLock<tempfile::TempDir>,
    train: u32,
    test: u32,
) -> &'static Path {
    cell.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        write_tiny_mnist(d.path(), train, test);
        d
    })
    .path()
}

/// A run's report.json.
pub fn read_report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

/// The report's history without wall-clock times: what must match between runs of the
/// same config and seed.
pub fn history_without_times(report: &serde_json::Value) -> Vec<serde_json::Value> {
    report["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let mut h = h.clone();
            h.as_object_mut().unwrap().remove("wall_seconds");
            h
        })
        .collect()
}

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
