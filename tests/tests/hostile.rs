//! Hostile and broken clients against a live run: results for jobs a client does not
//! hold, malformed results, random bytes where a protobuf message should be, oversized
//! messages and a wrong protocol version. Each is refused with its specific answer, and
//! the run ends with exactly the network of the same run left alone.

use std::path::Path;

use ccq_proto::client::{Auth, Client, JobStream};
use ccq_proto::v1::coordinator_client::CoordinatorClient;
use ccq_proto::v1::monitor_client::MonitorClient;
use ccq_proto::v1::{
    poll_job_response, work_request, work_response, CandidateResult, RegisterRequest,
    StatusRequest, SubmitResultRequest, WorkRequest, WorkResponse,
};
use ccq_tests::{spawn_cluster, tiny_config, write_tiny_mnist};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

const EVALUATIONS: u64 = 480;
/// Kinds of wrong answers the rogue gives in turn.
const KINDS: usize = 7;

/// The model of the run left alone (2 workers) on the dataset in `data`.
async fn undisturbed(data: &Path, evaluations: u64) -> Vec<u8> {
    let out = data.join("undisturbed");
    spawn_cluster(tiny_config(data, &out, evaluations), 2)
        .await
        .finish()
        .await;
    std::fs::read(out.join("model.ccq")).unwrap()
}

async fn connect(addr: std::net::SocketAddr) -> Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    for _ in 0..200 {
        if let Ok(c) = endpoint.connect().await {
            return c;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("coordinator at {addr} never served");
}

/// Registers `client` as a worker, retrying while the coordinator is still setting up.
async fn register(client: &mut Client) -> Option<u64> {
    for _ in 0..500 {
        let r = client
            .register(RegisterRequest {
                protocol_version: ccq_proto::PROTOCOL_VERSION,
                name: "rogue".into(),
                shard_index: None,
                shard_count: None,
                threads: 1,
            })
            .await;
        match r {
            Ok(r) => return Some(r.into_inner().worker_id),
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(_) => return None, // the run is over
        }
    }
    None
}

/// A client that takes real jobs and answers them wrongly (too few or too many results,
/// more correct than images, the wrong image count, extreme losses that no image can
/// reach or that would wrap a sum), and answers jobs it never got. Every answer must be
/// refused; the run must not notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_for_jobs_not_held_and_malformed_results_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 700, 120, 3);
    let expected = undisturbed(dir.path(), EVALUATIONS).await;

    let out = dir.path().join("disturbed");
    let cluster = spawn_cluster(tiny_config(dir.path(), &out, EVALUATIONS), 2).await;
    let mut client =
        CoordinatorClient::with_interceptor(connect(cluster.addr).await, Auth::new(None).unwrap());
    let (mut not_held, mut malformed) = (0u32, 0u32);
    let mut kind = 0usize;
    'rogue: while let Some(id) = register(&mut client).await {
        let Ok(mut jobs) = JobStream::open(&mut client).await else {
            break 'rogue;
        };
        loop {
            let Ok(poll) = jobs.poll(id).await else {
                break 'rogue;
            };
            let job = match poll.reply {
                Some(poll_job_response::Reply::Job(job)) => job,
                Some(poll_job_response::Reply::Idle(_)) | None => continue,
                Some(poll_job_response::Reply::Unknown(_)) => break, // dropped: register again
                Some(poll_job_response::Reply::Done(_)) => break 'rogue,
            };
            // A measurement block wants one result over its images; a training job one per
            // candidate over the job's images. Both are answered wrongly.
            let (n, count) = match &job.measure {
                Some(m) => (m.count, 1),
                None => (job.images.len() as u64, job.candidates.len()),
            };
            let good = CandidateResult {
                loss_fixed: 1,
                correct: n,
                images: n,
                paired_sq: 0,
            };
            // First a perfect-looking answer to a job this client does not hold.
            let accepted = jobs
                .submit(SubmitResultRequest {
                    worker_id: id,
                    job_id: job.job_id + 1_000_000,
                    results: vec![good; count],
                    eval_micros: 1,
                    take_next: false,
                })
                .await
                .unwrap()
                .accepted;
            assert!(!accepted, "a result for a job not held was accepted");
            not_held += 1;
            // Then a malformed answer to the job it holds.
            let max_loss = n * ccq_common::qnet::MAX_IMAGE_LOSS_FIXED;
            let results = match kind % KINDS {
                0 => vec![good; count + 1],
                1 => vec![good; count.saturating_sub(1)],
                2 => vec![
                    CandidateResult {
                        correct: n + 1,
                        ..good
                    };
                    count
                ],
                3 => vec![
                    CandidateResult {
                        images: n + 7,
                        ..good
                    };
                    count
                ],
                // Every loss at the top of u64: would wrap the candidates' sums.
                4 => vec![
                    CandidateResult {
                        loss_fixed: u64::MAX,
                        ..good
                    };
                    count
                ],
                // One candidate's paired spread past what its images can have.
                5 => {
                    let mut r = vec![good; count];
                    r[count - 1].paired_sq = n * ccq_common::qnet::MAX_PAIRED_SQ + 1;
                    r
                }
                // One candidate just past the largest loss its images can have.
                _ => {
                    let mut r = vec![good; count];
                    r[count - 1].loss_fixed = max_loss + 1;
                    r
                }
            };
            kind += 1;
            let accepted = jobs
                .submit(SubmitResultRequest {
                    worker_id: id,
                    job_id: job.job_id,
                    results,
                    eval_micros: 1,
                    take_next: false,
                })
                .await
                .unwrap()
                .accepted;
            assert!(!accepted, "a malformed result was accepted");
            malformed += 1;
        }
    }
    let report = cluster.finish().await;
    assert_eq!(report.evaluations, EVALUATIONS);
    assert!(
        not_held >= KINDS as u32 && malformed >= KINDS as u32,
        "the rogue must have taken part ({not_held} / {malformed})"
    );
    assert!(
        std::fs::read(out.join("model.ccq")).unwrap() == expected,
        "the rogue changed the trained network"
    );
}

