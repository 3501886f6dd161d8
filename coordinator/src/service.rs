//! The gRPC face of the coordinator. Handlers check what they can without state, convert
//! the wire messages into the loop's domain types ([`crate::state`]'s [`Event`]s) and
//! back; the loop is the only owner of run state, so there are no locks here.
//!
//! Access control is one interceptor ([`RequireToken`]) wrapped around each gRPC service
//! when it is built ([`services`]), so an RPC added later cannot forget it: every
//! `Coordinator` RPC (the workers') needs the cluster token, the `Monitor` service (status)
//! only when `cluster.public_status = false`.

use std::sync::Arc;
use std::time::Duration;

use ccq_common::qnet::EvalStats;
use ccq_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use ccq_proto::v1::monitor_server::{Monitor, MonitorServer};
use ccq_proto::v1::{
    measure, poll_job_response, work_request, work_response, CandidateResult, Changes, Done,
    HeartbeatRequest, HeartbeatResponse, Idle, Job, Measure, PollJobResponse, RegisterRequest,
    RegisterResponse, StatusRequest, StatusResponse, SubmitResultRequest, SubmitResultResponse,
    SyncNetworkRequest, SyncNetworkResponse, Unknown, WorkRequest, WorkResponse, WorkerStatus,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status, Streaming};

use crate::state::{
    EvalSplit, Event, JobSpec, NetworkUpdate, PollReply, Refusal, RegisterWorker, Registration,
    RunStatus, Submission, Work, WorkerRow,
};

/// How long a poll waits for work before answering `idle`.
pub const POLL_WAIT: Duration = Duration::from_millis(500);

/// The largest gRPC request the coordinator accepts: a job's results are ~20 bytes per
/// candidate; anything larger is refused before it is buffered.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Replies can carry a whole network.
const MAX_REPLY_BYTES: usize = 256 << 20;

/// The coordinator's gRPC services, each behind the token check, ready to serve.
pub fn services(
    events: mpsc::Sender<Event>,
    token: Option<String>,
    public_status: bool,
) -> (
    InterceptedService<CoordinatorServer<CoordinatorService>, RequireToken>,
    InterceptedService<MonitorServer<MonitorService>, RequireToken>,
) {
    let token: Option<Arc<str>> = token.map(Into::into);
    let workers = CoordinatorServer::new(CoordinatorService {
        events: events.clone(),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES)
    .max_encoding_message_size(MAX_REPLY_BYTES);
    let monitor =
        MonitorServer::new(MonitorService { events }).max_decoding_message_size(MAX_REQUEST_BYTES);
    let status_token = if public_status { None } else { token.clone() };
    (
        InterceptedService::new(workers, RequireToken { token }),
        InterceptedService::new(
            monitor,
            RequireToken {
                token: status_token,
            },
        ),
    )
}

/// Refuses a request without the cluster token (when one is configured).
#[derive(Clone)]
pub struct RequireToken {
    token: Option<Arc<str>>,
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(req);
        };
        let presented = req
            .metadata()
            .get(ccq_proto::TOKEN_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated(
                "this coordinator requires the cluster token (--token or CCQ_TOKEN)",
            )),
        }
    }
}

/// Compares without an early exit, so response time does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Sends an event carrying a reply channel and waits for the loop's answer.
async fn ask<T>(
    events: &mpsc::Sender<Event>,
    make: impl FnOnce(oneshot::Sender<T>) -> Event,
) -> Result<T, Status> {
    let (tx, rx) = oneshot::channel();
    events.send(make(tx)).await.map_err(|_| shutting_down())?;
    rx.await.map_err(|_| shutting_down())
}

fn shutting_down() -> Status {
    Status::unavailable("the coordinator is shutting down")
}

/// The workers' RPCs.
pub struct CoordinatorService {
    events: mpsc::Sender<Event>,
}

impl CoordinatorService {
    /// A poll: the loop parks it until work exists, or it is answered "idle" after
    /// [`POLL_WAIT`]. A job sent just as we give up is not lost: the loop re-queues a
    /// worker's job when that worker polls again.
    async fn poll(&self, worker: u64) -> Result<PollJobResponse, Status> {
        let (tx, rx) = oneshot::channel();
        self.events
            .send(Event::Poll { worker, reply: tx })
            .await
            .map_err(|_| shutting_down())?;
        poll_answer(rx).await
    }

