//! ccq's wire protocol: the code generated from `proto/ccq.proto` (at build time; nothing
//! generated is committed) and the protocol version both ends compare on registration.
//!
//! - [`client`]: how a process reaches the coordinator (endpoint, TLS, token, errors);
//!   used by workers and `coordinator status`;
//! - [`process`]: the shutdown signal and log setup shared by both binaries.

pub mod client;
pub mod process;

/// Bumped on any incompatible change to `ccq.proto` or to the meaning of its fields.
/// 2: `SyncNetworkResponse.full` is the binary network form, no longer the JSON `.ccq`.
/// 3: `Job.teacher_logits` (distillation): a worker that ignored it would score the
/// labels instead, silently.
/// 4: measurement jobs (`Job.measure`) and `SyncNetworkRequest.want_version`: the
/// coordinator no longer measures validation and test accuracy itself; training jobs
/// carry the network changes since the worker's last job (`Job.changes`).
/// 5: `search.window`: a training job's `network_version` may be older than the latest
/// (or than the worker's), and the worker asks for exactly that version
/// (`SyncNetworkRequest.want_version`); change lists may go back as well as forward.
/// 6: `CandidateResult.paired_sq` (`search.margin`): a worker that left it 0 would make
/// every gain look noise-free, silently.
/// 7: the job loop is one stream (`Work`) instead of a `PollJob` / `SubmitResult` call
/// per job.
pub const PROTOCOL_VERSION: u32 = 7;

/// Request metadata key carrying the cluster token, as `Bearer <token>`.
pub const TOKEN_METADATA: &str = "authorization";

pub mod v1 {
    tonic::include_proto!("ccq.v1");
}
