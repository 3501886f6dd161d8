//! Virtual workers: the real event loop driven through its events, with no network and
//! on tokio's paused clock. Liveness rules (reaping, lease expiry, late results, moving
//! idle workers to orphaned shards) are timing rules; here time moves only when every
//! task waits, so each scenario is deterministic and takes milliseconds of real time
//! however many virtual seconds it spans.

use std::time::Duration;

use ccq_common::model::{Graph, Linear, Node, Normalization, Op, Shape};
use ccq_common::qnet::{EvalStats, QNetwork};
use ccq_common::quant::{quantize, QuantConfig};
use ccq_search::eda::EdaParams;
use ccq_search::trainer::Trainer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;
use crate::config::RunConfig;

/// Heartbeat interval of the virtual runs: workers silent for 3 of these are reaped.
/// Longer than a poll's wait (500 ms), as in real deployments.
const HB: Duration = Duration::from_secs(1);
/// Job lease of the virtual runs.
const JOB_TIMEOUT: Duration = Duration::from_secs(10);
/// Training images (the search range): shard k of S holds [k*64/S, (k+1)*64/S).
const SEARCH_LEN: usize = 64;

/// A 16-4 perceptron on 4x4 one-channel images, 3-bit weights: 64 variables.
pub(super) fn network() -> QNetwork {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let graph = Graph {
        input_name: "x".into(),
        input_shape: Shape::new(1, 4, 4),
        nodes: vec![
            Node {
                name: "flatten".into(),
                op: Op::Flatten,
                inputs: vec![0],
                shape: Shape::new(16, 1, 1),
            },
            Node {
                name: "fc".into(),
                op: Op::Linear(Linear {
                    out_features: 4,
                    in_features: 16,
                    weight: (0..64).map(|_| rng.random_range(-1.0..1.0)).collect(),
                    bias: vec![0.0; 4],
                }),
                inputs: vec![1],
                shape: Shape::new(4, 1, 1),
            },
        ],
        output: 2,
    };
    let pixels: Vec<u8> = (0..32 * 16).map(|_| rng.random()).collect();
    let q = QuantConfig::new(3, 8);
    quantize(&graph, &Normalization::identity(1), &pixels, 32, &q).unwrap()
}

/// A coordinator event loop with no network in front of it.
struct Virtual {
    events: mpsc::Sender<Event>,
    run: JoinHandle<Result<Finished, crate::Error>>,
    stop: Option<oneshot::Sender<()>>,
    /// What the metrics endpoint and the progress display would see.
    telemetry: watch::Receiver<Option<Telemetry>>,
    /// Measurement blocks are answered from the measured network's codes
    /// ([`validation_correct`]) instead of a fixed half.
    measure_codes: bool,
    _out: tempfile::TempDir,
}

/// The loop's inputs for a virtual run of [`network`]: `shards` shards, an evaluation
/// budget, `validation` and `test` images measured every `every` generations, `window`
/// generations in flight. The directory holds the run's outputs.
pub(super) fn virtual_setup(
    shards: usize,
    evaluations: u64,
    validation: usize,
    test: usize,
    every: u64,
    window: usize,
) -> (Setup, Trainer, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let mut config: RunConfig = toml::from_str(
        "[model]\nonnx = \"m.onnx\"\nmean = [0.5]\nstd = [0.25]\n[data]\nsource = \"mnist:d\"\n",
    )
    .unwrap();
    config.out = out.path().to_path_buf();
    config.cluster.heartbeat_ms = HB.as_millis() as u64;
    config.cluster.job_timeout_secs = JOB_TIMEOUT.as_secs_f64();
    config.budget.evaluations = Some(evaluations);
    config.search.batch_size = 8;
    config.search.window = Some(window);
    config.eval.every_generations = every;
    let trainer = Trainer::new(
        network(),
        EdaParams::default(),
        config.search.clone(),
        7,
        SEARCH_LEN,
    )
    .unwrap();
    let setup = Setup {
        run_id: "virtual".into(),
        config,
        data_source: "mnist:d".into(),
        shards,
        search_len: SEARCH_LEN,
        validation,
        test,
        float_top1: 50.0,
        ptq_top1: None,
        network_fingerprint: "0".into(),
        search_seconds_before: 0.0,
        instance: "i".into(),
        teacher: None,
        blocks: None,
    };
    (setup, trainer, out)
}

