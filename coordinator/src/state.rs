//! The coordinator's state and the one event loop that owns it.
//!
//! gRPC handlers ([`crate::service`]) turn requests into [`Event`]s; timers and background
//! evaluations do the same. Handling an event never blocks: CPU-heavy work (validation and
//! test evaluations) runs on the blocking pool and reports back as an event.
//!
//! Work flow: the [`Trainer`] produces a generation; it is cut into jobs, one per (shard,
//! slice of candidates) so that several workers of one shard share the candidates; a
//! worker's poll takes a job of its shard; results are summed per candidate (exact integer
//! sums, so arrival order never matters); when every job of the generation is in, the
//! trainer completes it and the next generation starts.
//!
//! Liveness: every request from a worker refreshes it; a worker silent for three heartbeat
//! intervals is dropped and its job goes back to the queue, as does a job held longer than
//! the job timeout. A result for a job the worker no longer holds is refused, so nothing
//! is counted twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use ccq_common::data::Dataset;
use ccq_common::qnet::{EvalStats, QNetwork};
use ccq_proto::v1::{
    poll_job_response, CandidateResult, Done, HeartbeatResponse, Job, PollJobResponse,
    RegisterRequest, RegisterResponse, StatusResponse, SubmitResultRequest, SyncNetworkRequest,
    SyncNetworkResponse, Unknown, VarChange, WorkerStatus,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tracing::{debug, info, warn};

use crate::config::RunConfig;
use ccq_search::trainer::{Generation, Trainer};

pub enum Event {
    Register {
        req: RegisterRequest,
        addr: Option<std::net::SocketAddr>,
        reply: oneshot::Sender<Result<RegisterResponse, Status>>,
    },
    Heartbeat {
        worker: u64,
        reply: oneshot::Sender<HeartbeatResponse>,
    },
    Poll {
        worker: u64,
        reply: oneshot::Sender<PollJobResponse>,
    },
    Submit {
        req: SubmitResultRequest,
        reply: oneshot::Sender<bool>,
    },
    Sync {
        req: SyncNetworkRequest,
        reply: oneshot::Sender<Result<SyncNetworkResponse, Status>>,
    },
    Status {
        reply: oneshot::Sender<StatusResponse>,
    },
    /// Validation/test evaluation `id`, scheduled by [`State::schedule_eval`], finished.
    /// (Its network is dropped by the task: the loop keeps the codes it was built from.)
    EvalDone(u64, EvalPoint),
}

/// Latency histogram in Prometheus form (cumulative buckets are derived when rendered).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, seconds, ascending (+Inf is implicit).
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); one more entry than `bounds` for +Inf.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, x: f64) {
        let b = self.bounds.partition_point(|&u| u < x);
        self.counts[b] += 1;
        self.sum += x;
        self.count += 1;
    }
}

/// What the loop publishes for observers (metrics endpoint, progress display): the live
/// status plus counters that only accumulate. Refreshed every heartbeat interval and after
/// every generation.
#[derive(Debug, Clone)]
pub struct Telemetry {
    pub status: StatusResponse,
    pub generations: u64,
    pub adoptions: u64,
    pub jobs_completed: u64,
    /// Jobs handed out again after a worker was lost, timed out or dropped them.
    pub jobs_retried: u64,
    /// From assignment to accepted result, seconds.
    pub job_seconds: Histogram,
    /// Per worker id: job latency histogram.
    pub worker_job_seconds: BTreeMap<u64, Histogram>,
}

const LATENCY_BOUNDS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// One row of the run's history: the global network measured at a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    pub generation: u64,
    pub evaluations: u64,
    pub wall_seconds: f64,
    /// Mean batch cross-entropy of the latest generation's best candidate.
    pub best_fitness: Option<f64>,
    pub train_top1: Option<f64>,
    pub val_top1: f64,
    pub val_loss: f64,
    pub test_top1: f64,
    pub network_version: u64,
    #[serde(skip)]
    pub is_final: bool,
}

/// Distribution of variable confidence in one layer: `histogram[b]` counts variables with
/// confidence in `[b/20, (b+1)/20)` (the last bin includes 1).
#[derive(Debug, Clone, Serialize)]
pub struct LayerConfidence {
    pub name: String,
    pub variables: usize,
    pub frozen: usize,
    pub mean_confidence: f64,
    pub histogram: Vec<u64>,
}

/// Fixed inputs of the loop.
pub struct Setup {
    pub run_id: String,
    pub config: RunConfig,
    pub data_source: String,
    pub shards: usize,
    pub search_len: usize,
    pub validation: Dataset,
    pub test: Dataset,
    pub float_top1: f64,
    pub ptq_top1: Option<f64>,
    pub eval_threads: usize,
    /// Identity of the quantized network the search started from (checkpoints).
    pub network_fingerprint: String,
    /// Seconds of search before this process took over (a resumed run).
    pub search_seconds_before: f64,
    /// Random per process: tells workers that network versions they hold from another
    /// coordinator process mean nothing here.
    pub instance: String,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Training,
    Evaluating,
    Done,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Training => "training",
            Phase::Evaluating => "evaluating",
            Phase::Done => "done",
        }
    }
}

struct WorkerEntry {
    name: String,
    address: String,
    shard: usize,
    /// The worker asked for its shard (`--shard`, Indexed Job); it is never moved.
    fixed_shard: bool,
    last_seen: Instant,
    job: Option<u64>,
    jobs_done: u64,
    images: u64,
    eval_micros: u64,
}

struct JobEntry {
    shard: usize,
    /// Candidate range of the generation.
    first: usize,
    count: usize,
    images: Vec<u64>,
    assigned: Option<(u64, Instant)>,
}

/// A validation/test measurement not finished when a checkpoint was taken: a resumed
/// run measures these codes again (the result is a function of the codes alone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingEval {
    pub point: EvalPoint,
    pub is_final: bool,
    pub codes: Vec<i8>,
}

