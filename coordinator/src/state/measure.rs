//! Validation and test measurements of the global network, and what the loop does with
//! their results (the history, the best network, a validation target, the end of the
//! run). The coordinator does not measure: a measurement is cut into blocks of images
//! that workers evaluate as low-priority jobs ([`super::jobs`]), and the loop adds their
//! exact integer sums, so a measurement's figures do not depend on which workers took
//! which blocks. Until the last block is in the loop keeps the codes being measured: a
//! worker that needs that network in full is sent it, and a checkpoint asks a resumed
//! run to measure them again.

use std::collections::BTreeMap;

use ccq_common::qnet::{EvalStats, QNetwork};
use tracing::info;

use super::events::PollReply;
use super::jobs::Completed;
use super::State;
use crate::checkpoint::{PendingEval, Phase};
use crate::history::EvalPoint;

/// Bounds of a measurement block. A block is about a training job's share of the batch
/// (`search.batch_size` over the shards), so a worker that takes one at the generation
/// barrier holds the next generation back by little; at least `MIN_BLOCK` images, so a
/// measurement is not thousands of round trips.
const MIN_BLOCK: usize = 16;
const MAX_BLOCK: usize = 256;

/// Images per measurement block for a batch of `batch` images over `shards` shards.
pub fn block_images(batch: usize, shards: usize) -> usize {
    (batch / shards.max(1)).clamp(MIN_BLOCK, MAX_BLOCK)
}

#[derive(Default)]
pub struct Measurements {
    running: BTreeMap<u64, PendingEval>,
    next_id: u64,
}

