//! `coordinator bench`: what the coordinator itself costs, apart from the workers' fitness
//! evaluation (issue #7, "Coordinator and wire"). Three measurements:
//!
//! 1. **Dispatch**: the real run ([`ccq_coordinator::run::run`]: gRPC service on a loopback
//!    listener, the event loop, the trainer's EDA sampling and updates on a real model)
//!    against in-process *no-op workers* that speak the worker protocol (Register,
//!    PollJob, SyncNetwork when a job names another network version, SubmitResult) with
//!    the generated client but answer every job at once. Candidate evaluations and
//!    generations per second, per population, group size and worker count.
//! 2. **Wire**: the encoded (protobuf) size of every Job, SubmitResult and SyncNetwork
//!    message those workers saw, per candidate; and how often each worker received the
//!    whole network.
//! 3. **Memory**: bytes per decision variable of what the event loop holds for a network
//!    (EDA state, the trainer's codes and network, the best network's codes, a running
//!    measurement's codes and the network copy built for a worker's whole-network sync
//!    of it), by accounting (heap capacities) and by the
//!    process's resident set growing while the same structures are built, for the bench
//!    model and for a synthetic network of many variables.
//!
//! No-op results are made up but valid: each candidate's loss is a hash of its codes, so
//! candidates rank differently, the best is usually adopted, and network versions (and so
//! change-list syncs) advance as in a real run.

mod host;
pub mod scale;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ccq_common::data::DataSource;
use ccq_common::model::{Graph, Linear, Node, Normalization, Op, Shape};
use ccq_common::qnet::{EvalStats, QNetwork};
use ccq_common::quant::{self, QuantConfig};
use ccq_proto::client::{Auth, Client, JobStream};
use ccq_proto::v1::coordinator_client::CoordinatorClient;
use ccq_proto::v1::{
    poll_job_response, CandidateResult, PollJobResponse, RegisterRequest, SubmitResultRequest,
    SyncNetworkRequest,
};
use ccq_search::eda::{EdaParams, EdaState, Variable};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::net::TcpListener;

use ccq_coordinator::config::{
    BudgetConfig, CheckpointConfig, ClusterConfig, DataConfig, EvalSchedule, ModelConfig,
    QuantSection, RunConfig,
};
use ccq_coordinator::run::{self, RunOptions};
use ccq_coordinator::Error;

use self::host::{cpu_model, loadavg, proc_status_bytes, trim_heap};
use ccq_search::config::SearchConfig;
use ccq_search::trainer::Trainer;

/// The targets of issue #7 this bench checks.
pub const TARGET_EVALS_PER_SEC: f64 = 20_000.0;
pub const TARGET_WIRE_BYTES_PER_CANDIDATE: f64 = 1024.0;
pub const TARGET_GROUP_SIZE: usize = 256;
pub const TARGET_BYTES_PER_VARIABLE: f64 = 16.0;

/// The model whose trainer the dispatch bench drives, and where its data is.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSpec {
    pub name: String,
    pub onnx: PathBuf,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// A data source (`cifar10:DIR`, `mnist:DIR`, `folder:DIR`, `npy:DIR`); the coordinator reads its validation and test
    /// images and the calibration images from it (no-op workers read nothing).
    pub data: String,
    pub weight_bits: u8,
    pub act_bits: u8,
}

impl ModelSpec {
    /// The model quantized as a run quantizes it (64 calibration images from the
    /// training split), and the data source it was calibrated on.
    pub fn quantized(&self) -> Result<(QNetwork, DataSource), Error> {
        let graph = ccq_common::onnx::load_onnx(&self.onnx)?;
        let source: DataSource = self.data.parse()?;
        Ok((self.quantize(&graph, &source)?, source))
    }

    /// [`ModelSpec::quantized`] from a graph already loaded.
    fn quantize(&self, graph: &Graph, source: &DataSource) -> Result<QNetwork, Error> {
        let norm = Normalization {
            mean: self.mean.clone(),
            std: self.std.clone(),
        };
        let q = QuantConfig::new(self.weight_bits, self.act_bits);
        ccq_coordinator::eval::quantize_from_train(graph, &norm, source, &q, 64)
    }

    /// The headline model: ResNet-20 W4A8 on CIFAR-10 (JPEG q75 copy) from `../shared`.
    pub fn resnet20(repo: &Path) -> ModelSpec {
        let shared = repo.join("../shared");
        ModelSpec {
            name: "resnet20-cifar10 w4a8".into(),
            onnx: shared.join("models/resnet20-cifar10.onnx"),
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            data: format!(
                "cifar10:{}",
                shared
                    .join("datasets/cifar10-jpeg/cifar-10-batches-bin")
                    .display()
            ),
            weight_bits: 4,
            act_bits: 8,
        }
    }

    /// The quickstart model shipped in the repository: the MNIST CNN, W2A8.
    pub fn mnist(repo: &Path) -> ModelSpec {
        ModelSpec {
            name: "mnist-cnn w2a8".into(),
            onnx: repo.join("examples/mnist/mnist-cnn.onnx"),
            mean: vec![0.1307],
            std: vec![0.3081],
            data: format!("mnist:{}", repo.join("examples/data/mnist-10k").display()),
            weight_bits: 2,
            act_bits: 8,
        }
    }