impl Virtual {
    /// A run whose measurements have no images (they complete at once): for scenarios
    /// about training jobs alone.
    fn start(shards: usize, evaluations: u64) -> Virtual {
        Virtual::start_measured(shards, evaluations, 0, 0, 1_000_000)
    }

    /// A run measuring `validation` and `test` images every `every` generations, as
    /// jobs for the virtual workers.
    fn start_measured(
        shards: usize,
        evaluations: u64,
        validation: usize,
        test: usize,
        every: u64,
    ) -> Virtual {
        let (setup, trainer, out) = virtual_setup(shards, evaluations, validation, test, every, 1);
        Virtual::start_from(setup, trainer, out)
    }

    fn start_from(setup: Setup, trainer: Trainer, out: tempfile::TempDir) -> Virtual {
        let (tx, rx) = mpsc::channel(64);
        let (telemetry, watched) = watch::channel(None);
        let state = State::new(setup, trainer, telemetry);
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(state.run(rx, async move {
            let _ = stopped.await;
        }));
        Virtual {
            events: tx,
            run,
            stop: Some(stop),
            telemetry: watched,
            measure_codes: false,
            _out: out,
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Event) -> T {
        let (tx, rx) = oneshot::channel();
        self.events.send(make(tx)).await.unwrap();
        rx.await.expect("the loop answers")
    }

    /// Registers a worker (for shard `(k, S)` if given); returns (id, shard).
    async fn register(&self, name: &str, shard: Option<(u32, u32)>) -> (u64, usize) {
        let req = RegisterWorker {
            name: name.into(),
            shard,
            address: None,
        };
        let r = self
            .ask(|reply| Event::Register { req, reply })
            .await
            .unwrap();
        (r.worker_id, r.shard)
    }

    async fn heartbeat(&self, worker: u64) -> HeartbeatReply {
        self.ask(|reply| Event::Heartbeat { worker, reply }).await
    }

    /// Polls like the gRPC handler: waits up to half a second for work.
    async fn poll(&self, worker: u64) -> Option<PollReply> {
        let (tx, rx) = oneshot::channel();
        self.events
            .send(Event::Poll { worker, reply: tx })
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_millis(500), rx)
            .await
            .ok()
            .map(|r| r.unwrap())
    }

    /// The next training job for `worker`; measurement blocks handed out meanwhile are
    /// answered at once, as a worker would.
    async fn job(&self, worker: u64) -> JobSpec {
        loop {
            match self.poll(worker).await {
                Some(PollReply::Job(j)) if matches!(j.work, Work::Measure(_)) => {
                    assert!(self.submit(worker, &j).await, "measurement block refused");
                }
                Some(PollReply::Job(j)) => return j,
                other => panic!("worker {worker} expected a job, got {other:?}"),
            }
        }
    }

    /// Submits synthetic results for `job`: per image, a loss that grows with each of
    /// the group's codes' distance from a target code, so the search has something to
    /// find and adopts candidates.
    async fn submit(&self, worker: u64, job: &JobSpec) -> bool {
        let (images, g, first, count) = match &job.work {
            Work::Candidates {
                images,
                generation,
                first,
                count,
                ..
            } => (images, generation, *first, *count),
            Work::Measure(b) => {
                let n = b.count;
                let correct = match self.measure_codes {
                    true => {
                        let net = self.sync(None, Some(job.network_version)).await.unwrap();
                        let (version, c) = codes(net);
                        assert_eq!(version, job.network_version);
                        validation_correct(&c, n)
                    }
                    false => n / 2,
                };
                let results = vec![EvalStats {
                    loss_fixed: n * 1000,
                    correct,
                    images: n,
                    paired_sq: 0,
                }];
                let submission = Submission {
                    worker,
                    job: job.job_id,
                    results,
                    eval_micros: 100,
                };
                return self
                    .ask(|reply| Event::Submit {
                        submission,
                        reply,
                        then_poll: None,
                    })
                    .await;
            }
        };
        let n = images.len() as u64;
        let submission = Submission {
            worker,
            job: job.job_id,
            results: g.candidates[first..first + count]
                .iter()
                .map(|codes| {
                    let distance: u64 = g
                        .vars
                        .iter()
                        .zip(codes)
                        .map(|(&v, &c)| (c - trained_code(v as usize)).unsigned_abs().pow(2) as u64)
                        .sum();
                    EvalStats {
                        loss_fixed: n * (1000 + distance),
                        correct: n / 2,
                        images: n,
                        paired_sq: 0,
                    }
                })
                .collect(),
            eval_micros: 100,
        };
        self.ask(|reply| Event::Submit {
            submission,
            reply,
            then_poll: None,
        })
        .await
    }

