//! The ccq coordinator as a library, so that tests drive exactly what the binary runs.
//!
//! - [`eval`]: `coordinator eval` — accuracy and speed of a float, PTQ or trained network;
//! - [`export`]: `coordinator export` — the integer network as QDQ ONNX or plain arrays;
//! - [`config`]: the run configuration (TOML);
//! - [`checkpoint`]: the run's whole state on disk, written atomically, for `--resume`;
//! - [`history`]: the measurements a run records and the choice of its output network;
//! - [`state`]: the event loop that owns all run state, dispatches jobs, tracks workers;
//! - [`service`]: gRPC handlers: access control, proto <-> domain, forward to the loop;
//! - [`run`]: `coordinator run` — wires it all together and writes the outputs;
//! - [`metrics`]: the Prometheus endpoint; [`progress`]: the progress bar or log lines;
//! - [`report`]: `report.json`, the charts and `report.html` written at the end of a run;
//! - [`status`]: `coordinator status` — a running coordinator's state, once or watched;
//! - [`artifact`]: float-engine setup results (a distillation run's teacher logits, the
//!   block-local phase's targets) kept beside the checkpoint for `--resume`.
//!
//! `coordinator bench` (dispatch rate, wire bytes and memory of the coordinator) is not
//! here: it drives this library from outside, so it lives in the binary (`src/bench/`).

pub mod artifact;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod export;
pub mod history;
pub mod metrics;
pub mod progress;
pub mod report;
pub mod run;
pub mod service;
pub mod state;
pub mod status;

/// Where `coordinator run` listens and `coordinator status` looks by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Errors of the coordinator library; the binary adds context with anyhow at its edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] ccq_common::Error),

    /// A combination of command-line options that cannot work together.
    #[error("{0}")]
    Usage(String),

    #[error("config {path}: {reason}")]
    Config { path: String, reason: String },

    /// A checkpoint that cannot be used: unreadable, corrupted, from another format
    /// version, or written for another model or search configuration.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },

    /// Shutdown was requested before the run started (during the named setup phase).
    #[error("interrupted while {0}, before the search started; nothing was written")]
    Interrupted(String),

    /// The run stopped before any measurement of the network was in, so there is no
    /// network to hand back; its checkpoint lets `--resume` continue.
    #[error(
        "stopped before the first validation measurement was in: no model was written; \
         `coordinator run --resume {0}` continues the run (workers measure it)"
    )]
    Unmeasured(String),

    /// Workers returned something that cannot belong to the job they were given.
    #[error("protocol violation: {0}")]
    Protocol(String),

    /// The search could not go back to its best network (`search.rollback`).
    #[error("cannot go back to the best network: {0}")]
    Rollback(String),
}

/// The search's errors keep their meaning here: a snapshot that does not fit is a bad
/// checkpoint, results that do not fit a generation are a protocol violation, a bad
/// setting is a bad setting (with the same message as before the search had its crate).
impl From<ccq_search::Error> for Error {
    fn from(e: ccq_search::Error) -> Self {
        match e {
            ccq_search::Error::InvalidSetting {
                field,
                value,
                reason,
            } => Error::Common(ccq_common::Error::InvalidSetting {
                field,
                value,
                reason,
            }),
            ccq_search::Error::Snapshot { origin, reason } => Error::Checkpoint {
                path: origin,
                reason,
            },
            ccq_search::Error::Results(why) => Error::Protocol(why),
            ccq_search::Error::Rollback(why) => Error::Rollback(why),
            ccq_search::Error::Network(e) => Error::Common(e),
        }
    }
}