/// The event loop's share of a checkpoint (the trainer's is [`ccq_search::trainer::TrainerSnapshot`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopSnapshot {
    pub phase: Phase,
    /// The generation being evaluated; a resumed run evaluates it again from scratch.
    pub generation: Option<Generation>,
    pub pending_evals: Vec<PendingEval>,
    pub history: Vec<EvalPoint>,
    /// Codes of the best network by validation, and where it was measured.
    pub best: Option<(Vec<i8>, EvalPoint)>,
    pub network_version: u64,
    pub last_best_loss: Option<f64>,
    pub last_train_top1: Option<f64>,
    pub last_train_secs: Option<f64>,
    pub stop_reason: Option<String>,
    pub ptq_top1: Option<f64>,
    pub workers_seen: u64,
}

struct GenInProgress {
    generation: Generation,
    version: u64,
    sums: Vec<EvalStats>,
    outstanding: usize,
}

/// The network versions of this process: entry `k` turns version `base + k` into
/// `base + k + 1`. A resumed run starts at the checkpoint's version with no entries
/// (older workers get the whole network). Entries that no sync can use any more are
/// dropped as new ones come, so the log is bounded by the full-network threshold instead
/// of growing with the run.
#[derive(Debug, Default)]
struct ChangeLog {
    entries: VecDeque<Vec<(u32, i8)>>,
    base: u64,
    /// Changes in all entries together.
    changes: usize,
}

impl ChangeLog {
    fn starting_at(version: u64) -> ChangeLog {
        ChangeLog {
            base: version,
            ..ChangeLog::default()
        }
    }

    fn version(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// Appends the next version. Then drops the oldest entry while the entries after it
    /// alone reach `limit`: a worker at a dropped version would have been sent the whole
    /// network anyway (lists only get longer going back), and still is.
    fn push(&mut self, changes: Vec<(u32, i8)>, limit: usize) {
        self.changes += changes.len();
        self.entries.push_back(changes);
        while let Some(front) = self.entries.front() {
            if self.changes - front.len() < limit {
                break;
            }
            self.changes -= front.len();
            self.entries.pop_front();
            self.base += 1;
        }
    }

    /// The changes from version `have` to the current one, if `have` is known and the
    /// list is shorter than `limit`; otherwise the worker needs the whole network.
    fn since(&self, have: u64, limit: usize) -> Option<Vec<VarChange>> {
        if have < self.base || have > self.version() {
            return None;
        }
        let list: Vec<VarChange> = self
            .entries
            .range((have - self.base) as usize..)
            .flatten()
            .map(|&(var, code)| VarChange {
                var,
                code: code.into(),
            })
            .collect();
        (list.len() < limit).then_some(list)
    }
}

pub struct State {
    setup: Setup,
    trainer: Trainer,
    started: Instant,
    phase: Phase,
    workers: BTreeMap<u64, WorkerEntry>,
    next_worker: u64,
    workers_seen: u64,
    jobs: HashMap<u64, JobEntry>,
    pending: Vec<VecDeque<u64>>,
    next_job: u64,
    gen: Option<GenInProgress>,
    parked: Vec<(u64, oneshot::Sender<PollJobResponse>)>,
    /// How each network version differs from the one before, for workers' syncs.
    log: ChangeLog,
    history: Vec<EvalPoint>,
    /// Codes of the best network by validation, and where it was measured. Codes, not a
    /// network: a network also holds its packed kernel weights (3 bytes per variable
    /// instead of 1), and the best one is only needed as a network at the end.
    best: Option<(Vec<i8>, EvalPoint)>,
    /// Validation/test measurements running, by id.
    evals: BTreeMap<u64, PendingEval>,
    next_eval: u64,
    last_best_loss: Option<f64>,
    last_train_top1: Option<f64>,
    /// Seconds since start when `last_train_top1` was measured.
    last_train_secs: Option<f64>,
    stop_reason: Option<String>,
    events: mpsc::Sender<Event>,
    /// (time, evaluations) samples for the recent evaluation rate.
    rate: VecDeque<(Instant, u64)>,
    jobs_completed: u64,
    jobs_retried: u64,
    job_seconds: Histogram,
    worker_job_seconds: BTreeMap<u64, Histogram>,
    telemetry: tokio::sync::watch::Sender<Option<Telemetry>>,
    checkpoints: Checkpointer,
    /// What a resumed run picks up when its loop starts.
    restored: Option<(Option<Generation>, Vec<PendingEval>)>,
    /// Since when work has been waiting with no worker connected, and when that was last
    /// logged: a run with no workers must say so, not report 0.0/s forever.
    no_worker_since: Option<Instant>,
    no_worker_logged: Option<Instant>,
}

/// How long work may wait without any worker before the coordinator logs it, and how
/// often it repeats the message while nothing changes.
const NO_WORKER_GRACE: Duration = Duration::from_secs(2);
const NO_WORKER_REPEAT: Duration = Duration::from_secs(30);

/// Decides when to write checkpoints and writes them off the loop, one at a time.
struct Checkpointer {
    every_generations: u64,
    every: Option<Duration>,
    last_at: Instant,
    last_generation: u64,
    writing: Option<tokio::task::JoinHandle<()>>,
}

impl State {
    pub fn new(
        setup: Setup,
        trainer: Trainer,
        events: mpsc::Sender<Event>,
        telemetry: tokio::sync::watch::Sender<Option<Telemetry>>,
    ) -> State {
        let shards = setup.shards;
        State {
            trainer,
            started: Instant::now(),
            phase: Phase::Training,
            workers: BTreeMap::new(),
            next_worker: 1,
            workers_seen: 0,
            jobs: HashMap::new(),
            pending: vec![VecDeque::new(); shards],
            next_job: 1,
            gen: None,
            parked: Vec::new(),
            log: ChangeLog::default(),
            history: Vec::new(),
            best: None,
            evals: BTreeMap::new(),
            next_eval: 1,
            last_best_loss: None,
            last_train_top1: None,
            last_train_secs: None,
            stop_reason: None,
            events,
            rate: VecDeque::new(),
            no_worker_since: None,
            no_worker_logged: None,
            jobs_completed: 0,
            jobs_retried: 0,
            job_seconds: Histogram::new(&LATENCY_BOUNDS),
            worker_job_seconds: BTreeMap::new(),
            telemetry,
            checkpoints: Checkpointer {
                every_generations: setup.config.checkpoint.every_generations,
                every: (setup.config.checkpoint.every_secs > 0.0)
                    .then(|| Duration::from_secs_f64(setup.config.checkpoint.every_secs)),
                last_at: Instant::now(),
                last_generation: 0,
                writing: None,
            },
            restored: None,
            setup,
        }
    }

