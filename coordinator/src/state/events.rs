//! What the event loop is given ([`Setup`]), asked ([`Event`]), answers, and hands back
//! at the end ([`Finished`]), in domain terms. The gRPC handlers
//! ([`crate::service`]) convert the wire messages to and from these, so the loop never
//! sees a protobuf type or a `tonic::Status`.

use std::net::SocketAddr;
use std::sync::Arc;

use ccq_common::qnet::{EvalStats, QNetwork};
use ccq_search::trainer::Generation;
use tokio::sync::oneshot;

use super::telemetry::RunStatus;
use crate::config::RunConfig;
use crate::history::{EvalPoint, LayerConfidence};

/// Fixed inputs of the loop.
pub struct Setup {
    pub run_id: String,
    pub config: RunConfig,
    pub data_source: String,
    pub shards: usize,
    pub search_len: usize,
    /// Held-out validation images: training indices `search_len..search_len + validation`.
    pub validation: usize,
    /// Test images measured: test indices `0..test`.
    pub test: usize,
    pub float_top1: f64,
    pub ptq_top1: Option<f64>,
    /// Identity of the quantized network the search started from (checkpoints).
    pub network_fingerprint: String,
    /// Seconds of search before this process took over (a resumed run).
    pub search_seconds_before: f64,
    /// Random per process: tells workers that network versions they hold from another
    /// coordinator process mean nothing here.
    pub instance: String,
    /// The float model's logits on the search images (`search.fitness = "distill"`).
    pub teacher: Option<Arc<TeacherLogits>>,
    /// The block-local phase's targets (`search.local_evaluations`).
    pub blocks: Option<Arc<BlockTargets>>,
}

/// The float model's logits on every image of the search part of the training split,
/// computed once at setup; each job carries its images' rows.
#[derive(Debug)]
pub struct TeacherLogits {
    /// `classes` logits per image, by global training index.
    pub logits: Vec<f32>,
    pub classes: usize,
    pub temperature: f32,
}

impl TeacherLogits {
    /// The rows of `images` (global training indices below the search length), in order.
    pub fn rows(&self, images: &[u64]) -> Vec<f32> {
        let c = self.classes;
        images
            .iter()
            .flat_map(|&i| &self.logits[i as usize * c..(i as usize + 1) * c])
            .copied()
            .collect()
    }
}

/// The block-local phase's targets (`search.local_evaluations`): at the end of every
/// block, the float model's codes ([`ccq_common::blocks::targets`]) for every image of
/// the local pool, computed once at setup; a local generation's jobs carry their
/// images' rows at the end of its group's block.
#[derive(Debug)]
pub struct BlockTargets {
    /// The pool: training indices, ascending ([`ccq_search::SearchConfig::local_pool`]).
    pub pool: Vec<u64>,
    /// Per block end: its node and the pool's codes there, image by image.
    pub ends: Vec<(u32, Vec<u8>)>,
    /// Per entry of the network's layer list: the end of its block, `None` in the last
    /// block (scored by the run's fitness).
    pub end_of_layer: Vec<Option<u32>>,
}

impl BlockTargets {
    /// The block end a generation is scored at: `None` outside the local phase and for
    /// groups in the last block.
    pub fn end_for(&self, generation: &Generation) -> Option<u32> {
        if !generation.local {
            return None;
        }
        self.end_of_layer
            .get(generation.layer as usize)
            .copied()
            .flatten()
    }

    /// The codes of `images` (pool members) at block end `node`, image by image.
    pub fn rows(&self, node: u32, images: &[u64]) -> Vec<u8> {
        let Some((_, codes)) = self.ends.iter().find(|(e, _)| *e == node) else {
            return Vec::new();
        };
        let per = codes.len() / self.pool.len().max(1);
        let mut out = Vec::with_capacity(images.len() * per);
        for i in images {
            // A local generation's batch is drawn from the pool (and a restored one is
            // checked against it), so a miss is a bug: the job goes out short and the
            // worker refuses it by name rather than scoring the wrong images.
            if let Ok(k) = self.pool.binary_search(i) {
                out.extend_from_slice(&codes[k * per..(k + 1) * per]);
            }
        }
        out
    }
}

/// What the loop hands back when the run is over.
pub struct Finished {
    pub history: Vec<EvalPoint>,
    /// The network with the best validation accuracy, and where it was measured.
    pub best: (QNetwork, EvalPoint),
    pub last: EvalPoint,
    pub progress: ccq_search::trainer::Progress,
    pub frozen: usize,
    /// Confidence per layer at the end (for the report's plots).
    pub layers: Vec<LayerConfidence>,
    pub wall_seconds: f64,
    pub workers_seen: u64,
    pub stop_reason: String,
    /// The run reached its end (not interrupted): nothing is left to resume.
    pub complete: bool,
}

