//! A deterministic discrete-event simulation of a cluster (issue #16, "simulated").
//!
//! What is simulated is everything around the coordinator's event loop; the loop itself
//! is the real one: this module's [`State`] (worker registry, job queue and window,
//! trainer, change log, measurements) handles the same [`Event`]s the gRPC handlers would
//! send it, in virtual time. Around it:
//!
//! - **W workers**, each doing what a real worker does with a job (bring its network copy
//!   up to date from the changes the job carries or by a sync, evaluate, submit, poll
//!   again), taking the job's cost from a [`CostModel`] calibrated on the machine with the
//!   real engine (`coordinator scale` measures it) and answering with made-up but valid
//!   sums ([`made_up_stats`], the same as the emulated workers').
//! - **The network**: every request and every reply takes half a round trip. A worker
//!   submits a result and takes its next job in one request, as real workers do.
//! - **The coordinator's CPU**: every request occupies one of its cores for a fixed time
//!   (its gRPC handling and its turn of the loop), measured by the emulation; requests
//!   queue when every core is busy. That is where a large cluster saturates it.
//!
//! The clock is tokio's, paused: the loop reads it as it always does, and the simulation
//! moves it to each event's time. Events are ordered by (time, sequence number), so a
//! simulation is a pure function of its inputs: the same bits on every machine, in
//! seconds of real time for hundreds of virtual workers.
//!
//! What it leaves out, as the emulation does: network bandwidth (job and sync sizes),
//! stragglers and failures, and the real fitness values (made-up sums steer the search
//! along another trajectory than a real run's).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use ccq_common::qnet::EvalStats;
use ccq_search::trainer::Trainer;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::{
    JobSpec, NetworkUpdate, Phase, PollReply, RegisterWorker, Setup, State, Submission, Work,
};

/// The calibrated cost of a job on one core: `fixed + images × (base + candidates ×
/// per_candidate[layer])`, seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostModel {
    pub fixed_secs: f64,
    pub base_per_image_secs: f64,
    pub layers: Vec<LayerCost>,
    /// Population and group size the candidates were measured with.
    pub population: usize,
    pub group_size: usize,
    /// Calibration wall time.
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerCost {
    pub layer: usize,
    pub first_var: u32,
    pub variables: usize,
    /// One candidate whose group lies in this layer, per image.
    pub candidate_per_image_secs: f64,
}

impl CostModel {
    /// Seconds a job of `candidates` changed candidates on `images` images whose group
    /// starts with variable `var` costs one core.
    pub fn job_secs(&self, images: usize, candidates: usize, var: u32) -> f64 {
        let i = self.layers.partition_point(|l| l.first_var <= var);
        let per = self
            .layers
            .get(i.saturating_sub(1))
            .map_or(0.0, |l| l.candidate_per_image_secs);
        self.fixed_secs + images as f64 * (self.base_per_image_secs + candidates as f64 * per)
    }

    /// A block of a measurement: one base forward per image.
    pub fn measure_secs(&self, images: u64) -> f64 {
        self.fixed_secs + images as f64 * self.base_per_image_secs
    }

    /// The part of a job of `count` of the generation's candidates (`changed` of them
    /// not the context) that one worker holding the whole batch would also spend: the
    /// changed candidates, and of the base forward and the fixed cost only the job's
    /// share (`images` of `batch`, `count` of the population). Workers that split a
    /// shard's candidates each run the base forward; one worker would run it once.
    pub fn useful_secs(
        &self,
        images: usize,
        count: usize,
        changed: usize,
        var: u32,
        batch: usize,
    ) -> f64 {
        let share = count as f64 / self.population.max(1) as f64;
        let once = self.fixed_secs * images as f64 / batch.max(1) as f64
            + images as f64 * self.base_per_image_secs;
        let candidates = self.job_secs(images, changed, var)
            - self.fixed_secs
            - images as f64 * self.base_per_image_secs;
        once * share + candidates
    }