    /// Seconds of search, including any before a resume.
    fn elapsed(&self) -> f64 {
        self.setup.search_seconds_before + self.started.elapsed().as_secs_f64()
    }

    /// The loop's state for a checkpoint.
    pub fn snapshot(&self) -> LoopSnapshot {
        LoopSnapshot {
            phase: self.phase,
            generation: self.gen.as_ref().map(|g| g.generation.clone()),
            pending_evals: self.evals.values().cloned().collect(),
            history: self.history.clone(),
            best: self.best.clone(),
            network_version: self.version(),
            last_best_loss: self.last_best_loss,
            last_train_top1: self.last_train_top1,
            last_train_secs: self.last_train_secs,
            stop_reason: self.stop_reason.clone(),
            ptq_top1: self.setup.ptq_top1,
            workers_seen: self.workers_seen,
        }
    }

    /// Takes over a checkpoint's loop state (the trainer was restored already). Every
    /// part is checked against the network first; nothing is changed on error.
    pub fn restore(&mut self, snap: LoopSnapshot, origin: &str) -> Result<(), crate::Error> {
        let bad = |reason: String| crate::Error::Checkpoint {
            path: origin.to_string(),
            reason,
        };
        let n = self.trainer.network().num_vars();
        let codes_ok = |c: &[i8]| c.len() == n;
        if let Some((codes, _)) = &snap.best {
            if !codes_ok(codes) {
                return Err(bad(format!(
                    "state.best holds {} codes, the network has {n}",
                    codes.len()
                )));
            }
        }
        if let Some(e) = snap.pending_evals.iter().find(|e| !codes_ok(&e.codes)) {
            return Err(bad(format!(
                "state.pending_evals (generation {}) holds {} codes, the network has {n}",
                e.point.generation,
                e.codes.len()
            )));
        }
        if let Some(g) = &snap.generation {
            let fits = g.vars.iter().all(|&v| (v as usize) < n)
                && !g.candidates.is_empty()
                && g.candidates.iter().all(|c| c.len() == g.vars.len())
                && g.images
                    .iter()
                    .all(|&i| (i as usize) < self.setup.search_len);
            if !fits {
                return Err(bad(format!(
                    "state.generation {} does not fit the network and data",
                    g.id
                )));
            }
        }
        if snap.phase == Phase::Done {
            return Err(bad("the run it belongs to is finished".into()));
        }
        if let Some((codes, _)) = &snap.best {
            // Checks every code against its layer's range.
            self.trainer
                .network()
                .clone()
                .set_codes(codes)
                .map_err(|e| bad(format!("state.best: {e}")))?;
        }
        let best = snap.best;
        self.phase = snap.phase;
        self.history = snap.history;
        self.best = best;
        self.log = ChangeLog::starting_at(snap.network_version);
        self.last_best_loss = snap.last_best_loss;
        self.last_train_top1 = snap.last_train_top1;
        self.last_train_secs = snap.last_train_secs;
        self.stop_reason = snap.stop_reason;
        self.setup.ptq_top1 = snap.ptq_top1;
        self.workers_seen = snap.workers_seen;
        self.checkpoints.last_generation = self.trainer.progress().generations;
        self.restored = Some((snap.generation, snap.pending_evals));
        Ok(())
    }

    fn publish(&self) {
        let p = self.trainer.progress();
        self.telemetry.send_replace(Some(Telemetry {
            status: self.status(),
            generations: p.generations,
            adoptions: p.adoptions,
            jobs_completed: self.jobs_completed,
            jobs_retried: self.jobs_retried,
            job_seconds: self.job_seconds.clone(),
            worker_job_seconds: self.worker_job_seconds.clone(),
        }));
    }

    fn version(&self) -> u64 {
        self.log.version()
    }

