//! `coordinator scale`: how far the real coordinator scales out, emulated on one machine
//! (issue #16, "emulated").
//!
//! Two parts:
//!
//! 1. **Calibration.** The cost of a fitness job on this machine, measured with the real
//!    engine ([`ccq_common::fitness::evaluate_candidates`], one thread) on the bench model
//!    and real training images: a fixed cost per job, the base forward per image, and per
//!    layer the cost of one candidate per image when its group lies in that layer
//!    (groups of the default size at random positions of the layer, codes moved by ±1 as
//!    the EDA's radius-1 candidates are).
//! 2. **Emulation.** The real run ([`ccq_coordinator::run::run`]: gRPC on loopback, the
//!    event loop, the trainer, and its validation and test measurements on its own cores,
//!    all at the run defaults) against W emulated workers. Each takes real jobs through the
//!    worker protocol, waits the calibrated cost of the job it holds (its images, its
//!    candidates, its group's layer) on a thread of its own, and answers with made-up but
//!    valid sums (as `coordinator bench`'s no-op workers do). Waiting costs no CPU, so 128
//!    workers fit on two cores; what the coordinator spends is measured from the process's
//!    CPU time minus the emulator's threads.
//!
//! What this does not reproduce: the made-up sums steer the search along another
//! trajectory than real fitness would (which groups come when, how often a candidate is
//! adopted), and a real cluster adds network latency that loopback lacks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ccq_common::data::{self, Split};
use ccq_common::fitness;
use ccq_common::qnet::Targets;
use ccq_proto::v1::{CandidateResult, SubmitResultRequest};
use ccq_search::config::SearchConfig;
use ccq_search::eda::EdaParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::net::TcpListener;

use ccq_coordinator::config::{
    BudgetConfig, CheckpointConfig, ClusterConfig, DataConfig, EvalSchedule, ModelConfig,
    QuantSection, RunConfig,
};
use ccq_coordinator::run::{self, RunOptions};
use ccq_coordinator::state::sim::{self, Cluster, SimCase};
pub use ccq_coordinator::state::sim::{CostModel, LayerCost};
use ccq_coordinator::Error;

use super::host::{cpu_model, loadavg};
use super::{made_up_result, Clock, ModelSpec};

/// Names the threads of the emulated workers' runtime, so their CPU time can be told
/// apart from the coordinator's.
pub const EMULATOR_THREAD: &str = "ccq-emulator";

/// What to measure.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub model: ModelSpec,
    /// Numbers of emulated workers.
    pub workers: Vec<usize>,
    /// Workers per shard: W workers serve W / replicas shards (1: one shard each).
    pub replicas: usize,
    /// Generations in flight (`search.window`).
    pub window: usize,
    /// Search seconds per case (the run's wall-time budget).
    pub seconds: f64,
    /// Threads of the coordinator's runtime (`coordinator run --threads`), and the cores
    /// of the simulated coordinator.
    pub coordinator_threads: usize,
    /// Training images each calibration job evaluates.
    pub calibration_images: usize,
    /// Where the runs write their outputs (removed afterwards).
    pub scratch: PathBuf,
    /// Numbers of simulated workers ([`ccq_coordinator::state::sim`]), after the
    /// emulated cases, with the same cost model.
    pub simulate: Vec<usize>,
    /// Round trip between a simulated worker and the coordinator, seconds.
    pub round_trip_secs: f64,
    /// Coordinator CPU per request in the simulation; `None`: as the emulated case with
    /// the most workers measured it.
    pub coordinator_secs_per_request: Option<f64>,
    /// Evaluations a simulated case runs for when no emulated case had its number of
    /// workers (otherwise as many as that case did, so both follow one trajectory).
    pub simulate_evaluations: u64,
    /// The cost model of an earlier report (its `cost`) instead of calibrating.
    pub costs: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub machine: super::Machine,
    pub model: ModelSpec,
    /// Generations in flight (`search.window`) in every case.
    pub window: usize,
    pub cost: CostModel,
    pub cases: Vec<ScaleCase>,
    /// The simulated cluster's parameters (W aside), when cases were simulated.
    pub simulation: Option<Cluster>,
    pub simulated: Vec<SimCase>,
    /// Each emulated case simulated as it ran: the coordinator's and the emulated
    /// workers' CPU per job, as that case measured them, sharing the machine's cores.
    /// How close these come to the emulated cases is what validates the simulation.
    pub validation: Vec<SimCase>,
}