    /// One generation (the population on a whole batch) on one core.
    pub fn generation_secs(&self, batch: usize) -> f64 {
        let changed = self.population.saturating_sub(1);
        let total: usize = self.layers.iter().map(|l| l.variables).sum();
        // Groups are drawn from layers in proportion to their variables.
        let per: f64 = self
            .layers
            .iter()
            .map(|l| l.candidate_per_image_secs * l.variables as f64 / total.max(1) as f64)
            .sum();
        self.fixed_secs + batch as f64 * (self.base_per_image_secs + changed as f64 * per)
    }
}

/// Made-up but valid sums for a candidate (its codes as the wire carries them) on
/// `images` images: a loss that depends on the codes only, per image, so that blocks of
/// a batch add up to the same total however the batch was cut. The search adopts and
/// freezes as it would on real sums, along another trajectory.
pub fn made_up_stats(codes: impl IntoIterator<Item = u8>, images: u64) -> EvalStats {
    let h = made_up_hash(codes);
    EvalStats {
        loss_fixed: images * ((1 << 23) + (h >> 41)),
        correct: (h % (images + 1)).min(images),
        images,
        paired_sq: 0,
    }
}

/// Made-up but valid sums for a measurement block of `images` images.
pub fn made_up_measurement(images: u64) -> EvalStats {
    EvalStats {
        loss_fixed: images * (1 << 23),
        correct: images / 2,
        images,
        paired_sq: 0,
    }
}

/// FNV-1a.
fn made_up_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The simulated cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub workers: usize,
    /// Round trip between a worker and the coordinator, seconds.
    pub round_trip_secs: f64,
    /// Coordinator CPU per request (gRPC handling and its turn of the loop), seconds.
    pub coordinator_secs_per_request: f64,
    /// Cores that handle requests in parallel.
    pub coordinator_cores: usize,
}

/// What one simulation measured, in virtual time.
#[derive(Debug, Clone, Serialize)]
pub struct SimCase {
    pub workers: usize,
    pub shards: usize,
    pub evaluations: u64,
    pub generations: u64,
    /// Completed passes over the free variables: the window drains at the end of each.
    pub cycles: u64,
    pub measurements: u64,
    /// Virtual seconds from the start to the last merged generation.
    pub search_seconds: f64,
    /// Virtual seconds from the start to the end of the run (its last measurement in),
    /// as a run's report counts `search_seconds`.
    pub finished_seconds: f64,
    /// Candidate evaluations per second over the sustained window (from a fifth of the
    /// evaluations on), counted by the trainer.
    pub evals_per_sec: f64,
    /// As the emulation's: what one ideal worker (the cost model, no coordinator, no
    /// network) would spend on the same generations, over W × the window.
    pub efficiency: f64,
    /// Workers' compute (measurements included) over W × the window.
    pub worker_busy_fraction: f64,
    /// Coordinator CPU over its cores × the window.
    pub coordinator_busy_fraction: f64,
    /// Requests the coordinator handled.
    pub requests: u64,
    pub jobs: u64,
    /// FNV-1a of the final network's codes: equal across cluster sizes for one config,
    /// seed and window, as on a real cluster.
    pub network_hash: String,
    pub stop_reason: String,
    /// Real seconds the simulation took.
    pub real_seconds: f64,
}

/// A request on its way to the coordinator.
#[derive(Debug)]
enum Request {
    Register,
    Poll,
    Submit(Submission),
    Sync {
        have: Option<u64>,
        want: Option<u64>,
    },
}

/// What a worker hears back.
#[derive(Debug)]
enum Reply {
    Registered(u64),
    Poll(PollReply),
    Synced(Option<u64>),
}

#[derive(Debug)]
enum What {
    /// A request reached the coordinator: it waits for a core.
    Arrive(Request),
    /// A core has spent the request's time on it: the loop handles it now.
    Handle(Request),
    /// The reply reached the worker.
    Reply(Reply),
    /// The worker finished computing its job: the seconds it took, and the part of them
    /// one worker holding the whole batch would also have spent.
    Computed { secs: f64, useful: f64 },
}