    /// Runs the loop until the run is finished and workers were told, or `shutdown`.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Event>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<Finished, crate::Error> {
        tokio::pin!(shutdown);
        let hb = Duration::from_millis(self.setup.config.cluster.heartbeat_ms);
        let mut tick = tokio::time::interval(hb);
        match self.restored.take() {
            Some((generation, evals)) => {
                for e in evals {
                    let mut net = self.trainer.network().clone();
                    net.set_codes(&e.codes)?;
                    self.spawn_eval(e.point, e.is_final, net);
                }
                match generation {
                    Some(g) => self.launch(g),
                    None if self.phase == Phase::Training => self.start_generation()?,
                    None => {}
                }
                if self.phase == Phase::Evaluating && self.evals.is_empty() {
                    self.schedule_eval(true);
                }
                info!(
                    generation = self.trainer.progress().generations,
                    "resumed from the checkpoint"
                );
            }
            None => {
                // The PTQ network, measured before any search, is history's first row.
                self.schedule_eval(false);
                self.start_generation()?;
            }
        }
        let mut done_since: Option<Instant> = None;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    self.handle(ev)?;
                }
                _ = tick.tick() => {
                    self.reap(hb);
                    self.watch_for_no_workers();
                    self.publish();
                }
                _ = &mut shutdown => {
                    warn!("shutdown requested before the run finished");
                    if self.phase != Phase::Done {
                        // What lets `--resume` continue where this process stopped.
                        self.checkpoint_now().await?;
                    }
                    self.stop_reason.get_or_insert_with(|| "interrupted".into());
                    break;
                }
            }
            if self.phase == Phase::Done {
                // Linger so workers hear "done" from a poll or heartbeat, then leave.
                let since = *done_since.get_or_insert_with(Instant::now);
                let told = self.workers.is_empty();
                if told || since.elapsed() > hb * 3 {
                    break;
                }
            }
        }
        self.settle_checkpoints().await;
        let (best_codes, best_point) = self.best.take().ok_or_else(|| {
            crate::Error::Protocol("the run ended before the PTQ network was evaluated".into())
        })?;
        let mut best_net = self.trainer.network().clone();
        best_net.set_codes(&best_codes)?;
        let last = self
            .history
            .last()
            .cloned()
            .unwrap_or_else(|| best_point.clone());
        let layers = self.layer_confidence();
        Ok(Finished {
            history: self.history,
            best: (best_net, best_point),
            last,
            progress: self.trainer.progress(),
            frozen: self.trainer.eda().frozen_count(),
            layers,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            workers_seen: self.workers_seen,
            complete: self.phase == Phase::Done,
            stop_reason: self.stop_reason.unwrap_or_else(|| "interrupted".into()),
        })
    }

    fn handle(&mut self, ev: Event) -> Result<(), crate::Error> {
        match ev {
            Event::Register { req, addr, reply } => {
                let _ = reply.send(self.register(req, addr));
            }
            Event::Heartbeat { worker, reply } => {
                let known = self.touch(worker);
                let _ = reply.send(HeartbeatResponse {
                    known,
                    done: self.phase == Phase::Done,
                });
                if self.phase == Phase::Done {
                    self.workers.remove(&worker);
                }
            }
            Event::Poll { worker, reply } => self.poll(worker, reply),
            Event::Submit { req, reply } => {
                let accepted = self.submit(req)?;
                let _ = reply.send(accepted);
            }
            Event::Sync { req, reply } => {
                let _ = reply.send(Ok(self.sync(req)));
            }
            Event::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Event::EvalDone(id, point) => self.eval_done(id, point),
        }
        Ok(())
    }

    fn register(
        &mut self,
        req: RegisterRequest,
        addr: Option<std::net::SocketAddr>,
    ) -> Result<RegisterResponse, Status> {
        let shards = self.setup.shards;
        let shard = match (req.shard_index, req.shard_count) {
            (Some(k), Some(s)) => {
                if s as usize != shards || k as usize >= shards {
                    return Err(Status::failed_precondition(format!(
                        "worker asked for shard {k}/{s}, but this run has {shards} shard(s) (0..{shards})"
                    )));
                }
                k as usize
            }
            // The shard with the fewest live workers; ties to the lowest index.
            _ => (0..shards)
                .min_by_key(|&s| (self.workers.values().filter(|w| w.shard == s).count(), s))
                .unwrap_or(0),
        };
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers_seen += 1;
        info!(worker = id, name = %req.name, shard, "worker registered");
        self.workers.insert(
            id,
            WorkerEntry {
                name: req.name,
                address: addr.map_or_else(String::new, |a| a.to_string()),
                fixed_shard: req.shard_index.is_some(),
                shard,
                last_seen: Instant::now(),
                job: None,
                jobs_done: 0,
                images: 0,
                eval_micros: 0,
            },
        );
        Ok(RegisterResponse {
            worker_id: id,
            run_id: self.setup.run_id.clone(),
            shard_index: shard as u32,
            shard_count: shards as u32,
            data_source: self.setup.data_source.clone(),
            search_len: self.setup.search_len as u64,
            heartbeat_interval_ms: self.setup.config.cluster.heartbeat_ms as u32,
            coordinator_instance: self.setup.instance.clone(),
        })
    }

    /// Marks a worker alive; false if unknown.
    fn touch(&mut self, worker: u64) -> bool {
        match self.workers.get_mut(&worker) {
            Some(w) => {
                w.last_seen = Instant::now();
                true
            }
            None => false,
        }
    }

    fn poll(&mut self, worker: u64, reply: oneshot::Sender<PollJobResponse>) {
        let reply_with = |r| PollJobResponse { reply: Some(r) };
        if self.phase == Phase::Done {
            let _ = reply.send(reply_with(poll_job_response::Reply::Done(Done {})));
            self.workers.remove(&worker);
            return;
        }
        if !self.touch(worker) {
            let _ = reply.send(reply_with(poll_job_response::Reply::Unknown(Unknown {})));
            return;
        }
        // A worker works on one job at a time: polling means it holds none, so a job we
        // think it holds was lost in transit and goes back to the queue.
        if let Some(job) = self.workers.get_mut(&worker).and_then(|w| w.job.take()) {
            self.requeue(job);
        }
        if let Some(empty) = self.orphaned_shard_for(worker) {
            // A shard with work and nobody serving it (its worker died, or came back and
            // was assigned elsewhere) would stall the run: an idle, movable worker
            // re-registers and is given that shard, the least served.
            info!(
                worker,
                shard = empty,
                "moving an idle worker to a shard with no worker"
            );
            self.workers.remove(&worker);
            let _ = reply.send(reply_with(poll_job_response::Reply::Unknown(Unknown {})));
            return;
        }
        self.parked.retain(|(w, _)| *w != worker);
        self.parked.push((worker, reply));
        self.dispatch();
    }

    /// A shard with pending jobs and no live worker, if `worker` is free to move there:
    /// it did not ask for its shard and its own shard has nothing pending.
    fn orphaned_shard_for(&self, worker: u64) -> Option<usize> {
        let w = self.workers.get(&worker)?;
        if w.fixed_shard || !self.pending[w.shard].is_empty() {
            return None;
        }
        (0..self.setup.shards)
            .find(|&s| !self.pending[s].is_empty() && !self.workers.values().any(|w| w.shard == s))
    }

    /// Hands pending jobs to parked polls of the right shard.
    fn dispatch(&mut self) {
        let parked = std::mem::take(&mut self.parked);
        for (worker, reply) in parked {
            if reply.is_closed() {
                continue;
            }
            let Some(shard) = self.workers.get(&worker).map(|w| w.shard) else {
                continue;
            };
            let Some(job_id) = self.pending[shard].pop_front() else {
                self.parked.push((worker, reply));
                continue;
            };
            let job = self.job_message(job_id);
            let msg = PollJobResponse {
                reply: Some(poll_job_response::Reply::Job(job)),
            };
            if reply.send(msg).is_err() {
                // The poll timed out just now; keep the job for the next one.
                self.pending[shard].push_front(job_id);
                continue;
            }
            if let Some(j) = self.jobs.get_mut(&job_id) {
                j.assigned = Some((worker, Instant::now()));
            }
            if let Some(w) = self.workers.get_mut(&worker) {
                w.job = Some(job_id);
            }
        }
    }

    fn job_message(&self, job_id: u64) -> Job {
        let j = &self.jobs[&job_id];
        let g = self
            .gen
            .as_ref()
            .expect("jobs exist only during a generation");
        Job {
            job_id,
            network_version: g.version,
            images: j.images.clone(),
            group_vars: g.generation.vars.clone(),
            candidates: g.generation.candidates[j.first..j.first + j.count]
                .iter()
                .map(|c| c.iter().map(|&x| x as u8).collect())
                .collect(),
            first_candidate: j.first as u32,
        }
    }

    fn requeue(&mut self, job_id: u64) {
        if let Some(j) = self.jobs.get_mut(&job_id) {
            if j.assigned.take().is_some() {
                debug!(job = job_id, "job back in the queue");
                self.jobs_retried += 1;
                self.pending[j.shard].push_front(job_id);
            }
        }
    }

    fn submit(&mut self, req: SubmitResultRequest) -> Result<bool, crate::Error> {
        self.touch(req.worker_id);
        let holds = self
            .jobs
            .get(&req.job_id)
            .is_some_and(|j| matches!(j.assigned, Some((w, _)) if w == req.worker_id));
        if !holds {
            debug!(
                job = req.job_id,
                worker = req.worker_id,
                "ignoring a result for a job the worker does not hold"
            );
            return Ok(false);
        }
        let j = &self.jobs[&req.job_id];
        let valid = req.results.len() == j.count
            && req
                .results
                .iter()
                .all(|r| r.images == j.images.len() as u64 && r.correct <= r.images);
        if !valid {
            // A worker that answers with results that cannot belong to its job is broken
            // (or hostile): forget it, so it must register again before it gets work.
            warn!(
                job = req.job_id,
                worker = req.worker_id,
                "malformed result refused; the worker is dropped and the job goes to another"
            );
            self.workers.remove(&req.worker_id);
            self.requeue(req.job_id);
            self.dispatch();
            return Ok(false);
        }
        let j = self.jobs.remove(&req.job_id).expect("checked above");
        if let Some((_, at)) = j.assigned {
            let secs = at.elapsed().as_secs_f64();
            self.job_seconds.observe(secs);
            self.worker_job_seconds
                .entry(req.worker_id)
                .or_insert_with(|| Histogram::new(&LATENCY_BOUNDS))
                .observe(secs);
        }
        self.jobs_completed += 1;
        if let Some(w) = self.workers.get_mut(&req.worker_id) {
            w.job = None;
            w.jobs_done += 1;
            w.images += (j.images.len() * j.count) as u64;
            w.eval_micros += req.eval_micros;
        }
        let g = self
            .gen
            .as_mut()
            .expect("jobs exist only during a generation");
        for (sum, r) in g.sums[j.first..j.first + j.count]
            .iter_mut()
            .zip(&req.results)
        {
            sum.add(&from_proto(r));
        }
        g.outstanding -= 1;
        if g.outstanding == 0 {
            self.finish_generation()?;
        }
        Ok(true)
    }

    fn finish_generation(&mut self) -> Result<(), crate::Error> {
        let g = self.gen.take().expect("a generation is in progress");
        let outcome = self.trainer.complete(&g.generation, &g.sums)?;
        if !outcome.changes.is_empty() {
            let limit = self.full_sync_threshold();
            self.log.push(outcome.changes, limit);
        }
        self.last_best_loss = Some(outcome.best_loss);
        self.last_train_top1 = Some(outcome.best_top1);
        self.last_train_secs = Some(self.elapsed());
        let p = self.trainer.progress();
        self.rate.push_back((Instant::now(), p.evaluations));
        while self.rate.len() > 50 {
            self.rate.pop_front();
        }
        if p.generations
            .is_multiple_of(self.setup.config.eval.every_generations)
        {
            self.schedule_eval(false);
        }
        self.publish();
        self.start_generation()?;
        self.maybe_checkpoint();
        Ok(())
    }

    /// Starts a background checkpoint write if one is due and none is being written.
    /// Taken right after a generation started, so the snapshot holds it.
    fn maybe_checkpoint(&mut self) {
        let gens = self.trainer.progress().generations;
        let c = &self.checkpoints;
        let due = (c.every_generations > 0 && gens >= c.last_generation + c.every_generations)
            || c.every.is_some_and(|t| c.last_at.elapsed() >= t);
        if !due || self.phase != Phase::Training {
            return;
        }
        if c.writing.as_ref().is_some_and(|h| !h.is_finished()) {
            return; // the disk is slower than the interval: skip, try next generation
        }
        let ck = self.checkpoint();
        let dir = self.setup.config.out.clone();
        self.checkpoints.last_at = Instant::now();
        self.checkpoints.last_generation = gens;
        self.checkpoints.writing = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::checkpoint::write_atomic(&dir, &ck.encode()) {
                warn!("checkpoint not written: {e}");
            } else {
                debug!(generation = gens, "checkpoint written");
            }
        }));
    }

    /// Writes a checkpoint now and waits for it (shutdown).
    async fn checkpoint_now(&mut self) -> Result<(), crate::Error> {
        if let Some(h) = self.checkpoints.writing.take() {
            let _ = h.await;
        }
        let ck = self.checkpoint();
        let dir = self.setup.config.out.clone();
        let gens = ck.trainer.progress.generations;
        tokio::task::spawn_blocking(move || crate::checkpoint::write_atomic(&dir, &ck.encode()))
            .await
            .expect("checkpoint writer panicked")?;
        info!(
            generation = gens,
            "checkpoint written; `coordinator run --resume {}` continues the run",
            self.setup.config.out.display()
        );
        Ok(())
    }

    fn checkpoint(&self) -> crate::checkpoint::Checkpoint {
        crate::checkpoint::Checkpoint {
            network_fingerprint: self.setup.network_fingerprint.clone(),
            run_id: self.setup.run_id.clone(),
            config: self.setup.config.clone(),
            search_len: self.setup.search_len,
            float_top1: self.setup.float_top1,
            search_seconds: self.elapsed(),
            trainer: self.trainer.snapshot(),
            state: self.snapshot(),
        }
    }

    /// Waits for a checkpoint still being written (the end of a run).
    pub async fn settle_checkpoints(&mut self) {
        if let Some(h) = self.checkpoints.writing.take() {
            let _ = h.await;
        }
    }

    /// Starts the next generation, or finishes the run when the budget is spent.
    fn start_generation(&mut self) -> Result<(), crate::Error> {
        if self.phase != Phase::Training {
            return Ok(());
        }
        if let Some(reason) = self.budget_spent() {
            return self.finish(reason);
        }
        let Some(generation) = self.trainer.next_generation()? else {
            let reason = match self.trainer.strategy() {
                ccq_search::config::Strategy::Rtn => "strategy rtn: no search",
                _ => "every variable is frozen",
            };
            return self.finish(reason.into());
        };
        self.launch(generation);
        Ok(())
    }

    /// Cuts a generation into jobs and queues them.
    fn launch(&mut self, generation: Generation) {
        let shards = self.setup.shards;
        let mut per_shard: Vec<Vec<u64>> = vec![Vec::new(); shards];
        for &i in &generation.images {
            per_shard[shard_of(i as usize, self.setup.search_len, shards)].push(i);
        }
        let n = generation.candidates.len();
        let mut outstanding = 0;
        for (shard, images) in per_shard.into_iter().enumerate() {
            if images.is_empty() {
                continue;
            }
            // One job per live worker of the shard, each a slice of the candidates.
            let live = self
                .workers
                .values()
                .filter(|w| w.shard == shard)
                .count()
                .clamp(1, n);
            let per = n.div_ceil(live);
            let mut first = 0;
            while first < n {
                let count = per.min(n - first);
                let id = self.next_job;
                self.next_job += 1;
                self.jobs.insert(
                    id,
                    JobEntry {
                        shard,
                        first,
                        count,
                        images: images.clone(),
                        assigned: None,
                    },
                );
                self.pending[shard].push_back(id);
                outstanding += 1;
                first += count;
            }
        }
        self.gen = Some(GenInProgress {
            version: self.version(),
            sums: vec![EvalStats::default(); n],
            generation,
            outstanding,
        });
        self.dispatch();
    }

    fn budget_spent(&self) -> Option<String> {
        if let Some(r) = &self.stop_reason {
            return Some(r.clone());
        }
        let b = &self.setup.config.budget;
        let p = self.trainer.progress();
        if b.evaluations.is_some_and(|e| p.evaluations >= e) {
            return Some(format!("evaluation budget ({}) spent", p.evaluations));
        }
        if b.cycles.is_some_and(|c| p.cycles >= c) {
            return Some(format!("{} cycle(s) done", p.cycles));
        }
        if b.wall_seconds.is_some_and(|s| self.elapsed() >= s) {
            return Some("wall-time budget spent".into());
        }
        None
    }

    fn finish(&mut self, reason: String) -> Result<(), crate::Error> {
        info!("search finished: {reason}");
        self.stop_reason = Some(reason);
        self.phase = Phase::Evaluating;
        self.schedule_eval(true);
        Ok(())
    }

    /// Measures the current global network on validation and test data off the loop.
    fn schedule_eval(&mut self, is_final: bool) {
        let p = self.trainer.progress();
        let net = self.trainer.network().clone();
        let point = EvalPoint {
            generation: p.generations,
            evaluations: p.evaluations,
            wall_seconds: self.elapsed(),
            best_fitness: self.last_best_loss,
            train_top1: self.last_train_top1,
            val_top1: 0.0,
            val_loss: 0.0,
            test_top1: 0.0,
            network_version: self.version(),
            is_final,
        };
        self.spawn_eval(point, is_final, net);
    }

    fn spawn_eval(&mut self, point: EvalPoint, is_final: bool, net: QNetwork) {
        let id = self.next_eval;
        self.next_eval += 1;
        self.evals.insert(
            id,
            PendingEval {
                point: point.clone(),
                is_final,
                codes: net.codes(),
            },
        );
        let (val, test) = (self.setup.validation.clone(), self.setup.test.clone());
        let threads = self.setup.eval_threads;
        let tx = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let v = net.evaluate(&val.images, &val.labels, 256, threads);
            let t = net.evaluate(&test.images, &test.labels, 256, threads);
            let point = EvalPoint {
                val_top1: v.top1(),
                val_loss: v.mean_loss(),
                test_top1: t.top1(),
                ..point
            };
            drop(net);
            let _ = tx.blocking_send(Event::EvalDone(id, point));
        });
    }

    fn eval_done(&mut self, id: u64, point: EvalPoint) {
        let Some(pending) = self.evals.remove(&id) else {
            return;
        };
        let point = EvalPoint {
            is_final: pending.is_final,
            ..point
        };
        info!(
            generation = point.generation,
            evaluations = point.evaluations,
            "val top-1 {:.2} %, test top-1 {:.2} %",
            point.val_top1,
            point.test_top1
        );
        // Model selection uses validation only; the earliest generation wins ties, so
        // the choice does not depend on the order in which measurements finish.
        let better = self.best.as_ref().is_none_or(|(_, b)| {
            point.val_top1 > b.val_top1
                || (point.val_top1 == b.val_top1 && point.generation < b.generation)
        });
        if better {
            self.best = Some((pending.codes, point.clone()));
        }
        if let Some(t) = self.setup.config.budget.target_val_top1 {
            if point.val_top1 >= t && self.stop_reason.is_none() {
                self.stop_reason = Some(format!(
                    "validation top-1 {:.2} % reached the target {t} %",
                    point.val_top1
                ));
            }
        }
        if point.generation == 0 && self.setup.ptq_top1.is_none() {
            self.setup.ptq_top1 = Some(point.test_top1);
        }
        let is_final = point.is_final;
        self.history.push(point);
        // Evaluations can finish out of order; keep history in generation order.
        self.history.sort_by_key(|p| (p.generation, p.is_final));
        // The run is over once the final measurement and any earlier ones are in.
        let finishing = is_final || self.phase == Phase::Evaluating;
        if finishing && self.evals.is_empty() {
            self.phase = Phase::Done;
            self.publish();
            // Wake parked polls so workers learn the run is over.
            for (w, reply) in std::mem::take(&mut self.parked) {
                let _ = reply.send(PollJobResponse {
                    reply: Some(poll_job_response::Reply::Done(Done {})),
                });
                self.workers.remove(&w);
            }
        }
    }

    fn layer_confidence(&self) -> Vec<LayerConfidence> {
        let net = self.trainer.network();
        self.trainer
            .eda()
            .layer_summaries(20)
            .into_iter()
            .map(|s| LayerConfidence {
                name: net
                    .layers
                    .get(s.layer as usize)
                    .map_or_else(String::new, |l| l.name.clone()),
                variables: s.variables,
                frozen: s.frozen,
                mean_confidence: s.mean_confidence,
                histogram: s.histogram,
            })
            .collect()
    }

    /// A change list this long or longer is replaced by the whole network.
    fn full_sync_threshold(&self) -> usize {
        self.trainer.network().num_vars() / 8 + 1024
    }

    fn sync(&self, req: SyncNetworkRequest) -> SyncNetworkResponse {
        let version = self.version();
        // Changes are cheaper than the whole network unless the worker is far behind.
        let changes = req
            .have_version
            .and_then(|h| self.log.since(h, self.full_sync_threshold()));
        match changes {
            Some(changes) => SyncNetworkResponse {
                version,
                full: Vec::new(),
                changes,
            },
            None => SyncNetworkResponse {
                version,
                full: self.trainer.network().to_bytes(),
                changes: Vec::new(),
            },
        }
    }

    fn reap(&mut self, hb: Duration) {
        let now = Instant::now();
        let dead: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > hb * 3)
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            if let Some(w) = self.workers.remove(&id) {
                warn!(worker = id, name = %w.name, "worker lost (no heartbeat)");
                if let Some(job) = w.job {
                    self.requeue(job);
                }
            }
        }
        let timeout = Duration::from_secs_f64(self.setup.config.cluster.job_timeout_secs);
        let expired: Vec<(u64, u64)> = self
            .jobs
            .iter()
            .filter_map(|(&id, j)| {
                j.assigned
                    .filter(|(_, t)| now.duration_since(*t) > timeout)
                    .map(|(w, _)| (id, w))
            })
            .collect();
        for (job, worker) in expired {
            warn!(
                job,
                worker, "job lease expired; giving it to another worker"
            );
            if let Some(w) = self.workers.get_mut(&worker) {
                w.job = None;
            }
            self.requeue(job);
        }
        self.dispatch();
    }

    /// Set while jobs wait and no worker is connected: what is wrong and how to fix it.
    fn waiting_for_workers(&self) -> Option<String> {
        let waiting = self.pending.iter().any(|q| !q.is_empty());
        (self.phase != Phase::Done && waiting && self.workers.is_empty()).then(|| {
            "no worker is connected and work is waiting: start workers with \
             `worker --coordinator http://ADDR` (ADDR = this coordinator's --listen address), \
             or restart with --local-workers N (local workers are not part of a checkpoint: \
             a resumed local run needs the flag again)"
                .to_string()
        })
    }

    fn watch_for_no_workers(&mut self) {
        let Some(message) = self.waiting_for_workers() else {
            self.no_worker_since = None;
            self.no_worker_logged = None;
            return;
        };
        let now = Instant::now();
        let since = *self.no_worker_since.get_or_insert(now);
        let due = self
            .no_worker_logged
            .is_none_or(|at| now.duration_since(at) >= NO_WORKER_REPEAT);
        if now.duration_since(since) >= NO_WORKER_GRACE && due {
            warn!(
                waiting_secs = now.duration_since(since).as_secs(),
                "{message}"
            );
            self.no_worker_logged = Some(now);
        }
    }

    fn status(&self) -> StatusResponse {
        let p = self.trainer.progress();
        let eda = self.trainer.eda();
        let elapsed = self.elapsed();
        let rate = match (self.rate.front(), self.rate.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
            }
            _ => 0.0,
        };
        let b = &self.setup.config.budget;
        let eta = b
            .evaluations
            .filter(|_| rate > 0.0)
            .map(|e| e.saturating_sub(p.evaluations) as f64 / rate)
            .into_iter()
            .chain(b.wall_seconds.map(|w| (w - elapsed).max(0.0)))
            .reduce(f64::min);
        let latest = self
            .history
            .iter()
            .rev()
            .find(|h| h.generation > 0 || self.history.len() == 1);
        let layer = self
            .trainer
            .current_layer()
            .and_then(|l| self.trainer.network().layers.get(l as usize))
            .map(|l| l.name.clone())
            .unwrap_or_default();
        let now = Instant::now();
        StatusResponse {
            run_id: self.setup.run_id.clone(),
            phase: self.phase.as_str().into(),
            elapsed_secs: elapsed,
            cycle: p.cycles,
            group: p.groups,
            generation: p.generations,
            layer,
            evaluations: p.evaluations,
            evaluations_per_sec: rate,
            best_fitness: self.last_best_loss.unwrap_or(f64::NAN),
            train_top1: self.last_train_top1,
            val_top1: latest.map(|h| h.val_top1),
            test_top1: latest.map(|h| h.test_top1),
            float_top1: self.setup.float_top1,
            ptq_top1: self.setup.ptq_top1.unwrap_or(f64::NAN),
            frozen_variables: eda.frozen_count() as u64,
            free_variables: eda.free_count() as u64,
            mean_confidence: eda.mean_confidence(),
            eta_secs: eta,
            waiting_for_workers: self.waiting_for_workers().unwrap_or_default(),
            workers: self
                .workers
                .iter()
                .map(|(&id, w)| WorkerStatus {
                    id,
                    name: w.name.clone(),
                    address: w.address.clone(),
                    shard: w.shard as u32,
                    state: if w.job.is_some() { "busy" } else { "idle" }.into(),
                    jobs_done: w.jobs_done,
                    jobs_in_flight: w.job.is_some() as u32,
                    last_heartbeat_secs: now.duration_since(w.last_seen).as_secs_f64(),
                    images_per_sec: if w.eval_micros > 0 {
                        w.images as f64 / (w.eval_micros as f64 / 1e6)
                    } else {
                        0.0
                    },
                })
                .collect(),
            network_version: self.version(),
            train_measured_secs: self.last_train_secs,
            test_measured_secs: latest.map(|h| h.wall_seconds),
        }
    }
}