    /// A worker's `SyncNetwork`: from `have` to `want` (None: the latest).
    async fn sync(&self, have: Option<u64>, want: Option<u64>) -> Result<NetworkUpdate, Refusal> {
        self.ask(|reply| Event::Sync {
            have_version: have,
            want_version: want,
            reply,
        })
        .await
    }

    async fn status(&self) -> RunStatus {
        self.ask(|reply| Event::Status { reply }).await
    }

    /// Keeps `workers` alive (and only them) for `d` of virtual time.
    async fn stay_alive(&self, workers: &[u64], d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            for &w in workers {
                assert!(self.heartbeat(w).await.known, "worker {w} was reaped");
            }
            tokio::time::sleep(HB).await;
        }
    }

    async fn stop(mut self) -> Result<Finished, crate::Error> {
        let _ = self.stop.take().unwrap().send(());
        self.run.await.unwrap()
    }
}

/// The code the virtual workers' training loss pulls variable `v` towards.
fn trained_code(v: usize) -> i8 {
    (v % 3) as i8 - 1
}

/// Correct answers of a measurement block of `n` images on a network with `codes`, when
/// held-out data disagrees with the training loss: the more codes sit where training
/// pulls them, the fewer are right, so searching lowers validation.
fn validation_correct(codes: &[i8], n: u64) -> u64 {
    let trained = (codes.iter().enumerate())
        .filter(|&(v, &c)| c == trained_code(v))
        .count() as u64;
    n * (codes.len() as u64 - trained) / codes.len() as u64
}

/// The (version, codes) of a whole-network answer to a sync.
fn codes(u: NetworkUpdate) -> (u64, Vec<i8>) {
    match u {
        NetworkUpdate::Full { version, network } => (
            version,
            QNetwork::from_bytes(&network, "test").unwrap().codes(),
        ),
        other => panic!("the whole network expected, got {other:?}"),
    }
}

/// Virtual seconds, real milliseconds: a scenario that took a second of real time waited
/// on the real clock somewhere.
fn assert_fast(real: std::time::Instant) {
    let took = real.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?} of real time");
}

/// A worker that goes silent is reaped after three heartbeat intervals; the job it held
/// goes to another worker, and its late result is refused.
#[tokio::test(start_paused = true)]
async fn a_silent_worker_is_reaped_and_its_job_reassigned() {
    let real = std::time::Instant::now();
    let v = Virtual::start(1, 1000);
    let (a, _) = v.register("a", None).await;
    let job = v.job(a).await;
    let (b, _) = v.register("b", None).await;
    // b keeps heartbeating while a says nothing: a is gone after 3 intervals.
    v.stay_alive(&[b], HB * 5).await;
    let s = v.status().await;
    assert_eq!(s.workers.iter().map(|w| w.id).collect::<Vec<_>>(), [b]);
    assert_eq!(
        (s.window, s.generations_in_flight),
        (1, 1),
        "status shows the window and the generation waiting on the reaped job"
    );
    assert!(!v.heartbeat(a).await.known, "a must register again");
    let again = v.job(b).await;
    assert_eq!(
        again.job_id, job.job_id,
        "a's job went back to the front of the queue"
    );
    assert!(
        !v.submit(a, &job).await,
        "a late result from a reaped worker is refused"
    );
    assert!(v.submit(b, &again).await);
    assert_eq!(
        v.status().await.generation,
        1,
        "the generation completed once"
    );
    v.stop().await.unwrap();
    assert_fast(real);
}

/// Per-worker latency series cover live workers only: a worker that did jobs and was
/// then reaped leaves the published telemetry, so churn cannot grow a scrape forever.
#[tokio::test(start_paused = true)]
async fn a_departed_worker_leaves_the_per_worker_latencies() {
    let real = std::time::Instant::now();
    let v = Virtual::start(1, 1000);
    let (a, _) = v.register("a", None).await;
    let (b, _) = v.register("b", None).await;
    let job = v.job(a).await;
    assert!(v.submit(a, &job).await);
    let job = v.job(b).await;
    assert!(v.submit(b, &job).await);
    v.stay_alive(&[a, b], HB * 2).await;
    let ids = |v: &Virtual| -> Vec<u64> {
        let t = v.telemetry.borrow();
        let t = t.as_ref().expect("published");
        t.worker_job_seconds.keys().copied().collect()
    };
    assert_eq!(ids(&v), [a, b], "both workers completed a job");
    // a goes silent and is reaped; b stays.
    v.stay_alive(&[b], HB * 5).await;
    assert_eq!(ids(&v), [b], "a reaped worker's series is gone");
    v.stop().await.unwrap();
    assert_fast(real);
}

