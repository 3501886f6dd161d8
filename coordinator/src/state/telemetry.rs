//! What the loop tells observers: the live status (the `Status` RPC, `coordinator
//! status`), counters and latency histograms (the Prometheus endpoint, the progress
//! display), and the recent evaluation rate behind the ETA.

use std::collections::{BTreeMap, VecDeque};

use tokio::time::Instant;

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
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts `x` in the first bucket whose upper bound is at least `x` (Prometheus `le`).
    pub fn observe(&mut self, x: f64) {
        let b = self.bounds.partition_point(|&u| u < x);
        self.counts[b] += 1;
        self.sum += x;
        self.count += 1;
    }
}

/// Job latency bucket bounds, seconds.
pub const LATENCY_BOUNDS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The live state of a run, as the `Status` RPC reports it (see proto/ccq.proto for the
/// meaning of each field; NaN where a figure does not exist yet).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunStatus {
    pub run_id: String,
    pub phase: String,
    pub elapsed_secs: f64,
    pub cycle: u64,
    pub group: u64,
    pub generation: u64,
    pub layer: String,
    pub evaluations: u64,
    pub evaluations_per_sec: f64,
    pub best_fitness: f64,
    pub train_top1: Option<f64>,
    pub val_top1: Option<f64>,
    pub test_top1: Option<f64>,
    pub float_top1: f64,
    pub ptq_top1: f64,
    pub frozen_variables: u64,
    pub free_variables: u64,
    pub mean_confidence: f64,
    pub eta_secs: Option<f64>,
    pub workers: Vec<WorkerRow>,
    pub network_version: u64,
    pub train_measured_secs: Option<f64>,
    pub test_measured_secs: Option<f64>,
    /// What is wrong and how to fix it while work waits with no worker; empty otherwise.
    pub waiting_for_workers: String,
    /// The search window (`search.window`, resolved) and the generations in flight now.
    pub window: u32,
    pub generations_in_flight: u32,
    /// The search waits for a measurement before it goes on (`search.rollback`), and
    /// the times it went back to its best network.
    pub waiting_for_measurement: bool,
    pub rollbacks: u64,
}

/// One worker in [`RunStatus`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerRow {
    pub id: u64,
    pub name: String,
    pub address: String,
    pub shard: u32,
    /// "busy" or "idle".
    pub state: String,
    pub jobs_done: u64,
    pub jobs_in_flight: u32,
    pub last_heartbeat_secs: f64,
    pub images_per_sec: f64,
}

/// What the loop publishes for observers (metrics endpoint, progress display): the live
/// status plus counters that only accumulate. Refreshed every heartbeat interval and after
/// every generation.
#[derive(Debug, Clone)]
pub struct Telemetry {
    pub status: RunStatus,
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

/// Samples kept for the recent evaluation rate (one per generation).
const RATE_WINDOW: usize = 50;

/// The loop's counters: jobs completed and retried, job latencies, the evaluation rate.
#[derive(Debug)]
pub struct Counters {
    pub jobs_completed: u64,
    pub jobs_retried: u64,
    pub job_seconds: Histogram,
    pub worker_job_seconds: BTreeMap<u64, Histogram>,
    /// (time, evaluations so far) at the end of recent generations.
    rate: VecDeque<(Instant, u64)>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            jobs_completed: 0,
            jobs_retried: 0,
            job_seconds: Histogram::new(&LATENCY_BOUNDS),
            worker_job_seconds: BTreeMap::new(),
            rate: VecDeque::new(),
        }
    }
}

impl Counters {
    /// A job of `worker` was accepted `secs` after it was handed out.
    pub fn job_done(&mut self, worker: u64, secs: f64) {
        self.jobs_completed += 1;
        self.job_seconds.observe(secs);
        self.worker_job_seconds
            .entry(worker)
            .or_insert_with(|| Histogram::new(&LATENCY_BOUNDS))
            .observe(secs);
    }

    /// Records the evaluation count at the end of a generation.
    pub fn sample(&mut self, at: Instant, evaluations: u64) {
        self.rate.push_back((at, evaluations));
        while self.rate.len() > RATE_WINDOW {
            self.rate.pop_front();
        }
    }

    /// Evaluations per second over the recent generations; 0 until two samples apart.
    pub fn rate(&self) -> f64 {
        match (self.rate.front(), self.rate.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// Seconds to the nearer of the budgets: the evaluations left at `rate`, or the wall time
/// left. None when neither can be told.
pub fn eta(
    evaluations: u64,
    rate: f64,
    budget_evaluations: Option<u64>,
    wall_left: Option<f64>,
) -> Option<f64> {
    budget_evaluations
        .filter(|_| rate > 0.0)
        .map(|e| e.saturating_sub(evaluations) as f64 / rate)
        .into_iter()
        .chain(wall_left.map(|w| w.max(0.0)))
        .reduce(f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_upper_bounds_inclusive() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for x in [0.05, 0.1, 0.5, 1.0, 3.0] {
            h.observe(x);
        }
        assert_eq!(h.counts, [2, 2, 1]);
        assert_eq!(h.count, 5);
        assert!((h.sum - 4.65).abs() < 1e-12);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_covers_the_recent_window_only() {
        let mut c = Counters::default();
        assert_eq!(c.rate(), 0.0);
        let t0 = Instant::now();
        c.sample(t0, 0);
        assert_eq!(c.rate(), 0.0, "one sample has no rate");
        // 100 evaluations a second for 60 generations, then 10 a second for 50.
        let mut evals = 0;
        let mut t = t0;
        for _ in 0..60 {
            t += Duration::from_secs(1);
            evals += 100;
            c.sample(t, evals);
        }
        assert!((c.rate() - 100.0).abs() < 1e-9);
        for _ in 0..RATE_WINDOW {
            t += Duration::from_secs(1);
            evals += 10;
            c.sample(t, evals);
        }
        // The window now holds slow generations only.
        assert!((c.rate() - 10.0).abs() < 1e-9, "{}", c.rate());
    }

    #[test]
    fn counters_count_jobs_per_worker() {
        let mut c = Counters::default();
        c.job_done(3, 0.02);
        c.job_done(3, 2.0);
        c.job_done(5, 0.02);
        assert_eq!(c.jobs_completed, 3);
        assert_eq!(c.job_seconds.count, 3);
        assert_eq!(c.worker_job_seconds[&3].count, 2);
        assert_eq!(c.worker_job_seconds[&5].counts[1], 1);
    }

    #[test]
    fn eta_takes_the_nearer_budget() {
        assert_eq!(eta(100, 10.0, Some(1100), None), Some(100.0));
        assert_eq!(eta(100, 10.0, Some(1100), Some(50.0)), Some(50.0));
        assert_eq!(eta(100, 0.0, Some(1100), None), None, "no rate yet");
        assert_eq!(eta(100, 0.0, Some(1100), Some(-3.0)), Some(0.0));
        assert_eq!(eta(2000, 10.0, Some(1100), None), Some(0.0), "spent");
        assert_eq!(eta(100, 10.0, None, None), None);
    }
}
