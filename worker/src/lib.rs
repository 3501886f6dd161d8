//! The ccq worker: stateless fitness evaluation on one data shard.
//!
//! A worker connects to the coordinator (retrying with backoff, so start-up order never
//! matters), registers with the protocol version, loads its shard of the training split,
//! and then long-polls for jobs. For each job it brings its copy of the network to the
//! job's version (changes since the version it holds, or the whole network), evaluates the
//! candidates on the job's images ([`ccq_common::fitness`]) and submits the sums. A
//! measurement job names a block of validation or test images and an older network
//! version: the worker reads the block (once; blocks are kept), brings a second copy of
//! the network, which only moves forward, to that version, and submits the sums.
//! It heartbeats in the background; when the coordinator no longer knows it (restart,
//! reaping) it registers again; when the run is done it returns `Ok`.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ccq_common::data::{self, DataSource, Dataset, Shard, Split};
use ccq_common::fitness;
use ccq_common::qnet::{BlockTarget, EvalStats, QNetwork, Targets, Teacher};
use ccq_proto::client::{self, endpoint, error_chain, Auth, Client, JobStream};
use ccq_proto::v1::coordinator_client::CoordinatorClient;
use ccq_proto::v1::{
    measure, poll_job_response, CandidateResult, Changes, HeartbeatRequest, Job, Measure,
    PollJobResponse, RegisterRequest, RegisterResponse, SubmitResultRequest, SyncNetworkRequest,
};
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] ccq_common::Error),
    /// A bad coordinator URL, CA file or token.
    #[error(transparent)]
    Client(#[from] client::Error),
    /// The coordinator refused this worker for good (protocol version, bad shard, ...).
    #[error("coordinator refused registration: {0}")]
    Refused(String),
    #[error("coordinator sent an invalid job {job}: {reason}")]
    BadJob { job: u64, reason: String },
    #[error("coordinator RPC failed: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("coordinator {addr} unreachable for {secs} s, giving up: {reason}")]
    Unreachable {
        addr: String,
        secs: f64,
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// `None`: the coordinator assigns one.
    pub shard: Option<Shard>,
    /// Threads for evaluation.
    pub threads: usize,
    /// Label shown in `coordinator status`.
    pub name: String,
    /// Read data from here instead of the path the coordinator names (containers that
    /// mount the data elsewhere).
    pub data_override: Option<DataSource>,
    /// Give up when the coordinator has been unreachable this long (`None`: retry forever).
    pub give_up_after: Option<Duration>,
    /// The cluster token (`--token`, `CCQ_TOKEN`); required when the coordinator has one.
    pub token: Option<String>,
    /// PEM file of the CA that signed the coordinator's TLS certificate (`--tls-ca`);
    /// the coordinator URL is then `https://`.
    pub tls_ca: Option<PathBuf>,
}

/// The shard of a Kubernetes Indexed-Job pod: completion index `index` serves shard
/// `index mod shards`, so a Job of R × S completions runs R workers per shard (the
/// coordinator splits a shard's candidates among its workers). Errors name the variable
/// at fault.
pub fn shard_from_index(index: &str, shards: &str) -> Result<Shard, Error> {
    let bad = |what: &str, v: &str| {
        Error::Common(ccq_common::Error::setting(
            what,
            v,
            "expected a whole number (the Indexed Job sets JOB_COMPLETION_INDEX; CCQ_SHARDS must equal cluster.shards)",
        ))
    };
    let k: usize = index
        .trim()
        .parse()
        .map_err(|_| bad("JOB_COMPLETION_INDEX", index))?;
    let s: usize = shards
        .trim()
        .parse()
        .map_err(|_| bad("CCQ_SHARDS", shards))?;
    if s == 0 {
        return Err(Error::Common(ccq_common::Error::setting(
            "CCQ_SHARDS",
            shards,
            "must be at least 1",
        )));
    }
    Ok(Shard::new(k % s, s)?)
}

/// How a worker's run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The coordinator reported the run done.
    RunDone,
    /// `shutdown` completed first (a signal): the run may still need this worker.
    Shutdown,
}