/// A worker that stays alive but holds a job past the job timeout loses it; its result,
/// arriving after that, is refused, and the job is counted once, from the new holder.
#[tokio::test(start_paused = true)]
async fn an_expired_lease_is_given_to_another_worker() {
    let real = std::time::Instant::now();
    let v = Virtual::start(1, 1000);
    let (a, _) = v.register("a", None).await;
    let (b, _) = v.register("b", None).await;
    // The first generation was cut before any worker came: one job.
    let first = v.job(a).await;
    assert!(v.submit(a, &first).await);
    // The next one is cut for two live workers.
    let ja = v.job(a).await;
    let jb = v.job(b).await;
    assert_ne!(ja.job_id, jb.job_id);
    assert!(v.submit(b, &jb).await);
    // a heartbeats (so it is not reaped) but never answers within the timeout.
    v.stay_alive(&[a, b], JOB_TIMEOUT + HB * 2).await;
    let s = v.status().await;
    let state = |id| s.workers.iter().find(|w| w.id == id).unwrap().state.clone();
    assert_eq!(state(a), "idle", "the lease was taken back");
    assert_eq!(s.generation, 1, "the generation waits for the lost job");
    let retried = v.job(b).await;
    assert_eq!(retried.job_id, ja.job_id);
    assert!(
        !v.submit(a, &ja).await,
        "the old holder's late result is refused"
    );
    assert!(v.submit(b, &retried).await);
    let s = v.status().await;
    assert_eq!(s.generation, 2);
    let b_row = s.workers.iter().find(|w| w.id == b).unwrap();
    assert_eq!(b_row.jobs_done, 2);
    v.stop().await.unwrap();
    assert_fast(real);
}

/// When the only worker of a shard dies, an idle worker that did not ask for its shard
/// is sent to register again and is given the orphaned shard; a worker that asked for its
/// shard never moves.
#[tokio::test(start_paused = true)]
async fn an_idle_worker_moves_to_a_shard_nobody_serves() {
    let real = std::time::Instant::now();
    // A batch of 8 of 64 images over 2 shards of 32: both shards get images in every
    // generation with overwhelming odds; the test checks it rather than assume it.
    let v = Virtual::start(2, 1000);
    let (fixed, s0) = v.register("fixed", Some((0, 2))).await;
    let (a, s1) = v.register("a", None).await;
    assert_eq!((s0, s1), (0, 1));
    let (movable, s) = v.register("movable", None).await;
    assert_eq!(s, 0, "the least served shard, lowest first");
    // a takes its shard's job and dies; the fixed worker takes shard 0's job and
    // finishes it; the movable worker finds shard 0 empty.
    let ja = v.job(a).await;
    let jf = v.job(fixed).await;
    assert!(v.submit(fixed, &jf).await);
    v.stay_alive(&[fixed, movable], HB * 5).await;
    assert!(
        v.status().await.workers.iter().all(|w| w.id != a),
        "a was reaped"
    );
    // The worker that asked for shard 0 waits there, even with shard 1 unserved.
    assert!(
        v.poll(fixed).await.is_none(),
        "no work for shard 0 and it stays"
    );
    assert!(
        matches!(v.poll(movable).await, Some(PollReply::Unknown)),
        "the idle movable worker is told to register again"
    );
    let (moved, shard) = v.register("movable", None).await;
    assert_eq!(shard, 1, "and gets the shard nobody serves");
    let j = v.job(moved).await;
    assert_eq!(j.job_id, ja.job_id);
    assert!(v.submit(moved, &j).await);
    assert_eq!(v.status().await.generation, 1);
    v.stop().await.unwrap();
    assert_fast(real);
}