pub enum Event {
    Register {
        req: RegisterWorker,
        reply: oneshot::Sender<Result<Registration, Refusal>>,
    },
    Heartbeat {
        worker: u64,
        reply: oneshot::Sender<HeartbeatReply>,
    },
    Poll {
        worker: u64,
        reply: oneshot::Sender<PollReply>,
    },
    Submit {
        submission: Submission,
        reply: oneshot::Sender<bool>,
        /// The worker's next poll, handled right after the results (one event per job,
        /// not two).
        then_poll: Option<oneshot::Sender<PollReply>>,
    },
    Sync {
        /// The network version the worker holds, if any.
        have_version: Option<u64>,
        /// The version it needs (a measurement job's); `None`: the latest.
        want_version: Option<u64>,
        reply: oneshot::Sender<Result<NetworkUpdate, Refusal>>,
    },
    Status {
        reply: oneshot::Sender<RunStatus>,
    },
}

/// A worker asking to join.
#[derive(Debug, Clone)]
pub struct RegisterWorker {
    /// Human label (host or pod name); not an identity.
    pub name: String,
    /// The shard it was started for (`--shard K/S`, an Indexed Job), as (K, S).
    pub shard: Option<(u32, u32)>,
    /// Where the request came from, as the server saw it.
    pub address: Option<SocketAddr>,
}

/// What a registered worker is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub worker_id: u64,
    pub run_id: String,
    pub shard: usize,
    pub shards: usize,
    pub data_source: String,
    pub search_len: usize,
    pub heartbeat_ms: u64,
    /// Random per coordinator process (see [`Setup::instance`]).
    pub instance: String,
}

/// Why the loop turned a request down.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The request cannot work with this run (a shard it does not have).
    Invalid(String),
    /// Not now: the coordinator is still setting up; retry.
    NotReady(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeartbeatReply {
    /// False: the worker is unknown here and must register (again).
    pub known: bool,
    /// The run is over; the worker may exit.
    pub done: bool,
}

/// The answer to a poll. (A poll that waits too long is answered "idle" by its handler.)
#[derive(Debug, Clone)]
pub enum PollReply {
    Job(JobSpec),
    Done,
    /// Unknown worker (or one moved to another shard): register again.
    Unknown,
}

/// One job: the network at `network_version` and the work to do with it.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub job_id: u64,
    /// The context network the candidates are sparse deltas against, or the network a
    /// measurement measures.
    pub network_version: u64,
    pub work: Work,
    /// Training jobs: the changes from the version of the worker's previous job to
    /// `network_version`, when the log has them (the worker syncs otherwise).
    pub changes: Option<(u64, Vec<(u32, i8)>)>,
}

#[derive(Debug, Clone)]
pub enum Work {
    /// A slice of a generation's candidates on one shard's part of the batch.
    Candidates {
        /// Global training-split indices of this shard's part of the batch.
        images: Vec<u64>,
        /// Shared with the loop, not copied: the handler encodes the candidate slice.
        generation: Arc<Generation>,
        /// The candidates `first..first + count` of the generation.
        first: usize,
        count: usize,
        /// Shared, not copied: the handler encodes the rows of `images`.
        teacher: Option<Arc<TeacherLogits>>,
        /// A local generation's block and its targets; the handler encodes the rows.
        block: Option<(u32, Arc<BlockTargets>)>,
    },
    /// A block of a validation/test measurement: one result, the network's sums on it.
    Measure(MeasureBlock),
}

/// Which images a measurement block covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasureBlock {
    pub split: EvalSplit,
    /// Index of the first image: in the training split for validation (at or after
    /// `search_len`), in the test split for test.
    pub first: u64,
    pub count: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    Validation,
    Test,
}

/// A worker's results for a job: one entry per candidate of the job, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub worker: u64,
    pub job: u64,
    pub results: Vec<EvalStats>,
    /// Time the worker spent evaluating, for throughput reporting.
    pub eval_micros: u64,
}

/// How a worker brings its network copy up to date.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkUpdate {
    /// The changes from the worker's version to `version`, in order.
    Changes {
        version: u64,
        changes: Vec<(u32, i8)>,
    },
    /// The whole network, encoded for the wire.
    Full { version: u64, network: Vec<u8> },
}

/// Answers requests that arrive while the run is still being set up (importing the model,
/// measuring the float reference, calibrating): status tells the phase, workers are asked
/// to come back (they retry with backoff).
pub fn answer_during_setup(ev: Event, run_id: &str, phase: &str, elapsed_secs: f64) {
    let later = || {
        Refusal::NotReady(format!(
            "the coordinator is still setting up ({phase}); retry"
        ))
    };
    match ev {
        Event::Register { reply, .. } => {
            let _ = reply.send(Err(later()));
        }
        Event::Heartbeat { reply, .. } => {
            let _ = reply.send(HeartbeatReply {
                known: false,
                done: false,
            });
        }
        Event::Poll { reply, .. } => {
            let _ = reply.send(PollReply::Unknown);
        }
        Event::Submit {
            reply, then_poll, ..
        } => {
            let _ = reply.send(false);
            if let Some(poll) = then_poll {
                let _ = poll.send(PollReply::Unknown);
            }
        }
        Event::Sync { reply, .. } => {
            let _ = reply.send(Err(later()));
        }
        Event::Status { reply } => {
            let _ = reply.send(RunStatus {
                run_id: run_id.to_string(),
                phase: phase.to_string(),
                elapsed_secs,
                best_fitness: f64::NAN,
                float_top1: f64::NAN,
                ptq_top1: f64::NAN,
                ..Default::default()
            });
        }
    }
}
