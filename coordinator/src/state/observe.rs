//! What observers see of the loop: the status snapshot, the telemetry published for the
//! metrics endpoint and the progress display, per-layer confidence, and the warning that
//! work waits with no worker connected.

use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::telemetry::{eta, RunStatus, Telemetry, WorkerRow};
use super::State;
use crate::checkpoint::Phase;
use crate::history::LayerConfidence;

/// How long work may wait without any worker before the coordinator logs it, and how
/// often it repeats the message while nothing changes.
const NO_WORKER_GRACE: Duration = Duration::from_secs(2);
const NO_WORKER_REPEAT: Duration = Duration::from_secs(30);

/// Since when work has been waiting with no worker connected, and when that was last
/// logged: a run with no workers must say so, not report 0.0/s forever.
#[derive(Debug, Default)]
pub struct NoWorkerWatch {
    since: Option<Instant>,
    logged: Option<Instant>,
}

impl NoWorkerWatch {
    /// Whether to log now, given whether work waits with nobody to do it.
    fn due(&mut self, waiting: bool, now: Instant) -> Option<Duration> {
        if !waiting {
            *self = NoWorkerWatch::default();
            return None;
        }
        let since = *self.since.get_or_insert(now);
        let repeat = self
            .logged
            .is_none_or(|at| now.duration_since(at) >= NO_WORKER_REPEAT);
        let waited = now.duration_since(since);
        (waited >= NO_WORKER_GRACE && repeat).then(|| {
            self.logged = Some(now);
            waited
        })
    }
}

impl State {
    pub(super) fn publish(&self) {
        let p = self.trainer.progress();
        self.telemetry.send_replace(Some(Telemetry {
            status: self.status(),
            generations: p.generations,
            adoptions: p.adoptions,
            jobs_completed: self.counters.jobs_completed,
            jobs_retried: self.counters.jobs_retried,
            job_seconds: self.counters.job_seconds.clone(),
            // Live workers only: departed ones would otherwise keep their series for the
            // rest of the run, and churn (restarts, moves, reaping) would grow the scrape
            // without bound.
            worker_job_seconds: self
                .counters
                .worker_job_seconds
                .iter()
                .filter(|(id, _)| self.workers.get(**id).is_some())
                .map(|(id, h)| (*id, h.clone()))
                .collect(),
        }));
    }

    /// Set while jobs wait and no worker is connected: what is wrong and how to fix it.
    pub(super) fn waiting_for_workers(&self) -> Option<String> {
        (self.phase != Phase::Done && self.jobs.any_pending() && self.workers.is_empty()).then(
            || {
                "no worker is connected and work is waiting: start workers with \
                 `worker --coordinator http://ADDR` (ADDR = this coordinator's --listen address), \
                 or restart with --local-workers N (local workers are not part of a checkpoint: \
                 a resumed local run needs the flag again)"
                    .to_string()
            },
        )
    }

    pub(super) fn watch_for_no_workers(&mut self) {
        let message = self.waiting_for_workers();
        if let Some(waited) = self.no_worker.due(message.is_some(), Instant::now()) {
            warn!(
                waiting_secs = waited.as_secs(),
                "{}",
                message.unwrap_or_default()
            );
        }
    }

    pub(super) fn layer_confidence(&self) -> Vec<LayerConfidence> {
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

    pub(super) fn status(&self) -> RunStatus {
        let p = self.trainer.progress();
        let eda = self.trainer.eda();
        let elapsed = self.elapsed();
        let rate = self.counters.rate();
        let b = &self.setup.config.budget;
        let latest = self.history.latest();
        // The layer of the newest generation in flight.
        let layer = (self.trainer.in_flight().back())
            .map(|g| g.layer)
            .and_then(|l| self.trainer.network().layers.get(l as usize))
            .map(|l| l.name.clone())
            .unwrap_or_default();
        let now = Instant::now();
        RunStatus {
            run_id: self.setup.run_id.clone(),
            phase: self.phase.as_str().into(),
            elapsed_secs: elapsed,
            cycle: p.cycles,
            group: p.groups,
            generation: p.generations,
            layer,
            evaluations: p.evaluations,
            evaluations_per_sec: rate,
            best_fitness: self.last.best_loss.unwrap_or(f64::NAN),
            train_top1: self.last.train_top1,
            val_top1: latest.map(|h| h.val_top1),
            test_top1: latest.map(|h| h.test_top1),
            float_top1: self.setup.float_top1,
            ptq_top1: self.setup.ptq_top1.unwrap_or(f64::NAN),
            frozen_variables: eda.frozen_count() as u64,
            free_variables: eda.free_count() as u64,
            mean_confidence: eda.mean_confidence(),
            eta_secs: eta(
                p.evaluations,
                rate,
                b.evaluations,
                b.wall_seconds.map(|w| w - elapsed),
            ),
            waiting_for_workers: self.waiting_for_workers().unwrap_or_default(),
            workers: self
                .workers
                .iter()
                .map(|(id, w)| WorkerRow {
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
            window: u32::try_from(self.trainer.window()).unwrap_or(u32::MAX),
            generations_in_flight: u32::try_from(self.trainer.in_flight().len())
                .unwrap_or(u32::MAX),
            waiting_for_measurement: self.phase == Phase::Training
                && self.trainer.in_flight().is_empty()
                && self.held_for_measurement(),
            rollbacks: self.trainer.progress().rollbacks,
            train_measured_secs: self.last.train_secs,
            test_measured_secs: latest.map(|h| h.wall_seconds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn no_workers_is_said_after_a_grace_period_and_repeated_slowly() {
        let t0 = Instant::now();
        let mut w = NoWorkerWatch::default();
        assert_eq!(w.due(true, t0), None, "just started waiting");
        assert_eq!(w.due(true, t0 + Duration::from_secs(1)), None);
        assert_eq!(
            w.due(true, t0 + NO_WORKER_GRACE),
            Some(NO_WORKER_GRACE),
            "said after the grace period"
        );
        assert_eq!(
            w.due(true, t0 + Duration::from_secs(10)),
            None,
            "not repeated at once"
        );
        let again = t0 + NO_WORKER_GRACE + NO_WORKER_REPEAT;
        assert_eq!(w.due(true, again), Some(again - t0));
        // A worker came: the next wait starts over with its own grace period.
        assert_eq!(w.due(false, again), None);
        assert_eq!(w.due(true, again + Duration::from_secs(1)), None);
        assert!(w
            .due(true, again + Duration::from_secs(1) + NO_WORKER_GRACE)
            .is_some());
    }
}