/// One simulated worker.
#[derive(Default)]
struct Worker {
    id: u64,
    /// Network version of its training copy, and of its measurement copy.
    have: Option<u64>,
    measured: Option<u64>,
    job: Option<JobSpec>,
    /// A poll the loop parked: its answer comes when work does.
    parked: Option<oneshot::Receiver<PollReply>>,
    done: bool,
}

/// One scheduled event. Ordered by (virtual nanoseconds, sequence): the sequence number
/// breaks ties in the order events were scheduled, so nothing depends on the heap's whims.
struct Entry {
    at: u64,
    seq: u64,
    worker: usize,
    what: What,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The event queue, earliest first.
#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
}

impl Queue {
    fn push(&mut self, at: u64, worker: usize, what: What) {
        self.seq += 1;
        let seq = self.seq;
        self.heap.push(Reverse(Entry {
            at,
            seq,
            worker,
            what,
        }));
    }

    fn pop(&mut self) -> Option<(u64, usize, What)> {
        let Reverse(e) = self.heap.pop()?;
        Some((e.at, e.worker, e.what))
    }
}

fn nanos(secs: f64) -> u64 {
    (secs.max(0.0) * 1e9).round() as u64
}

/// Runs the real event loop for `setup` and `trainer` against the simulated `cluster`
/// until the run finishes (its budget must be in evaluations or generations: virtual
/// time runs much faster than wall time).
pub fn simulate(
    setup: Setup,
    trainer: Trainer,
    cost: &CostModel,
    cluster: &Cluster,
) -> Result<SimCase, crate::Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| ccq_common::Error::io("the simulation's runtime", e))?;
    rt.block_on(simulate_paused(setup, trainer, cost, cluster))
}

