//! The coordinator's run state and the one event loop that owns it.
//!
//! gRPC handlers ([`crate::service`]) turn requests into [`Event`]s (domain types only);
//! timers and background measurements do the same. Handling an event never blocks:
//! CPU-heavy work (validation and test measurements, checkpoint writes) runs on the
//! blocking pool and reports back.
//!
//! The state is made of parts, each owning one concern and tested on its own:
//! [`workers::WorkerRegistry`] (who is connected, shards, liveness),
//! [`jobs::JobQueue`] (the generations in flight as jobs, leases, dispatch, the sums, the
//! order they merge in),
//! [`changelog::ChangeLog`] (network versions for syncs), [`crate::history::History`]
//! (measurements and the best network), [`measure::Measurements`] (measurements
//! running), [`telemetry::Counters`] and [`checkpointer::Checkpointer`]. This module
//! wires them to the [`Trainer`]: a generation is launched as jobs, results are summed,
//! and when every job of it and of every older generation is in the trainer completes it
//! and the window (`search.window` generations in flight) is filled again, so generation
//! `g` always starts right after `g - window` merged, whatever the order results came in.
//!
//! Liveness: every request from a worker refreshes it; a worker silent for three heartbeat
//! intervals is dropped and its job goes back to the queue, as does a job held longer than
//! the job timeout. A result for a job the worker no longer holds is refused, so nothing
//! is counted twice; a result that cannot be honest drops its worker. All times come
//! from tokio's clock, so tests run the loop on paused time.

mod changelog;
mod checkpointer;
mod events;
mod jobs;
mod measure;
mod observe;
pub mod telemetry;
mod workers;

#[cfg(test)]
mod harness;
pub mod sim;

use std::time::Duration;