/// Runs until the coordinator reports the run done or `shutdown` completes.
pub async fn run(cfg: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<Exit, Error> {
    tokio::select! {
        r = run_inner(&cfg) => r.map(|()| Exit::RunDone),
        _ = shutdown => {
            info!("shutdown requested; abandoning any job in progress");
            Ok(Exit::Shutdown)
        }
    }
}

/// What survives re-registration: the loaded shard, the network copies and the
/// measurement blocks read so far.
#[derive(Default)]
struct Local {
    shard: Option<(String, Shard, Dataset)>,
    /// Where the data is read from (the coordinator's source or `--data` override).
    source: Option<DataSource>,
    net: Option<(u64, QNetwork)>,
    /// The network measurement jobs measure: an older version than `net`'s, moving forward.
    measured: Option<(u64, QNetwork)>,
    /// Measurement blocks by (test split?, first, count); bounded by the run's validation
    /// and test sizes.
    blocks: HashMap<(bool, u64, u64), std::sync::Arc<Dataset>>,
    /// The coordinator process the network versions belong to.
    instance: String,
}

async fn run_inner(cfg: &WorkerConfig) -> Result<(), Error> {
    let endpoint = endpoint(&cfg.coordinator, cfg.tls_ca.as_deref())?;
    let auth = Auth::new(cfg.token.as_deref())?;
    let mut local = Local::default();
    let mut backoff = Backoff::new();
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let channel = match endpoint.connect().await {
            Ok(c) => {
                unreachable_since = None;
                c
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if let Some(limit) = cfg.give_up_after.filter(|&l| since.elapsed() >= l) {
                    return Err(Error::Unreachable {
                        addr: cfg.coordinator.clone(),
                        secs: limit.as_secs_f64(),
                        reason: error_chain(&e),
                    });
                }
                let wait = backoff.next();
                debug!(
                    "coordinator {} not reachable ({}); retrying in {wait:?}",
                    cfg.coordinator,
                    error_chain(&e)
                );
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let mut client = CoordinatorClient::with_interceptor(channel, auth.clone())
            .max_decoding_message_size(256 << 20);
        let reg = match register(&mut client, cfg).await {
            Ok(r) => r,
            Err(Error::Rpc(s)) if is_transient(&s) => {
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff.reset();
        if reg.coordinator_instance != local.instance {
            // A restarted (or another) coordinator: version numbers start afresh.
            local.net = None;
            local.measured = None;
            local.instance = reg.coordinator_instance.clone();
        }
        info!(
            worker = reg.worker_id,
            shard = format!("{}/{}", reg.shard_index, reg.shard_count),
            "registered with run {}",
            reg.run_id
        );
        match serve(&mut client, cfg, &reg, &mut local).await {
            Ok(Served::Done) => {
                info!("run finished; exiting");
                return Ok(());
            }
            Ok(Served::Reregister) => {
                info!("coordinator lost track of this worker; registering again")
            }
            Err(Error::Rpc(s)) if is_transient(&s) => {
                warn!(
                    "connection to the coordinator lost ({}); reconnecting",
                    s.message()
                );
                tokio::time::sleep(backoff.next()).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

async fn register(client: &mut Client, cfg: &WorkerConfig) -> Result<RegisterResponse, Error> {
    let req = RegisterRequest {
        protocol_version: ccq_proto::PROTOCOL_VERSION,
        name: cfg.name.clone(),
        shard_index: cfg.shard.map(|s| s.index as u32),
        shard_count: cfg.shard.map(|s| s.count as u32),
        threads: cfg.threads as u32,
    };
    match client.register(req).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
            ) =>
        {
            Err(Error::Refused(s.message().to_string()))
        }
        // Plain HTTP/2 against a TLS listener fails as a protocol error.
        Err(s) if s.code() == tonic::Code::Internal && cfg.coordinator.starts_with("http://") => {
            Err(Error::Refused(format!(
                "{} (if the coordinator uses TLS, connect to https://... with --tls-ca)",
                s.message()
            )))
        }
        Err(s) => Err(Error::Rpc(s)),
    }
}

enum Served {
    Done,
    Reregister,
}

async fn serve(
    client: &mut Client,
    cfg: &WorkerConfig,
    reg: &RegisterResponse,
    local: &mut Local,
) -> Result<Served, Error> {
    // Heartbeats run beside everything that follows, loading the shard included: decoding
    // a shard of large images takes longer than the coordinator waits for a heartbeat, and
    // a worker silent that long would be reaped and register again after loading. A
    // heartbeat that finds us unknown (or the run done) ends the job loop.
    let (hb_tx, mut hb_rx) = tokio::sync::oneshot::channel::<Served>();
    let _heartbeats = AbortOnDrop(tokio::spawn(heartbeat(
        client.clone(),
        reg.worker_id,
        Duration::from_millis(reg.heartbeat_interval_ms.max(50) as u64),
        hb_tx,
    )));
    let shard = Shard {
        index: reg.shard_index as usize,
        count: reg.shard_count as usize,
    };
    let source = match &cfg.data_override {
        // An override moves the data, it must not change how it is read: other options
        // (a crop, a channel order) would give other pixels than the coordinator measures.
        Some(s) => match reg.data_source.parse::<DataSource>() {
            Ok(theirs) if theirs.format != s.format => {
                return Err(ccq_common::Error::InvalidDataSource {
                    spec: s.to_string(),
                    reason: format!(
                        "the coordinator reads {theirs}; --data may name another directory \
                         but not another format or other options"
                    ),
                }
                .into())
            }
            _ => s.clone(),
        },
        None => reg.data_source.parse::<DataSource>()?,
    };
    let key = source.to_string();
    if !matches!(&local.shard, Some((k, s, _)) if *k == key && *s == shard) {
        let range = shard.range(reg.search_len as usize);
        info!(
            "loading shard {}/{} of {key}: images {range:?}",
            shard.index, shard.count
        );
        let src = source.clone();
        let d = tokio::task::spawn_blocking(move || data::load(&src, Split::Train, Some(range)))
            .await
            .expect("data loading task panicked")?;
        local.shard = Some((key.clone(), shard, d));
    }
    if local.source.as_ref().map(|s| s.to_string()) != Some(key) {
        local.blocks.clear();
        local.source = Some(source.clone());
    }

    async {
        // Jobs come on one stream. The next job comes with the previous result's
        // acknowledgement (one round trip per job); a poll only when there was none (the
        // first, after idle or a skipped job).
        let mut jobs = JobStream::open(client).await?;
        let mut next: Option<PollJobResponse> = None;
        loop {
            let poll = match next.take() {
                Some(p) => p,
                None => tokio::select! {
                    p = jobs.poll(reg.worker_id) => p?,
                    Ok(s) = &mut hb_rx => return Ok(s),
                },
            };
            match poll.reply {
                Some(poll_job_response::Reply::Job(job)) => {
                    let job_id = job.job_id;
                    let Some((results, micros)) =
                        evaluate(client, reg.worker_id, local, job, cfg.threads.max(1)).await?
                    else {
                        continue;
                    };
                    // Waits at most a poll's wait for the next job.
                    let submitted = jobs
                        .submit(SubmitResultRequest {
                            worker_id: reg.worker_id,
                            job_id,
                            results,
                            eval_micros: micros,
                            take_next: true,
                        })
                        .await?;
                    next = submitted.next;
                }
                Some(poll_job_response::Reply::Idle(_)) | None => {}
                Some(poll_job_response::Reply::Done(_)) => return Ok(Served::Done),
                Some(poll_job_response::Reply::Unknown(_)) => return Ok(Served::Reregister),
            }
        }
    }
    .await
}

/// Aborts the task when dropped: the heartbeats stop on every way out of `serve`.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn heartbeat(
    mut client: Client,
    worker_id: u64,
    every: Duration,
    tx: tokio::sync::oneshot::Sender<Served>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match client.heartbeat(HeartbeatRequest { worker_id }).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.done {
                    let _ = tx.send(Served::Done);
                    return;
                }
                if !r.known {
                    let _ = tx.send(Served::Reregister);
                    return;
                }
            }
            // The job loop notices a dead connection itself.
            Err(e) => debug!("heartbeat failed: {}", e.message()),
        }
    }
}

/// Brings the network to the job's version, then evaluates off the async runtime.
/// `None` when the job is stale (the coordinator has moved to a newer network).
async fn evaluate(
    client: &mut Client,
    worker_id: u64,
    local: &mut Local,
    mut job: Job,
    threads: usize,
) -> Result<Option<(Vec<CandidateResult>, u64)>, Error> {
    if let Some(m) = job.measure.take() {
        return measure(
            client,
            worker_id,
            local,
            job.job_id,
            job.network_version,
            m,
            threads,
        )
        .await;
    }
    // The job may carry the changes from the version of our previous job: no round trip.
    if let (Some(from), Some((have, net))) = (job.changes_from, local.net.as_mut()) {
        if *have == from && from != job.network_version {
            wire_changes(job.changes.as_ref())
                .and_then(|c| net.apply_changes(&c).map_err(|e| e.to_string()))
                .map_err(|e| Error::BadJob {
                    job: job.job_id,
                    reason: format!("its network changes: {e}"),
                })?;
            *have = job.network_version;
        }
    }
    // The generation's own network, which with a window may be older than the latest.
    let version = job.network_version;
    if !sync_network(client, worker_id, &mut local.net, version).await? {
        // The job belongs to a generation that is already over; its result would be refused.
        debug!(job = job.job_id, "skipping a stale job");
        return Ok(None);
    }
    let (_, _, data) = local.shard.as_ref().expect("shard loaded before jobs");
    let bad = |reason: String| Error::BadJob {
        job: job.job_id,
        reason,
    };
    // Gather this job's images out of the shard.
    let il = data.image_len();
    let mut pixels = Vec::with_capacity(job.images.len() * il);
    let mut labels = Vec::with_capacity(job.images.len());
    for &g in &job.images {
        let i = (g as usize)
            .checked_sub(data.first_index)
            .filter(|&i| i < data.len())
            .ok_or_else(|| bad(format!("image {g} is not in this worker's shard")))?;
        pixels.extend_from_slice(data.image(i));
        labels.push(data.labels[i]);
    }
    let candidates: Vec<Vec<i8>> = job
        .candidates
        .iter()
        .map(|c| c.iter().map(|&b| b as i8).collect())
        .collect();
    let (_, net) = local.net.take().expect("network synced");
    let vars = job.group_vars.clone();
    // Distillation: the teacher's logits travel with the job (checked with the rest by
    // `evaluate_candidates`: a malformed teacher is a bad job, not a panic).
    let teacher = std::mem::take(&mut job.teacher_logits);
    let temperature = job.temperature;
    // Block-local fitness: likewise its targets (checked against the network there).
    let block_codes = std::mem::take(&mut job.block_targets);
    let block_end = job.block_end;
    let started = Instant::now();
    let (net, res) = tokio::task::spawn_blocking(move || {
        let targets = Targets {
            block: block_end.map(|node| BlockTarget {
                node: node as usize,
                codes: &block_codes,
            }),
            labels: &labels,
            teacher: (!teacher.is_empty()).then_some(Teacher {
                logits: &teacher,
                temperature,
            }),
        };
        let per_pass = images_per_pass(&net, PASS_BYTES, threads);
        let r = evaluate_in_passes(
            &net,
            &pixels,
            &targets,
            &vars,
            &candidates,
            threads,
            per_pass,
        );
        (net, r)
    })
    .await
    .expect("evaluation task panicked");
    local.net = Some((job.network_version, net));
    let stats = res.map_err(|e| bad(e.to_string()))?;
    let results = stats
        .iter()
        .map(|s| CandidateResult {
            loss_fixed: s.loss_fixed,
            correct: s.correct,
            images: s.images,
            paired_sq: s.paired_sq,
        })
        .collect();
    Ok(Some((results, started.elapsed().as_micros() as u64)))
}

/// Evaluates the network at `version` on a measurement block: one result, its sums.
/// `None` when the measurement is over (the coordinator no longer has that version).
async fn measure(
    client: &mut Client,
    worker_id: u64,
    local: &mut Local,
    job_id: u64,
    version: u64,
    m: Measure,
    threads: usize,
) -> Result<Option<(Vec<CandidateResult>, u64)>, Error> {
    let bad = |reason: String| Error::BadJob {
        job: job_id,
        reason,
    };
    let test = match measure::Split::try_from(m.split) {
        Ok(measure::Split::Validation) => false,
        Ok(measure::Split::Test) => true,
        Err(_) => return Err(bad(format!("unknown measurement split {}", m.split))),
    };
    let (first, count) = (m.first, m.count);
    let end = first
        .checked_add(count)
        .filter(|_| count > 0)
        .ok_or_else(|| bad(format!("measurement block {first} + {count}")))?;
    // The network moves forward between measurements; an older one is a fresh copy.
    if matches!(&local.measured, Some((v, _)) if *v > version) {
        local.measured = None;
    }
    if !sync_network(client, worker_id, &mut local.measured, version).await? {
        debug!(job = job_id, "skipping a measurement that is over");
        return Ok(None);
    }
    let key = (test, first, count);
    let block = match local.blocks.get(&key) {
        Some(b) => std::sync::Arc::clone(b),
        None => {
            let source = local.source.clone().expect("data source known before jobs");
            let split = if test { Split::Test } else { Split::Train };
            let range = first as usize..end as usize;
            let d = tokio::task::spawn_blocking(move || data::load(&source, split, Some(range)))
                .await
                .expect("data loading task panicked")
                .map_err(|e| bad(format!("measurement block {first}..{end}: {e}")))?;
            let d = std::sync::Arc::new(d);
            local.blocks.insert(key, std::sync::Arc::clone(&d));
            d
        }
    };
    if block.len() as u64 != count {
        return Err(bad(format!(
            "measurement block {first}..{end} holds {} images",
            block.len()
        )));
    }
    let (_, net) = local.measured.take().expect("network synced");
    let started = Instant::now();
    let (net, stats) = tokio::task::spawn_blocking(move || {
        let s = net.evaluate(&block.images, &block.labels, 256, threads);
        (net, s)
    })
    .await
    .expect("measurement task panicked");
    local.measured = Some((version, net));
    Ok(Some((
        vec![CandidateResult {
            loss_fixed: stats.loss_fixed,
            correct: stats.correct,
            images: stats.images,
            paired_sq: stats.paired_sq,
        }],
        started.elapsed().as_micros() as u64,
    )))
}

/// Brings `slot` to version `want`, which may be older than the latest (a generation's
/// in a window, or a measurement's). True when `slot` then holds `want`; false when the
/// coordinator no longer has that version (it sends the latest instead).
async fn sync_network(
    client: &mut Client,
    worker_id: u64,
    slot: &mut Option<(u64, QNetwork)>,
    want: u64,
) -> Result<bool, Error> {
    if matches!(slot, Some((v, _)) if *v == want) {
        return Ok(true);
    }
    let have = slot.as_ref().map(|(v, _)| *v);
    let r = client
        .sync_network(SyncNetworkRequest {
            worker_id,
            have_version: have,
            want_version: Some(want),
        })
        .await?
        .into_inner();
    if !r.full.is_empty() {
        let net = QNetwork::from_bytes(&r.full, "network from the coordinator")?;
        *slot = Some((r.version, net));
    } else {
        let (v, net) = slot.as_mut().ok_or_else(|| Error::BadJob {
            job: 0,
            reason: "coordinator sent changes but this worker holds no network".into(),
        })?;
        let changes = wire_changes(r.changes.as_ref()).map_err(|reason| Error::BadJob {
            job: 0,
            reason: format!("the network changes of version {}: {reason}", r.version),
        })?;
        net.apply_changes(&changes)?;
        *v = r.version;
    }
    Ok(slot.as_ref().map(|(v, _)| *v) == Some(want))
}

/// Variable changes as the wire carries them (none when absent); arrays of different
/// lengths are an error (a code out of the variable's range is refused by
/// `apply_changes`).
fn wire_changes(changes: Option<&Changes>) -> Result<Vec<(u32, i8)>, String> {
    changes.map_or(Ok(Vec::new()), Changes::to_pairs)
}

/// Exponential backoff from 50 ms to 2 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(50))
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        d
    }
    fn reset(&mut self) {
        *self = Backoff::new();
    }
}