/// A run with work and no worker says so in status, and says how to fix it.
#[tokio::test(start_paused = true)]
async fn work_without_workers_is_reported_in_status() {
    let v = Virtual::start(1, 1000);
    tokio::time::sleep(HB).await;
    let s = v.status().await;
    assert!(
        s.waiting_for_workers.contains("no worker is connected"),
        "{s:?}"
    );
    let (a, _) = v.register("a", None).await;
    assert_eq!(v.status().await.waiting_for_workers, "");
    let job = v.job(a).await;
    assert!(v.submit(a, &job).await);
    v.stop().await.unwrap();
}

/// A run driven to its budget by virtual workers, one of which dies holding a job, ends
/// with the same network as the run with one steady worker: work lost to a dead worker is
/// redone, never counted twice or skipped.
#[tokio::test(start_paused = true)]
async fn losing_a_worker_mid_run_changes_nothing() {
    /// Every worker polls and answers in turn; in round `die_at` the last one takes a
    /// job and falls silent.
    async fn drive(v: &Virtual, workers: &[u64], die_at: Option<usize>) {
        let mut alive = workers.to_vec();
        for round in 0.. {
            if Some(round) == die_at {
                let dying = alive.pop().unwrap();
                loop {
                    if let Some(PollReply::Job(_)) = v.poll(dying).await {
                        break;
                    }
                }
            }
            for &w in &alive {
                match v.poll(w).await {
                    Some(PollReply::Job(j)) => assert!(v.submit(w, &j).await),
                    Some(PollReply::Done) => return,
                    Some(PollReply::Unknown) => panic!("worker {w} was dropped"),
                    None => {}
                }
            }
        }
    }
    let mut ends = Vec::new();
    for (n, die_at) in [(1, None), (3, Some(4))] {
        let v = Virtual::start_measured(1, 16 * 12, 16, 16, 4);
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(v.register(&format!("w{i}"), None).await.0);
        }
        drive(&v, &ids, die_at).await;
        let f = v.stop().await.unwrap();
        assert!(f.complete, "{}", f.stop_reason);
        assert!(
            f.progress.adoptions > 0,
            "the synthetic fitness is searched"
        );
        let last = f.last;
        ends.push((
            f.progress.evaluations,
            f.progress.adoptions,
            last.network_version,
            last.val_loss.to_bits(),
            f.best.0.codes(),
        ));
    }
    assert_eq!(ends[0], ends[1]);
}

/// Validation and test measurements are jobs: a single worker serves training first and
/// measurement blocks once a measurement is overdue, every scheduled measurement is
/// recorded with the exact sums of its blocks, and the run ends only when the final
/// measurement is in.
#[tokio::test(start_paused = true)]
async fn measurements_are_worker_jobs_and_the_run_waits_for_the_last() {
    let real = std::time::Instant::now();
    // 16 candidates per generation: 6 generations; measured every 2 generations.
    let v = Virtual::start_measured(1, 16 * 6, 40, 24, 2);
    let (a, _) = v.register("a", None).await;
    let mut kinds = Vec::new();
    loop {
        match v.poll(a).await {
            Some(PollReply::Job(j)) => {
                kinds.push(matches!(j.work, Work::Measure(_)));
                assert!(v.submit(a, &j).await);
            }
            Some(PollReply::Done) => break,
            other => panic!("{other:?}"),
        }
    }
    // Training went first: the PTQ measurement waited for a generation.
    assert!(!kinds[0], "{kinds:?}");
    let f = v.stop().await.unwrap();
    assert!(f.complete, "{}", f.stop_reason);
    let gens: Vec<(u64, bool)> = f
        .history
        .iter()
        .map(|p| (p.generation, p.is_final))
        .collect();
    assert_eq!(
        gens,
        [(0, false), (2, false), (4, false), (6, false), (6, true)]
    );
    for p in &f.history {
        // The virtual worker answers each block with half its images correct.
        assert_eq!((p.val_top1, p.test_top1), (50.0, 50.0), "{p:?}");
        assert!((p.val_loss - 1000.0 / (1u64 << 24) as f64).abs() < 1e-12);
    }
    // 40 + 24 images in blocks of at most 8 (batch 8, one shard; at least 16): 3 + 2.
    let blocks = kinds.iter().filter(|&&m| m).count();
    assert_eq!(blocks, 5 * 5, "five measurements of five blocks: {kinds:?}");
    assert_fast(real);
}

