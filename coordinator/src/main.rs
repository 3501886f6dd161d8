//! The `coordinator` binary: parses the command line, sets up tracing and hands a domain
//! config to the library. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use ccq_common::data::{DataSource, Split};
use ccq_coordinator::config::RunConfig;
use ccq_coordinator::eval::{self, EvalConfig};
use ccq_coordinator::run::{self, RunOptions};
use ccq_coordinator::status;
use clap::{Parser, Subcommand};

// `coordinator bench` measures the coordinator from outside, through the library's
// public API: it is part of the binary, not of what runs a coordinator.
mod bench;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "ccq coordinator: trains low-bit networks by cooperative coevolution"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accuracy and speed of a network on a dataset split: the float model, its
    /// post-training quantization (with --weight-bits), or a trained .ccq network.
    Eval(EvalArgs),
    /// Train: quantize the model, then search its weight codes with EDA + cooperative
    /// coevolution, serving workers over gRPC.
    Run(RunArgs),
    /// Live state of a running coordinator.
    Status(StatusArgs),
    /// Write an integer network for other runtimes: QDQ ONNX or plain integer arrays.
    Export(ccq_coordinator::export::ExportArgs),
    /// Measure the coordinator itself: evaluations/s against no-op workers over loopback,
    /// bytes on the wire per candidate, memory per decision variable.
    Bench(BenchArgs),
    /// Emulate a cluster: the real coordinator against W workers that wait each job's
    /// cost as calibrated on this machine; evaluations/s, scale-out efficiency and the
    /// coordinator's CPU per evaluation.
    Scale(ScaleArgs),
}