/// Activation bytes one job may hold at a time. A forward pass keeps every intermediate
/// value of its images (candidates reuse the prefix before their layer), so a job of 1,024
/// images through a 224 x 224 network would need gigabytes at once; evaluated in passes of
/// at most this many bytes it does not. Sums are exact, so passes change no result, and a
/// CIFAR-sized job of 256 images fits in one pass.
const PASS_BYTES: usize = 256 << 20;

/// Images per pass so that a pass's activations stay within `budget` bytes: every value of
/// the forward pass twice (the context's and a candidate's), per image, and never fewer
/// images than threads.
fn images_per_pass(net: &QNetwork, budget: usize, threads: usize) -> usize {
    let values: usize =
        net.input_value.len() + net.nodes.iter().map(|n| n.out.len()).sum::<usize>();
    let per_image = 2 * values + 4 * net.num_classes;
    (budget / per_image.max(1)).max(threads).max(1)
}

/// [`fitness::evaluate_candidates`] over the job's images `per_pass` at a time, the
/// per-candidate sums added.
fn evaluate_in_passes(
    net: &QNetwork,
    pixels: &[u8],
    targets: &Targets,
    vars: &[u32],
    candidates: &[Vec<i8>],
    threads: usize,
    per_pass: usize,
) -> ccq_common::Result<Vec<EvalStats>> {
    let (n, il, classes) = (targets.labels.len(), net.image_len(), net.num_classes);
    if n <= per_pass {
        return fitness::evaluate_candidates(net, pixels, targets, vars, candidates, threads);
    }
    // A job whose pixels or teacher do not match its images is refused whole, as one pass
    // would refuse it, before any slicing.
    targets.check(classes)?;
    if pixels.len() != n * il {
        return fitness::evaluate_candidates(net, pixels, targets, vars, candidates, threads);
    }
    let mut totals = vec![EvalStats::default(); candidates.len()];
    for lo in (0..n).step_by(per_pass) {
        let hi = (lo + per_pass).min(n);
        let part = fitness::evaluate_candidates(
            net,
            &pixels[lo * il..hi * il],
            &targets.slice(lo, hi, classes),
            vars,
            candidates,
            threads,
        )?;
        for (t, p) in totals.iter_mut().zip(&part) {
            t.add(p);
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The random-weight MNIST-shaped CNN fixture, quantized at 4 bits, and 40 random
    /// images with labels.
    fn fixture() -> (QNetwork, Vec<u8>, Vec<u8>) {
        use ccq_common::quant::{self, QuantConfig};
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../common/tests/fixtures/mnist_cnn.onnx");
        let graph = ccq_common::onnx::load_onnx(&path).unwrap();
        let n = 40;
        let pixels: Vec<u8> = (0..n * 784).map(|i| (i * 37 % 251) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
        let norm = ccq_common::model::Normalization {
            mean: vec![0.45],
            std: vec![0.25],
        };
        let cfg = QuantConfig::new(4, 8);
        let net = quant::quantize(&graph, &norm, &pixels, n, &cfg).unwrap();
        (net, pixels, labels)
    }

    #[test]
    fn passes_give_the_same_sums_as_one_evaluation() {
        let (net, pixels, labels) = fixture();
        let targets = Targets::labels(&labels);
        // Two variables of the first layer and of the last, each candidate moving them.
        let last = net.num_vars() as u32 - 1;
        let vars = vec![0, 1, last - 1, last];
        let codes = net.codes();
        let candidates: Vec<Vec<i8>> = (0..5)
            .map(|c| {
                vars.iter()
                    .map(|&v| {
                        let l = &net.layers[net.layer_of(v as usize)];
                        (codes[v as usize] + c as i8 - 2).clamp(l.lo, l.hi)
                    })
                    .collect()
            })
            .collect();
        let whole =
            fitness::evaluate_candidates(&net, &pixels, &targets, &vars, &candidates, 2).unwrap();
        assert_eq!(whole[0].images, 40);
        for per_pass in [1, 7, 16, 39, 40, 1000] {
            let passes =
                evaluate_in_passes(&net, &pixels, &targets, &vars, &candidates, 2, per_pass)
                    .unwrap();
            assert_eq!(passes, whole, "{per_pass} images per pass");
        }
        // A job whose pixels do not match its images is refused in passes as in one.
        assert!(
            evaluate_in_passes(&net, &pixels[1..], &targets, &vars, &candidates, 2, 7).is_err()
        );
    }

    #[test]
    fn passes_are_sized_by_the_activation_budget() {
        let (net, _, _) = fixture();
        let values: usize =
            net.input_value.len() + net.nodes.iter().map(|n| n.out.len()).sum::<usize>();
        let per_image = 2 * values + 4 * net.num_classes;
        assert_eq!(images_per_pass(&net, per_image * 10, 1), 10);
        assert_eq!(images_per_pass(&net, per_image * 10 + per_image - 1, 1), 10);
        // Never fewer images than threads, never zero.
        assert_eq!(images_per_pass(&net, per_image * 2, 4), 4);
        assert_eq!(images_per_pass(&net, 0, 0), 1);
        // A small network's job fits the real budget in one pass.
        assert!(images_per_pass(&net, PASS_BYTES, 1) > 1024);
    }

    #[test]
    fn completion_indexes_map_onto_shards_round_robin() {
        let shards: Vec<usize> = (0..8)
            .map(|k| shard_from_index(&k.to_string(), "3").unwrap().index)
            .collect();
        assert_eq!(shards, [0, 1, 2, 0, 1, 2, 0, 1]);
        assert_eq!(
            shard_from_index(" 4 ", "4").unwrap(),
            Shard::new(0, 4).unwrap()
        );
        for (index, shards, names) in [
            ("x", "4", "JOB_COMPLETION_INDEX"),
            ("-1", "4", "JOB_COMPLETION_INDEX"),
            ("1", "four", "CCQ_SHARDS"),
            ("1", "0", "CCQ_SHARDS"),
        ] {
            let e = shard_from_index(index, shards).unwrap_err().to_string();
            assert!(e.contains(names), "{index}/{shards}: {e}");
        }
    }
}
