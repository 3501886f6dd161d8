//! The `worker` binary: parses the command line, sets up tracing and runs the library's
//! worker loop until the run is done or a signal arrives.

use std::process::ExitCode;

use ccq_common::data::{DataSource, Shard};
use ccq_worker::WorkerConfig;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "ccq worker: evaluates candidate networks on one data shard"
)]
struct Cli {
    /// Coordinator URL, e.g. http://coordinator:50051.
    #[arg(long, env = "CCQ_COORDINATOR")]
    coordinator: String,
    /// Shard K/S of the training data; default: the Kubernetes Indexed-Job index
    /// (JOB_COMPLETION_INDEX mod CCQ_SHARDS, so R × S pods serve S shards R times) if
    /// set, else the coordinator assigns one.
    #[arg(long)]
    shard: Option<String>,
    /// Evaluation threads (default 1: run one worker per core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Read the training data from here instead of the path the coordinator names: the same
    /// format and options (`folder:/mnt/photos?resize=36&crop=32`), another directory.
    #[arg(long, env = "CCQ_DATA")]
    data: Option<String>,
    /// Name shown in `coordinator status` (default: host name).
    #[arg(long, env = "HOSTNAME")]
    name: Option<String>,
    /// Exit with an error after the coordinator has been unreachable this many seconds
    /// (default: retry forever).
    #[arg(long, env = "CCQ_GIVE_UP_AFTER")]
    give_up_after: Option<f64>,
    /// The cluster token the coordinator was started with.
    #[arg(long, env = "CCQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the cluster token from this file instead.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    /// PEM file of the CA that signed the coordinator's TLS certificate (with an
    /// https:// coordinator URL).
    #[arg(long, env = "CCQ_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// `text` or `json` log lines.
    #[arg(long, default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    ccq_proto::process::init_tracing(&cli.log_format, "info", std::io::stderr);
    match run(cli).await {
        Ok(ccq_worker::Exit::RunDone) => ExitCode::SUCCESS,
        // Stopped by a signal before the run finished: not a success, so that a Job
        // controller replaces this worker instead of counting its index complete.
        Ok(ccq_worker::Exit::Shutdown) => ExitCode::from(143),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ccq_worker::Exit> {
    let shard = match (
        &cli.shard,
        std::env::var("JOB_COMPLETION_INDEX").ok(),
        std::env::var("CCQ_SHARDS").ok(),
    ) {
        (Some(s), _, _) => Some(s.parse::<Shard>()?),
        (None, Some(k), Some(n)) => Some(ccq_worker::shard_from_index(&k, &n)?),
        _ => None,
    };
    let data_override = cli
        .data
        .as_deref()
        .map(str::parse::<DataSource>)
        .transpose()?;
    let token = match &cli.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => cli.token.clone(),
    };
    let cfg = WorkerConfig {
        coordinator: cli.coordinator,
        shard,
        threads: cli.threads.max(1),
        name: cli.name.unwrap_or_else(|| "worker".into()),
        data_override,
        token,
        tls_ca: cli.tls_ca,
        give_up_after: cli
            .give_up_after
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(std::time::Duration::from_secs_f64),
    };
    Ok(ccq_worker::run(cfg, ccq_proto::process::shutdown_signal()).await?)
}