/// A measurement block names an older network version than the latest; `SyncNetwork`
/// with `want_version` brings a worker there: the whole network as it was at that version,
/// or the changes forward from an older version the worker holds. Once the measurement
/// is in, nobody is sent that version any more.
#[tokio::test(start_paused = true)]
async fn a_measured_version_is_synced_as_it_was() {
    let real = std::time::Instant::now();
    let v = Virtual::start_measured(1, 16 * 40, 16, 16, 3);
    let (a, _) = v.register("a", None).await;
    let sync = |have, want| v.sync(have, want);
    // Every version the training jobs name, as the latest network was then.
    let mut seen: std::collections::BTreeMap<u64, Vec<i8>> = Default::default();
    let block = loop {
        let Some(PollReply::Job(j)) = v.poll(a).await else {
            panic!("work expected")
        };
        match j.work {
            Work::Candidates { .. } => {
                let (version, c) = codes(sync(None, None).await.unwrap());
                assert_eq!(version, j.network_version);
                seen.insert(version, c);
                assert!(v.submit(a, &j).await);
            }
            Work::Measure(_) if j.network_version > 1 => break j,
            Work::Measure(_) => assert!(v.submit(a, &j).await),
        }
    };
    let want = block.network_version;
    assert!(
        seen.len() > 2 && seen.contains_key(&want),
        "{:?}",
        seen.keys()
    );
    let latest = *seen.keys().last().unwrap();
    assert!(latest > want, "the search moved on while the block waited");
    // Whole, from nothing.
    let (version, c) = codes(sync(None, Some(want)).await.unwrap());
    assert_eq!((version, &c), (want, &seen[&want]));
    // As changes, forward from an older version and back from a newer one.
    for have in [*seen.keys().next().unwrap(), latest] {
        match sync(Some(have), Some(want)).await.unwrap() {
            NetworkUpdate::Changes { version, changes } => {
                assert_eq!(version, want);
                let mut c = seen[&have].clone();
                for (var, code) in changes {
                    c[var as usize] = code;
                }
                assert_eq!(c, seen[&want], "from {have}");
            }
            other => panic!("changes expected, got {other:?}"),
        }
    }
    // The measurement completes; its version is then answered with the latest network.
    assert!(v.submit(a, &block).await);
    // Its remaining blocks come first (it is overdue); stop at the first training job.
    while let Some(PollReply::Job(j)) = v.poll(a).await {
        if matches!(j.work, Work::Candidates { .. }) {
            break;
        }
        assert!(v.submit(a, &j).await);
    }
    let (version, _) = codes(sync(None, Some(want)).await.unwrap());
    assert!(
        version > want,
        "a finished measurement's version is not served"
    );
    v.stop().await.unwrap();
    assert_fast(real);
}

/// A training job carries the network changes since the version of the worker's previous
/// job, so a worker that holds that version needs no `SyncNetwork`: applied to it they
/// give exactly the network the coordinator serves for the job's version.
#[tokio::test(start_paused = true)]
async fn jobs_carry_the_changes_since_the_workers_previous_job() {
    let real = std::time::Instant::now();
    let v = Virtual::start(1, 16 * 30);
    let (a, _) = v.register("a", None).await;
    let latest = || async { codes(v.sync(None, None).await.unwrap()) };
    let first = v.job(a).await;
    assert!(first.changes.is_none(), "nothing was sent before: it syncs");
    let (mut held, mut codes) = latest().await;
    assert_eq!(held, first.network_version);
    assert!(v.submit(a, &first).await);
    let mut carried = 0;
    // Until the search ends (the 64 variables freeze).
    while let Some(PollReply::Job(j)) = v.poll(a).await {
        match &j.changes {
            Some((from, changes)) => {
                assert_eq!(*from, held, "from the previous job's version");
                for &(var, code) in changes {
                    codes[var as usize] = code;
                }
                held = j.network_version;
                assert_eq!((held, &codes), (latest().await.0, &latest().await.1));
                carried += 1;
            }
            None => assert_eq!(j.network_version, held, "no changes: nothing changed"),
        }
        assert!(v.submit(a, &j).await);
    }
    assert!(carried > 0, "the network moved and the jobs carried it");
    v.stop().await.unwrap();
    assert_fast(real);
}

