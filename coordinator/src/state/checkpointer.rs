//! When to write checkpoints, and writing them off the loop, one at a time.

use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::checkpoint::Checkpoint;
use crate::config::CheckpointConfig;

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
