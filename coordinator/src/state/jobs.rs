//! The job queue: the generations in flight cut into jobs, the measurement blocks
//! waiting, the jobs waiting per shard, the leases on jobs handed out, the polls parked
//! until work exists, and the partial sums as results come in. Generations complete in
//! any order but are handed back strictly in generation order (the reorder buffer of
//! `search.window`); a shard's jobs are served oldest generation first.
//!
//! A training job is a block of one shard's part of the batch, for all the candidates or
//! (when a generation alone must keep more of the shard's workers busy than it has
//! blocks) for a slice of them. See [`JobQueue::launch`]. A measurement job is a block of
//! validation or test images for any worker; training comes first unless a measurement
//! is overdue (see [`JobQueue::dispatch`]), so measurements use the time workers would
//! otherwise wait at the generation barrier. Results are summed in exact integers with
//! checked arithmetic, so arrival order never matters and no worker can make a sum wrap.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ccq_common::qnet::EvalStats;
use ccq_search::trainer::Generation;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::events::{
    BlockTargets, EvalSplit, JobSpec, MeasureBlock, PollReply, Submission, TeacherLogits, Work,
};

#[derive(Debug, Clone)]
enum Task {
    Candidates {
        /// The generation it is part of.
        generation: u64,
        shard: usize,
        /// Candidate range of the generation.
        first: usize,
        count: usize,
        images: Vec<u64>,
    },
    Measure {
        /// The measurement it is part of.
        id: u64,
        block: MeasureBlock,
    },
}

#[derive(Debug, Clone)]
struct JobEntry {
    task: Task,
    /// (worker, when it was handed out).
    lease: Option<(u64, Instant)>,
}

/// A generation whose jobs are out (or all in, waiting for an older one).
#[derive(Debug)]
struct InFlight {
    generation: Arc<Generation>,
    version: u64,
    sums: Vec<EvalStats>,
    outstanding: usize,
}

/// A measurement whose blocks are out: the network version and the sums per split.
#[derive(Debug)]
struct Measuring {
    version: u64,
    validation: EvalStats,
    test: EvalStats,
    outstanding: usize,
}

/// What a finished job completed, if anything.
#[derive(Debug, PartialEq)]
pub enum Completed {
    Nothing,
    /// Every job of these generations is in, and of every generation before them: each
    /// generation with its sums per candidate, oldest first.
    Generations(Vec<(Generation, Vec<EvalStats>)>),
    /// Every block of measurement `id` is in: its validation and test sums.
    Measurement {
        id: u64,
        validation: EvalStats,
        test: EvalStats,
    },
}

/// What became of a submitted result.
#[derive(Debug, PartialEq)]
pub enum Accepted {
    /// The worker does not hold this job (any more): late, duplicate or made up.
    NotHeld,
    /// The results cannot belong to the job; the job is queued again.
    Implausible(String),
    /// Counted. `images` = images × candidates evaluated (images, for a measurement);
    /// `held_for` = lease age.
    Counted {
        images: u64,
        held_for: Duration,
        complete: Completed,
    },
}

pub struct JobQueue {
    jobs: HashMap<u64, JobEntry>,
    pending: Vec<VecDeque<u64>>,
    /// Measurement blocks waiting, oldest measurement first.
    measure_pending: VecDeque<u64>,
    next_id: u64,
    /// The generations in flight, by id.
    in_flight: BTreeMap<u64, InFlight>,
    measuring: BTreeMap<u64, Measuring>,
    /// Polls waiting for work: (worker, reply).
    parked: Vec<(u64, oneshot::Sender<PollReply>)>,
    /// Every job carries its images' teacher logits (distillation fitness).
    teacher: Option<Arc<TeacherLogits>>,
    /// Local generations' jobs carry their block targets (`search.local_evaluations`).
    blocks: Option<Arc<BlockTargets>>,
    /// Generations in flight at once (`search.window`): how many jobs a generation
    /// needs to keep the workers busy.
    window: usize,
}

/// The fewest images a training job is cut down to: below this a job's fixed costs (a
/// round trip, the base forward's setup) outweigh its evaluation.
pub const MIN_JOB_IMAGES: usize = 16;

impl JobQueue {
    pub fn new(shards: usize) -> JobQueue {
        JobQueue {
            jobs: HashMap::new(),
            pending: vec![VecDeque::new(); shards],
            measure_pending: VecDeque::new(),
            next_id: 1,
            in_flight: BTreeMap::new(),
            measuring: BTreeMap::new(),
            parked: Vec::new(),
            teacher: None,
            blocks: None,
            window: 1,
        }
    }