/// Answers requests that arrive while the run is still being set up (importing the model,
/// measuring the float reference, calibrating): status tells the phase, workers are asked
/// to come back (they retry with backoff).
pub fn answer_during_setup(ev: Event, run_id: &str, phase: &str, elapsed_secs: f64) {
    let later = || {
        Status::unavailable(format!(
            "the coordinator is still setting up ({phase}); retry"
        ))
    };
    match ev {
        Event::Register { reply, .. } => {
            let _ = reply.send(Err(later()));
        }
        Event::Heartbeat { reply, .. } => {
            let _ = reply.send(HeartbeatResponse {
                known: false,
                done: false,
            });
        }
        Event::Poll { reply, .. } => {
            let _ = reply.send(PollJobResponse {
                reply: Some(poll_job_response::Reply::Unknown(Unknown {})),
            });
        }
        Event::Submit { reply, .. } => {
            let _ = reply.send(false);
        }
        Event::Sync { reply, .. } => {
            let _ = reply.send(Err(later()));
        }
        Event::Status { reply } => {
            let _ = reply.send(StatusResponse {
                run_id: run_id.to_string(),
                phase: phase.to_string(),
                elapsed_secs,
                best_fitness: f64::NAN,
                float_top1: f64::NAN,
                ptq_top1: f64::NAN,
                ..Default::default()
            });
        }
        Event::EvalDone(..) => {}
    }
}

