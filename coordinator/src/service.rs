//! The gRPC face of the coordinator. Handlers validate what they can without state and
//! hand each request to the event loop ([`crate::state`]) as an [`Event`]; the loop is the
//! only owner of run state, so there are no locks here.

use std::time::Duration;

use ccq_proto::v1::coordinator_server::Coordinator;
use ccq_proto::v1::{
    poll_job_response, HeartbeatRequest, HeartbeatResponse, Idle, PollJobRequest, PollJobResponse,
    RegisterRequest, RegisterResponse, StatusRequest, StatusResponse, SubmitResultRequest,
    SubmitResultResponse, SyncNetworkRequest, SyncNetworkResponse,
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::state::Event;

/// How long a poll waits for work before answering `idle`.
pub const POLL_WAIT: Duration = Duration::from_millis(500);

pub struct CoordinatorService {
    events: mpsc::Sender<Event>,
}

impl CoordinatorService {
    pub fn new(events: mpsc::Sender<Event>) -> Self {
        CoordinatorService { events }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Event) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.events
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let addr = req.remote_addr();
        let req = req.into_inner();
        if req.protocol_version != ccq_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: worker speaks {}, coordinator speaks {}; run the same ccq release on both",
                req.protocol_version,
                ccq_proto::PROTOCOL_VERSION
            )));
        }
        if req.shard_index.is_some() != req.shard_count.is_some() {
            return Err(Status::invalid_argument(
                "shard_index and shard_count go together",
            ));
        }
        let r = self
            .ask(|reply| Event::Register { req, addr, reply })
            .await?;
        r.map(Response::new)
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let worker = req.into_inner().worker_id;
        Ok(Response::new(
            self.ask(|reply| Event::Heartbeat { worker, reply }).await?,
        ))
    }

    async fn poll_job(
        &self,
        req: Request<PollJobRequest>,
    ) -> Result<Response<PollJobResponse>, Status> {
        let worker = req.into_inner().worker_id;
        let (tx, rx) = oneshot::channel();
        self.events
            .send(Event::Poll { worker, reply: tx })
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        // The loop parks the poll until work exists. A job sent just as we give up is not
        // lost: the loop re-queues a worker's job when that worker polls again.
        match tokio::time::timeout(POLL_WAIT, rx).await {
            Ok(Ok(r)) => Ok(Response::new(r)),
            Ok(Err(_)) => Err(Status::unavailable("the coordinator is shutting down")),
            Err(_) => Ok(Response::new(PollJobResponse {
                reply: Some(poll_job_response::Reply::Idle(Idle {})),
            })),
        }
    }

    async fn submit_result(
        &self,
        req: Request<SubmitResultRequest>,
    ) -> Result<Response<SubmitResultResponse>, Status> {
        let req = req.into_inner();
        let accepted = self.ask(|reply| Event::Submit { req, reply }).await?;
        Ok(Response::new(SubmitResultResponse { accepted }))
    }

    async fn sync_network(
        &self,
        req: Request<SyncNetworkRequest>,
    ) -> Result<Response<SyncNetworkResponse>, Status> {
        let req = req.into_inner();
        let r = self.ask(|reply| Event::Sync { req, reply }).await?;
        r.map(Response::new)
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(
            self.ask(|reply| Event::Status { reply }).await?,
        ))
    }
}
