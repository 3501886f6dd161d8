//! Test support: tiny generated datasets, run configs, and [`spawn_cluster`], which starts
//! a real coordinator and real workers talking gRPC on a loopback port chosen by the OS.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ccq_coordinator::config::RunConfig;
use ccq_coordinator::run::{RunOptions, RunReport};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// The small random-weight MNIST-shaped CNN fixture (Conv+bias, Relu, MaxPool, Reshape, Gemm).
pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../common/tests/fixtures/mnist_cnn.onnx")
}

/// Writes an MNIST-format dataset (raw IDX) of `train` + `test` random 28x28 digits with
/// random labels into `dir`. Learning is not the point: exact, reproducible fitness is.
pub fn write_tiny_mnist(dir: &Path, train: usize, test: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut images = Vec::new();
        images.extend_from_slice(&2051u32.to_be_bytes());
        images.extend_from_slice(&(n as u32).to_be_bytes());
        images.extend_from_slice(&28u32.to_be_bytes());
        images.extend_from_slice(&28u32.to_be_bytes());
        let mut labels = Vec::new();
        labels.extend_from_slice(&2049u32.to_be_bytes());
        labels.extend_from_slice(&(n as u32).to_be_bytes());
        for _ in 0..n {
            // Sparse bright strokes on black, like digits.
            images.extend((0..28 * 28).map(|_| {
                if rng.random_range(0..4) == 0 {
                    rng.random::<u8>()
                } else {
                    0
                }
            }));
            labels.push(rng.random_range(0..10u8));
        }
        write(&dir.join(format!("{prefix}-images-idx3-ubyte")), &images);
        write(&dir.join(format!("{prefix}-labels-idx1-ubyte")), &labels);
    }
}

fn write(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create dataset file");
    f.write_all(bytes).expect("write dataset file");
}

/// A run config for the tiny model on the dataset in `data`, writing to `out`.
pub fn tiny_config(data: &Path, out: &Path, evaluations: u64) -> RunConfig {
    let text = format!(
        r#"
seed = 7
out = "{out}"
[model]
onnx = "{model}"
mean = [0.1307]
std = [0.3081]
[data]
source = "mnist:{data}"
validation = 100
[quant]
weight_bits = 2
act_bits = 8
calib_images = 64
[eda]
population = 8
top_k = 3
group_size = 32
[search]
generations_per_group = 2
batch_size = 96
[budget]
evaluations = {evaluations}
[eval]
every_generations = 1
threads = 1
[cluster]
heartbeat_ms = 200
"#,
        out = out.display(),
        model = tiny_model().display(),
        data = data.display(),
    );
    let cfg: RunConfig = toml::from_str(&text).expect("tiny config parses");
    cfg.validate().expect("tiny config is valid");
    cfg
}

/// A worker of the test cluster at `url` (one thread, no TLS, retrying forever).
pub fn worker_config(url: String, name: &str, token: Option<&str>) -> ccq_worker::WorkerConfig {
    ccq_worker::WorkerConfig {
        coordinator: url,
        shard: None,
        threads: 1,
        name: name.to_string(),
        data_override: None,
        give_up_after: None,
        tls_ca: None,
        token: token.map(str::to_string),
    }
}

pub struct Cluster {
    pub addr: SocketAddr,
    pub coordinator: JoinHandle<Result<RunReport, ccq_coordinator::Error>>,
    pub workers: Vec<JoinHandle<Result<ccq_worker::Exit, ccq_worker::Error>>>,
    pub stop: broadcast::Sender<()>,
}

/// Starts `workers` workers and then the coordinator (workers retry until it serves, so
/// start-up order does not matter), each on its own task, all over loopback gRPC.
/// Unless the config sets `cluster.shards`, the run uses one shard per worker.
pub async fn spawn_cluster(cfg: RunConfig, workers: usize) -> Cluster {
    spawn_cluster_with_token(cfg, workers, None).await
}

/// [`spawn_cluster`] with a cluster token that the coordinator requires and the workers present.
pub async fn spawn_cluster_with_token(
    mut cfg: RunConfig,
    workers: usize,
    token: Option<&str>,
) -> Cluster {
    cfg.cluster.shards.get_or_insert(workers.max(1));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (stop, _) = broadcast::channel(1);
    let workers = (0..workers)
        .map(|i| {
            let wc = worker_config(format!("http://{addr}"), &format!("test-{i}"), token);
            let mut rx = stop.subscribe();
            tokio::spawn(async move {
                ccq_worker::run(wc, async move {
                    let _ = rx.recv().await;
                })
                .await
            })
        })
        .collect();
    let opts = RunOptions {
        config: cfg,
        local_workers: 0,
        worker_threads: 1,
        token: token.map(str::to_string),
        insecure: false,
        resume: false,
    };
    let mut rx = stop.subscribe();
    let coordinator = tokio::spawn(async move {
        ccq_coordinator::run::run(opts, listener, async move {
            let _ = rx.recv().await;
        })
        .await
    });
    Cluster {
        addr,
        coordinator,
        workers,
        stop,
    }
}

impl Cluster {
    /// Starts one more worker (no token) against this cluster's coordinator.
    pub fn add_worker(&mut self, name: &str) {
        let wc = worker_config(format!("http://{}", self.addr), name, None);
        let mut rx = self.stop.subscribe();
        self.workers.push(tokio::spawn(async move {
            ccq_worker::run(wc, async move {
                let _ = rx.recv().await;
            })
            .await
        }));
    }

    /// Waits for the run to finish and every worker to exit on its own ("done").
    pub async fn finish(self) -> RunReport {
        let report = self
            .coordinator
            .await
            .expect("coordinator task")
            .expect("run succeeds");
        for w in self.workers {
            let exit = w.await.expect("worker task").expect("worker exits cleanly");
            assert_eq!(
                exit,
                ccq_worker::Exit::RunDone,
                "workers leave because the run is done"
            );
        }
        report
    }
}