/// The shard holding global training index `i`: the inverse of `Shard::range`.
pub fn shard_of(i: usize, total: usize, shards: usize) -> usize {
    // Shard k holds [k*N/S, (k+1)*N/S); find the largest k with k*N/S <= i.
    let mut k = ((i as u128 * shards as u128) / total.max(1) as u128) as usize;
    k = k.min(shards - 1);
    while k > 0 && (k as u128 * total as u128 / shards as u128) as usize > i {
        k -= 1;
    }
    while k + 1 < shards && ((k + 1) as u128 * total as u128 / shards as u128) as usize <= i {
        k += 1;
    }
    k
}

fn from_proto(r: &CandidateResult) -> EvalStats {
    EvalStats {
        loss_fixed: r.loss_fixed,
        correct: r.correct,
        images: r.images,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccq_common::data::Shard;

    /// Trimming never changes an answer: for every version a worker may hold, the
    /// trimmed log gives the same change list (or the same "send the whole network") as
    /// a log that keeps everything, and its size stays bounded.
    #[test]
    fn trimmed_change_log_answers_like_the_whole_log() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for limit in [1usize, 5, 40] {
            let mut trimmed = ChangeLog::starting_at(7);
            let mut whole = ChangeLog::starting_at(7);
            for _ in 0..300 {
                let n = rng.random_range(0..12);
                let changes: Vec<(u32, i8)> = (0..n)
                    .map(|_| (rng.random_range(0..1000), rng.random_range(-8..8)))
                    .collect();
                trimmed.push(changes.clone(), limit);
                whole.push(changes, usize::MAX);
                assert_eq!(trimmed.version(), whole.version());
                for have in 0..=whole.version() + 1 {
                    let full = whole.since(have, usize::MAX).filter(|l| l.len() < limit);
                    assert_eq!(
                        trimmed.since(have, limit),
                        full,
                        "have {have} limit {limit}"
                    );
                }
                // Bounded: the entries after the oldest kept one hold fewer than `limit`.
                let oldest = trimmed.entries.front().map_or(0, Vec::len);
                assert!(trimmed.changes - oldest < limit);
            }
            assert!(trimmed.base > 7, "old entries were dropped (limit {limit})");
        }
    }

    #[test]
    fn shard_of_inverts_shard_ranges() {
        for total in [1usize, 7, 100, 1001, 49_000] {
            for shards in 1..=9usize {
                for k in 0..shards {
                    let r = Shard {
                        index: k,
                        count: shards,
                    }
                    .range(total);
                    for i in r {
                        assert_eq!(
                            shard_of(i, total, shards),
                            k,
                            "i={i} total={total} shards={shards}"
                        );
                    }
                }
            }
        }
    }
}
