//! What a run records of itself: measurements of the global network (validation and test
//! accuracy at a generation), the choice of the output network among them, and the
//! per-layer confidence the report plots. Plain data and rules: no clock, no I/O.

use serde::{Deserialize, Serialize};

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

/// The run's measurements in generation order, and the best network by validation.
///
/// Measurements run in the background and can finish in any order; neither the order of
/// `points` nor the choice of `best` depends on it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    points: Vec<EvalPoint>,
    /// Codes of the best network by validation, and where it was measured. Codes, not a
    /// network: a network also holds its packed kernel weights (3 bytes per variable
    /// instead of 1), and the best one is only needed as a network at the end.
    best: Option<(Vec<i8>, EvalPoint)>,
}

impl History {
    /// A history taken over from a checkpoint.
    pub fn restore(points: Vec<EvalPoint>, best: Option<(Vec<i8>, EvalPoint)>) -> History {
        History { points, best }
    }

    /// Adds a measurement of the network with `codes`; true if it is the new best.
    ///
    /// Model selection uses validation only; the earliest generation wins ties, so the
    /// choice does not depend on the order in which measurements finish.
    pub fn record(&mut self, point: EvalPoint, codes: Vec<i8>) -> bool {
        let better = self.best.as_ref().is_none_or(|(_, b)| {
            point.val_top1 > b.val_top1
                || (point.val_top1 == b.val_top1 && point.generation < b.generation)
        });
        if better {
            self.best = Some((codes, point.clone()));
        }
        self.points.push(point);
        self.points.sort_by_key(|p| (p.generation, p.is_final));
        better
    }

    pub fn points(&self) -> &[EvalPoint] {
        &self.points
    }

    pub fn best(&self) -> Option<&(Vec<i8>, EvalPoint)> {
        self.best.as_ref()
    }

    /// The measurement status shows: the latest after the search started, or the PTQ
    /// start while it is the only one.
    pub fn latest(&self) -> Option<&EvalPoint> {
        self.points
            .iter()
            .rev()
            .find(|h| h.generation > 0 || self.points.len() == 1)
    }

    pub fn into_parts(self) -> (Vec<EvalPoint>, Option<(Vec<i8>, EvalPoint)>) {
        (self.points, self.best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(generation: u64, val: f64) -> EvalPoint {
        EvalPoint {
            generation,
            evaluations: generation * 16,
            wall_seconds: generation as f64,
            best_fitness: None,
            train_top1: None,
            val_top1: val,
            val_loss: 1.0,
            test_top1: val - 1.0,
            network_version: generation,
            is_final: false,
        }
    }

    /// Whatever order measurements finish in, the history is in generation order and the
    /// best is the highest validation accuracy, the earliest generation among equals.
    #[test]
    fn the_best_and_the_order_do_not_depend_on_arrival_order() {
        let points = [
            (0, 50.0),
            (100, 70.0),
            (200, 80.0),
            (300, 80.0),
            (400, 75.0),
        ];
        // Every rotation and the reverse of each.
        for r in 0..points.len() {
            for reverse in [false, true] {
                let mut order: Vec<_> = points.iter().cycle().skip(r).take(5).collect();
                if reverse {
                    order.reverse();
                }
                let mut h = History::default();
                for &&(g, v) in &order {
                    h.record(point(g, v), vec![g as i8]);
                }
                let gens: Vec<u64> = h.points().iter().map(|p| p.generation).collect();
                assert_eq!(gens, [0, 100, 200, 300, 400]);
                let (codes, best) = h.best().unwrap();
                assert_eq!(
                    (best.generation, codes.as_slice()),
                    (200, &[200u8 as i8][..])
                );
            }
        }
    }

    #[test]
    fn record_says_whether_the_point_is_the_new_best() {
        let mut h = History::default();
        assert!(h.record(point(0, 50.0), vec![0]), "the first is the best");
        assert!(!h.record(point(100, 49.0), vec![1]));
        assert!(
            !h.record(point(200, 50.0), vec![2]),
            "a tie with an earlier one"
        );
        assert!(h.record(point(300, 50.5), vec![3]));
        assert_eq!(h.best().unwrap().0, vec![3]);
        // A final measurement sorts after an ordinary one of the same generation.
        let mut last = point(300, 10.0);
        last.is_final = true;
        h.record(last, vec![4]);
        assert!(h.points().last().unwrap().is_final);
    }

    #[test]
    fn status_shows_the_latest_search_point_or_the_start() {
        let mut h = History::default();
        assert!(h.latest().is_none());
        h.record(point(0, 50.0), vec![0]);
        assert_eq!(h.latest().unwrap().generation, 0, "only the start so far");
        h.record(point(200, 60.0), vec![0]);
        h.record(point(100, 55.0), vec![0]);
        assert_eq!(h.latest().unwrap().generation, 200);
        let (points, best) = h.clone().into_parts();
        assert_eq!(History::restore(points, best), h);
    }
}