async fn simulate_paused(
    setup: Setup,
    trainer: Trainer,
    cost: &CostModel,
    cluster: &Cluster,
) -> Result<SimCase, crate::Error> {
    let real = std::time::Instant::now();
    let shards = setup.shards;
    let batch = setup.config.search.batch_size;
    let (telemetry, _) = watch::channel(None);
    let mut state = State::new(setup, trainer, telemetry);
    let start = tokio::time::Instant::now();
    state.begin()?;
    let half = nanos(cluster.round_trip_secs / 2.0);
    let per_request = nanos(cluster.coordinator_secs_per_request);
    let mut cores = vec![0u64; cluster.coordinator_cores.max(1)];
    let mut q = Queue::default();
    let mut workers: Vec<Worker> = (0..cluster.workers).map(|_| Worker::default()).collect();
    for w in 0..workers.len() {
        q.push(half, w, What::Arrive(Request::Register));
    }
    let mut parked: Vec<usize> = Vec::new();
    // (virtual ns, trainer evaluations) at each change, for the sustained rate.
    let mut marks: Vec<(u64, u64)> = vec![(0, 0)];
    // (end, busy ns, useful ns) per job.
    let mut work: Vec<(u64, u64, f64)> = Vec::new();
    // When each request's CPU time on the coordinator ended.
    let mut coordinator_busy: Vec<u64> = Vec::new();
    let (mut requests, mut jobs) = (0u64, 0u64);
    let mut finished_at: Option<u64> = None;

    while let Some((at, w, what)) = q.pop() {
        match what {
            What::Arrive(req) => {
                // The core free first takes it; FIFO across cores.
                let core = (0..cores.len()).min_by_key(|&c| cores[c]).unwrap_or(0);
                let done = cores[core].max(at) + per_request;
                cores[core] = done;
                coordinator_busy.push(done);
                q.push(done, w, What::Handle(req));
            }
            What::Handle(req) => {
                requests += 1;
                let target = start + Duration::from_nanos(at);
                let lag = target.saturating_duration_since(tokio::time::Instant::now());
                if !lag.is_zero() {
                    tokio::time::advance(lag).await;
                }
                let reply = handle(&mut state, &mut workers[w], w, req)?;
                if let Some(r) = reply {
                    q.push(at + half, w, What::Reply(r));
                }
                // Work that appeared may have answered parked polls.
                parked.retain(
                    |&p| match workers[p].parked.as_mut().map(|rx| rx.try_recv()) {
                        Some(Ok(r)) => {
                            workers[p].parked = None;
                            q.push(at + half, p, What::Reply(Reply::Poll(r)));
                            false
                        }
                        Some(Err(oneshot::error::TryRecvError::Empty)) => true,
                        _ => {
                            workers[p].parked = None;
                            false
                        }
                    },
                );
                if workers[w].parked.is_some() && !parked.contains(&w) {
                    parked.push(w);
                }
                let e = state.trainer.progress().evaluations;
                if marks.last().is_some_and(|&(_, m)| m != e) {
                    marks.push((at, e));
                }
                if state.phase == Phase::Done {
                    finished_at.get_or_insert(at);
                    // A real parked poll times out and polls again, to hear "done".
                    for p in parked.drain(..) {
                        workers[p].parked = None;
                        q.push(at + half, p, What::Reply(Reply::Poll(PollReply::Done)));
                    }
                }
            }
            What::Reply(r) => {
                let worker = &mut workers[w];
                let next = match r {
                    Reply::Registered(id) => {
                        worker.id = id;
                        Some(Request::Poll)
                    }
                    Reply::Poll(PollReply::Done) => {
                        worker.done = true;
                        None
                    }
                    Reply::Poll(PollReply::Unknown) => Some(Request::Register),
                    Reply::Poll(PollReply::Job(job)) => {
                        start_job(worker, job, cost, batch, at, &mut q, w)
                    }
                    Reply::Synced(version) => match &worker.job {
                        Some(job) if matches!(job.work, Work::Measure(_)) => {
                            worker.measured = version;
                            if version == Some(job.network_version) {
                                compute(worker, cost, batch, at, &mut q, w);
                                None
                            } else {
                                worker.job = None; // the measurement is over
                                Some(Request::Poll)
                            }
                        }
                        _ => {
                            worker.have = version;
                            let job = worker.job.take().expect("a sync is for a job");
                            if version == Some(job.network_version) {
                                worker.job = Some(job);
                                compute(worker, cost, batch, at, &mut q, w);
                                None
                            } else {
                                Some(Request::Poll) // a stale job: skipped
                            }
                        }
                    },
                };
                if let Some(req) = next {
                    q.push(at + half, w, What::Arrive(req));
                }
            }
            What::Computed { secs, useful } => {
                let worker = &mut workers[w];
                let job = worker.job.take().expect("a worker computes a job it holds");
                let results = match &job.work {
                    Work::Measure(b) => vec![made_up_measurement(b.count)],
                    Work::Candidates {
                        images,
                        generation,
                        first,
                        count,
                        ..
                    } => generation.candidates[*first..first + count]
                        .iter()
                        .map(|c| made_up_stats(c.iter().map(|&x| x as u8), images.len() as u64))
                        .collect(),
                };
                jobs += 1;
                work.push((at, nanos(secs), useful));
                let submission = Submission {
                    worker: worker.id,
                    job: job.job_id,
                    results,
                    eval_micros: (secs * 1e6) as u64,
                };
                q.push(at + half, w, What::Arrive(Request::Submit(submission)));
            }
        }
        if workers.iter().all(|w| w.done) {
            break;
        }
    }

    let p = state.trainer.progress();
    let total = marks.last().map_or(0, |m| m.1);
    let from = marks
        .iter()
        .find(|(_, e)| *e as f64 >= 0.2 * total as f64)
        .copied()
        .unwrap_or((0, 0));
    let to = marks.last().copied().unwrap_or((0, 0));
    let span = to.0.saturating_sub(from.0).max(1);
    let inside = |end: u64| end > from.0 && end <= to.0;
    let (busy, useful) = work
        .iter()
        .filter(|(end, _, _)| inside(*end))
        .fold((0u64, 0.0), |(b, u), (_, s, x)| (b + s, u + x));
    let coordinator =
        coordinator_busy.iter().filter(|&&end| inside(end)).count() as u64 * per_request;
    let capacity = |n: usize| n as f64 * span as f64;
    Ok(SimCase {
        workers: cluster.workers,
        shards,
        evaluations: p.evaluations,
        generations: p.generations,
        cycles: p.cycles,
        measurements: state.history.points().len() as u64,
        search_seconds: to.0 as f64 / 1e9,
        finished_seconds: finished_at.unwrap_or(to.0) as f64 / 1e9,
        evals_per_sec: (to.1 - from.1) as f64 / (span as f64 / 1e9),
        efficiency: useful * 1e9 / capacity(cluster.workers),
        worker_busy_fraction: busy as f64 / capacity(cluster.workers),
        coordinator_busy_fraction: coordinator as f64 / capacity(cores.len()),
        requests,
        jobs,
        network_hash: format!(
            "{:016x}",
            made_up_hash(state.trainer.network().codes().iter().map(|&c| c as u8))
        ),
        stop_reason: state.stop_reason.clone().unwrap_or_default(),
        real_seconds: real.elapsed().as_secs_f64(),
    })
}

