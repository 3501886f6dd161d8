//! When to write checkpoints, and writing them off the loop, one at a time; the loop's
//! share of a checkpoint and taking it over on resume.

use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::changelog::{Change, ChangeLog};
use super::{LastGeneration, State};
use crate::checkpoint::{Checkpoint, LoopSnapshot, Phase};
use crate::config::CheckpointConfig;
use crate::history::History;

pub struct Checkpointer {
    dir: PathBuf,
    every_generations: u64,
    every: Option<Duration>,
    last_at: Instant,
    last_generation: u64,
    writing: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub fn new(cfg: &CheckpointConfig, dir: PathBuf, now: Instant) -> Checkpointer {
        Checkpointer {
            dir,
            every_generations: cfg.every_generations,
            every: (cfg.every_secs > 0.0).then(|| Duration::from_secs_f64(cfg.every_secs)),
            last_at: now,
            last_generation: 0,
            writing: None,
        }
    }

    /// A resumed run counts the interval from the checkpoint it started from.
    pub fn resumed_at(&mut self, generation: u64) {
        self.last_generation = generation;
    }

    /// Is a checkpoint due after `generations`? Never while one is still being written
    /// (the disk is slower than the interval: skip, and try after the next generation).
    pub fn due(&self, generations: u64, now: Instant) -> bool {
        let due = (self.every_generations > 0
            && generations >= self.last_generation + self.every_generations)
            || self
                .every
                .is_some_and(|t| now.duration_since(self.last_at) >= t);
        due && self.writing.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Writes `ck` on the blocking pool; failures are logged (the next one may work).
    pub fn start(&mut self, ck: Checkpoint, generations: u64, now: Instant) {
        let dir = self.dir.clone();
        self.last_at = now;
        self.last_generation = generations;
        self.writing =
            Some(tokio::task::spawn_blocking(
                move || match crate::checkpoint::write_atomic(&dir, &ck.encode()) {
                    Ok(()) => debug!(generation = generations, "checkpoint written"),
                    Err(e) => warn!("checkpoint not written: {e}"),
                },
            ));
    }

    /// Writes `ck` now and waits for it (shutdown, or a run that cannot go on).
    pub async fn write_now(&mut self, ck: Checkpoint) -> Result<(), crate::Error> {
        self.settle().await;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || crate::checkpoint::write_atomic(&dir, &ck.encode()))
            .await
            .map_err(|e| crate::Error::Checkpoint {
                path: crate::checkpoint::path(&self.dir).display().to_string(),
                reason: format!("the writer failed: {e}"),
            })?
    }

    /// Waits for a checkpoint still being written.
    pub async fn settle(&mut self) {
        if let Some(h) = self.writing.take() {
            let _ = h.await;
        }
    }
}

impl State {
    /// The loop's state for a checkpoint.
    pub fn snapshot(&self) -> LoopSnapshot {
        let (history, best) = self.history.clone().into_parts();
        let in_flight_versions = self.jobs.in_flight_versions();
        let oldest = in_flight_versions
            .first()
            .copied()
            .unwrap_or(self.version());
        let recent_changes = (self.log.entries_since(oldest))
            .expect("the log keeps the networks of the generations in flight")
            .into_iter()
            .map(|e| e.into_iter().map(|c| (c.var, c.old, c.new)).collect())
            .collect();
        LoopSnapshot {
            phase: self.phase,
            in_flight_versions,
            recent_changes,
            pending_evals: self.measurements.running(),
            history,
            best,
            network_version: self.version(),
            last_best_loss: self.last.best_loss,
            last_train_top1: self.last.train_top1,
            last_train_secs: self.last.train_secs,
            stop_reason: self.stop_reason.clone(),
            ptq_top1: self.setup.ptq_top1,
            workers_seen: self.workers.seen(),
        }
    }