/// One run against `workers` emulated workers.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleCase {
    pub workers: usize,
    pub shards: usize,
    pub evaluations: u64,
    pub generations: u64,
    /// Validation/test measurements the coordinator made (history rows).
    pub measurements: usize,
    /// Candidate evaluations per second, sustained (from a fifth of the results on).
    pub evals_per_sec: f64,
    /// Scale-out efficiency over the sustained window: the time one ideal worker (the
    /// cost model, no coordinator, no network) would need for the same generations, over
    /// W × the window. Independent of which layers the groups happened to fall in.
    pub efficiency: f64,
    /// rate(W) / (W × rate(1)) against the 1-worker case of the same report; depends on
    /// the cases' mix of layers as well as on scaling.
    pub rate_ratio: Option<f64>,
    /// Emulated compute over the sustained window, as a fraction of W × its length.
    pub worker_busy_fraction: f64,
    /// Sustained window, seconds.
    pub window_seconds: f64,
    /// CPU seconds of the coordinator (process minus emulator threads) over the window:
    /// its loop, gRPC and the validation/test measurements it ran meanwhile.
    pub coordinator_cpu_secs: f64,
    pub coordinator_cpu_micros_per_eval: f64,
    /// Jobs that ended inside the sustained window, and the coordinator's CPU per job
    /// (one request each: the result, with the next job's poll).
    pub jobs_in_window: u64,
    pub coordinator_cpu_micros_per_job: f64,
    /// The emulated workers' CPU per job (their gRPC clients; the waiting costs none),
    /// which shares the machine's cores with the coordinator.
    pub emulator_cpu_micros_per_job: f64,
    pub search_seconds: f64,
    pub stop_reason: String,
    pub jobs: u64,
    /// PollJob requests: jobs that did not come with the previous result's reply.
    pub polls: u64,
    pub worker_errors: Vec<String>,
}

/// Calibrates, then runs every case. The emulated workers get a runtime of their own
/// (threads named [`EMULATOR_THREAD`]) and so does each case's coordinator, so the two
/// can be told apart in the process's CPU time.
pub fn run(opts: &ScaleOptions) -> Result<ScaleReport, Error> {
    let emulator = tokio::runtime::Builder::new_multi_thread()
        .thread_name(EMULATOR_THREAD)
        // Threads that exit take their CPU time out of /proc/self/task.
        .thread_keep_alive(Duration::from_secs(3600))
        .max_blocking_threads(1024)
        .enable_all()
        .build()
        .map_err(|e| ccq_common::Error::io("the emulator's runtime", e))?;
    emulator.block_on(run_cases(opts))
}

