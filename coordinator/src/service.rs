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
    /// Every request except (optionally) Status must carry this token.
    token: Option<String>,
    public_status: bool,
}

impl CoordinatorService {
    pub fn new(events: mpsc::Sender<Event>, token: Option<String>, public_status: bool) -> Self {
        CoordinatorService {
            events,
            token,
            public_status,
        }
    }

    /// Refuses a request without the cluster token (when one is configured).
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let presented = req
            .metadata()
            .get(ccq_proto::TOKEN_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated(
                "this coordinator requires the cluster token (--token or CCQ_TOKEN)",
            )),
        }
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
        self.authorize(&req)?;
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
        self.authorize(&req)?;
        let worker = req.into_inner().worker_id;
        Ok(Response::new(
            self.ask(|reply| Event::Heartbeat { worker, reply }).await?,
        ))
    }

    async fn poll_job(
        &self,
        req: Request<PollJobRequest>,
    ) -> Result<Response<PollJobResponse>, Status> {
        self.authorize(&req)?;
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
        self.authorize(&req)?;
        let req = req.into_inner();
        let accepted = self.ask(|reply| Event::Submit { req, reply }).await?;
        Ok(Response::new(SubmitResultResponse { accepted }))
    }

    async fn sync_network(
        &self,
        req: Request<SyncNetworkRequest>,
    ) -> Result<Response<SyncNetworkResponse>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let r = self.ask(|reply| Event::Sync { req, reply }).await?;
        r.map(Response::new)
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        if !self.public_status {
            self.authorize(&req)?;
        }
        Ok(Response::new(
            self.ask(|reply| Event::Status { reply }).await?,
        ))
    }
}

/// Compares without an early exit, so response time does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(token: Option<&str>, public_status: bool) -> CoordinatorService {
        let (tx, _rx) = mpsc::channel(1);
        CoordinatorService::new(tx, token.map(str::to_string), public_status)
    }

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
        let s = service(Some("s3cret"), true);
        assert!(s.authorize(&request(Some("s3cret"))).is_ok());
        for bad in [
            Some("s3cre"),
            Some("s3cret!"),
            Some("S3CRET"),
            Some(""),
            None,
        ] {
            let e = s.authorize(&request(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        // Without a configured token everything is accepted.
        assert!(service(None, true).authorize(&request(None)).is_ok());
        assert!(service(None, true).authorize(&request(Some("x"))).is_ok());
    }
}