    /// ResNet-20 when `../shared` holds it, else the MNIST quickstart model.
    pub fn auto(repo: &Path) -> ModelSpec {
        let r = ModelSpec::resnet20(repo);
        if r.onnx.exists() {
            r
        } else {
            ModelSpec::mnist(repo)
        }
    }

    /// `resnet20`, `mnist` or `auto`.
    pub fn named(name: &str, repo: &Path) -> Result<ModelSpec, Error> {
        match name {
            "resnet20" => Ok(ModelSpec::resnet20(repo)),
            "mnist" => Ok(ModelSpec::mnist(repo)),
            "auto" => Ok(ModelSpec::auto(repo)),
            other => Err(Error::Usage(format!(
                "--model {other}: expected resnet20, mnist or auto"
            ))),
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: ModelSpec,
    /// Candidate evaluations (the run's budget) per dispatch case.
    pub evaluations: u64,
    /// Numbers of no-op workers; each case uses as many shards (as `--local-workers` does).
    pub workers: Vec<usize>,
    pub populations: Vec<usize>,
    pub group_sizes: Vec<usize>,
    /// Variables of the synthetic network measured for memory (0: skip).
    pub memory_variables: usize,
    /// Where the runs write their outputs (removed afterwards).
    pub scratch: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub model: ModelSpec,
    pub variables: usize,
    pub memory: MemoryReport,
    pub dispatch: Vec<DispatchCase>,
    pub wire: WireSummary,
    pub targets: Targets,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    /// `/proc/loadavg` before and after: other processes share the machine.
    pub load_before: String,
    pub load_after: String,
}

/// One run against no-op workers.
#[derive(Debug, Clone, Serialize)]
pub struct DispatchCase {
    pub population: usize,
    pub group_size: usize,
    pub workers: usize,
    pub shards: usize,
    /// The run's own count (generations x population) ...
    pub evaluations: u64,
    pub generations: u64,
    pub adoptions: u64,
    /// ... and what the no-op workers had accepted (candidates in accepted jobs, divided
    /// by the shards: each shard evaluates every candidate on its part of the batch).
    pub evaluations_submitted: u64,
    /// Sustained rate of candidate evaluations as the run counts them (a candidate on the
    /// whole batch): from the moment a fifth were in to the last result (excludes
    /// connection set-up and the first validation measurement).
    pub evals_per_sec: f64,
    pub generations_per_sec: f64,
    /// The whole search phase as the run reports it (includes set-up of the loop, the
    /// PTQ and final validation measurements and the workers' goodbye).
    pub search_seconds: f64,
    pub jobs: u64,
    /// Jobs answered by each worker.
    pub jobs_per_worker: Vec<u64>,
    pub wire: WireCounts,
    /// Full networks received by each worker (the base network once per worker).
    pub full_syncs_per_worker: Vec<u64>,
    /// Errors of no-op workers (none expected).
    pub worker_errors: Vec<String>,
}

/// Encoded protobuf sizes seen by the no-op workers (no HTTP/2 or gRPC framing: that
/// adds 9 + 5 bytes of frame headers per message plus compressed HTTP/2 headers).
#[derive(Debug, Clone, Default, Serialize)]
pub struct WireCounts {
    pub job_bytes: u64,
    pub job_candidates: u64,
    /// Jobs whose group has exactly the configured group size.
    pub full_group_jobs: u64,
    pub full_group_job_bytes: u64,
    pub full_group_job_candidates: u64,
    /// Largest `Job` per candidate it carries, full groups only.
    pub max_full_group_job_bytes_per_candidate: f64,
    pub submit_bytes: u64,
    pub full_syncs: u64,
    pub full_sync_bytes: u64,
    pub change_syncs: u64,
    pub change_sync_bytes: u64,
    pub changes: u64,
    /// Jobs that needed no SyncNetwork (the worker held the job's version).
    pub jobs_without_sync: u64,
    /// Jobs that carried the changes from the worker's version (no SyncNetwork either).
    pub jobs_with_changes: u64,
}

impl WireCounts {
    fn add(&mut self, o: &WireCounts) {
        self.job_bytes += o.job_bytes;
        self.job_candidates += o.job_candidates;
        self.full_group_jobs += o.full_group_jobs;
        self.full_group_job_bytes += o.full_group_job_bytes;
        self.full_group_job_candidates += o.full_group_job_candidates;
        self.max_full_group_job_bytes_per_candidate = self
            .max_full_group_job_bytes_per_candidate
            .max(o.max_full_group_job_bytes_per_candidate);
        self.submit_bytes += o.submit_bytes;
        self.full_syncs += o.full_syncs;
        self.full_sync_bytes += o.full_sync_bytes;
        self.change_syncs += o.change_syncs;
        self.change_sync_bytes += o.change_sync_bytes;
        self.changes += o.changes;
        self.jobs_without_sync += o.jobs_without_sync;
        self.jobs_with_changes += o.jobs_with_changes;
    }
}

/// Wire cost of one candidate of a [`TARGET_GROUP_SIZE`]-variable group at the default
/// population, from the dispatch cases that ran that shape.
#[derive(Debug, Clone, Serialize)]
pub struct WireSummary {
    pub group_size: usize,
    pub population: usize,
    pub rows: Vec<WireRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WireRow {
    pub workers: usize,
    /// Mean `Job` bytes per candidate it carries (what one worker receives).
    pub job_bytes_per_candidate: f64,
    pub max_job_bytes_per_candidate: f64,
    /// Everything sent for one candidate of a generation: all shards' jobs (each shard
    /// gets every candidate for its part of the batch).
    pub generation_bytes_per_candidate: f64,
    /// `SubmitResult` bytes per candidate (the way back).
    pub result_bytes_per_candidate: f64,
    /// Size of the whole network as SyncNetwork sends it.
    pub full_network_bytes: f64,
    pub change_sync_bytes_per_job: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    /// Best sustained rate over the dispatch cases at the default population.
    pub evals_per_sec: f64,
    pub evals_per_sec_met: bool,
    /// Largest `Job` bytes per candidate it carries, 256-variable groups, any case.
    pub wire_bytes_per_candidate: f64,
    pub wire_met: bool,
    pub full_network_once_per_worker: bool,
    pub bytes_per_variable: f64,
    pub bytes_per_variable_peak: f64,
    pub memory_met: bool,
}

/// Memory of the event loop's per-variable state.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub model: NetworkMemory,
    pub synthetic: Option<NetworkMemory>,
    /// Only `EdaState::new` over the synthetic network's variables.
    pub eda_only: Option<EdaMemory>,
    /// The process's peak resident set at the end of the memory part (`VmHWM`), which
    /// includes the float weights of the synthetic model while it was quantized.
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NetworkMemory {
    pub name: String,
    pub variables: usize,
    /// Heap capacities of each part, bytes.
    pub accounting: Accounting,
    /// Accounted bytes per variable: steady (between validation measurements) and while
    /// one runs (it holds a copy of the network).
    pub bytes_per_variable: f64,
    pub bytes_per_variable_peak: f64,
    /// Growth of the resident set while building the same parts, bytes per variable
    /// (`None` where /proc is not available).
    pub rss_bytes_per_variable: Option<f64>,
    pub rss_bytes_per_variable_peak: Option<f64>,
    /// Bytes per variable on the wire and on disk: the whole network as SyncNetwork sends
    /// it (built once per full sync), and the trainer's part of a checkpoint body (streamed
    /// to the file, never held whole; see `benches/checkpoint.rs` for its memory).
    pub full_network_bytes_per_variable: f64,
    pub checkpoint_bytes_per_variable: f64,
}

/// What [`ccq_coordinator::state::State`] holds per variable, by part.
#[derive(Debug, Clone, Serialize)]
pub struct Accounting {
    /// `EdaState`: lowest code, span and fixed-point probabilities of each variable.
    pub eda: usize,
    /// The trainer's flat copy of the current codes.
    pub trainer_codes: usize,
    /// The trainer's network: weight codes, reference and packed kernel weights.
    pub network: usize,
    /// Codes of the best network by validation.
    pub best_codes: usize,
    /// A running measurement: its codes (kept until its last block is in) and the
    /// network built from them when a worker needs that version whole.
    pub eval_codes: usize,
    pub eval_network: usize,
}

impl Accounting {
    fn steady(&self) -> usize {
        self.eda + self.trainer_codes + self.network + self.best_codes
    }
    fn peak(&self) -> usize {
        self.steady() + self.eval_codes + self.eval_network
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EdaMemory {
    pub variables: usize,
    pub radius: u8,
    pub accounted_bytes_per_variable: f64,
    pub rss_bytes_per_variable: Option<f64>,
}

/// Runs every measurement. Memory first, while the process is still small.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, Error> {
    let load_before = loadavg();
    let memory = {
        let o = opts.clone();
        tokio::task::spawn_blocking(move || measure_memory(&o))
            .await
            .expect("memory measurement panicked")?
    };
    let mut dispatch = Vec::new();
    for &population in &opts.populations {
        for &group_size in &opts.group_sizes {
            for &workers in &opts.workers {
                let case = dispatch_case(opts, population, group_size, workers).await?;
                tracing::info!(
                    population,
                    group_size,
                    workers,
                    "{:.0} evaluations/s",
                    case.evals_per_sec
                );
                dispatch.push(case);
            }
        }
    }
    let default_pop = EdaParams::default().population;
    let wire = wire_summary(&dispatch, TARGET_GROUP_SIZE, default_pop);
    let best_rate = dispatch
        .iter()
        .filter(|c| c.population == default_pop)
        .map(|c| c.evals_per_sec)
        .fold(0.0, f64::max);
    // What one worker receives per candidate, in the largest job. (Every shard receives
    // every candidate for its part of the batch, so a generation sends a candidate once
    // per shard: see `generation_bytes_per_candidate`.)
    let wire_worst = wire
        .rows
        .iter()
        .map(|r| r.max_job_bytes_per_candidate)
        .fold(0.0, f64::max);
    let once = dispatch
        .iter()
        .all(|c| c.full_syncs_per_worker.iter().all(|&n| n == 1));
    let per_var = memory
        .synthetic
        .as_ref()
        .map_or(memory.model.bytes_per_variable, |s| {
            s.bytes_per_variable.max(memory.model.bytes_per_variable)
        });
    let per_var_peak =
        memory
            .synthetic
            .as_ref()
            .map_or(memory.model.bytes_per_variable_peak, |s| {
                s.bytes_per_variable_peak
                    .max(memory.model.bytes_per_variable_peak)
            });
    let targets = Targets {
        evals_per_sec: best_rate,
        evals_per_sec_met: best_rate >= TARGET_EVALS_PER_SEC,
        wire_bytes_per_candidate: wire_worst,
        wire_met: !wire.rows.is_empty() && wire_worst <= TARGET_WIRE_BYTES_PER_CANDIDATE,
        full_network_once_per_worker: once,
        bytes_per_variable: per_var,
        bytes_per_variable_peak: per_var_peak,
        memory_met: per_var_peak <= TARGET_BYTES_PER_VARIABLE,
    };
    Ok(BenchReport {
        machine: Machine {
            cpu: cpu_model(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_before,
            load_after: loadavg(),
        },
        model: opts.model.clone(),
        variables: memory.model.variables,
        memory,
        dispatch,
        wire,
        targets,
    })
}

fn wire_summary(cases: &[DispatchCase], group_size: usize, population: usize) -> WireSummary {
    let rows = cases
        .iter()
        .filter(|c| c.group_size == group_size && c.population == population)
        .filter(|c| c.wire.full_group_job_candidates > 0)
        .map(|c| {
            let w = &c.wire;
            let per_job = w.full_group_job_bytes as f64 / w.full_group_job_candidates as f64;
            WireRow {
                workers: c.workers,
                job_bytes_per_candidate: per_job,
                max_job_bytes_per_candidate: w.max_full_group_job_bytes_per_candidate,
                generation_bytes_per_candidate: per_job * c.shards as f64,
                result_bytes_per_candidate: w.submit_bytes as f64 / w.job_candidates.max(1) as f64,
                full_network_bytes: w.full_sync_bytes as f64 / w.full_syncs.max(1) as f64,
                change_sync_bytes_per_job: w.change_sync_bytes as f64 / (c.jobs.max(1)) as f64,
            }
        })
        .collect();
    WireSummary {
        group_size,
        population,
        rows,
    }
}

/// The run configuration of one dispatch case: the model and data of the bench, the
/// search shape under test, and nothing else competing for the coordinator's cores —
/// validation/test measurements only at the start and the end (on 256 images each, one
/// thread) and no checkpoints.
pub fn dispatch_config(
    spec: &ModelSpec,
    population: usize,
    group_size: usize,
    workers: usize,
    evaluations: u64,
    out: PathBuf,
) -> RunConfig {
    let eda = EdaParams {
        population,
        group_size,
        top_k: EdaParams::default().top_k.min(population),
        ..EdaParams::default()
    };
    RunConfig {
        seed: 1,
        out,
        model: ModelConfig {
            onnx: spec.onnx.clone(),
            mean: spec.mean.clone(),
            std: spec.std.clone(),
        },
        data: DataConfig {
            source: spec.data.clone(),
            validation: 256,
            test_limit: Some(256),
        },
        quant: QuantSection {
            weight_bits: spec.weight_bits,
            act_bits: spec.act_bits,
            calib_images: 64,
            calibration: "max".into(),
            ..QuantSection::default()
        },
        eda,
        search: SearchConfig::default(),
        budget: BudgetConfig {
            evaluations: Some(evaluations),
            ..BudgetConfig::default()
        },
        eval: EvalSchedule {
            every_generations: u64::MAX,
            threads: 1,
        },
        cluster: ClusterConfig {
            listen: "127.0.0.1:0".into(),
            shards: Some(workers.max(1)),
            ..ClusterConfig::default()
        },
        checkpoint: CheckpointConfig {
            every_generations: 0,
            every_secs: 0.0,
        },
    }
}

/// One run of the real coordinator against `workers` no-op workers.
pub async fn dispatch_case(
    opts: &BenchOptions,
    population: usize,
    group_size: usize,
    workers: usize,
) -> Result<DispatchCase, Error> {
    let out = opts
        .scratch
        .join(format!("dispatch-p{population}-g{group_size}-w{workers}"));
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| ccq_common::Error::io(&out, e))?;
    }
    let config = dispatch_config(
        &opts.model,
        population,
        group_size,
        workers,
        opts.evaluations,
        out.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| ccq_common::Error::io("127.0.0.1:0", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ccq_common::Error::io("listener", e))?;
    let clock = Arc::new(Clock::default());
    let handles: Vec<_> = (0..workers)
        .map(|i| {
            let clock = clock.clone();
            tokio::spawn(noop_worker(
                format!("http://{addr}"),
                format!("noop-{i}"),
                group_size,
                clock,
            ))
        })
        .collect();
    let run_opts = RunOptions {
        config,
        local_workers: 0,
        worker_threads: 1,
        token: None,
        insecure: false,
        resume: false,
    };
    let report = run::run(run_opts, listener, std::future::pending()).await;
    let mut tallies = Vec::new();
    for h in handles {
        tallies.push(h.await.expect("no-op worker panicked"));
    }
    let _ = std::fs::remove_dir_all(&out);
    let report = report?;

    let mut wire = WireCounts::default();
    let mut errors = Vec::new();
    for t in &tallies {
        wire.add(&t.wire);
        errors.extend(t.error.clone());
    }
    // Each shard's job carries every candidate (on the shard's part of the batch), so a
    // candidate evaluation, as the run counts them, is one job-candidate per shard.
    let shards = workers.max(1);
    let (job_candidates_per_sec, job_candidates) = clock.sustained_rate(0.2);
    let evals_per_sec = job_candidates_per_sec / shards as f64;
    Ok(DispatchCase {
        population,
        group_size,
        workers,
        shards,
        evaluations: report.evaluations,
        generations: report.generations,
        adoptions: report.adoptions,
        evaluations_submitted: job_candidates / shards as u64,
        evals_per_sec,
        generations_per_sec: evals_per_sec / population as f64,
        search_seconds: report.search_seconds,
        jobs: tallies.iter().map(|t| t.jobs).sum(),
        jobs_per_worker: tallies.iter().map(|t| t.jobs).collect(),
        full_syncs_per_worker: tallies.iter().map(|t| t.wire.full_syncs).collect(),
        wire,
        worker_errors: errors,
    })
}

/// Accepted results over time, shared by the no-op workers of a case.
#[derive(Default)]
struct Clock {
    total: AtomicU64,
    marks: Mutex<Vec<(Instant, u64)>>,
}

impl Clock {
    fn record(&self, candidates: u64) {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let total = self.total.fetch_add(candidates, Ordering::Relaxed) + candidates;
        marks.push((Instant::now(), total));
    }

    /// The window from the first mark at `skip` of the total to the last, and the rate
    /// of candidates over it.
    fn sustained_window(&self, skip: f64) -> (Option<(Instant, Instant)>, f64) {
        let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&(t1, total)) = marks.last() else {
            return (None, 0.0);
        };
        match marks.iter().find(|(_, n)| *n as f64 >= skip * total as f64) {
            Some(&(t0, n0)) if t1 > t0 => (
                Some((t0, t1)),
                (total - n0) as f64 / (t1 - t0).as_secs_f64(),
            ),
            _ => (None, 0.0),
        }
    }

    /// Evaluations per second from the first mark at `skip` of the total to the last,
    /// and the total.
    fn sustained_rate(&self, skip: f64) -> (f64, u64) {
        let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&(t1, total)) = marks.last() else {
            return (0.0, 0);
        };
        let from = marks
            .iter()
            .find(|(_, n)| *n as f64 >= skip * total as f64)
            .copied();
        match from {
            Some((t0, n0)) if t1 > t0 => ((total - n0) as f64 / (t1 - t0).as_secs_f64(), total),
            _ => (0.0, total),
        }
    }
}

#[derive(Default)]
struct Tally {
    jobs: u64,
    /// Measurement blocks answered (not counted in `jobs` or `wire`).
    measure_jobs: u64,
    wire: WireCounts,
    error: Option<String>,
}

/// A worker that evaluates instantly: the real protocol, made-up results.
async fn noop_worker(url: String, name: String, group_size: usize, clock: Arc<Clock>) -> Tally {
    let mut tally = Tally::default();
    if let Err(e) = noop_serve(&url, &name, group_size, &clock, &mut tally).await {
        tally.error = Some(format!("{name}: {e}"));
    }
    tally
}

async fn noop_serve(
    url: &str,
    name: &str,
    group_size: usize,
    clock: &Clock,
    tally: &mut Tally,
) -> Result<(), tonic::Status> {
    // The coordinator accepts connections from the start but refuses registrations until
    // its model is imported and calibrated: retry for at most a few minutes.
    let mut session = Session::start(url, name, Duration::from_secs(300)).await?;
    let mut have: Option<u64> = None;
    let mut measured: Option<u64> = None;
    loop {
        let Some(job) = session.next_job().await? else {
            return Ok(());
        };
        if job.measure.is_some() {
            answer_measurement(&mut session, &mut measured, job, None).await?;
            tally.measure_jobs += 1;
            continue;
        }
        let w = &mut tally.wire;
        let bytes = job.encoded_len() as u64;
        let n = job.candidates.len() as u64;
        w.job_bytes += bytes;
        w.job_candidates += n;
        if job.group_vars.len() == group_size && n > 0 {
            w.full_group_jobs += 1;
            w.full_group_job_bytes += bytes;
            w.full_group_job_candidates += n;
            w.max_full_group_job_bytes_per_candidate = w
                .max_full_group_job_bytes_per_candidate
                .max(bytes as f64 / n as f64);
        }
        if job.changes_from.is_some() && job.changes_from == have {
            w.jobs_with_changes += 1;
            w.changes += job.changes.as_ref().map_or(0, |c| c.len()) as u64;
            have = Some(job.network_version);
        } else if have == Some(job.network_version) {
            w.jobs_without_sync += 1;
        } else {
            let r = session.sync(have, job.network_version).await?;
            let len = r.encoded_len() as u64;
            if r.full.is_empty() {
                w.change_syncs += 1;
                w.change_sync_bytes += len;
                w.changes += r.changes.as_ref().map_or(0, |c| c.len()) as u64;
            } else {
                w.full_syncs += 1;
                w.full_sync_bytes += len;
            }
            have = Some(r.version);
            if have != Some(job.network_version) {
                continue; // a stale job: the real worker skips it too
            }
        }
        let images = job.images.len() as u64;
        let results: Vec<CandidateResult> = job
            .candidates
            .iter()
            .map(|c| made_up_result(c, images))
            .collect();
        let submit = SubmitResultRequest {
            worker_id: session.worker_id,
            job_id: job.job_id,
            results,
            eval_micros: 1,
            take_next: true,
        };
        w.submit_bytes += submit.encoded_len() as u64;
        let accepted = session.submit(submit).await?;
        tally.jobs += 1;
        if accepted {
            clock.record(n);
        }
    }
}

/// A protocol client of the bench's workers: connected and registered, re-registering
/// when the coordinator has forgotten it.
struct Session {
    client: Client,
    /// The job stream, as real workers take their jobs.
    jobs: JobStream,
    worker_id: u64,
    name: String,
    give_up: Instant,
    /// The next job's answer, taken with the last result as real workers do.
    next: Option<PollJobResponse>,
    /// PollJob requests sent (a job that did not come with the previous result's reply).
    polls: u64,
}

impl Session {
    /// Connects and registers, retrying for at most `patience`.
    async fn start(url: &str, name: &str, patience: Duration) -> Result<Session, tonic::Status> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let give_up = Instant::now() + patience;
        let mut client = loop {
            match endpoint.connect().await {
                Ok(ch) => {
                    break CoordinatorClient::with_interceptor(
                        ch,
                        Auth::new(None).expect("no token"),
                    )
                    .max_decoding_message_size(256 << 20)
                }
                Err(e) if Instant::now() > give_up => {
                    return Err(tonic::Status::unavailable(e.to_string()))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let worker_id = register(&mut client, name, give_up).await?;
        let jobs = JobStream::open(&mut client).await?;
        Ok(Session {
            client,
            jobs,
            worker_id,
            name: name.to_string(),
            give_up,
            next: None,
            polls: 0,
        })
    }

    /// Submits a job's results and takes the next job's answer with it, as real workers
    /// do (one round trip per job). True when the results were accepted.
    async fn submit(&mut self, mut req: SubmitResultRequest) -> Result<bool, tonic::Status> {
        req.take_next = true;
        let r = self.jobs.submit(req).await?;
        self.next = r.next;
        Ok(r.accepted)
    }

    /// `SyncNetwork` from `have` to `want`, as a real worker asks: the job's own version
    /// (with a window older than the latest), or a measurement's.
    async fn sync(
        &mut self,
        have: Option<u64>,
        want: u64,
    ) -> Result<ccq_proto::v1::SyncNetworkResponse, tonic::Status> {
        let req = SyncNetworkRequest {
            worker_id: self.worker_id,
            have_version: have,
            want_version: Some(want),
        };
        Ok(self.client.sync_network(req).await?.into_inner())
    }

    /// The next job, polling through idle answers and registering again when told to;
    /// `None` once the run is done.
    async fn next_job(&mut self) -> Result<Option<ccq_proto::v1::Job>, tonic::Status> {
        loop {
            let poll = match self.next.take() {
                Some(p) => p,
                None => {
                    self.polls += 1;
                    self.jobs.poll(self.worker_id).await?
                }
            };
            match poll.reply {
                Some(poll_job_response::Reply::Job(job)) => return Ok(Some(job)),
                Some(poll_job_response::Reply::Idle(_)) | None => {}
                Some(poll_job_response::Reply::Done(_)) => return Ok(None),
                Some(poll_job_response::Reply::Unknown(_)) => {
                    self.worker_id = register(&mut self.client, &self.name, self.give_up).await?;
                }
            }
        }
    }
}

/// Answers a measurement block as a worker would: brings its measured network's version
/// to the job's (forward only), waits `wait` if given (the block's emulated cost), and
/// submits made-up but valid sums. True when the sums were accepted.
async fn answer_measurement(
    session: &mut Session,
    measured: &mut Option<u64>,
    job: ccq_proto::v1::Job,
    wait: Option<Duration>,
) -> Result<bool, tonic::Status> {
    let Some(m) = job.measure else {
        return Ok(false);
    };
    if *measured != Some(job.network_version) {
        let have = measured.filter(|&v| v <= job.network_version);
        let r = session.sync(have, job.network_version).await?;
        *measured = Some(r.version);
        if r.version != job.network_version {
            return Ok(false); // the measurement is over
        }
    }
    if let Some(d) = wait {
        tokio::task::spawn_blocking(move || std::thread::sleep(d))
            .await
            .expect("sleeping does not panic");
    }
    let result = candidate_result(ccq_coordinator::state::sim::made_up_measurement(m.count));
    let worker_id = session.worker_id;
    session
        .submit(SubmitResultRequest {
            worker_id,
            job_id: job.job_id,
            results: vec![result],
            eval_micros: wait.map_or(1, |d| d.as_micros() as u64),
            take_next: true,
        })
        .await
}

async fn register(client: &mut Client, name: &str, give_up: Instant) -> Result<u64, tonic::Status> {
    loop {
        let req = RegisterRequest {
            protocol_version: ccq_proto::PROTOCOL_VERSION,
            name: name.to_string(),
            shard_index: None,
            shard_count: None,
            threads: 1,
        };
        match client.register(req).await {
            Ok(r) => return Ok(r.into_inner().worker_id),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(s) => return Err(s),
        }
    }
}

/// A valid result for a candidate on `images` images: loss between 0.5 and 1 nat per
/// image (2^-24 fixed point), chosen by a hash of the codes so candidates differ.
fn made_up_result(codes: &[u8], images: u64) -> CandidateResult {
    candidate_result(ccq_coordinator::state::sim::made_up_stats(
        codes.iter().copied(),
        images,
    ))
}

fn candidate_result(s: EvalStats) -> CandidateResult {
    CandidateResult {
        loss_fixed: s.loss_fixed,
        correct: s.correct,
        images: s.images,
        paired_sq: s.paired_sq,
    }
}

/// The memory part: the bench model, then the synthetic network.
fn measure_memory(opts: &BenchOptions) -> Result<MemoryReport, Error> {
    let spec = &opts.model;
    let model = {
        let graph = ccq_common::onnx::load_onnx(&spec.onnx)?;
        let source: DataSource = spec.data.parse()?;
        network_memory(&spec.name, || spec.quantize(&graph, &source))?
    };
    let (synthetic, eda_only) = if opts.memory_variables > 0 {
        let v = opts.memory_variables;
        let eda = eda_memory(v)?;
        let net = network_memory(&format!("synthetic MLP, {v} weights, w4a8"), || {
            Ok(synthetic_network(v)?)
        })?;
        (Some(net), Some(eda))
    } else {
        (None, None)
    };
    Ok(MemoryReport {
        model,
        synthetic,
        eda_only,
        peak_rss_bytes: proc_status_bytes("VmHWM:"),
    })
}

/// Builds what the event loop holds for a network, in the order it does, measuring the
/// resident set before and after. Mirrors [`ccq_coordinator::state::State`]: the trainer (network,
/// codes, EDA state), the best network's codes, and a running measurement (its codes
/// and the network built from them for a worker's whole-network sync).
fn network_memory(
    name: &str,
    build: impl FnOnce() -> Result<QNetwork, Error>,
) -> Result<NetworkMemory, Error> {
    let net = build()?;
    trim_heap();
    // The network was built with temporaries: its own size is measured as a clone.
    let rss_a = proc_status_bytes("VmRSS:");
    let copy = net.clone();
    let rss_b = proc_status_bytes("VmRSS:");
    drop(net);
    trim_heap();
    let net = copy;
    let rss_base = proc_status_bytes("VmRSS:");
    let variables = net.num_vars();
    let network_bytes = net.weight_heap_bytes();
    let trainer = Trainer::new(net, EdaParams::default(), SearchConfig::default(), 1, 1_000)?;
    let best_codes = trainer.network().codes();
    let rss_steady = proc_status_bytes("VmRSS:");
    let eval_codes = trainer.network().codes();
    let eval_net = trainer.network().clone();
    let rss_peak = proc_status_bytes("VmRSS:");
    let full_network = trainer.network().to_bytes().len();
    let checkpoint_body = postcard::to_stdvec(&trainer.snapshot())
        .expect("a trainer snapshot always serialises")
        .len();
    let accounting = Accounting {
        eda: trainer.eda().heap_bytes(),
        // `QNetwork::codes` allocates exactly one i8 per variable.
        trainer_codes: variables,
        network: network_bytes,
        best_codes: best_codes.capacity(),
        eval_codes: eval_codes.capacity(),
        eval_network: eval_net.weight_heap_bytes(),
    };
    let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / variables as f64),
        _ => None,
    };
    let net_rss = per(rss_a, rss_b);
    let steady = per(rss_base, rss_steady).zip(net_rss).map(|(a, b)| a + b);
    let peak = per(rss_base, rss_peak).zip(net_rss).map(|(a, b)| a + b);
    drop((trainer, best_codes, eval_codes, eval_net));
    trim_heap();
    Ok(NetworkMemory {
        name: name.to_string(),
        variables,
        bytes_per_variable: accounting.steady() as f64 / variables as f64,
        bytes_per_variable_peak: accounting.peak() as f64 / variables as f64,
        accounting,
        rss_bytes_per_variable: steady,
        rss_bytes_per_variable_peak: peak,
        full_network_bytes_per_variable: full_network as f64 / variables as f64,
        checkpoint_bytes_per_variable: checkpoint_body as f64 / variables as f64,
    })
}

/// `EdaState::new` alone over `v` 4-bit variables in one layer.
fn eda_memory(v: usize) -> Result<EdaMemory, Error> {
    trim_heap();
    let before = proc_status_bytes("VmRSS:");
    let params = EdaParams::default();
    let radius = params.radius;
    let eda = EdaState::new(
        params,
        (0..v).map(|i| Variable {
            initial: (i % 16) as i8 - 8,
            lo: -8,
            hi: 7,
            layer: 0,
        }),
    )?;
    let after = proc_status_bytes("VmRSS:");
    let accounted = eda.heap_bytes() as f64 / v as f64;
    drop(eda);
    trim_heap();
    Ok(EdaMemory {
        variables: v,
        radius,
        accounted_bytes_per_variable: accounted,
        rss_bytes_per_variable: before
            .zip(after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / v as f64),
    })
}

/// A two-layer perceptron on 3x32x32 inputs with about `v` weights (random, seeded),
/// quantized W4A8: a network as large as the memory target asks about without a model
/// file of that size.
pub fn synthetic_network(v: usize) -> Result<QNetwork, ccq_common::Error> {
    let input = Shape::new(3, 32, 32);
    let classes = 10;
    let hidden = (v / (input.len() + classes)).max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut linear = |inp: usize, out: usize| {
        let bound = (1.0 / inp as f32).sqrt();
        Linear {
            out_features: out,
            in_features: inp,
            weight: (0..inp * out)
                .map(|_| rng.random_range(-bound..bound))
                .collect(),
            bias: vec![0.0; out],
        }
    };
    let l1 = linear(input.len(), hidden);
    let l2 = linear(hidden, classes);
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
            node("flatten", Op::Flatten, 0, Shape::new(input.len(), 1, 1)),
            node("fc1", Op::Linear(l1), 1, Shape::new(hidden, 1, 1)),
            node("relu", Op::Relu, 2, Shape::new(hidden, 1, 1)),
            node("fc2", Op::Linear(l2), 3, Shape::new(classes, 1, 1)),
        ],
        output: 4,
    };
    let n = 4;
    let pixels: Vec<u8> = (0..n * input.len()).map(|_| rng.random()).collect();
    let q = QuantConfig::new(4, 8);
    quant::quantize(&graph, &Normalization::identity(3), &pixels, n, &q)
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "machine  {} ({} cores), load {} -> {}",
            self.machine.cpu, self.machine.cores, self.machine.load_before, self.machine.load_after
        )?;
        writeln!(
            f,
            "model    {} ({} variables)",
            self.model.name, self.variables
        )?;
        writeln!(f, "\ndispatch (no-op workers, loopback)")?;
        writeln!(
            f,
            "  pop  group  workers   evals/s   gens/s   jobs  full syncs/worker"
        )?;
        for c in &self.dispatch {
            writeln!(
                f,
                "  {:>3}  {:>5}  {:>7}  {:>8.0}  {:>7.0}  {:>5}  {:?}",
                c.population,
                c.group_size,
                c.workers,
                c.evals_per_sec,
                c.generations_per_sec,
                c.jobs,
                c.full_syncs_per_worker
            )?;
        }
        writeln!(
            f,
            "\nwire, {}-variable groups, population {} (protobuf bytes)",
            self.wire.group_size, self.wire.population
        )?;
        writeln!(
            f,
            "  workers  job/cand  max job/cand  generation/cand  result/cand  full network  change sync/job"
        )?;
        for r in &self.wire.rows {
            writeln!(
                f,
                "  {:>7}  {:>8.0}  {:>12.0}  {:>15.0}  {:>11.1}  {:>12.0}  {:>15.1}",
                r.workers,
                r.job_bytes_per_candidate,
                r.max_job_bytes_per_candidate,
                r.generation_bytes_per_candidate,
                r.result_bytes_per_candidate,
                r.full_network_bytes,
                r.change_sync_bytes_per_job
            )?;
        }
        writeln!(f, "\nmemory per variable (bytes)")?;
        let m = &self.memory;
        for n in std::iter::once(&m.model).chain(&m.synthetic) {
            let a = &n.accounting;
            let per = |x: usize| x as f64 / n.variables as f64;
            writeln!(
                f,
                "  {} ({} variables): accounted {:.2} steady, {:.2} during a validation run; \
                 RSS {} / {}",
                n.name,
                n.variables,
                n.bytes_per_variable,
                n.bytes_per_variable_peak,
                n.rss_bytes_per_variable
                    .map_or("n/a".into(), |x| format!("{x:.2}")),
                n.rss_bytes_per_variable_peak
                    .map_or("n/a".into(), |x| format!("{x:.2}")),
            )?;
            writeln!(
                f,
                "    eda {:.2}, trainer codes {:.2}, network {:.2}, best codes {:.2}, eval codes {:.2}, eval network {:.2}",
                per(a.eda),
                per(a.trainer_codes),
                per(a.network),
                per(a.best_codes),
                per(a.eval_codes),
                per(a.eval_network)
            )?;
            writeln!(
                f,
                "    on the wire / disk: full network for SyncNetwork {:.2}, checkpoint body (trainer part) {:.2}",
                n.full_network_bytes_per_variable, n.checkpoint_bytes_per_variable
            )?;
        }
        if let Some(e) = &m.eda_only {
            writeln!(
                f,
                "  EdaState alone ({} variables, radius {}): accounted {:.2}, RSS {}",
                e.variables,
                e.radius,
                e.accounted_bytes_per_variable,
                e.rss_bytes_per_variable
                    .map_or("n/a".into(), |x| format!("{x:.2}"))
            )?;
        }
        let t = &self.targets;
        let yes = |b: bool| if b { "met" } else { "NOT met" };
        writeln!(f, "\ntargets")?;
        writeln!(
            f,
            "  >= {TARGET_EVALS_PER_SEC} evaluations/s: {:.0} ({})",
            t.evals_per_sec,
            yes(t.evals_per_sec_met)
        )?;
        writeln!(
            f,
            "  <= {TARGET_WIRE_BYTES_PER_CANDIDATE} bytes per candidate of a {TARGET_GROUP_SIZE}-variable group: {:.0} ({})",
            t.wire_bytes_per_candidate,
            yes(t.wire_met)
        )?;
        writeln!(
            f,
            "  the whole network once per worker: {}",
            yes(t.full_network_once_per_worker)
        )?;
        write!(
            f,
            "  <= {TARGET_BYTES_PER_VARIABLE} bytes per variable: {:.2} steady, {:.2} peak ({})",
            t.bytes_per_variable,
            t.bytes_per_variable_peak,
            yes(t.memory_met)
        )
    }
}

#[cfg(test)]
mod tests;