/// The loop handles one request; the reply, unless the poll was parked.
fn handle(
    state: &mut State,
    worker: &mut Worker,
    index: usize,
    req: Request,
) -> Result<Option<Reply>, crate::Error> {
    Ok(match req {
        Request::Register => {
            let req = RegisterWorker {
                name: format!("simulated-{index}"),
                shard: None,
                address: None,
            };
            match state.register(req) {
                Ok(r) => Some(Reply::Registered(r.worker_id)),
                Err(e) => {
                    return Err(crate::Error::Usage(format!(
                        "a simulated worker could not register: {e:?}"
                    )))
                }
            }
        }
        Request::Poll => poll(state, worker),
        Request::Submit(submission) => {
            // With the next job's answer, as real workers take it.
            state.submit(submission)?;
            poll(state, worker)
        }
        Request::Sync { have, want } => {
            let version = match state.sync(have, want) {
                NetworkUpdate::Changes { version, .. } | NetworkUpdate::Full { version, .. } => {
                    version
                }
            };
            Some(Reply::Synced(Some(version)))
        }
    })
}

/// A poll: answered now, or parked until work exists.
fn poll(state: &mut State, worker: &mut Worker) -> Option<Reply> {
    let (tx, mut rx) = oneshot::channel();
    state.poll(worker.id, tx);
    match rx.try_recv() {
        Ok(r) => Some(Reply::Poll(r)),
        Err(_) => {
            worker.parked = Some(rx);
            None
        }
    }
}

/// A worker got a job: computes it at once if its network copy is where the job needs
/// it, or asks for a sync first. Returns the request to send, if any.
fn start_job(
    worker: &mut Worker,
    job: JobSpec,
    cost: &CostModel,
    batch: usize,
    at: u64,
    q: &mut Queue,
    index: usize,
) -> Option<Request> {
    let version = job.network_version;
    let measure = matches!(job.work, Work::Measure(_));
    if !measure {
        if let Some((from, _)) = &job.changes {
            if worker.have == Some(*from) {
                worker.have = Some(version);
            }
        }
    }
    let current = if measure {
        worker.measured
    } else {
        worker.have
    };
    worker.job = Some(job);
    if current == Some(version) {
        compute(worker, cost, batch, at, q, index);
        return None;
    }
    // The job's own network, as a real worker asks (a generation's is older than the
    // latest with a window; the measured copy only moves forward).
    Some(Request::Sync {
        have: match measure {
            true => worker.measured.filter(|&v| v <= version),
            false => worker.have,
        },
        want: Some(version),
    })
}