async fn run_cases(opts: &ScaleOptions) -> Result<ScaleReport, Error> {
    let load_before = loadavg();
    let params = EdaParams::default();
    let cost = if let Some(file) = &opts.costs {
        read_costs(file)?
    } else {
        let o = opts.clone();
        tokio::task::spawn_blocking(move || {
            calibrate(
                &o.model,
                params.population,
                params.group_size,
                o.calibration_images,
            )
        })
        .await
        .expect("calibration panicked")?
    };
    tracing::warn!(
        "{}: {:.1} ms per generation of {} candidates on 256 images, one core",
        opts.costs.as_ref().map_or("calibrated".into(), |f| format!(
            "job costs from {}",
            f.display()
        )),
        cost.generation_secs(256) * 1e3,
        params.population
    );
    let cost = Arc::new(cost);
    let mut cases: Vec<ScaleCase> = Vec::new();
    for &w in &opts.workers {
        let mut case = scale_case(opts, &cost, w).await?;
        let single = cases
            .iter()
            .find(|c| c.workers == 1)
            .map(|c| c.evals_per_sec);
        let single = single.or((w == 1).then_some(case.evals_per_sec));
        case.rate_ratio = single
            .filter(|&r| r > 0.0)
            .map(|r| case.evals_per_sec / (w as f64 * r));
        tracing::warn!(
            workers = w,
            "{:.0} evaluations/s, efficiency {:.2}, coordinator {:.0} µs CPU per evaluation",
            case.evals_per_sec,
            case.efficiency,
            case.coordinator_cpu_micros_per_eval
        );
        cases.push(case);
    }
    let (simulation, simulated, validation) = simulate_cases(opts, &cost, &cases).await?;
    Ok(ScaleReport {
        machine: super::Machine {
            cpu: cpu_model(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_before,
            load_after: loadavg(),
        },
        model: opts.model.clone(),
        window: opts.window,
        cost: (*cost).clone(),
        cases,
        simulation,
        simulated,
        validation,
    })
}

/// The simulated cases: the real event loop on a virtual clock (`state::sim`) with the
/// calibrated costs. Projected: every size in `opts.simulate`, the coordinator's CPU per
/// request as the largest emulated case measured it. Validation: every emulated case
/// again, as it ran (its own CPU per job, the emulated workers' included, on this
/// machine's cores). Each runs as many evaluations as the emulated case of its size.
async fn simulate_cases(
    opts: &ScaleOptions,
    cost: &Arc<CostModel>,
    emulated: &[ScaleCase],
) -> Result<(Option<Cluster>, Vec<SimCase>, Vec<SimCase>), Error> {
    if opts.simulate.is_empty() {
        return Ok((None, Vec::new(), Vec::new()));
    }
    let per_request = match opts.coordinator_secs_per_request {
        Some(s) => s,
        None => emulated
            .iter()
            .filter(|c| c.jobs_in_window > 0)
            .max_by_key(|c| c.workers)
            .map(|c| c.coordinator_cpu_micros_per_job * 1e-6)
            .ok_or_else(|| {
                Error::Usage(
                    "simulating needs the coordinator's CPU per request: emulate a case \
                     (--workers) or pass --coordinator-us-per-request"
                        .into(),
                )
            })?,
    };
    let template = Cluster {
        workers: 0,
        round_trip_secs: opts.round_trip_secs,
        coordinator_secs_per_request: per_request,
        coordinator_cores: opts.coordinator_threads.max(1),
    };
    let evaluations_of = |w: usize| {
        emulated
            .iter()
            .find(|c| c.workers == w)
            .map_or(opts.simulate_evaluations, |c| c.evaluations)
    };
    let mut runs: Vec<(Cluster, u64, bool)> = opts
        .simulate
        .iter()
        .map(|&w| {
            let cluster = Cluster {
                workers: w,
                ..template.clone()
            };
            (cluster, evaluations_of(w), false)
        })
        .collect();
    for c in emulated.iter().filter(|c| c.jobs_in_window > 0) {
        let cluster = Cluster {
            workers: c.workers,
            coordinator_secs_per_request: (c.coordinator_cpu_micros_per_job
                + c.emulator_cpu_micros_per_job)
                * 1e-6,
            ..template.clone()
        };
        runs.push((cluster, c.evaluations, true));
    }
    let o = opts.clone();
    let cost = Arc::clone(cost);
    let (simulated, validation) = tokio::task::spawn_blocking(move || {
        let setup = SimSetup::new(&o.model)?;
        let (mut simulated, mut validation) = (Vec::new(), Vec::new());
        for (cluster, evaluations, as_emulated) in runs {
            let w = cluster.workers;
            let shards = (w / o.replicas.max(1)).max(1);
            let mut config = scale_config(&o.model, shards, o.window, 0.0, o.scratch.join("sim"));
            config.budget = BudgetConfig {
                evaluations: Some(evaluations.max(1)),
                ..BudgetConfig::default()
            };
            let (state_setup, trainer) = setup.build(config, shards)?;
            let case = sim::simulate(state_setup, trainer, &cost, &cluster)?;
            tracing::warn!(
                workers = w,
                "simulated{}: {:.0} evaluations/s, efficiency {:.2}, coordinator {:.0} % busy ({:.1} s)",
                if as_emulated { " as emulated" } else { "" },
                case.evals_per_sec,
                case.efficiency,
                case.coordinator_busy_fraction * 100.0,
                case.real_seconds
            );
            match as_emulated {
                true => validation.push(case),
                false => simulated.push(case),
            }
        }
        Ok::<_, Error>((simulated, validation))
    })
    .await
    .expect("the simulation panicked")?;
    Ok((Some(template), simulated, validation))
}

/// What every simulated case starts from: the bench model quantized as a run would, and
/// the sizes of its data splits (run defaults: 5,000 validation images).
struct SimSetup {
    net: ccq_common::qnet::QNetwork,
    train_len: usize,
    test_len: usize,
}

impl SimSetup {
    fn new(spec: &ModelSpec) -> Result<SimSetup, Error> {
        let (net, source) = spec.quantized()?;
        Ok(SimSetup {
            net,
            train_len: data::split_len(&source, Split::Train)?,
            test_len: data::split_len(&source, Split::Test)?,
        })
    }

    fn build(
        &self,
        config: RunConfig,
        shards: usize,
    ) -> Result<(ccq_coordinator::state::Setup, ccq_search::trainer::Trainer), Error> {
        let validation = config.data.validation.min(self.train_len / 2);
        let search_len = self.train_len - validation;
        let trainer = ccq_search::trainer::Trainer::new(
            self.net.clone(),
            config.eda.clone(),
            config.search.clone(),
            config.seed,
            search_len,
        )?;
        let setup = ccq_coordinator::state::Setup {
            run_id: "simulated".into(),
            data_source: config.data.source.clone(),
            shards,
            search_len,
            validation,
            test: self.test_len,
            float_top1: 0.0,
            ptq_top1: None,
            network_fingerprint: String::new(),
            search_seconds_before: 0.0,
            instance: "simulated".into(),
            teacher: None,
            blocks: None,
            config,
        };
        Ok((setup, trainer))
    }
}

/// The cost model of an earlier `coordinator scale --json` report.
pub(crate) fn read_costs(file: &std::path::Path) -> Result<CostModel, Error> {
    #[derive(serde::Deserialize)]
    struct Report {
        cost: CostModel,
    }
    let text = std::fs::read_to_string(file).map_err(|e| ccq_common::Error::io(file, e))?;
    let r: Report = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: file.display().to_string(),
        reason: format!("not a `coordinator scale --json` report with a cost model: {e}"),
    })?;
    let c = &r.cost;
    let finite = |x: f64| x.is_finite() && x >= 0.0;
    let sane = finite(c.fixed_secs)
        && finite(c.base_per_image_secs)
        && !c.layers.is_empty()
        && c.layers.windows(2).all(|w| w[0].first_var < w[1].first_var)
        && c.layers.iter().all(|l| finite(l.candidate_per_image_secs));
    if !sane {
        return Err(Error::Config {
            path: file.display().to_string(),
            reason: "cost: times must be finite and >= 0, layers in variable order".into(),
        });
    }
    Ok(r.cost)
}