    /// Takes over a checkpoint's loop state (the trainer was restored already). Every
    /// part is checked against the network first; nothing is changed on error.
    pub fn restore(&mut self, snap: LoopSnapshot, origin: &str) -> Result<(), crate::Error> {
        snap.check(self.trainer.network(), origin)?;
        let in_flight = self.trainer.in_flight().len();
        if snap.in_flight_versions.len() != in_flight {
            return Err(crate::Error::Checkpoint {
                path: origin.to_string(),
                reason: format!(
                    "state.in_flight_versions names {} versions for the trainer's {in_flight} generations in flight",
                    snap.in_flight_versions.len()
                ),
            });
        }
        self.phase = snap.phase;
        self.history = History::restore(snap.history, snap.best);
        let entries = (snap.recent_changes.into_iter())
            .map(|e| {
                (e.into_iter()
                    .map(|(var, old, new)| Change { var, old, new }))
                .collect()
            })
            .collect();
        self.log = ChangeLog::restore(snap.network_version, entries);
        self.last = LastGeneration {
            best_loss: snap.last_best_loss,
            train_top1: snap.last_train_top1,
            train_secs: snap.last_train_secs,
        };
        self.stop_reason = snap.stop_reason;
        self.setup.ptq_top1 = snap.ptq_top1;
        self.workers.restore_seen(snap.workers_seen);
        self.checkpoints
            .resumed_at(self.trainer.progress().generations);
        self.restored = Some((snap.in_flight_versions, snap.pending_evals));
        Ok(())
    }

    /// Starts a background checkpoint write if one is due. Taken right after a
    /// generation started, so the snapshot holds it.
    pub(super) fn maybe_checkpoint(&mut self) {
        let gens = self.trainer.progress().generations;
        let now = Instant::now();
        if self.phase == Phase::Training && self.checkpoints.due(gens, now) {
            let ck = self.checkpoint();
            self.checkpoints.start(ck, gens, now);
        }
    }

    /// Writes a checkpoint now and waits for it (shutdown, failure).
    pub(super) async fn checkpoint_now(&mut self) -> Result<(), crate::Error> {
        let ck = self.checkpoint();
        let gens = ck.trainer.progress.generations;
        self.checkpoints.write_now(ck).await?;
        info!(
            generation = gens,
            "checkpoint written; `coordinator run --resume {}` continues the run",
            self.setup.config.out.display()
        );
        Ok(())
    }

    pub(super) fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(every_generations: u64, every_secs: f64) -> CheckpointConfig {
        CheckpointConfig {
            every_generations,
            every_secs,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checkpoints_are_due_by_generations_or_by_time() {
        let t0 = Instant::now();
        let c = Checkpointer::new(&cfg(10, 0.0), PathBuf::from("x"), t0);
        assert!(
            !c.due(9, t0 + Duration::from_secs(3600)),
            "no time interval set"
        );
        assert!(c.due(10, t0));
        let c = Checkpointer::new(&cfg(0, 60.0), PathBuf::from("x"), t0);
        assert!(
            !c.due(1_000_000, t0 + Duration::from_secs(59)),
            "no generation interval"
        );
        assert!(c.due(0, t0 + Duration::from_secs(60)));
        let mut resumed = Checkpointer::new(&cfg(10, 0.0), PathBuf::from("x"), t0);
        resumed.resumed_at(500);
        assert!(!resumed.due(509, t0));
        assert!(resumed.due(510, t0));
        let off = Checkpointer::new(&cfg(0, 0.0), PathBuf::from("x"), t0);
        assert!(
            !off.due(u64::MAX / 2, t0 + Duration::from_secs(1 << 30)),
            "never when both are off"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_is_not_due_while_the_last_is_being_written() {
        let t0 = Instant::now();
        let mut c = Checkpointer::new(&cfg(1, 0.0), PathBuf::from("x"), t0);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        c.writing = Some(tokio::spawn(async move {
            let _ = rx.await;
        }));
        assert!(!c.due(5, t0));
        tx.send(()).unwrap();
        c.settle().await;
        assert!(c.due(5, t0));
    }
}