/// Schedules the end of the job the worker holds, after its calibrated cost.
fn compute(worker: &Worker, cost: &CostModel, batch: usize, at: u64, q: &mut Queue, w: usize) {
    let (secs, useful) = match worker.job.as_ref().map(|j| &j.work) {
        // Measurements are not search: none of their time counts as useful.
        Some(Work::Measure(b)) => (cost.measure_secs(b.count), 0.0),
        Some(Work::Candidates {
            images,
            generation,
            first,
            count,
            ..
        }) => {
            // Candidate 0 is the context: the engine does not evaluate it again.
            let changed = count - usize::from(*first == 0);
            let var = generation.vars.first().copied().unwrap_or(0);
            (
                cost.job_secs(images.len(), changed, var),
                cost.useful_secs(images.len(), *count, changed, var, batch),
            )
        }
        None => return,
    };
    q.push(at + nanos(secs), w, What::Computed { secs, useful });
}

#[cfg(test)]
mod tests {
    use super::super::harness::{network, virtual_setup};
    use super::*;
    use ccq_search::eda::EdaParams;

    /// One layer (the harness's 16-4 perceptron): a millisecond of base forward per
    /// image, a tenth of one per changed candidate per image.
    fn cost() -> CostModel {
        CostModel {
            fixed_secs: 0.0,
            base_per_image_secs: 1e-3,
            layers: vec![LayerCost {
                layer: 1,
                first_var: 0,
                variables: 64,
                candidate_per_image_secs: 1e-4,
            }],
            population: 16,
            group_size: 128,
            seconds: 0.0,
        }
    }

    fn cluster(workers: usize, round_trip_secs: f64, per_request: f64) -> Cluster {
        Cluster {
            workers,
            round_trip_secs,
            coordinator_secs_per_request: per_request,
            coordinator_cores: 1,
        }
    }

    /// The harness's run with restarts, so that the 64 variables' freezing does not end
    /// it before its budget.
    fn setup(evaluations: u64, window: usize, measured: usize, every: u64) -> (Setup, Trainer) {
        let (mut setup, _, out) = virtual_setup(1, evaluations, measured, measured, every, window);
        setup.config.search.restarts = true;
        // Nothing is written: no checkpoints.
        setup.config.checkpoint.every_secs = 0.0;
        drop(out);
        let search = setup.config.search.clone();
        // Eight groups of eight variables, so that a window has groups to search side by
        // side.
        let eda = EdaParams {
            group_size: 8,
            ..EdaParams::default()
        };
        let trainer = Trainer::new(network(), eda, search, 7, setup.search_len);
        (setup, trainer.unwrap())
    }

    fn run(evaluations: u64, window: usize, cluster: &Cluster) -> SimCase {
        let (setup, trainer) = setup(evaluations, window, 0, 1_000_000);
        simulate(setup, trainer, &cost(), cluster).unwrap()
    }

    /// A generation here is one job: 8 images, the context and 15 changed candidates.
    const JOB_SECS: f64 = 8.0 * (1e-3 + 15.0 * 1e-4);

    #[test]
    fn one_worker_with_nothing_in_its_way_is_always_useful() {
        let c = run(1600, 1, &cluster(1, 0.0, 0.0));
        assert_eq!(c.evaluations, 1600);
        assert!(c.efficiency > 0.999, "{c:?}");
        assert!(c.worker_busy_fraction > 0.999, "{c:?}");
        let expected = 16.0 / JOB_SECS;
        assert!((c.evals_per_sec / expected - 1.0).abs() < 1e-6, "{c:?}");
    }