#[derive(clap::Args)]
struct ScaleArgs {
    /// `resnet20` (../shared), `mnist` (examples/), or `auto`: ResNet-20 when present.
    #[arg(long, default_value = "auto")]
    model: String,
    /// Numbers of emulated workers, comma separated (0: none).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    workers: Vec<usize>,
    /// Numbers of simulated workers, comma separated: the real event loop on a virtual
    /// clock with the calibrated costs, after the emulated cases.
    #[arg(long, value_delimiter = ',')]
    simulate: Vec<usize>,
    /// Round trip between a simulated worker and the coordinator, microseconds.
    #[arg(long, default_value_t = 100.0)]
    round_trip_us: f64,
    /// Coordinator CPU per request in the simulation, microseconds [default: as the
    /// emulated case with the most workers measured it].
    #[arg(long)]
    coordinator_us_per_request: Option<f64>,
    /// Evaluations of a simulated case with no emulated case of its size (otherwise as
    /// many as that case made).
    #[arg(long, default_value_t = 50_000)]
    simulate_evaluations: u64,
    /// Take the job costs from an earlier `coordinator scale --json` report instead of
    /// calibrating.
    #[arg(long)]
    costs: Option<std::path::PathBuf>,
    /// Workers per shard: W workers serve W / R shards.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Generations in flight (`search.window`; 32 is what a run gives ResNet-20 unset).
    #[arg(long, default_value_t = ccq_search::config::DEFAULT_WINDOW)]
    window: usize,
    /// Search seconds per case.
    #[arg(long, default_value_t = 40.0)]
    seconds: f64,
    /// Threads of the emulated coordinator (`coordinator run --threads`); also the cores
    /// of the simulated one.
    #[arg(long, default_value_t = 1)]
    coordinator_threads: usize,
    /// Training images per calibration job.
    #[arg(long, default_value_t = 256)]
    calibration_images: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// `resnet20` (../shared), `mnist` (examples/), or `auto`: ResNet-20 when present.
    #[arg(long, default_value = "auto")]
    model: String,
    /// Candidate evaluations (the run's budget) per dispatch case.
    #[arg(long, default_value_t = 50_000)]
    evaluations: u64,
    /// Numbers of no-op workers, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Populations, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "16,32")]
    populations: Vec<usize>,
    /// Group sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    group_sizes: Vec<usize>,
    /// Weights of the synthetic network whose memory is measured (0: skip).
    #[arg(long, default_value_t = 25_000_000)]
    memory_variables: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The run configuration (TOML).
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in DIR (its output directory; default: the config's `out`) from
    /// its checkpoint. With --config, a new run starts if DIR holds no checkpoint yet
    /// (what a restarted pod wants); without, the checkpoint's own config is used.
    #[arg(long, value_name = "DIR", num_args = 0..=1, conflicts_with = "out")]
    resume: Option<Option<PathBuf>>,
    /// Start N workers inside this process (real gRPC over loopback).
    #[arg(long, default_value_t = 0)]
    local_workers: usize,
    /// gRPC listen address (overrides the config's cluster.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (overrides cluster.metrics_listen).
    #[arg(long, value_name = "ADDR", env = "CCQ_METRICS")]
    metrics: Option<String>,
    /// Output directory (overrides the config's out).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed (overrides the config's seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Threads per local worker.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Threads serving workers and running the search loop (import, calibration,
    /// references and checkpoints run on a pool of their own). One costs the least CPU
    /// per evaluation; more let the gRPC work use more cores, at more CPU per evaluation.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Cluster token that workers must present (required to listen beyond loopback).
    #[arg(long, env = "CCQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the cluster token from this file instead.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Listen beyond loopback without a token: anyone who reaches the port can join.
    #[arg(long)]
    insecure: bool,
    /// `text` or `json` log lines.
    #[arg(long, default_value = "text")]
    log_format: String,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Coordinator URL or address.
    #[arg(long, default_value = ccq_coordinator::DEFAULT_LISTEN)]
    addr: String,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds (default 2) until the run ends.
    #[arg(long, num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
    /// Cluster token, if the coordinator does not serve status publicly.
    #[arg(long, env = "CCQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of the CA that signed the coordinator's TLS certificate.
    #[arg(long, env = "CCQ_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// An ONNX model, or a .ccq integer network written by `coordinator run`.
    #[arg(long)]
    model: PathBuf,
    /// `cifar10:DIR` (CIFAR-10 binary batches), `mnist:DIR` (IDX files, raw or .gz),
    /// `folder:DIR[?resize=N&crop=N&channels=rgb|bgr|gray]` (JPEG/PNG, one directory per
    /// class) or `npy:DIR[?layout=nhwc|nchw]` (x_train.npy, y_train.npy, ...): see
    /// docs/DATA.md.
    #[arg(long)]
    data: String,
    /// `test` (reported accuracy) or `train` (the training split, validation hold-out
    /// included).
    #[arg(long, default_value = "test")]
    split: String,
    /// Per-channel mean of pixel/255, comma separated (default 0).
    #[arg(long, value_delimiter = ',')]
    mean: Option<Vec<f32>>,
    /// Per-channel std of pixel/255, comma separated (default 1).
    #[arg(long, value_delimiter = ',')]
    std: Option<Vec<f32>>,
    #[command(flatten)]
    quant: eval::QuantArgs,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Evaluate only the first N images of the split.
    #[arg(long)]
    limit: Option<usize>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (log_format, level) = match &cli.command {
        Command::Run(a) => (a.log_format.as_str(), "info"),
        // The bench runs many short runs; their info lines would bury its result.
        Command::Bench(_) | Command::Scale(_) => ("text", "warn"),
        _ => ("text", "info"),
    };
    // Logs go to stderr (stdout carries results and `--json` output); the writer keeps the
    // progress bar intact when a log line is written.
    ccq_proto::process::init_tracing(log_format, level, ccq_coordinator::progress::LogWriter);
    if let Command::Status(a) = &cli.command {
        // Scripts rely on exit code 2 for an unreachable coordinator.
        return status::main(
            &a.addr,
            a.token.as_deref(),
            a.tls_ca.as_deref(),
            a.json,
            a.watch,
        );
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => {
            let resume_dir = a.resume.clone().flatten();
            let mut config = match (&a.config, &resume_dir) {
                (Some(path), _) => RunConfig::load(path)?,
                (None, Some(dir)) => run::config_for_resume(dir)?,
                (None, None) => anyhow::bail!(
                    "--resume without --config needs the run's directory: --resume DIR"
                ),
            };
            if let Some(out) = a.out.or(resume_dir) {
                config.out = out;
            }
            if let Some(seed) = a.seed {
                config.seed = seed;
            }
            if let Some(listen) = a.listen {
                config.cluster.listen = listen;
            }
            if let Some(metrics) = a.metrics {
                config.cluster.metrics_listen = Some(metrics);
            }
            let token = match &a.token_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("--token-file {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                None => a.token.clone(),
            };
            let opts = RunOptions {
                config,
                local_workers: a.local_workers,
                worker_threads: a.worker_threads.max(1),
                token,
                insecure: a.insecure,
                resume: a.resume.is_some(),
            };
            // Two threads woken by turns cost more CPU per request than one doing
            // everything: 55 against 49 µs per evaluation at 128 emulated workers.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(a.threads.max(1))
                .enable_all()
                .build()?;
            let result = rt.block_on(async {
                let addr = &opts.config.cluster.listen;
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listen on {addr}"))?;
                anyhow::Ok(run::run(opts, listener, ccq_proto::process::shutdown_signal()).await?)
            });
            // A shutdown during setup may leave a reference evaluation running on the
            // blocking pool; its result is no longer wanted.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            let report = result?;
            let a = &report.accuracy;
            println!(
                "{}: float {:.2} %  ptq {:.2} %  ccq {:.2} %  (test top-1; {} evaluations, {:.0} s)",
                report.precision, a.float, a.ptq, a.final_, report.evaluations, report.wall_seconds
            );
            println!(
                "outputs: {} and {}/report.json",
                report.model_file,
                report.config.out.display()
            );
            Ok(())
        }
        Command::Status(_) => unreachable!("handled in main"),
        Command::Export(a) => {
            let report = ccq_coordinator::export::run(&a.config()?)?;
            print_report(&report, a.json)
        }
        Command::Bench(a) => {
            let opts = bench::BenchOptions {
                model: bench::ModelSpec::named(&a.model, std::path::Path::new("."))?,
                evaluations: a.evaluations,
                workers: a.workers,
                populations: a.populations,
                group_sizes: a.group_sizes,
                memory_variables: a.memory_variables,
                scratch: std::env::temp_dir().join(format!("ccq-bench-{}", std::process::id())),
            };
            let report = tokio::runtime::Runtime::new()?.block_on(bench::run(&opts));
            let _ = std::fs::remove_dir_all(&opts.scratch);
            let report = report?;
            print_report(&report, a.json)
        }
        Command::Scale(a) => {
            anyhow::ensure!(
                a.round_trip_us >= 0.0 && a.round_trip_us.is_finite(),
                "--round-trip-us must be a number of microseconds >= 0, not {}",
                a.round_trip_us
            );
            if let Some(u) = a.coordinator_us_per_request {
                anyhow::ensure!(
                    u >= 0.0 && u.is_finite(),
                    "--coordinator-us-per-request must be a number of microseconds >= 0, not {u}"
                );
            }
            let opts = bench::scale::ScaleOptions {
                model: bench::ModelSpec::named(&a.model, std::path::Path::new("."))?,
                workers: a.workers.into_iter().filter(|&w| w > 0).collect(),
                replicas: a.replicas,
                window: a.window,
                seconds: a.seconds,
                coordinator_threads: a.coordinator_threads.max(1),
                calibration_images: a.calibration_images,
                scratch: std::env::temp_dir().join(format!("ccq-scale-{}", std::process::id())),
                simulate: a.simulate.into_iter().filter(|&w| w > 0).collect(),
                round_trip_secs: a.round_trip_us * 1e-6,
                coordinator_secs_per_request: a.coordinator_us_per_request.map(|u| u * 1e-6),
                simulate_evaluations: a.simulate_evaluations,
                costs: a.costs,
            };
            let report = bench::scale::run(&opts);
            let _ = std::fs::remove_dir_all(&opts.scratch);
            let report = report?;
            print_report(&report, a.json)
        }
        Command::Eval(a) => {
            let cfg = eval_config(&a)?;
            let report = eval::run(&cfg)?;
            print_report(&report, a.json)
        }
    }
}

/// A command's result on stdout: one JSON object, or its human-readable form.
fn print_report(
    report: &(impl serde::Serialize + std::fmt::Display),
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

fn eval_config(a: &EvalArgs) -> anyhow::Result<EvalConfig> {
    let data: DataSource = a.data.parse().context("--data")?;
    let split: Split = a.split.parse().context("--split")?;
    let normalization = eval::normalization_flags(&a.mean, &a.std)?;
    let quant = a.quant.config()?;
    Ok(EvalConfig {
        model: a.model.clone(),
        data,
        split,
        normalization,
        quant,
        calib_images: a.quant.calib_images,
        threads: a.threads.unwrap_or_else(default_threads),
        limit: a.limit,
    })
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
