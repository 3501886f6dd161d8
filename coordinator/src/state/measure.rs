//! Validation and test measurements of the global network. They run on the blocking pool
//! (seconds of CPU each) and report back to the loop as [`Event::EvalDone`]; until then
//! the loop keeps the codes being measured, so a checkpoint can ask a resumed run to
//! measure them again.

use std::collections::BTreeMap;
use std::sync::Arc;

use ccq_common::data::Dataset;
use ccq_common::qnet::QNetwork;
use tokio::sync::mpsc;

use super::events::Event;
use crate::checkpoint::PendingEval;
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