/// Measures the job cost model on the bench model with real training images.
pub fn calibrate(
    spec: &ModelSpec,
    population: usize,
    group_size: usize,
    images: usize,
) -> Result<CostModel, Error> {
    let started = Instant::now();
    let (net, source) = spec.quantized()?;
    let n = images.max(8);
    let d = data::load(&source, Split::Train, Some(0..n))?;
    let targets = Targets {
        block: None,
        labels: &d.labels,
        teacher: None,
    };
    let quarter = n / 4;
    let time = |pixels: &[u8], labels: &[u8], vars: &[u32], cands: &[Vec<i8>]| {
        let t = Targets {
            block: None,
            labels,
            teacher: None,
        };
        let mut best = f64::INFINITY;
        // The fastest of five: what the code costs, not what the machine was doing (on a
        // busy machine the slope of three could come out negative).
        for _ in 0..5 {
            let t0 = Instant::now();
            fitness::evaluate_candidates(&net, pixels, &t, vars, cands, 1)
                .expect("a calibration job is well formed");
            best = best.min(t0.elapsed().as_secs_f64());
        }
        best
    };
    let il = d.image_len();
    let codes = net.codes();
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    // The context alone: the base forward, on n and on n/4 images (slope and intercept).
    let first = &net.layers[0];
    let context_only = |m: usize| {
        let vars: Vec<u32> = (0..group_size.min(first.len) as u32).collect();
        let cands = vec![vars.iter().map(|&v| codes[v as usize]).collect::<Vec<i8>>()];
        time(&d.images[..m * il], &d.labels[..m], &vars, &cands)
    };
    let full = context_only(n);
    let part = context_only(quarter);
    let base = ((full - part) / (n - quarter) as f64).max(0.0);
    let fixed = (part - quarter as f64 * base).max(0.0);
    let mut layers = Vec::new();
    for (i, l) in net.layers.iter().enumerate() {
        if l.len == 0 {
            continue;
        }
        let g = group_size.min(l.len);
        let mut vars: Vec<u32> = Vec::with_capacity(g);
        while vars.len() < g {
            let v = (l.offset + rng.random_range(0..l.len)) as u32;
            if !vars.contains(&v) {
                vars.push(v);
            }
        }
        let context: Vec<i8> = vars.iter().map(|&v| codes[v as usize]).collect();
        let mut cands = vec![context.clone()];
        for _ in 1..population.max(2) {
            cands.push(
                vars.iter()
                    .zip(&context)
                    .map(|(&v, &c)| {
                        let info = net.var_info(v as usize).expect("a variable of the network");
                        let moved = c as i16 + if rng.random_bool(0.5) { 1 } else { -1 };
                        moved.clamp(info.lo as i16, info.hi as i16) as i8
                    })
                    .collect(),
            );
        }
        let t = time(&d.images, &targets.labels[..n], &vars, &cands);
        let per = ((t - fixed - n as f64 * base) / (n * (cands.len() - 1)) as f64).max(0.0);
        layers.push(LayerCost {
            layer: i,
            first_var: l.offset as u32,
            variables: l.len,
            candidate_per_image_secs: per,
        });
    }
    Ok(CostModel {
        fixed_secs: fixed,
        base_per_image_secs: base,
        layers,
        population,
        group_size,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The run configuration of one case: the run defaults (validation and test measured
/// every 100 generations, the default population, group and batch), the bench model,
/// `shards` shards, a wall-time budget, no checkpoints.
fn scale_config(
    spec: &ModelSpec,
    shards: usize,
    window: usize,
    seconds: f64,
    out: PathBuf,
) -> RunConfig {
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
            // The run default (`data.validation`).
            validation: 5000,
            test_limit: None,
        },
        quant: QuantSection {
            weight_bits: spec.weight_bits,
            act_bits: spec.act_bits,
            ..QuantSection::default()
        },
        eda: EdaParams::default(),
        // Made-up sums freeze variables as real ones do; restarts keep the search going
        // for the whole budget instead of ending a case early.
        search: SearchConfig {
            restarts: true,
            window: Some(window),
            ..SearchConfig::default()
        },
        budget: BudgetConfig {
            wall_seconds: Some(seconds),
            ..BudgetConfig::default()
        },
        eval: EvalSchedule::default(),
        cluster: ClusterConfig {
            listen: "127.0.0.1:0".into(),
            shards: Some(shards.max(1)),
            ..ClusterConfig::default()
        },
        checkpoint: CheckpointConfig {
            every_generations: 0,
            every_secs: 0.0,
        },
    }
}

/// CPU seconds of this process, and of its threads named [`EMULATOR_THREAD`].
fn cpu_seconds() -> (f64, f64) {
    let ticks = 100.0; // USER_HZ: 100 on every Linux ABI ccq runs on.
    let read = |path: &std::path::Path| -> Option<(String, f64)> {
        let s = std::fs::read_to_string(path).ok()?;
        let (head, rest) = s.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the comm: state is field 3, utime 14 and stime 15 (1-based).
        let u: f64 = f.get(11)?.parse().ok()?;
        let s: f64 = f.get(12)?.parse().ok()?;
        Some((comm, (u + s) / ticks))
    };
    let total = read(std::path::Path::new("/proc/self/stat")).map_or(0.0, |(_, t)| t);
    let emulator = std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| read(&e.path().join("stat")))
                .filter(|(comm, _)| {
                    comm.starts_with(&EMULATOR_THREAD[..EMULATOR_THREAD.len().min(15)])
                })
                .map(|(_, t)| t)
                .sum()
        })
        .unwrap_or(0.0);
    (total, emulator)
}