impl Measurements {
    /// Records a measurement of `codes` (described by `point`) as running; its id.
    pub fn start(&mut self, point: EvalPoint, is_final: bool, codes: Vec<i8>) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.running.insert(
            id,
            PendingEval {
                point,
                is_final,
                codes,
            },
        );
        id
    }

    /// The measurement `id` is in: what was being measured (None if unknown).
    pub fn finish(&mut self, id: u64) -> Option<PendingEval> {
        self.running.remove(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// The measurements still running, in the order they were started.
    pub fn running(&self) -> Vec<PendingEval> {
        self.running.values().cloned().collect()
    }

    /// The codes of a running measurement of network version `version`.
    pub fn codes_at(&self, version: u64) -> Option<&[i8]> {
        self.running
            .values()
            .find(|p| p.point.network_version == version)
            .map(|p| p.codes.as_slice())
    }

    /// Whether a measurement of the network at generation `generation` is running.
    pub fn running_at(&self, generation: u64) -> bool {
        self.running
            .values()
            .any(|p| p.point.generation == generation)
    }

    /// The generation the oldest running measurement was started at.
    pub fn oldest_generation(&self) -> Option<u64> {
        self.running.values().next().map(|p| p.point.generation)
    }
}

impl State {
    /// Measures the current global network on validation and test data, as jobs.
    pub(super) fn schedule_eval(&mut self, is_final: bool) -> Result<(), crate::Error> {
        let p = self.trainer.progress();
        let point = EvalPoint {
            generation: p.generations,
            evaluations: p.evaluations,
            wall_seconds: self.elapsed(),
            best_fitness: self.last.best_loss,
            train_top1: self.last.train_top1,
            val_top1: 0.0,
            val_loss: 0.0,
            test_top1: 0.0,
            network_version: self.version(),
            is_final,
        };
        let codes = self.trainer.network().codes();
        self.launch_measurement(point, is_final, codes)
    }

    /// Queues the blocks of a measurement of `codes`.
    pub(super) fn launch_measurement(
        &mut self,
        point: EvalPoint,
        is_final: bool,
        codes: Vec<i8>,
    ) -> Result<(), crate::Error> {
        let version = point.network_version;
        let id = self.measurements.start(point, is_final, codes);
        let first = self.setup.search_len as u64;
        let validation = first..first + self.setup.validation as u64;
        let test = 0..self.setup.test as u64;
        let block = block_images(self.setup.config.search.batch_size, self.setup.shards) as u64;
        if let Some(Completed::Measurement {
            id,
            validation,
            test,
        }) = self
            .jobs
            .launch_measurement(id, version, validation, test, block)
        {
            self.eval_done(id, validation, test)?;
        }
        self.dispatch();
        Ok(())
    }

    /// Whether the search waits for a measurement before it goes on (`search.rollback`):
    /// no generation starts past the next measured one, and none at all while that
    /// measurement runs, so each decision to go back to the best network is taken at
    /// the same point of the search whatever the workers' speed. Derived from what is
    /// running, so a resumed run waits for the same measurement.
    pub(super) fn held_for_measurement(&self) -> bool {
        if self.setup.config.search.rollback.is_none() {
            return false;
        }
        let every = self.setup.config.eval.every_generations.max(1);
        let done = self.trainer.progress().generations;
        let next = done + self.trainer.in_flight().len() as u64;
        next >= (done / every + 1) * every
            || (self.rollback_point(done) && self.measurements.running_at(done))
    }

    /// Whether a measurement of generation `generation` is one the search waits for
    /// while it runs: with `search.rollback`, during the search, and never the start's
    /// (there is nothing to go back to).
    fn rollback_point(&self, generation: u64) -> bool {
        generation > 0
            && self.phase == Phase::Training
            && self.setup.config.search.rollback.is_some()
    }

    /// With `search.rollback`, after the measurement the search waited for: when it
    /// scored more than the allowed points below the best, the search goes back to the
    /// best network; then it goes on.
    fn after_held_measurement(&mut self, point: &EvalPoint) -> Result<(), crate::Error> {
        if self.below_best(point) {
            self.roll_back_to_best(point)?;
        }
        self.start_generation()
    }

    /// Whether `point` scored more than `search.rollback` points of validation top-1
    /// below the best measurement recorded so far.
    fn below_best(&self, point: &EvalPoint) -> bool {
        let Some(allowed) = self.setup.config.search.rollback else {
            return false;
        };
        self.history
            .best()
            .is_some_and(|(_, best)| best.val_top1 - point.val_top1 > allowed)
    }

    /// With `search.rollback`, whether the final measurement, `point`, found the search
    /// drifted below its best after the last measurement it waited for: then the run
    /// ends on its best network rather than on the drifted one. The search ended with
    /// nothing in flight and the network has not moved since: checked all the same, so
    /// that only the network the run ends with is ever replaced.
    fn ends_below_best(&self, point: &EvalPoint) -> bool {
        self.below_best(point)
            && self.trainer.in_flight().is_empty()
            && point.network_version == self.version()
    }

    /// Sets the global network to the best one measured, re-centring the search on it.
    fn roll_back_to_best(&mut self, point: &EvalPoint) -> Result<(), crate::Error> {
        let Some((codes, best)) = self.history.best() else {
            return Ok(());
        };
        let (codes, best) = (codes.clone(), best.clone());
        let r = self.trainer.roll_back(&codes)?;
        info!(
            generation = point.generation,
            "val top-1 {:.2} % is more than {} points below the best, {:.2} % at \
             generation {}: back to that network ({} codes differ)",
            point.val_top1,
            self.setup.config.search.rollback.unwrap_or_default(),
            best.val_top1,
            best.generation,
            r.changes.len()
        );
        self.record_changes(&r.changes, &r.replaced);
        Ok(())
    }

    /// Whether a measurement has waited long enough to go before training: for half the
    /// measurement interval (a measurement never waits for one after it), or the search
    /// is over.
    pub(super) fn measurement_overdue(&self) -> bool {
        let Some(started) = self.measurements.oldest_generation() else {
            return false;
        };
        if self.phase != Phase::Training {
            return true;
        }
        let every = self.setup.config.eval.every_generations.max(1);
        let waited = self.trainer.progress().generations.saturating_sub(started);
        waited >= every.div_ceil(2)
    }

    /// The network a running measurement measures, whole (for a worker that cannot be
    /// brought there by changes).
    pub(super) fn network_at(&self, version: u64) -> Option<QNetwork> {
        let codes = self.measurements.codes_at(version)?;
        let mut net = self.trainer.network().clone();
        // The codes came from this network's layout; they always fit.
        net.set_codes(codes).ok()?;
        Some(net)
    }

    pub(super) fn eval_done(
        &mut self,
        id: u64,
        validation: EvalStats,
        test: EvalStats,
    ) -> Result<(), crate::Error> {
        let Some(pending) = self.measurements.finish(id) else {
            return Ok(());
        };
        // Whether the search is waiting for it: then nothing has moved since it started.
        let g = pending.point.generation;
        let held = !pending.is_final
            && self.rollback_point(g)
            && g == self.trainer.progress().generations
            && self.trainer.in_flight().is_empty();
        if matches!(&self.older_whole, Some((v, _)) if *v == pending.point.network_version) {
            self.older_whole = None;
        }
        let point = EvalPoint {
            val_top1: validation.top1(),
            val_loss: validation.mean_loss(),
            test_top1: test.top1(),
            is_final: pending.is_final,
            ..pending.point
        };
        info!(
            generation = point.generation,
            evaluations = point.evaluations,
            "val top-1 {:.2} %, test top-1 {:.2} %",
            point.val_top1,
            point.test_top1
        );
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
        if is_final && self.ends_below_best(&point) {
            // Not the network the run ends with after all: recorded as a measurement
            // during the search, and the network it goes back to measured as the final.
            self.history.record(
                EvalPoint {
                    is_final: false,
                    ..point.clone()
                },
                pending.codes,
            );
            self.roll_back_to_best(&point)?;
            return self.schedule_eval(true);
        }
        self.history.record(point.clone(), pending.codes);
        if held {
            return self.after_held_measurement(&point);
        }
        // The run is over once the final measurement and any earlier ones are in.
        let finishing = is_final || self.phase == Phase::Evaluating;
        if finishing && self.measurements.is_empty() {
            self.phase = Phase::Done;
            self.publish();
            // Wake parked polls so workers learn the run is over.
            for (w, reply) in self.jobs.take_parked() {
                let _ = reply.send(PollReply::Done);
                self.workers.remove(w);
            }
        }
        Ok(())
    }
}