/// `search.rollback`: when held-out data disagrees with the training loss, validation
/// falls as the search goes on, and each measurement that reads more than the allowed
/// points below the best sends the search back to the best network. The search waits at
/// each measured generation for its measurement, so the same runs with one worker or
/// three (answering in turn, in alternating order) and with two generations in flight
/// decide the same and end identical; jobs after a rollback carry the changes that bring
/// a worker to the network they name.
#[tokio::test(start_paused = true)]
async fn a_rollback_run_returns_to_its_best_network_whatever_the_workers() {
    let real = std::time::Instant::now();
    const ALLOWED: f64 = 2.0;
    let mut ends = Vec::new();
    for n in [1, 3] {
        let (mut setup, _, out) = virtual_setup(1, 16 * 120, 256, 16, 5, 2);
        setup.config.search.rollback = Some(ALLOWED);
        // Every batch is the whole search range, and a measurement block all 256
        // validation images: validation moves by 1/64 per trained code.
        setup.config.search.batch_size = 256;
        let trainer = Trainer::new(
            network(),
            EdaParams::default(),
            setup.config.search.clone(),
            7,
            SEARCH_LEN,
        )
        .unwrap();
        let mut v = Virtual::start_from(setup, trainer, out);
        v.measure_codes = true;
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(v.register(&format!("w{i}"), None).await.0);
        }
        // What each worker holds: (version, codes), kept up by the jobs' changes.
        let mut held: std::collections::BTreeMap<u64, (u64, Vec<i8>)> = Default::default();
        // Measurement blocks handed out while the status said the search waits for them.
        let mut waited = 0;
        'run: for round in 0.. {
            let mut order = ids.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for &w in &order {
                match v.poll(w).await {
                    Some(PollReply::Job(j)) => {
                        if let Work::Candidates { .. } = j.work {
                            let latest =
                                codes(v.sync(None, Some(j.network_version)).await.unwrap());
                            match (&j.changes, held.get_mut(&w)) {
                                (Some((from, changes)), Some((version, c))) => {
                                    assert_eq!(from, version);
                                    for &(var, code) in changes {
                                        c[var as usize] = code;
                                    }
                                    *version = j.network_version;
                                }
                                _ => {
                                    held.insert(w, latest.clone());
                                }
                            }
                            assert_eq!(held[&w], latest, "worker {w} is where its job says");
                        } else {
                            let st = v.status().await;
                            if st.waiting_for_measurement {
                                assert_eq!(st.generations_in_flight, 0);
                                assert_eq!(st.generation % 5, 0, "at a measured generation");
                                waited += 1;
                            }
                        }
                        assert!(v.submit(w, &j).await);
                    }
                    Some(PollReply::Done) => break 'run,
                    Some(PollReply::Unknown) => panic!("worker {w} was dropped"),
                    None => {}
                }
            }
        }
        let f = v.stop().await.unwrap();
        assert!(f.complete, "{}", f.stop_reason);
        assert!(
            waited > 0,
            "status showed the search waiting for a measurement"
        );
        // Every measurement during the search more than ALLOWED below the best before it
        // (and itself) sent the search back, and nothing else did: not the start's, and
        // not one due where the search ended, which the search did not wait for.
        let (last, measured) = f.history.split_last().unwrap();
        let end = last.generation;
        let mut best = f64::MIN;
        let mut expected = 0;
        for p in measured {
            best = best.max(p.val_top1);
            if p.generation > 0 && p.generation < end && best - p.val_top1 > ALLOWED {
                expected += 1;
            }
        }
        assert!(
            expected > 1,
            "validation fell during the search: {:?}",
            f.history
        );
        // The final measurement found the search drifted again after the last one it
        // waited for: it went back once more, and the network it ends with, measured
        // again as the final, is the best.
        let drifted = &measured[measured.len() - 1];
        assert!(last.is_final && !drifted.is_final);
        assert_eq!(drifted.generation, end);
        assert!(best - drifted.val_top1 > ALLOWED, "{:?}", f.history);
        assert_eq!(f.progress.rollbacks, expected + 1);
        assert_eq!(last.val_top1.to_bits(), best.to_bits());
        assert_eq!(last.val_top1.to_bits(), f.best.1.val_top1.to_bits());
        let history: Vec<_> = (f.history.iter())
            .map(|p| {
                (
                    p.generation,
                    p.val_top1.to_bits(),
                    p.network_version,
                    p.is_final,
                )
            })
            .collect();
        ends.push((history, f.progress, f.best.0.codes()));
    }
    assert_eq!(ends[0], ends[1], "one worker and three decide the same");
    assert_fast(real);
}