use ccq_search::trainer::{Generation, Trainer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use self::changelog::{Change, ChangeLog};
use self::checkpointer::Checkpointer;
pub use self::events::{
    answer_during_setup, BlockTargets, EvalSplit, Event, Finished, HeartbeatReply, JobSpec,
    MeasureBlock, NetworkUpdate, PollReply, Refusal, RegisterWorker, Registration, Setup,
    Submission, TeacherLogits, Work,
};
use self::jobs::{Accepted, Completed, JobQueue};
use self::measure::Measurements;
use self::observe::NoWorkerWatch;
use self::telemetry::Counters;
pub use self::telemetry::{Histogram, RunStatus, Telemetry, WorkerRow};
use self::workers::WorkerRegistry;
use crate::checkpoint::{PendingEval, Phase};
use crate::history::History;

/// What the latest generation's best candidate scored on its batch.
#[derive(Debug, Clone, Copy, Default)]
struct LastGeneration {
    best_loss: Option<f64>,
    train_top1: Option<f64>,
    /// Seconds of search when it was measured.
    train_secs: Option<f64>,
}

pub struct State {
    setup: Setup,
    trainer: Trainer,
    started: Instant,
    phase: Phase,
    workers: WorkerRegistry,
    jobs: JobQueue,
    /// How each network version differs from the one before, for workers' syncs.
    log: ChangeLog,
    history: History,
    measurements: Measurements,
    last: LastGeneration,
    stop_reason: Option<String>,
    counters: Counters,
    telemetry: watch::Sender<Option<Telemetry>>,
    checkpoints: Checkpointer,
    /// What a resumed run picks up when its loop starts: the network versions of the
    /// trainer's generations in flight, and the measurements running.
    restored: Option<(Vec<u64>, Vec<PendingEval>)>,
    no_worker: NoWorkerWatch,
    /// The last older network version (measured, or of a generation in flight) sent
    /// whole, encoded (see `sync`).
    older_whole: Option<(u64, Vec<u8>)>,
}

impl State {
    pub fn new(
        setup: Setup,
        trainer: Trainer,
        telemetry: watch::Sender<Option<Telemetry>>,
    ) -> State {
        let now = Instant::now();
        let window = trainer.window();
        info!("{window} generation(s) in flight (search.window)");
        State {
            trainer,
            started: now,
            phase: Phase::Training,
            workers: WorkerRegistry::new(setup.shards),
            jobs: JobQueue::new(setup.shards)
                .with_teacher(setup.teacher.clone())
                .with_blocks(setup.blocks.clone())
                .with_window(window),
            log: ChangeLog::default(),
            history: History::default(),
            measurements: Measurements::default(),
            last: LastGeneration::default(),
            stop_reason: None,
            counters: Counters::default(),
            telemetry,
            checkpoints: Checkpointer::new(&setup.config.checkpoint, setup.config.out.clone(), now),
            restored: None,
            no_worker: NoWorkerWatch::default(),
            older_whole: None,
            setup,
        }
    }

    /// Seconds of search, including any before a resume.
    fn elapsed(&self) -> f64 {
        self.setup.search_seconds_before + self.started.elapsed().as_secs_f64()
    }

    fn version(&self) -> u64 {
        self.log.version()
    }

    /// Runs the loop until the run is finished and workers were told, or `shutdown`.
    /// If an event cannot be handled, the error is logged and a checkpoint written
    /// before it is returned, so the run can be resumed once the cause is fixed.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Event>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<Finished, crate::Error> {
        tokio::pin!(shutdown);
        let hb = Duration::from_millis(self.setup.config.cluster.heartbeat_ms);
        let mut tick = tokio::time::interval(hb);
        if let Err(e) = self.begin() {
            return Err(self.fail(e).await);
        }
        let mut done_since: Option<Instant> = None;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    if let Err(e) = self.handle(ev) {
                        return Err(self.fail(e).await);
                    }
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
                if self.workers.is_empty() || since.elapsed() > hb * 3 {
                    break;
                }
            }
        }
        self.checkpoints.settle().await;
        self.finished()
    }

    /// The first generation, or what a resumed run was in the middle of.
    fn begin(&mut self) -> Result<(), crate::Error> {
        match self.restored.take() {
            Some((versions, evals)) => {
                for e in evals {
                    // The checkpoint's codes must fit this network before workers get them.
                    self.trainer.network().clone().set_codes(&e.codes)?;
                    self.launch_measurement(e.point, e.is_final, e.codes)?;
                }
                // The generations in flight, evaluated again on the networks they were
                // sampled against.
                let in_flight: Vec<Generation> = self.trainer.in_flight().iter().cloned().collect();
                for (g, version) in in_flight.into_iter().zip(versions) {
                    self.launch_at(g, version);
                }
                self.start_generation()?;
                if self.phase == Phase::Evaluating && self.measurements.is_empty() {
                    self.schedule_eval(true)?;
                }
                info!(
                    generation = self.trainer.progress().generations,
                    "resumed from the checkpoint"
                );
            }
            None => {
                // The PTQ network, measured before any search, is history's first row.
                self.schedule_eval(false)?;
                self.start_generation()?;
            }
        }
        Ok(())
    }

    /// The run cannot go on: says so, and leaves a checkpoint to resume from.
    async fn fail(&mut self, e: crate::Error) -> crate::Error {
        error!("the run cannot go on: {e}");
        if self.phase != Phase::Done {
            if let Err(ck) = self.checkpoint_now().await {
                error!("and its final checkpoint could not be written: {ck}");
            }
        }
        e
    }

    fn finished(mut self) -> Result<Finished, crate::Error> {
        let layers = self.layer_confidence();
        let (history, best) = std::mem::take(&mut self.history).into_parts();
        let (best_codes, best_point) = best
            .ok_or_else(|| crate::Error::Unmeasured(self.setup.config.out.display().to_string()))?;
        let mut best_net = self.trainer.network().clone();
        best_net.set_codes(&best_codes)?;
        let last = history
            .last()
            .cloned()
            .unwrap_or_else(|| best_point.clone());
        Ok(Finished {
            history,
            best: (best_net, best_point),
            last,
            progress: self.trainer.progress(),
            frozen: self.trainer.eda().frozen_count(),
            layers,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            workers_seen: self.workers.seen(),
            complete: self.phase == Phase::Done,
            stop_reason: self.stop_reason.unwrap_or_else(|| "interrupted".into()),
        })
    }

    fn handle(&mut self, ev: Event) -> Result<(), crate::Error> {
        match ev {
            Event::Register { req, reply } => {
                let _ = reply.send(self.register(req));
            }
            Event::Heartbeat { worker, reply } => {
                let known = self.workers.touch(worker, Instant::now());
                let done = self.phase == Phase::Done;
                let _ = reply.send(HeartbeatReply { known, done });
                if done {
                    self.workers.remove(worker);
                }
            }
            Event::Poll { worker, reply } => self.poll(worker, reply),
            Event::Submit {
                submission,
                reply,
                then_poll,
            } => {
                let worker = submission.worker;
                let accepted = self.submit(submission)?;
                let _ = reply.send(accepted);
                if let Some(poll) = then_poll {
                    self.poll(worker, poll);
                }
            }
            Event::Sync {
                have_version,
                want_version,
                reply,
            } => {
                let _ = reply.send(Ok(self.sync(have_version, want_version)));
            }
            Event::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
        Ok(())
    }

    fn register(&mut self, req: RegisterWorker) -> Result<Registration, Refusal> {
        let address = req.address.map_or_else(String::new, |a| a.to_string());
        let jobs = &self.jobs;
        let (id, shard) =
            self.workers
                .register(req.name.clone(), address, req.shard, Instant::now(), |s| {
                    jobs.has_pending(s)
                })?;
        info!(worker = id, name = %req.name, shard, "worker registered");
        Ok(Registration {
            worker_id: id,
            run_id: self.setup.run_id.clone(),
            shard,
            shards: self.setup.shards,
            data_source: self.setup.data_source.clone(),
            search_len: self.setup.search_len,
            heartbeat_ms: self.setup.config.cluster.heartbeat_ms,
            instance: self.setup.instance.clone(),
        })
    }

    fn poll(&mut self, worker: u64, reply: oneshot::Sender<PollReply>) {
        if self.phase == Phase::Done {
            let _ = reply.send(PollReply::Done);
            self.workers.remove(worker);
            return;
        }
        if !self.workers.touch(worker, Instant::now()) {
            let _ = reply.send(PollReply::Unknown);
            return;
        }
        // A worker works on one job at a time: polling means it holds none, so a job we
        // think it holds was lost in transit and goes back to the queue.
        if let Some(job) = self.workers.get_mut(worker).and_then(|w| w.job.take()) {
            self.requeue(job);
        }
        let jobs = &self.jobs;
        if let Some(empty) = self
            .workers
            .orphaned_shard_for(worker, |s| jobs.has_pending(s))
        {
            // A shard with work and nobody serving it (its worker died, or came back and
            // was assigned elsewhere) would stall the run: an idle, movable worker
            // re-registers and is given that shard, the least served.
            info!(
                worker,
                shard = empty,
                "moving an idle worker to a shard with no worker"
            );
            self.workers.remove(worker);
            let _ = reply.send(PollReply::Unknown);
            return;
        }
        self.jobs.park(worker, reply);
        self.dispatch();
    }

    /// Hands pending jobs to parked polls and records the leases on the workers.
    fn dispatch(&mut self) {
        let measure_first = self.measurement_overdue();
        let limit = self.full_sync_threshold();
        let (workers, log) = (&self.workers, &self.log);
        let leased = self.jobs.dispatch(
            Instant::now(),
            measure_first,
            |w| workers.get(w).map(|w| w.shard),
            // The changes since the worker's last training job, so that it need not ask.
            |w, version| {
                let from = workers.get(w)?.version_sent.filter(|&v| v != version)?;
                Some((from, log.between(from, version, limit)?))
            },
        );
        for (worker, job) in leased {
            let version = self.jobs.training_version(job);
            if let Some(w) = self.workers.get_mut(worker) {
                w.job = Some(job);
                if version.is_some() {
                    w.version_sent = version;
                }
            }
        }
    }

    fn requeue(&mut self, job: u64) {
        if self.jobs.requeue(job) {
            debug!(job, "job back in the queue");
            self.counters.jobs_retried += 1;
        }
    }

    fn submit(&mut self, s: Submission) -> Result<bool, crate::Error> {
        let now = Instant::now();
        self.workers.touch(s.worker, now);
        match self.jobs.accept(&s, now) {
            Accepted::NotHeld => {
                debug!(
                    job = s.job,
                    worker = s.worker,
                    "ignoring a result for a job the worker does not hold"
                );
                Ok(false)
            }
            Accepted::Implausible(why) => {
                // A worker that answers with results that cannot belong to its job is
                // broken (or hostile): forget it, so it must register again before it
                // gets work; its job (already back in the queue) goes to another.
                warn!(
                    job = s.job,
                    worker = s.worker,
                    "result refused ({why}); the worker is dropped and the job goes to another"
                );
                self.counters.jobs_retried += 1;
                self.workers.remove(s.worker);
                self.dispatch();
                Ok(false)
            }
            Accepted::Counted {
                images,
                held_for,
                complete,
            } => {
                self.counters.job_done(s.worker, held_for.as_secs_f64());
                if let Some(w) = self.workers.get_mut(s.worker) {
                    w.job = None;
                    w.jobs_done += 1;
                    w.images += images;
                    w.eval_micros = w.eval_micros.saturating_add(s.eval_micros);
                }
                match complete {
                    Completed::Nothing => {}
                    Completed::Generations(done) => self.finish_generations(done)?,
                    Completed::Measurement {
                        id,
                        validation,
                        test,
                    } => self.eval_done(id, validation, test)?,
                }
                Ok(true)
            }
        }
    }

    /// Merges generations whose results are all in, oldest first; after each merge the
    /// window is filled again, so what starts never depends on how many came in at once.
    fn finish_generations(
        &mut self,
        done: Vec<(Generation, Vec<ccq_common::qnet::EvalStats>)>,
    ) -> Result<(), crate::Error> {
        for (generation, sums) in done {
            self.merge(generation, sums)?;
        }
        // Telemetry (metrics, progress) is published on the heartbeat tick, not per
        // generation: at hundreds of generations a second its copy of every worker's
        // histogram would cost the loop more than the merges. `coordinator status` asks
        // the loop and is always current.
        self.maybe_checkpoint();
        Ok(())
    }

    fn merge(
        &mut self,
        generation: Generation,
        sums: Vec<ccq_common::qnet::EvalStats>,
    ) -> Result<(), crate::Error> {
        let outcome = self.trainer.complete(&generation, &sums)?;
        self.record_changes(&outcome.changes, &outcome.replaced);
        self.last = LastGeneration {
            best_loss: Some(outcome.best_loss),
            train_top1: Some(outcome.best_top1),
            train_secs: Some(self.elapsed()),
        };
        let p = self.trainer.progress();
        self.counters.sample(Instant::now(), p.evaluations);
        if p.generations
            .is_multiple_of(self.setup.config.eval.every_generations)
        {
            self.schedule_eval(false)?;
        }
        self.start_generation()
    }

    /// A new network version when the trainer changed codes (`changes`, and the codes
    /// they `replaced`), for workers' syncs.
    fn record_changes(&mut self, changes: &[(u32, i8)], replaced: &[i8]) {
        if changes.is_empty() {
            return;
        }
        let limit = self.full_sync_threshold();
        let changes = (changes.iter().zip(replaced))
            .map(|(&(var, new), &old)| Change { var, old, new })
            .collect();
        // The networks of generations still in flight stay in the log.
        let keep = self.jobs.oldest_version().unwrap_or(u64::MAX);
        self.log.push(changes, limit, keep);
    }

    /// Fills the window with new generations; when none can start and none is in flight,
    /// finishes the run (budget spent, every variable frozen).
    fn start_generation(&mut self) -> Result<(), crate::Error> {
        while self.phase == Phase::Training {
            if let Some(reason) = self.budget_spent() {
                if self.trainer.in_flight().is_empty() {
                    self.finish(reason)?;
                }
                return Ok(());
            }
            if self.held_for_measurement() {
                return Ok(());
            }
            let Some(generation) = self.trainer.next_generation()? else {
                if self.trainer.in_flight().is_empty() {
                    let reason = match self.trainer.strategy() {
                        ccq_search::config::Strategy::Rtn => "strategy rtn: no search",
                        _ => "every variable is frozen",
                    };
                    self.finish(reason.into())?;
                }
                return Ok(());
            };
            self.launch(generation);
        }
        Ok(())
    }

    /// Cuts a generation sampled against the current network into jobs and hands them
    /// out.
    fn launch(&mut self, generation: Generation) {
        self.launch_at(generation, self.log.version());
    }

    /// Cuts a generation into jobs (one per live worker of each shard with images in the
    /// batch) on the network at `version` and hands them out.
    fn launch_at(&mut self, generation: Generation, version: u64) {
        let (total, shards) = (self.setup.search_len, self.setup.shards);
        let live = self.workers.live_per_shard();
        self.jobs.launch(
            generation,
            version,
            |i| ccq_common::data::Shard::holding(i as usize, total, shards),
            |s| live[s],
        );
        self.dispatch();
    }

    fn budget_spent(&self) -> Option<String> {
        if let Some(r) = &self.stop_reason {
            return Some(r.clone());
        }
        let b = &self.setup.config.budget;
        let p = self.trainer.progress();
        // Generations in flight count: a window never starts what the budget cannot merge.
        let in_flight: u64 = (self.trainer.in_flight().iter())
            .map(|g| g.candidates.len() as u64)
            .sum();
        let evaluations = p.evaluations + in_flight;
        if b.evaluations.is_some_and(|e| evaluations >= e) {
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
        self.schedule_eval(true)
    }

    /// A change list this long or longer is replaced by the whole network.
    fn full_sync_threshold(&self) -> usize {
        self.trainer.network().num_vars() / 8 + 1024
    }

    /// How a worker holding `have_version` gets to `want_version` (the network a
    /// generation in flight was sampled against, or a running measurement's) or, by
    /// default, to the latest network. A version nobody needs any more is answered with
    /// the latest: the worker then finds its job stale.
    fn sync(&mut self, have_version: Option<u64>, want_version: Option<u64>) -> NetworkUpdate {
        let limit = self.full_sync_threshold();
        let current = self.version();
        if let Some(want) = want_version.filter(|&w| w != current) {
            let needed = self.jobs.has_version(want) || self.measurements.codes_at(want).is_some();
            if needed {
                if let Some(changes) = have_version.and_then(|h| self.log.between(h, want, limit)) {
                    return NetworkUpdate::Changes {
                        version: want,
                        changes,
                    };
                }
                // Every worker's first job on an older network needs it whole: rebuilt
                // once per version, not once per worker.
                if !matches!(&self.older_whole, Some((v, _)) if *v == want) {
                    let net = match want >= self.log.oldest() {
                        true => self.log.network_at(self.trainer.network(), want),
                        false => self.network_at(want),
                    };
                    self.older_whole = net.map(|n| (want, n.to_bytes()));
                }
                if let Some((_, network)) = &self.older_whole {
                    return NetworkUpdate::Full {
                        version: want,
                        network: network.clone(),
                    };
                }
            }
        }
        // Changes are cheaper than the whole network unless the worker is far behind.
        match have_version.and_then(|h| self.log.since(h, limit)) {
            Some(changes) => NetworkUpdate::Changes {
                version: current,
                changes,
            },
            None => NetworkUpdate::Full {
                version: current,
                network: self.trainer.network().to_bytes(),
            },
        }
    }

    /// Drops workers not heard from for three heartbeats and takes back jobs held past
    /// the job timeout; their jobs go to others.
    fn reap(&mut self, hb: Duration) {
        let now = Instant::now();
        for (id, w) in self.workers.reap(now, hb) {
            warn!(worker = id, name = %w.name, "worker lost (no heartbeat)");
            if let Some(job) = w.job {
                self.requeue(job);
            }
        }
        let timeout = Duration::from_secs_f64(self.setup.config.cluster.job_timeout_secs);
        for (job, worker) in self.jobs.expired(now, timeout) {
            warn!(
                job,
                worker, "job lease expired; giving it to another worker"
            );
            if let Some(w) = self.workers.get_mut(worker) {
                w.job = None;
            }
            self.requeue(job);
        }
        // Latency histograms of workers that left by any path (reaped, moved, refused,
        // told the run is done) go with them, so churn does not grow the counters.
        let workers = &self.workers;
        self.counters
            .worker_job_seconds
            .retain(|id, _| workers.get(*id).is_some());
        self.dispatch();
    }
}