    /// Generations in flight at once (`search.window`, at least 1).
    pub fn with_window(mut self, window: usize) -> JobQueue {
        self.window = window.max(1);
        self
    }

    /// Jobs carry the teacher's logits of their images (distillation fitness).
    pub fn with_teacher(mut self, teacher: Option<Arc<TeacherLogits>>) -> JobQueue {
        self.teacher = teacher;
        self
    }

    /// Local generations' jobs carry their block's targets (block-local fitness).
    pub fn with_blocks(mut self, blocks: Option<Arc<BlockTargets>>) -> JobQueue {
        self.blocks = blocks;
        self
    }

    fn insert(&mut self, task: Task) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.jobs.insert(id, JobEntry { task, lease: None });
        id
    }

    /// Cuts `generation` into jobs and queues them, per shard with images in the batch
    /// (`shard_of` maps a global index to its shard). A shard's workers (`live(shard)`,
    /// at least one) need `live` jobs per generation with no window, and fewer with one:
    /// `ceil(live × min(window, 2) / window)`, twice what the window alone needs, so that
    /// a worker has a job while the oldest generation waits for its last one. The shard's
    /// images are cut into that many contiguous blocks of equal size (but no smaller than
    /// [`MIN_JOB_IMAGES`]), each with all the candidates: every job costs about the same,
    /// and the base forward runs once per image, not once per job. Only when there are
    /// fewer blocks than jobs needed are the candidates sliced as well. How a generation
    /// is cut never changes its sums.
    pub fn launch(
        &mut self,
        generation: Generation,
        version: u64,
        shard_of: impl Fn(u64) -> usize,
        live: impl Fn(usize) -> usize,
    ) {
        let shards = self.pending.len();
        let mut per_shard: Vec<Vec<u64>> = vec![Vec::new(); shards];
        for &i in &generation.images {
            per_shard[shard_of(i)].push(i);
        }
        let n = generation.candidates.len();
        let mut outstanding = 0;
        let gen = generation.id;
        for (shard, images) in per_shard.into_iter().enumerate() {
            if images.is_empty() {
                continue;
            }
            let live = live(shard).max(1);
            let want = (live * self.window.min(2)).div_ceil(self.window);
            let blocks = want.min(images.len().div_ceil(MIN_JOB_IMAGES)).max(1);
            let slices = want.div_ceil(blocks).clamp(1, n.max(1));
            let per = n.div_ceil(slices);
            for b in 0..blocks {
                let block = &images[b * images.len() / blocks..(b + 1) * images.len() / blocks];
                let mut first = 0;
                while first < n {
                    let count = per.min(n - first);
                    let id = self.insert(Task::Candidates {
                        generation: gen,
                        shard,
                        first,
                        count,
                        images: block.to_vec(),
                    });
                    self.pending[shard].push_back(id);
                    outstanding += 1;
                    first += count;
                }
            }
        }
        self.in_flight.insert(
            gen,
            InFlight {
                version,
                sums: vec![EvalStats::default(); n],
                generation: Arc::new(generation),
                outstanding,
            },
        );
    }

    /// Queues measurement `id` of the network at `version` as blocks of at most `block`
    /// images: validation images `validation` (training indices) and test images
    /// `test`. With no images at all it completes at once (returned).
    pub fn launch_measurement(
        &mut self,
        id: u64,
        version: u64,
        validation: std::ops::Range<u64>,
        test: std::ops::Range<u64>,
        block: u64,
    ) -> Option<Completed> {
        let block = block.max(1);
        let mut outstanding = 0;
        for (split, range) in [(EvalSplit::Validation, validation), (EvalSplit::Test, test)] {
            let mut first = range.start;
            while first < range.end {
                let count = block.min(range.end - first);
                let job = self.insert(Task::Measure {
                    id,
                    block: MeasureBlock {
                        split,
                        first,
                        count,
                    },
                });
                self.measure_pending.push_back(job);
                outstanding += 1;
                first += count;
            }
        }
        if outstanding == 0 {
            return Some(Completed::Measurement {
                id,
                validation: EvalStats::default(),
                test: EvalStats::default(),
            });
        }
        self.measuring.insert(
            id,
            Measuring {
                version,
                validation: EvalStats::default(),
                test: EvalStats::default(),
                outstanding,
            },
        );
        None
    }

    /// The network versions the generations in flight were sampled against, oldest
    /// generation first.
    pub fn in_flight_versions(&self) -> Vec<u64> {
        self.in_flight.values().map(|g| g.version).collect()
    }

    /// Whether a generation in flight was sampled against network `version`.
    pub fn has_version(&self, version: u64) -> bool {
        self.in_flight.values().any(|g| g.version == version)
    }

    /// The network version the oldest generation in flight was sampled against.
    pub fn oldest_version(&self) -> Option<u64> {
        self.in_flight.first_key_value().map(|(_, g)| g.version)
    }

    /// Whether a training job of `shard` waits.
    pub fn has_pending(&self, shard: usize) -> bool {
        !self.pending[shard].is_empty()
    }

    /// Whether any job, training or measurement, waits.
    pub fn any_pending(&self) -> bool {
        !self.measure_pending.is_empty() || self.pending.iter().any(|q| !q.is_empty())
    }

    #[cfg(test)]
    /// Jobs waiting per shard.
    pub fn pending_len(&self, shard: usize) -> usize {
        self.pending[shard].len()
    }

    /// Parks a poll until work for its worker's shard exists (replacing an older poll of
    /// the same worker).
    pub fn park(&mut self, worker: u64, reply: oneshot::Sender<PollReply>) {
        self.parked.retain(|(w, _)| *w != worker);
        self.parked.push((worker, reply));
    }

    /// Takes every parked poll (the run is over: they are all answered "done").
    pub fn take_parked(&mut self) -> Vec<(u64, oneshot::Sender<PollReply>)> {
        std::mem::take(&mut self.parked)
    }

    /// Hands pending jobs to parked polls (`shard_of_worker`; a worker that is gone
    /// drops its poll): a training job of the worker's shard, else a measurement block;
    /// with `measure_first` (a measurement is overdue) the other way round. A training job
    /// carries `changes(worker, version)`, the network changes that worker needs, if any.
    /// Returns the (worker, job) leases made.
    pub fn dispatch(
        &mut self,
        now: Instant,
        measure_first: bool,
        shard_of_worker: impl Fn(u64) -> Option<usize>,
        changes: impl Fn(u64, u64) -> Option<(u64, Vec<(u32, i8)>)>,
    ) -> Vec<(u64, u64)> {
        let mut leased = Vec::new();
        for (worker, reply) in std::mem::take(&mut self.parked) {
            if reply.is_closed() {
                continue;
            }
            let Some(shard) = shard_of_worker(worker) else {
                continue;
            };
            let job = if measure_first {
                self.measure_pending
                    .pop_front()
                    .or_else(|| self.pending[shard].pop_front())
            } else {
                self.pending[shard]
                    .pop_front()
                    .or_else(|| self.measure_pending.pop_front())
            };
            let Some(job_id) = job else {
                self.parked.push((worker, reply));
                continue;
            };
            let mut spec = self.spec(job_id);
            if matches!(spec.work, Work::Candidates { .. }) {
                spec.changes = changes(worker, spec.network_version);
            }
            if reply.send(PollReply::Job(spec)).is_err() {
                // The poll timed out just now; keep the job for the next one.
                self.queue_front(job_id);
                continue;
            }
            if let Some(j) = self.jobs.get_mut(&job_id) {
                j.lease = Some((worker, now));
            }
            leased.push((worker, job_id));
        }
        leased
    }

    /// The network version of training job `job_id` (None for a measurement block).
    pub fn training_version(&self, job_id: u64) -> Option<u64> {
        match self.jobs.get(&job_id)?.task {
            Task::Candidates { generation, .. } => {
                self.in_flight.get(&generation).map(|c| c.version)
            }
            Task::Measure { .. } => None,
        }
    }

    fn queue_front(&mut self, job_id: u64) {
        match &self.jobs[&job_id].task {
            Task::Candidates { shard, .. } => self.pending[*shard].push_front(job_id),
            Task::Measure { .. } => self.measure_pending.push_front(job_id),
        }
    }

    fn spec(&self, job_id: u64) -> JobSpec {
        match &self.jobs[&job_id].task {
            Task::Candidates {
                generation,
                first,
                count,
                images,
                ..
            } => {
                let c = &self.in_flight[generation];
                JobSpec {
                    job_id,
                    network_version: c.version,
                    work: Work::Candidates {
                        images: images.clone(),
                        generation: Arc::clone(&c.generation),
                        first: *first,
                        count: *count,
                        teacher: self.teacher.clone(),
                        block: (self.blocks.as_ref())
                            .and_then(|b| b.end_for(&c.generation).map(|end| (end, Arc::clone(b)))),
                    },
                    changes: None,
                }
            }
            Task::Measure { id, block } => JobSpec {
                job_id,
                network_version: self.measuring[id].version,
                work: Work::Measure(*block),
                changes: None,
            },
        }
    }

    /// Puts a leased job back at the front of its queue; false if it was not leased
    /// (already back, or done).
    pub fn requeue(&mut self, job_id: u64) -> bool {
        let Some(j) = self.jobs.get_mut(&job_id) else {
            return false;
        };
        let leased = j.lease.take().is_some();
        if leased {
            self.queue_front(job_id);
        }
        leased
    }

    #[cfg(test)]
    /// The worker holding `job_id`, if it is leased.
    pub fn holder(&self, job_id: u64) -> Option<u64> {
        self.jobs.get(&job_id)?.lease.map(|(w, _)| w)
    }

    /// Leases older than `timeout`: (job, worker).
    pub fn expired(&self, now: Instant, timeout: Duration) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .jobs
            .iter()
            .filter_map(|(&id, j)| {
                j.lease
                    .filter(|(_, t)| now.duration_since(*t) > timeout)
                    .map(|(w, _)| (id, w))
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Takes a worker's results for a job it holds. Checked before anything is counted:
    /// one result per candidate of the job (one for a measurement block), each over
    /// exactly the job's images, at most that many correct, a loss no image can exceed,
    /// and sums that cannot overflow. An implausible result is refused whole and its job
    /// queued again.
    pub fn accept(&mut self, s: &Submission, now: Instant) -> Accepted {
        let Some(j) = self
            .jobs
            .get(&s.job)
            .filter(|j| matches!(j.lease, Some((w, _)) if w == s.worker))
        else {
            return Accepted::NotHeld;
        };
        if let Some(why) = self.implausible(&j.task, &s.results) {
            self.requeue(s.job);
            return Accepted::Implausible(why);
        }
        let j = self.jobs.remove(&s.job).expect("checked above");
        let held_for = j
            .lease
            .map_or(Duration::ZERO, |(_, at)| now.duration_since(at));
        let (images, complete) = match j.task {
            Task::Candidates {
                generation,
                first,
                count,
                images,
                ..
            } => {
                let current = self.in_flight.get_mut(&generation).expect("checked above");
                for (sum, r) in current.sums[first..first + count]
                    .iter_mut()
                    .zip(&s.results)
                {
                    *sum = sum.checked_add(r).expect("checked above");
                }
                current.outstanding -= 1;
                (images.len() as u64 * count as u64, self.take_completed())
            }
            Task::Measure { id, block } => {
                let m = self.measuring.get_mut(&id).expect("checked above");
                let sum = match block.split {
                    EvalSplit::Validation => &mut m.validation,
                    EvalSplit::Test => &mut m.test,
                };
                *sum = sum.checked_add(&s.results[0]).expect("checked above");
                m.outstanding -= 1;
                let complete = if m.outstanding == 0 {
                    let m = self.measuring.remove(&id).expect("checked above");
                    Completed::Measurement {
                        id,
                        validation: m.validation,
                        test: m.test,
                    }
                } else {
                    Completed::Nothing
                };
                (block.count, complete)
            }
        };
        Accepted::Counted {
            images,
            held_for,
            complete,
        }
    }

    /// The generations at the front whose jobs are all in, oldest first: completed ones
    /// wait here until every older one is in too.
    fn take_completed(&mut self) -> Completed {
        let mut done = Vec::new();
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.get().outstanding > 0 {
                break;
            }
            let c = entry.remove();
            let generation = Arc::try_unwrap(c.generation).unwrap_or_else(|g| (*g).clone());
            done.push((generation, c.sums));
        }
        if done.is_empty() {
            Completed::Nothing
        } else {
            Completed::Generations(done)
        }
    }

    /// Why `results` cannot be the answer to `task`, if they cannot.
    fn implausible(&self, task: &Task, results: &[EvalStats]) -> Option<String> {
        let (images, first, sums): (u64, usize, &[EvalStats]) = match task {
            Task::Candidates {
                generation,
                first,
                count,
                images,
                ..
            } => {
                let current = &self.in_flight[generation];
                if results.len() != *count {
                    return Some(format!(
                        "{} results for a job of {count} candidates",
                        results.len()
                    ));
                }
                (
                    images.len() as u64,
                    *first,
                    &current.sums[*first..*first + *count],
                )
            }
            Task::Measure { id, block } => {
                if results.len() != 1 {
                    return Some(format!(
                        "{} results for a measurement block (one expected)",
                        results.len()
                    ));
                }
                let m = &self.measuring[id];
                let sum = match block.split {
                    EvalSplit::Validation => &m.validation,
                    EvalSplit::Test => &m.test,
                };
                (block.count, 0, std::slice::from_ref(sum))
            }
        };
        if let Some((i, r)) = results
            .iter()
            .enumerate()
            .find(|(_, r)| !r.plausible_for(images))
        {
            return Some(format!(
                "result {}: {} images, {} correct, loss {} for a job of {images} images",
                first + i,
                r.images,
                r.correct,
                r.loss_fixed
            ));
        }
        sums.iter()
            .zip(results)
            .any(|(sum, r)| sum.checked_add(r).is_none())
            .then(|| "the sums would overflow".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(images: Vec<u64>, candidates: usize) -> Generation {
        Generation {
            id: 7,
            vars: vec![0, 1],
            candidates: (0..candidates).map(|c| vec![c as i8, 0]).collect(),
            images,
            layer: 0,
            local: false,
        }
    }

    /// Shards of 10 images: index i is on shard i / 10.
    fn launch(q: &mut JobQueue, images: Vec<u64>, candidates: usize, live: usize) {
        q.launch(
            generation(images, candidates),
            3,
            |i| (i / 10) as usize,
            |_| live,
        );
    }

    fn stats(images: u64, loss: u64) -> EvalStats {
        EvalStats {
            loss_fixed: loss,
            correct: images / 2,
            images,
            paired_sq: 0,
        }
    }

    fn poll(q: &mut JobQueue, worker: u64, shard: usize, now: Instant) -> Option<JobSpec> {
        poll_with(q, worker, shard, now, false)
    }

    fn poll_with(
        q: &mut JobQueue,
        worker: u64,
        shard: usize,
        now: Instant,
        measure_first: bool,
    ) -> Option<JobSpec> {
        let (tx, mut rx) = oneshot::channel();
        q.park(worker, tx);
        q.dispatch(now, measure_first, |_| Some(shard), |_, _| None);
        match rx.try_recv() {
            Ok(PollReply::Job(j)) => Some(j),
            _ => None,
        }
    }

    /// A training job's (first, count, images).
    fn slice(j: &JobSpec) -> (usize, usize, Vec<u64>) {
        match &j.work {
            Work::Candidates {
                first,
                count,
                images,
                ..
            } => (*first, *count, images.clone()),
            Work::Measure(b) => panic!("a training job expected, got {b:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_generation_is_cut_by_shard_and_by_live_workers() {
        let mut q = JobQueue::new(3);
        // Shard 0: 2 images, shard 1: none, shard 2: 1 image; 5 candidates, 2 workers each.
        launch(&mut q, vec![3, 25, 7], 5, 2);
        assert_eq!(
            (q.pending_len(0), q.pending_len(1), q.pending_len(2)),
            (2, 0, 2)
        );
        let now = Instant::now();
        let a = poll(&mut q, 1, 0, now).unwrap();
        let b = poll(&mut q, 2, 0, now).unwrap();
        let (sa, sb) = (slice(&a), slice(&b));
        assert_eq!((sa.0, sa.1, sb.0, sb.1), (0, 3, 3, 2));
        assert_eq!(sa.2, [3, 7]);
        assert_eq!(a.network_version, 3);
        assert!(
            poll(&mut q, 3, 0, now).is_none(),
            "shard 0 has no more jobs"
        );
        let c = poll(&mut q, 4, 2, now).unwrap();
        assert_eq!(slice(&c).2, [25]);
        assert_eq!(q.in_flight_versions(), [3]);
    }

    #[tokio::test(start_paused = true)]
    async fn results_are_summed_per_candidate_and_complete_the_generation() {
        let mut q = JobQueue::new(2);
        launch(&mut q, vec![1, 2, 11], 2, 1);
        let now = Instant::now();
        let j0 = poll(&mut q, 1, 0, now).unwrap();
        let j1 = poll(&mut q, 2, 1, now).unwrap();
        let sub = |worker, job: &JobSpec, loss: u64| {
            let (_, count, images) = slice(job);
            Submission {
                worker,
                job: job.job_id,
                results: (0..count)
                    .map(|c| stats(images.len() as u64, loss + c as u64))
                    .collect(),
                eval_micros: 0,
            }
        };
        // In the other order the sums are the same: integers.
        let r = q.accept(&sub(2, &j1, 10), now + Duration::from_millis(30));
        assert!(
            matches!(r, Accepted::Counted { images: 2, held_for, complete: Completed::Nothing } if held_for == Duration::from_millis(30)),
            "{r:?}"
        );
        assert_eq!(
            q.accept(&sub(2, &j1, 10), now),
            Accepted::NotHeld,
            "counted once"
        );
        let Accepted::Counted {
            complete: Completed::Generations(mut done),
            ..
        } = q.accept(&sub(1, &j0, 100), now)
        else {
            panic!("the last job completes the generation");
        };
        let (g, sums) = done.pop().unwrap();
        assert!(done.is_empty());
        assert_eq!(g.id, 7);
        assert_eq!(
            sums,
            [
                stats(3, 110),
                EvalStats {
                    loss_fixed: 112,
                    correct: 1,
                    images: 3,
                    paired_sq: 0,
                }
            ]
        );
        assert!(q.in_flight_versions().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_holder_may_submit_and_leases_expire() {
        let mut q = JobQueue::new(1);
        launch(&mut q, vec![1, 2], 2, 1);
        let t0 = Instant::now();
        let j = poll(&mut q, 1, 0, t0).unwrap();
        assert_eq!(q.holder(j.job_id), Some(1));
        let s = Submission {
            worker: 2,
            job: j.job_id,
            results: vec![stats(2, 1); 2],
            eval_micros: 0,
        };
        assert_eq!(q.accept(&s, t0), Accepted::NotHeld, "another worker's job");
        let timeout = Duration::from_secs(5);
        assert!(q.expired(t0 + timeout, timeout).is_empty());
        assert_eq!(q.expired(t0 + timeout * 2, timeout), [(j.job_id, 1)]);
        assert!(q.requeue(j.job_id));
        assert!(!q.requeue(j.job_id), "already back in the queue");
        assert_eq!(q.holder(j.job_id), None);
        let late = Submission {
            worker: 1,
            ..s.clone()
        };
        assert_eq!(
            q.accept(&late, t0),
            Accepted::NotHeld,
            "a late result is refused"
        );
        let again = poll(&mut q, 2, 0, t0).unwrap();
        assert_eq!(again.job_id, j.job_id, "requeued at the front");
        assert!(matches!(
            q.accept(&s, t0),
            Accepted::Counted {
                complete: Completed::Generations(..),
                ..
            }
        ));
    }

    /// Whatever a worker that holds a job sends, nothing implausible is counted: the job
    /// goes back to the queue and the sums stay as they were.
    #[tokio::test(start_paused = true)]
    async fn implausible_results_are_refused_whole() {
        let max = ccq_common::qnet::MAX_IMAGE_LOSS_FIXED;
        let bad: Vec<Vec<EvalStats>> = vec![
            vec![stats(2, 1)],              // too few results
            vec![stats(2, 1); 3],           // too many
            vec![stats(2, 1), stats(3, 1)], // other images
            vec![
                stats(2, 1),
                EvalStats {
                    correct: 3,
                    ..stats(2, 1)
                },
            ],
            vec![stats(2, 1), stats(2, 2 * max + 1)], // a loss no image reaches
            vec![stats(2, u64::MAX), stats(2, 1)],
        ];
        for results in bad {
            let mut q = JobQueue::new(1);
            launch(&mut q, vec![1, 2], 2, 1);
            let now = Instant::now();
            let j = poll(&mut q, 1, 0, now).unwrap();
            let s = Submission {
                worker: 1,
                job: j.job_id,
                results: results.clone(),
                eval_micros: 0,
            };
            assert!(
                matches!(q.accept(&s, now), Accepted::Implausible(_)),
                "{results:?}"
            );
            assert_eq!(q.holder(j.job_id), None, "queued again");
            let j2 = poll(&mut q, 2, 0, now).unwrap();
            let good = Submission {
                worker: 2,
                job: j2.job_id,
                results: vec![stats(2, 5); 2],
                eval_micros: 0,
            };
            let Accepted::Counted {
                complete: Completed::Generations(mut done),
                ..
            } = q.accept(&good, now)
            else {
                panic!("the honest result completes it");
            };
            let (_, sums) = done.pop().unwrap();
            assert_eq!(sums, vec![stats(2, 5); 2], "{results:?} left no trace");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_that_went_away_keeps_the_job_queued() {
        let mut q = JobQueue::new(1);
        launch(&mut q, vec![1], 1, 1);
        let (tx, rx) = oneshot::channel();
        q.park(1, tx);
        drop(rx);
        assert!(q
            .dispatch(Instant::now(), false, |_| Some(0), |_, _| None)
            .is_empty());
        assert!(q.has_pending(0));
        // A worker that is gone drops its poll and takes nothing.
        let (tx, _rx) = oneshot::channel();
        q.park(2, tx);
        assert!(q
            .dispatch(Instant::now(), false, |_| None, |_, _| None)
            .is_empty());
        assert!(q.any_pending());
        assert!(q.take_parked().is_empty());
    }

    /// A measurement is cut into blocks of both splits; any worker takes them, after its
    /// shard's training jobs unless the measurement is overdue; the sums are exact and
    /// complete the measurement once, in any order.
    #[tokio::test(start_paused = true)]
    async fn measurement_blocks_fill_idle_polls_and_sum_exactly() {
        let mut q = JobQueue::new(2);
        launch(&mut q, vec![1, 11], 2, 1);
        assert!(q.launch_measurement(5, 2, 100..140, 0..20, 16).is_none());
        let now = Instant::now();
        // Shard 0's training job first; then measurement blocks, oldest first.
        let t = poll(&mut q, 1, 0, now).unwrap();
        assert!(matches!(t.work, Work::Candidates { .. }));
        let mut blocks = Vec::new();
        while let Some(j) = poll(&mut q, 1, 0, now) {
            let Work::Measure(b) = j.work else {
                panic!("only measurement blocks are left for shard 0")
            };
            assert_eq!(j.network_version, 2, "the measured version, not the latest");
            blocks.push((j.job_id, b));
        }
        let cut: Vec<(EvalSplit, u64, u64)> = blocks
            .iter()
            .map(|(_, b)| (b.split, b.first, b.count))
            .collect();
        assert_eq!(
            cut,
            [
                (EvalSplit::Validation, 100, 16),
                (EvalSplit::Validation, 116, 16),
                (EvalSplit::Validation, 132, 8),
                (EvalSplit::Test, 0, 16),
                (EvalSplit::Test, 16, 4),
            ]
        );
        // Overdue: a block goes before shard 1's training job.
        q.requeue(blocks[4].0);
        let j = poll_with(&mut q, 2, 1, now, true).unwrap();
        assert!(matches!(j.work, Work::Measure(_)), "{j:?}");
        let answer = |job: u64, b: &MeasureBlock, worker| Submission {
            worker,
            job,
            results: vec![stats(b.count, b.count * 3 + b.first)],
            eval_micros: 0,
        };
        // A block answered with the wrong image count is refused and queued again.
        let wrong = Submission {
            results: vec![stats(blocks[4].1.count + 1, 0)],
            ..answer(j.job_id, &blocks[4].1, 2)
        };
        assert!(matches!(q.accept(&wrong, now), Accepted::Implausible(_)));
        let j = poll_with(&mut q, 2, 1, now, true).unwrap();
        // In reverse order: nothing completes until the last block.
        let mut done = None;
        for (k, (id, b)) in blocks.iter().enumerate().rev() {
            let (id, worker) = if k == 4 { (j.job_id, 2) } else { (*id, 1) };
            match q.accept(&answer(id, b, worker), now) {
                Accepted::Counted {
                    complete: Completed::Nothing,
                    images,
                    ..
                } => assert_eq!(images, b.count),
                Accepted::Counted {
                    complete: c @ Completed::Measurement { .. },
                    ..
                } => done = Some((k, c)),
                other => panic!("{other:?}"),
            }
        }
        let (k, c) = done.expect("the measurement completed");
        assert_eq!(k, 0, "completed by the last block in");
        assert_eq!(
            c,
            Completed::Measurement {
                id: 5,
                validation: EvalStats {
                    loss_fixed: 40 * 3 + 100 + 116 + 132,
                    correct: 8 + 8 + 4,
                    images: 40,
                    paired_sq: 0,
                },
                test: EvalStats {
                    loss_fixed: 20 * 3 + 16,
                    correct: 8 + 2,
                    images: 20,
                    paired_sq: 0,
                },
            }
        );
        // Training was untouched by all of it.
        assert_eq!(q.in_flight_versions().len(), 1);
        assert!(q.has_pending(1));
        // A measurement of no images completes at once.
        assert!(matches!(
            q.launch_measurement(6, 2, 0..0, 0..0, 16),
            Some(Completed::Measurement { id: 6, .. })
        ));
    }

    /// Generations complete in any order but come back strictly in generation order: a
    /// younger one whose jobs are all in waits for the older ones, and then both come
    /// back together, oldest first. A shard's jobs are served oldest generation first,
    /// each on its generation's network version.
    #[tokio::test(start_paused = true)]
    async fn generations_come_back_in_order_whatever_order_they_complete_in() {
        let mut q = JobQueue::new(1);
        let now = Instant::now();
        for (id, version) in [(4, 10), (5, 10), (6, 11)] {
            let g = Generation {
                id,
                ..generation(vec![1, 2], 2)
            };
            q.launch(g, version, |_| 0, |_| 1);
        }
        assert_eq!(q.in_flight_versions(), [10, 10, 11]);
        assert_eq!(q.oldest_version(), Some(10));
        let jobs: Vec<JobSpec> = (1..=3).map(|w| poll(&mut q, w, 0, now).unwrap()).collect();
        let versions: Vec<u64> = jobs.iter().map(|j| j.network_version).collect();
        assert_eq!(versions, [10, 10, 11], "oldest generation first");
        let submit = |q: &mut JobQueue, k: usize| {
            q.accept(
                &Submission {
                    worker: k as u64 + 1,
                    job: jobs[k].job_id,
                    results: vec![stats(2, 7 + k as u64); 2],
                    eval_micros: 0,
                },
                now,
            )
        };
        let nothing = |r: Accepted| {
            matches!(
                r,
                Accepted::Counted {
                    complete: Completed::Nothing,
                    ..
                }
            )
        };
        assert!(nothing(submit(&mut q, 2)), "generation 6 waits for 4 and 5");
        assert!(nothing(submit(&mut q, 1)), "generation 5 waits for 4");
        let Accepted::Counted {
            complete: Completed::Generations(done),
            ..
        } = submit(&mut q, 0)
        else {
            panic!("generation 4 releases all three");
        };
        let ids: Vec<u64> = done.iter().map(|(g, _)| g.id).collect();
        assert_eq!(ids, [4, 5, 6]);
        assert_eq!(done[2].1, vec![stats(2, 9); 2], "each with its own sums");
        assert_eq!(q.oldest_version(), None);
    }

    /// A generation is cut into blocks of images with all the candidates, as many as the
    /// shard's workers need (fewer with a window), never below `MIN_JOB_IMAGES` images;
    /// candidates are sliced only when there are too few blocks. Every (image, candidate)
    /// pair is in exactly one job.
    #[tokio::test(start_paused = true)]
    async fn jobs_are_blocks_of_images_with_all_candidates() {
        // (images in the shard, live workers, window) -> (jobs, images per job, candidates
        // per job) with 16 candidates.
        for (images, live, window, expect) in [
            (256, 4, 1, (4, 64, 16)),
            (256, 128, 32, (8, 32, 16)),
            (256, 128, 1, (128, 16, 2)),
            (20, 4, 1, (4, 10, 8)),
            (256, 1, 8, (1, 256, 16)),
            (256, 6, 4, (3, 85, 16)),
        ] {
            let mut q = JobQueue::new(1).with_window(window);
            q.launch(generation((0..images).collect(), 16), 1, |_| 0, |_| live);
            let now = Instant::now();
            let mut jobs = Vec::new();
            while let Some(j) = poll(&mut q, jobs.len() as u64 + 1, 0, now) {
                jobs.push(slice(&j));
            }
            let case = (images, live, window);
            assert_eq!(jobs.len(), expect.0, "{case:?}: jobs");
            assert!(
                jobs.iter().all(
                    |(_, count, imgs)| imgs.len().abs_diff(expect.1) <= 1 && *count == expect.2
                ),
                "{case:?}: {:?}",
                jobs.iter()
                    .map(|(f, c, i)| (*f, *c, i.len()))
                    .collect::<Vec<_>>()
            );
            let mut pairs: Vec<(u64, usize)> = jobs
                .iter()
                .flat_map(|(first, count, imgs)| {
                    imgs.iter()
                        .flat_map(move |&i| (*first..first + count).map(move |c| (i, c)))
                })
                .collect();
            pairs.sort_unstable();
            let all: Vec<(u64, usize)> = (0..images)
                .flat_map(|i| (0..16).map(move |c| (i, c)))
                .collect();
            assert_eq!(pairs, all, "{case:?}: every pair once");
        }
    }
}