    /// A job's results, and with `take_next` the next job's poll answer: one event for
    /// both, so the loop is woken once per job.
    async fn submit(&self, req: SubmitResultRequest) -> Result<SubmitResultResponse, Status> {
        let submission = Submission {
            worker: req.worker_id,
            job: req.job_id,
            results: req.results.iter().map(result_from_proto).collect(),
            eval_micros: req.eval_micros,
        };
        let (reply, accepted) = oneshot::channel();
        let (then_poll, next) = match req.take_next {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        self.events
            .send(Event::Submit {
                submission,
                reply,
                then_poll,
            })
            .await
            .map_err(|_| shutting_down())?;
        let accepted = accepted.await.map_err(|_| shutting_down())?;
        let next = match next {
            Some(rx) => Some(poll_answer(rx).await?),
            None => None,
        };
        Ok(SubmitResultResponse { accepted, next })
    }
}

/// Waits for the loop's answer to a poll: a job, or "idle" after [`POLL_WAIT`].
async fn poll_answer(rx: oneshot::Receiver<PollReply>) -> Result<PollJobResponse, Status> {
    let reply = match tokio::time::timeout(POLL_WAIT, rx).await {
        Ok(Ok(PollReply::Job(job))) => poll_job_response::Reply::Job(job_to_proto(&job)),
        Ok(Ok(PollReply::Done)) => poll_job_response::Reply::Done(Done {}),
        Ok(Ok(PollReply::Unknown)) => poll_job_response::Reply::Unknown(Unknown {}),
        Ok(Err(_)) => return Err(shutting_down()),
        Err(_) => poll_job_response::Reply::Idle(Idle {}),
    };
    Ok(PollJobResponse { reply: Some(reply) })
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let address = req.remote_addr();
        let req = req.into_inner();
        if req.protocol_version != ccq_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: worker speaks {}, coordinator speaks {}; run the same ccq release on both",
                req.protocol_version,
                ccq_proto::PROTOCOL_VERSION
            )));
        }
        let shard = match (req.shard_index, req.shard_count) {
            (Some(k), Some(s)) => Some((k, s)),
            (None, None) => None,
            _ => {
                return Err(Status::invalid_argument(
                    "shard_index and shard_count go together",
                ))
            }
        };
        let req = RegisterWorker {
            name: req.name,
            shard,
            address,
        };
        let r = ask(&self.events, |reply| Event::Register { req, reply }).await?;
        r.map(|r| Response::new(registration_to_proto(r)))
            .map_err(refusal_to_status)
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let worker = req.into_inner().worker_id;
        let r = ask(&self.events, |reply| Event::Heartbeat { worker, reply }).await?;
        Ok(Response::new(HeartbeatResponse {
            known: r.known,
            done: r.done,
        }))
    }

    type WorkStream = ReceiverStream<Result<WorkResponse, Status>>;

    async fn work(
        &self,
        req: Request<Streaming<WorkRequest>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        let mut requests = req.into_inner();
        // Lock-step: a worker sends its next request only after this one's answer.
        let (tx, rx) = mpsc::channel(1);
        let this = CoordinatorService {
            events: self.events.clone(),
        };
        // One task per stream (not per job) answers its requests in order and ends with it.
        tokio::spawn(async move {
            loop {
                let request = match requests.message().await {
                    Ok(Some(WorkRequest { request: Some(r) })) => r,
                    Ok(Some(WorkRequest { request: None })) => {
                        let empty = Status::invalid_argument("an empty job stream request");
                        let _ = tx.send(Err(empty)).await;
                        return;
                    }
                    // The worker closed the stream.
                    Ok(None) => return,
                    // Something undecodable or too large (or the connection broke): say
                    // so, if anyone is still listening, and end the stream.
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let reply = match request {
                    work_request::Request::Poll(p) => {
                        this.poll(p.worker_id).await.map(work_response::Reply::Poll)
                    }
                    work_request::Request::Submit(s) => {
                        this.submit(s).await.map(work_response::Reply::Submit)
                    }
                };
                let failed = reply.is_err();
                let reply = reply.map(|r| WorkResponse { reply: Some(r) });
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn sync_network(
        &self,
        req: Request<SyncNetworkRequest>,
    ) -> Result<Response<SyncNetworkResponse>, Status> {
        let req = req.into_inner();
        let (have_version, want_version) = (req.have_version, req.want_version);
        let r = ask(&self.events, |reply| Event::Sync {
            have_version,
            want_version,
            reply,
        })
        .await?;
        let update = r.map_err(refusal_to_status)?;
        Ok(Response::new(match update {
            NetworkUpdate::Changes { version, changes } => SyncNetworkResponse {
                version,
                full: Vec::new(),
                changes: Some(Changes::from_pairs(&changes)),
            },
            NetworkUpdate::Full { version, network } => SyncNetworkResponse {
                version,
                full: network,
                changes: None,
            },
        }))
    }
}

/// The read-only view of the run.
pub struct MonitorService {
    events: mpsc::Sender<Event>,
}

#[tonic::async_trait]
impl Monitor for MonitorService {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = ask(&self.events, |reply| Event::Status { reply }).await?;
        Ok(Response::new(status_to_proto(s)))
    }
}

fn refusal_to_status(r: Refusal) -> Status {
    match r {
        Refusal::Invalid(m) => Status::failed_precondition(m),
        Refusal::NotReady(m) => Status::unavailable(m),
    }
}

fn registration_to_proto(r: Registration) -> RegisterResponse {
    RegisterResponse {
        worker_id: r.worker_id,
        run_id: r.run_id,
        shard_index: r.shard as u32,
        shard_count: r.shards as u32,
        data_source: r.data_source,
        search_len: r.search_len as u64,
        heartbeat_interval_ms: r.heartbeat_ms.min(u32::MAX as u64) as u32,
        coordinator_instance: r.instance,
    }
}

/// One byte per variable per candidate: the i8 codes as two's complement.
fn job_to_proto(j: &JobSpec) -> Job {
    match &j.work {
        Work::Candidates {
            images,
            generation,
            first,
            count,
            teacher,
            block,
        } => Job {
            job_id: j.job_id,
            network_version: j.network_version,
            images: images.clone(),
            group_vars: generation.vars.clone(),
            candidates: generation.candidates[*first..*first + *count]
                .iter()
                .map(|c| c.iter().map(|&x| x as u8).collect())
                .collect(),
            first_candidate: *first as u32,
            teacher_logits: teacher.as_ref().map_or_else(Vec::new, |t| t.rows(images)),
            temperature: teacher.as_ref().map_or(0.0, |t| t.temperature),
            measure: None,
            changes_from: j.changes.as_ref().map(|(from, _)| *from),
            changes: j.changes.as_ref().map(|(_, c)| Changes::from_pairs(c)),
            block_end: block.as_ref().map(|(end, _)| *end),
            block_targets: block
                .as_ref()
                .map_or_else(Vec::new, |(end, t)| t.rows(*end, images)),
        },
        Work::Measure(b) => Job {
            job_id: j.job_id,
            network_version: j.network_version,
            measure: Some(Measure {
                split: match b.split {
                    EvalSplit::Validation => measure::Split::Validation,
                    EvalSplit::Test => measure::Split::Test,
                }
                .into(),
                first: b.first,
                count: b.count,
            }),
            ..Job::default()
        },
    }
}

fn result_from_proto(r: &CandidateResult) -> EvalStats {
    EvalStats {
        loss_fixed: r.loss_fixed,
        correct: r.correct,
        images: r.images,
        paired_sq: r.paired_sq,
    }
}

fn status_to_proto(s: RunStatus) -> StatusResponse {
    StatusResponse {
        run_id: s.run_id,
        phase: s.phase,
        elapsed_secs: s.elapsed_secs,
        cycle: s.cycle,
        group: s.group,
        generation: s.generation,
        layer: s.layer,
        evaluations: s.evaluations,
        evaluations_per_sec: s.evaluations_per_sec,
        best_fitness: s.best_fitness,
        train_top1: s.train_top1,
        val_top1: s.val_top1,
        test_top1: s.test_top1,
        float_top1: s.float_top1,
        ptq_top1: s.ptq_top1,
        frozen_variables: s.frozen_variables,
        free_variables: s.free_variables,
        mean_confidence: s.mean_confidence,
        eta_secs: s.eta_secs,
        workers: s.workers.into_iter().map(worker_to_proto).collect(),
        network_version: s.network_version,
        train_measured_secs: s.train_measured_secs,
        test_measured_secs: s.test_measured_secs,
        waiting_for_workers: s.waiting_for_workers,
        window: s.window,
        generations_in_flight: s.generations_in_flight,
        waiting_for_measurement: s.waiting_for_measurement,
        rollbacks: s.rollbacks,
    }
}

fn worker_to_proto(w: WorkerRow) -> WorkerStatus {
    WorkerStatus {
        id: w.id,
        name: w.name,
        shard: w.shard,
        state: w.state,
        jobs_done: w.jobs_done,
        jobs_in_flight: w.jobs_in_flight,
        last_heartbeat_secs: w.last_heartbeat_secs,
        images_per_sec: w.images_per_sec,
        address: w.address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TeacherLogits;

    fn request(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut().insert(
                ccq_proto::TOKEN_METADATA,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        r
    }

    #[test]
    fn tokens_are_checked_exactly() {
        let mut s = RequireToken {
            token: Some("s3cret".into()),
        };
        assert!(s.call(request(Some("s3cret"))).is_ok());
        for bad in [
            Some("s3cre"),
            Some("s3cret!"),
            Some("S3CRET"),
            Some(""),
            None,
        ] {
            let e = s.call(request(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        // Without a configured token everything is accepted.
        let mut open = RequireToken { token: None };
        assert!(open.call(request(None)).is_ok());
        assert!(open.call(request(Some("x"))).is_ok());
    }

    /// The job on the wire is the loop's job: the candidate slice, codes as bytes.
    #[test]
    fn jobs_carry_their_slice_of_the_candidates() {
        let generation = ccq_search::trainer::Generation {
            id: 4,
            vars: vec![10, 11],
            candidates: vec![vec![0, 0], vec![-1, 1], vec![-2, 2]],
            images: vec![5, 6, 7],
            layer: 0,
            local: false,
        };
        let generation = Arc::new(generation);
        let spec = |images: Vec<u64>, teacher, block| JobSpec {
            job_id: 9,
            network_version: 2,
            work: Work::Candidates {
                images,
                generation: Arc::clone(&generation),
                first: 1,
                count: 2,
                teacher,
                block,
            },
            changes: None,
        };
        let j = job_to_proto(&spec(vec![6, 7], None, None));
        assert_eq!(j.candidates, [vec![0xff, 1], vec![0xfe, 2]]);
        assert_eq!((j.job_id, j.network_version, j.first_candidate), (9, 2, 1));
        assert_eq!((j.group_vars, j.images), (vec![10, 11], vec![6, 7]));
        assert!(j.teacher_logits.is_empty());
        assert!(j.measure.is_none());
        // With distillation, the job's images' rows of the teacher, in the job's order.
        let teacher = Arc::new(TeacherLogits {
            logits: (0..16).map(|x| x as f32).collect(),
            classes: 2,
            temperature: 3.0,
        });
        let j = job_to_proto(&spec(vec![7, 6], Some(teacher), None));
        assert_eq!(j.teacher_logits, [14.0, 15.0, 12.0, 13.0]);
        assert_eq!(j.temperature, 3.0);
        assert_eq!((j.block_end, j.block_targets.len()), (None, 0));
        // Block-local fitness: the block's end and its codes for the job's images, in
        // the job's order (pool images 2, 6, 7; three codes each at node 5).
        let blocks = Arc::new(crate::state::BlockTargets {
            pool: vec![2, 6, 7],
            ends: vec![(1, vec![0; 6]), (5, (10..19).collect())],
            end_of_layer: vec![Some(5)],
        });
        let j = job_to_proto(&spec(vec![7, 6], None, Some((5, blocks))));
        assert_eq!(j.block_end, Some(5));
        assert_eq!(j.block_targets, [16, 17, 18, 13, 14, 15]);
    }

    /// A measurement block on the wire: its split and range, no candidates.
    #[test]
    fn measurement_jobs_carry_their_block() {
        for (split, wire) in [
            (EvalSplit::Validation, measure::Split::Validation),
            (EvalSplit::Test, measure::Split::Test),
        ] {
            let j = job_to_proto(&JobSpec {
                job_id: 3,
                network_version: 8,
                work: Work::Measure(crate::state::MeasureBlock {
                    split,
                    first: 40,
                    count: 16,
                }),
                changes: None,
            });
            assert_eq!((j.job_id, j.network_version), (3, 8));
            let m = j.measure.unwrap();
            assert_eq!((m.split(), m.first, m.count), (wire, 40, 16));
            assert!(j.candidates.is_empty() && j.images.is_empty() && j.group_vars.is_empty());
        }
    }
}
