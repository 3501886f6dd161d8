//! Validation and test measurements of the global network, and what the loop does with
//! their results (the history, the best network, a validation target, the end of the run). They run on the blocking pool
//! (seconds of CPU each) and report back to the loop as [`Event::EvalDone`]; until then
//! the loop keeps the codes being measured, so a checkpoint can ask a resumed run to
//! measure them again.

use std::collections::BTreeMap;
use std::sync::Arc;

use ccq_common::data::Dataset;
use ccq_common::qnet::QNetwork;
use tokio::sync::mpsc;

use tracing::info;

use super::events::{Event, PollReply};
use super::State;
use crate::checkpoint::{PendingEval, Phase};
use crate::history::EvalPoint;

pub struct Measurements {
    running: BTreeMap<u64, PendingEval>,
    next_id: u64,
    validation: Arc<Dataset>,
    test: Arc<Dataset>,
    threads: usize,
    events: mpsc::Sender<Event>,
}

impl Measurements {
    pub fn new(
        validation: Arc<Dataset>,
        test: Arc<Dataset>,
        threads: usize,
        events: mpsc::Sender<Event>,
    ) -> Measurements {
        Measurements {
            running: BTreeMap::new(),
            next_id: 1,
            validation,
            test,
            threads,
            events,
        }
    }

    /// Measures `net` (whose codes `point` describes) on validation and test data off
    /// the loop.
    pub fn spawn(&mut self, point: EvalPoint, is_final: bool, net: QNetwork) {
        let id = self.next_id;
        self.next_id += 1;
        self.running.insert(
            id,
            PendingEval {
                point: point.clone(),
                is_final,
                codes: net.codes(),
            },
        );
        let (val, test) = (Arc::clone(&self.validation), Arc::clone(&self.test));
        let threads = self.threads;
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
}

impl State {
    /// Measures the current global network on validation and test data off the loop.
    pub(super) fn schedule_eval(&mut self, is_final: bool) {
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
        self.measurements
            .spawn(point, is_final, self.trainer.network().clone());
    }

    pub(super) fn eval_done(&mut self, id: u64, point: EvalPoint) {
        let Some(pending) = self.measurements.finish(id) else {
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
        self.history.record(point, pending.codes);
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
    }
}