/// One run of the real coordinator (on its own runtime, `coordinator`) against
/// `workers` emulated workers (spawned on the caller's runtime).
async fn scale_case(
    opts: &ScaleOptions,
    cost: &Arc<CostModel>,
    workers: usize,
) -> Result<ScaleCase, Error> {
    let out = opts.scratch.join(format!("scale-w{workers}"));
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| ccq_common::Error::io(&out, e))?;
    }
    let shards = (workers / opts.replicas.max(1)).max(1);
    let config = scale_config(&opts.model, shards, opts.window, opts.seconds, out.clone());
    let coordinator = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.coordinator_threads.max(1))
        .thread_name("ccq-coordinator")
        .enable_all()
        .build()
        .map_err(|e| ccq_common::Error::io("the coordinator's runtime", e))?;
    let listener = {
        let _guard = coordinator.enter();
        let std = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| ccq_common::Error::io("127.0.0.1:0", e))?;
        std.set_nonblocking(true)
            .map_err(|e| ccq_common::Error::io("listener", e))?;
        TcpListener::from_std(std).map_err(|e| ccq_common::Error::io("listener", e))?
    };
    let addr = listener
        .local_addr()
        .map_err(|e| ccq_common::Error::io("listener", e))?;
    let clock = Arc::new(Clock::default());
    let busy = Arc::new(Busy::default());
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = {
        let samples = Arc::clone(&samples);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let (cpu, emu) = cpu_seconds();
                samples.lock().unwrap_or_else(|e| e.into_inner()).push((
                    Instant::now(),
                    cpu - emu,
                    emu,
                ));
            }
        })
    };
    let handles: Vec<_> = (0..workers)
        .map(|i| {
            tokio::spawn(emulated_worker(
                format!("http://{addr}"),
                format!("emulated-{i}"),
                Arc::clone(cost),
                Arc::clone(&clock),
                Arc::clone(&busy),
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
    let report = coordinator
        .spawn(run::run(run_opts, listener, std::future::pending()))
        .await
        .expect("the coordinator panicked");
    let mut tallies = Vec::new();
    for h in handles {
        tallies.push(h.await.expect("an emulated worker panicked"));
    }
    sampler.abort();
    coordinator.shutdown_background();
    let _ = std::fs::remove_dir_all(&out);
    let report = report?;

    // Recorded: candidates × images per job. A generation's jobs together carry each
    // candidate on each image of the batch once, however the batch was cut.
    let batch = SearchConfig::default().batch_size;
    let (window, rate_candidate_images) = clock.sustained_window(0.2);
    let evals_per_sec = rate_candidate_images / batch as f64;
    let secs = window.map_or(0.0, |(t0, t1)| (t1 - t0).as_secs_f64());
    let (busy_secs, useful_secs, jobs_in_window) = busy.within(window);
    let share = |x: f64| x / (workers as f64 * secs.max(1e-9));
    // The coordinator's and the emulated workers' CPU between the samples nearest the
    // window's ends.
    let (coordinator_cpu, emulator_cpu) = window.map_or((0.0, 0.0), |(t0, t1)| {
        let s = samples.lock().unwrap_or_else(|e| e.into_inner());
        let at = |t: Instant| {
            s.iter()
                .min_by_key(|(when, ..)| if *when > t { *when - t } else { t - *when })
                .map_or((0.0, 0.0), |&(_, c, e)| (c, e))
        };
        let ((c0, e0), (c1, e1)) = (at(t0), at(t1));
        ((c1 - c0).max(0.0), (e1 - e0).max(0.0))
    });
    let window_evals = evals_per_sec * secs;
    Ok(ScaleCase {
        workers,
        shards,
        evaluations: report.evaluations,
        generations: report.generations,
        measurements: report.history.len(),
        evals_per_sec,
        efficiency: share(useful_secs),
        rate_ratio: None,
        worker_busy_fraction: share(busy_secs),
        window_seconds: secs,
        coordinator_cpu_secs: coordinator_cpu,
        coordinator_cpu_micros_per_eval: coordinator_cpu * 1e6 / window_evals.max(1.0),
        jobs_in_window,
        coordinator_cpu_micros_per_job: coordinator_cpu * 1e6 / jobs_in_window.max(1) as f64,
        emulator_cpu_micros_per_job: emulator_cpu * 1e6 / jobs_in_window.max(1) as f64,
        search_seconds: report.search_seconds,
        stop_reason: report.stop_reason.clone(),
        jobs: tallies.iter().map(|t| t.0).sum(),
        polls: tallies.iter().map(|t| t.1).sum(),
        worker_errors: tallies.into_iter().filter_map(|t| t.2).collect(),
    })
}

/// Emulated compute per job: (end time, seconds waited, the useful part).
#[derive(Default)]
struct Busy {
    jobs: std::sync::Mutex<Vec<(Instant, f64, f64)>>,
}

impl Busy {
    fn record(&self, end: Instant, secs: f64, useful: f64) {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((end, secs, useful));
    }

    /// (waited, useful) seconds and the number of the jobs that ended inside `window`.
    fn within(&self, window: Option<(Instant, Instant)>) -> (f64, f64, u64) {
        let Some((t0, t1)) = window else {
            return (0.0, 0.0, 0);
        };
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter()
            .filter(|(end, _, _)| *end > t0 && *end <= t1)
            .fold((0.0, 0.0, 0), |(a, b, n), (_, s, u)| (a + s, b + u, n + 1))
    }
}

/// A worker that waits each job's calibrated cost: the real protocol, made-up sums.
/// Returns (jobs answered, polls sent, error).
async fn emulated_worker(
    url: String,
    name: String,
    cost: Arc<CostModel>,
    clock: Arc<Clock>,
    busy: Arc<Busy>,
) -> (u64, u64, Option<String>) {
    let (mut jobs, mut polls) = (0, 0);
    let r = emulated_serve(&url, &name, &cost, &clock, &busy, &mut jobs, &mut polls).await;
    (jobs, polls, r.err().map(|e| format!("{name}: {e}")))
}

async fn emulated_serve(
    url: &str,
    name: &str,
    cost: &CostModel,
    clock: &Clock,
    busy: &Busy,
    jobs: &mut u64,
    polls: &mut u64,
) -> Result<(), tonic::Status> {
    let mut session = super::Session::start(url, name, Duration::from_secs(600)).await?;
    let mut have: Option<u64> = None;
    let mut measured: Option<u64> = None;
    let batch = SearchConfig::default().batch_size;
    loop {
        let next = session.next_job().await;
        *polls = session.polls;
        let Some(job) = next? else {
            return Ok(());
        };
        if let Some(m) = &job.measure {
            // A block of a measurement: one base forward per image.
            let secs = cost.fixed_secs + m.count as f64 * cost.base_per_image_secs;
            let wait = Duration::from_secs_f64(secs);
            if super::answer_measurement(&mut session, &mut measured, job, Some(wait)).await? {
                busy.record(Instant::now(), secs, 0.0);
            }
            *jobs += 1;
            continue;
        }
        if job.changes_from.is_some() && job.changes_from == have {
            have = Some(job.network_version);
        }
        if have != Some(job.network_version) {
            let r = session.sync(have, job.network_version).await?;
            have = Some(r.version);
            if have != Some(job.network_version) {
                continue; // a stale job: the real worker skips it too
            }
        }
        let images = job.images.len();
        // Candidate 0 of a generation is the context: the real engine does not recompute it.
        let changed = job.candidates.len() - usize::from(job.first_candidate == 0);
        let var = job.group_vars.first().copied().unwrap_or(0);
        let secs = cost.job_secs(images, changed, var);
        // A thread's sleep is precise to tens of microseconds; the runtime's timer rounds
        // up to milliseconds, as long as the short jobs of a large cluster.
        tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_secs_f64(secs)))
            .await
            .expect("sleeping does not panic");
        let useful = cost.useful_secs(images, job.candidates.len(), changed, var, batch);
        busy.record(Instant::now(), secs, useful);
        let results: Vec<CandidateResult> = job
            .candidates
            .iter()
            .map(|c| made_up_result(c, images as u64))
            .collect();
        let candidate_images = (results.len() * images) as u64;
        let accepted = session
            .submit(SubmitResultRequest {
                worker_id: session.worker_id,
                job_id: job.job_id,
                results,
                eval_micros: (secs * 1e6) as u64,
                take_next: true,
            })
            .await?;
        *jobs += 1;
        if accepted {
            clock.record(candidate_images);
        }
    }
}

impl std::fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "machine  {} ({} cores), load {} -> {}",
            self.machine.cpu, self.machine.cores, self.machine.load_before, self.machine.load_after
        )?;
        writeln!(
            f,
            "model    {}, search.window {}",
            self.model.name, self.window
        )?;
        writeln!(
            f,
            "job cost (one core): {:.2} ms fixed + {:.1} µs base forward per image + {:.1}–{:.1} µs per candidate per image (by layer); a generation of {} on 256 images {:.1} ms (layers weighted by their variables)",
            self.cost.fixed_secs * 1e3,
            self.cost.base_per_image_secs * 1e6,
            self.cost.layers.iter().map(|l| l.candidate_per_image_secs).fold(f64::INFINITY, f64::min) * 1e6,
            self.cost.layers.iter().map(|l| l.candidate_per_image_secs).fold(0.0, f64::max) * 1e6,
            self.cost.population,
            self.cost.generation_secs(256) * 1e3,
        )?;
        writeln!(
            f,
            "\n  workers  evals/s  efficiency  rate ratio  busy  coordinator µs CPU/eval  generations  measurements"
        )?;
        for c in &self.cases {
            writeln!(
                f,
                "  {:>7}  {:>7.0}  {:>9.0}%  {:>10}  {:>4.0}%  {:>23.0}  {:>11}  {:>12}",
                c.workers,
                c.evals_per_sec,
                c.efficiency * 100.0,
                c.rate_ratio
                    .map_or("—".into(), |e| format!("{:.0}%", e * 100.0)),
                c.worker_busy_fraction * 100.0,
                c.coordinator_cpu_micros_per_eval,
                c.generations,
                c.measurements
            )?;
        }
        if let Some(sim) = &self.simulation {
            writeln!(
                f,
                "\nsimulated: round trip {:.0} µs, coordinator {:.1} µs CPU per request on {} cores",
                sim.round_trip_secs * 1e6,
                sim.coordinator_secs_per_request * 1e6,
                sim.coordinator_cores
            )?;
            writeln!(
                f,
                "  workers  evals/s  efficiency  busy  coordinator busy  evaluations  simulated as emulated / emulated (evals/s, E)"
            )?;
            for c in &self.simulated {
                let vs = self
                    .validation
                    .iter()
                    .find(|v| v.workers == c.workers)
                    .and_then(|v| {
                        self.cases
                            .iter()
                            .find(|e| e.workers == v.workers)
                            .map(|e| (v, e))
                    })
                    .filter(|(_, e)| e.evals_per_sec > 0.0 && e.efficiency > 0.0)
                    .map_or("—".into(), |(v, e)| {
                        format!(
                            "{:.2}, {:.2}",
                            v.evals_per_sec / e.evals_per_sec,
                            v.efficiency / e.efficiency
                        )
                    });
                writeln!(
                    f,
                    "  {:>7}  {:>7.0}  {:>9.0}%  {:>3.0}%  {:>15.0}%  {:>11}  {}",
                    c.workers,
                    c.evals_per_sec,
                    c.efficiency * 100.0,
                    c.worker_busy_fraction * 100.0,
                    c.coordinator_busy_fraction * 100.0,
                    c.evaluations,
                    vs
                )?;
            }
        }
        Ok(())
    }
}