/// Sends raw bytes as the body of a gRPC call, whatever the method expects.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use prost::bytes::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

/// Sends raw bytes as the one request message of `method`, whatever the method expects,
/// and returns the answer: of a unary call, or the first of the job stream (`Work`).
async fn raw_call(
    channel: Channel,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    if !method.ends_with("/Work") {
        let answer = grpc
            .unary(tonic::Request::new(body), path, RawCodec)
            .await?;
        return Ok(answer.into_inner());
    }
    let requests = tokio_stream::iter(vec![body]);
    let mut answers = grpc
        .streaming(tonic::Request::new(requests), path, RawCodec)
        .await?
        .into_inner();
    answers
        .message()
        .await?
        .ok_or_else(|| Status::unknown("the stream ended without an answer"))
}

/// Property: random bytes sent where each request message belongs — including well-formed
/// protobuf with random field values, which decodes — get an error or a refusal, never a
/// crash, and the run's result is untouched. A message over the size limit is refused
/// before it is read, naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_bytes_and_oversized_messages_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 700, 120, 4);
    let evaluations = 4000;
    let expected = undisturbed(dir.path(), evaluations).await;

    // The workers join only after the traffic: until then the run cannot progress, so it
    // is certainly alive ("training") for all of it, however slow the machine is. The
    // shard count is that of the undisturbed run (2).
    let out = dir.path().join("disturbed");
    let mut cfg = tiny_config(dir.path(), &out, evaluations);
    cfg.cluster.shards = Some(2);
    let mut cluster = spawn_cluster(cfg, 0).await;
    let channel = connect(cluster.addr).await;
    let status = MonitorClient::new(channel.clone());
    let phase = || {
        let mut status = status.clone();
        async move {
            status
                .status(StatusRequest {})
                .await
                .map(|r| r.into_inner().phase)
                .unwrap_or_default()
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while phase().await != "training" {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never started training"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let methods = [
        "/ccq.v1.Coordinator/Work",
        "/ccq.v1.Coordinator/Register",
        "/ccq.v1.Coordinator/Heartbeat",
        "/ccq.v1.Coordinator/SyncNetwork",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut refused, mut answered) = (0, 0);
    for i in 0..400 {
        let len = rng.random_range(0..300);
        let body: Vec<u8> = if i % 2 == 0 {
            (0..len).map(|_| rng.random()).collect()
        } else {
            // A job stream's results message with random ids and counts.
            use prost::Message;
            let submit = SubmitResultRequest {
                worker_id: rng.random_range(0..4),
                job_id: rng.random_range(0..64),
                results: (0..rng.random_range(0..20))
                    .map(|_| CandidateResult {
                        loss_fixed: rng.random(),
                        correct: rng.random_range(0..200),
                        images: rng.random_range(0..200),
                        paired_sq: rng.random(),
                    })
                    .collect(),
                eval_micros: rng.random(),
                take_next: rng.random(),
            };
            WorkRequest {
                request: Some(work_request::Request::Submit(submit)),
            }
            .encode_to_vec()
        };
        // Every method gets both kinds of body.
        let method = methods[(i / 2) % methods.len()];
        match raw_call(channel.clone(), method, body).await {
            Err(s) => {
                assert!(
                    matches!(
                        s.code(),
                        Code::Internal | Code::InvalidArgument | Code::FailedPrecondition
                    ),
                    "{method}: unexpected status {s:?}"
                );
                refused += 1;
            }
            Ok(reply) => {
                if method.ends_with("Work") {
                    use prost::Message;
                    let r = WorkResponse::decode(reply.as_slice()).unwrap();
                    if let Some(work_response::Reply::Submit(r)) = r.reply {
                        assert!(!r.accepted, "a random result was accepted");
                    }
                }
                answered += 1;
            }
        }
    }
    assert!(
        refused > 50 && answered > 50,
        "{refused} refused, {answered} answered"
    );
    assert_eq!(phase().await, "training", "the traffic must hit a live run");

    let limit = ccq_coordinator::run::MAX_REQUEST_BYTES;
    let e = raw_call(
        channel.clone(),
        "/ccq.v1.Coordinator/Work",
        vec![0u8; limit + 1],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{}", e.message());

    cluster.add_worker("test-0");
    cluster.add_worker("test-1");
    let report = cluster.finish().await;
    assert_eq!(report.evaluations, evaluations);
    assert!(
        std::fs::read(out.join("model.ccq")).unwrap() == expected,
        "hostile messages changed the trained network"
    );
}

/// A worker of another protocol version is refused at registration, saying both versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_of_another_protocol_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 700, 120, 5);
    let out = dir.path().join("run");
    let cluster = spawn_cluster(tiny_config(dir.path(), &out, EVALUATIONS), 1).await;
    let mut client = CoordinatorClient::new(connect(cluster.addr).await);
    let err = loop {
        let r = client
            .register(RegisterRequest {
                protocol_version: ccq_proto::PROTOCOL_VERSION + 1,
                name: "future".into(),
                shard_index: None,
                shard_count: None,
                threads: 1,
            })
            .await;
        match r {
            Err(s) if s.code() == Code::Unavailable => tokio::task::yield_now().await,
            other => break other.unwrap_err(),
        }
    };
    assert_eq!(err.code(), Code::FailedPrecondition);
    let expected = format!(
        "worker speaks {}, coordinator speaks {}",
        ccq_proto::PROTOCOL_VERSION + 1,
        ccq_proto::PROTOCOL_VERSION
    );
    assert!(err.message().contains(&expected), "{}", err.message());
    assert_eq!(cluster.finish().await.evaluations, EVALUATIONS);
}