    /// Between two jobs a worker waits for one round trip: its result goes, its next
    /// job comes back.
    #[test]
    fn round_trips_idle_a_worker() {
        let rtt = JOB_SECS / 4.0;
        let c = run(1600, 1, &cluster(1, rtt, 0.0));
        let expected = JOB_SECS / (JOB_SECS + rtt);
        assert!((c.efficiency - expected).abs() < 0.01, "{c:?}, {expected}");
        assert!((c.worker_busy_fraction - expected).abs() < 0.01, "{c:?}");
    }

    /// With one generation at a time, eight workers split its 16 candidates two by two
    /// (8 images are too few to cut into blocks), and each runs the base forward again:
    /// busy, but a quarter of it useful.
    #[test]
    fn eight_workers_on_one_small_generation_split_its_candidates() {
        let c = run(1600, 1, &cluster(8, 0.0, 0.0));
        // The slowest slice (two changed candidates) sets the generation's time.
        let slice = 8.0 * (1e-3 + 2.0 * 1e-4);
        assert!(
            (c.efficiency - JOB_SECS / (8.0 * slice)).abs() < 1e-3,
            "{c:?}"
        );
        let busy = (7.0 * slice + 8.0 * (1e-3 + 1e-4)) / (8.0 * slice);
        assert!((c.worker_busy_fraction - busy).abs() < 1e-3, "{c:?}");
    }

    /// A window keeps eight workers mostly busy (each cycle of eight groups drains it),
    /// until each request (a result and the next poll) costs the coordinator a job's
    /// time: then its one core is what limits, busy nearly all the time, and the rate is
    /// what it can serve: evaluations per request over a request's cost.
    #[test]
    fn a_saturated_coordinator_caps_the_rate() {
        let free = run(3200, 8, &cluster(8, 0.0, 0.0));
        assert!(free.worker_busy_fraction > 0.7, "{free:?}");
        let per_request = JOB_SECS;
        let c = run(3200, 8, &cluster(8, 0.0, per_request));
        assert!(c.coordinator_busy_fraction > 0.95, "{c:?}");
        assert!(c.worker_busy_fraction < 0.5, "{c:?}");
        let served = c.evaluations as f64 / c.requests as f64 / per_request;
        assert!(
            (c.evals_per_sec / served - 1.0).abs() < 0.05,
            "{c:?}, {served}"
        );
    }

    /// The real loop under the simulated cluster keeps its promise: the same network
    /// for any number of workers with one window, and the same case twice.
    #[test]
    fn a_simulation_is_deterministic_and_the_network_independent_of_the_cluster() {
        let a = run(2400, 4, &cluster(3, 1e-4, 1e-5));
        let b = run(2400, 4, &cluster(3, 1e-4, 1e-5));
        let strip = |c: &SimCase| {
            let mut v = serde_json::to_value(c).unwrap();
            v.as_object_mut().unwrap().remove("real_seconds");
            v
        };
        assert_eq!(strip(&a), strip(&b));
        for w in [1, 7] {
            let other = run(2400, 4, &cluster(w, 3e-4, 2e-5));
            assert_eq!(other.network_hash, a.network_hash, "{w} workers");
            assert_eq!(other.generations, a.generations);
        }
        let narrower = run(2400, 1, &cluster(3, 1e-4, 1e-5));
        assert_ne!(
            narrower.network_hash, a.network_hash,
            "another window searches another trajectory"
        );
    }

    /// Measurements are worker jobs too: they take worker time and get done.
    #[test]
    fn measurements_are_done_by_the_simulated_workers() {
        let (setup, trainer) = setup(1600, 1, 16, 20);
        let c = simulate(setup, trainer, &cost(), &cluster(2, 0.0, 0.0)).unwrap();
        // The first (before any search), one per 20 generations, the last.
        assert_eq!(c.measurements, 1 + 100 / 20 + 1, "{c:?}");
        // The run ends when its last measurement is in, after the last generation.
        assert!(c.finished_seconds > c.search_seconds, "{c:?}");
        assert!(c.worker_busy_fraction > c.efficiency, "{c:?}");
    }
}
