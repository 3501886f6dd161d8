//! What every client of the coordinator needs to reach it: the endpoint for a URL (plain
//! or TLS), the interceptor that presents the cluster token, the worker's job stream, and
//! readable transport errors. Workers and `coordinator status` both dial the coordinator
//! with these.

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::v1::coordinator_client::CoordinatorClient;
use crate::v1::{
    work_request, work_response, PollJobRequest, PollJobResponse, SubmitResultRequest,
    SubmitResultResponse, WorkRequest, WorkResponse,
};

/// Why a client could not be set up (before any connection is tried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("coordinator address '{addr}': {reason}")]
    Address { addr: String, reason: String },
    #[error("the cluster token must be printable ASCII")]
    BadToken,
    /// The CA file for TLS cannot be read or used.
    #[error("TLS CA certificate {}: {reason}", path.display())]
    Tls { path: PathBuf, reason: String },
}

/// The gRPC endpoint for a coordinator URL: plain for `http://`, TLS trusting the CA in
/// `tls_ca` for `https://`.
pub fn endpoint(url: &str, tls_ca: Option<&Path>) -> Result<Endpoint, Error> {
    let bad = |reason: String| Error::Address {
        addr: url.to_string(),
        reason,
    };
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?;
    let https = url.starts_with("https://");
    match (https, tls_ca) {
        (false, None) => Ok(endpoint),
        (false, Some(ca)) => Err(bad(format!(
            "--tls-ca {} is given but the URL is not https://",
            ca.display()
        ))),
        (true, None) => Err(bad(
            "an https:// coordinator needs --tls-ca (the PEM file of the CA that signed its certificate)".into(),
        )),
        (true, Some(ca)) => {
            let pem = std::fs::read(ca).map_err(|e| Error::Tls {
                path: ca.to_path_buf(),
                reason: e.to_string(),
            })?;
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            endpoint.tls_config(tls).map_err(|e| Error::Tls {
                path: ca.to_path_buf(),
                reason: e.to_string(),
            })
        }
    }
}

/// Adds the cluster token to every request.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    /// `None`: send no token (a coordinator without one accepts that).
    pub fn new(token: Option<&str>) -> Result<Auth, Error> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| Error::BadToken)
            })
            .transpose()
            .map(Auth)
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(crate::TOKEN_METADATA, v.clone());
        }
        Ok(req)
    }
}

/// A coordinator client that presents the cluster token.
pub type Client = CoordinatorClient<InterceptedService<Channel, Auth>>;

/// A worker's side of the job stream (`Coordinator.Work`): one request, then its one
/// response, for as long as the worker serves. Any error ends the stream; the caller opens
/// a new one (the coordinator re-queues a job whose worker polls again).
pub struct JobStream {
    requests: tokio::sync::mpsc::Sender<WorkRequest>,
    responses: tonic::Streaming<WorkResponse>,
}

impl JobStream {
    /// Opens the stream (one round trip: the coordinator answers with its headers).
    pub async fn open(client: &mut Client) -> Result<JobStream, tonic::Status> {
        // Lock-step: at most one request is ever waiting to be sent.
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        let responses = client
            .work(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(JobStream {
            requests,
            responses,
        })
    }

    /// The next job, `idle` after the coordinator's poll wait, `done`, or `unknown`.
    pub async fn poll(&mut self, worker_id: u64) -> Result<PollJobResponse, tonic::Status> {
        match self
            .call(work_request::Request::Poll(PollJobRequest { worker_id }))
            .await?
        {
            work_response::Reply::Poll(p) => Ok(p),
            work_response::Reply::Submit(_) => Err(out_of_step("a poll")),
        }
    }

    /// A job's results (with `take_next`, the next job's answer comes back with them).
    pub async fn submit(
        &mut self,
        req: SubmitResultRequest,
    ) -> Result<SubmitResultResponse, tonic::Status> {
        match self.call(work_request::Request::Submit(req)).await? {
            work_response::Reply::Submit(r) => Ok(r),
            work_response::Reply::Poll(_) => Err(out_of_step("results")),
        }
    }

    async fn call(
        &mut self,
        request: work_request::Request,
    ) -> Result<work_response::Reply, tonic::Status> {
        let closed = || tonic::Status::unavailable("the coordinator closed the job stream");
        self.requests
            .send(WorkRequest {
                request: Some(request),
            })
            .await
            .map_err(|_| closed())?;
        match self.responses.message().await? {
            Some(WorkResponse { reply: Some(r) }) => Ok(r),
            Some(WorkResponse { reply: None }) => Err(tonic::Status::internal(
                "the coordinator sent an empty job stream response",
            )),
            None => Err(closed()),
        }
    }
}

fn out_of_step(what: &str) -> tonic::Status {
    tonic::Status::internal(format!(
        "the coordinator answered {what} with another kind of response"
    ))
}

/// An error with its causes: tonic's transport errors say little at the top level
/// ("transport error") and the reason (refused, TLS handshake failure) below.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn endpoint_refuses_mismatched_scheme_and_ca() {
        let ca = Path::new("/nonexistent/ca.pem");
        assert!(endpoint("http://127.0.0.1:1", None).is_ok());
        let e = endpoint("http://127.0.0.1:1", Some(ca)).unwrap_err();
        assert!(e.to_string().contains("not https://"), "{e}");
        let e = endpoint("https://127.0.0.1:1", None).unwrap_err();
        assert!(e.to_string().contains("--tls-ca"), "{e}");
        let e = endpoint("https://127.0.0.1:1", Some(ca)).unwrap_err();
        assert!(matches!(&e, Error::Tls { path, .. } if path == ca), "{e}");
        let e = endpoint("not a url", None).unwrap_err();
        assert!(
            matches!(&e, Error::Address { addr, .. } if addr == "not a url"),
            "{e}"
        );
    }

    #[test]
    fn auth_adds_the_bearer_token_or_nothing() {
        let mut with = Auth::new(Some("s3cret")).unwrap();
        let req = with.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get(crate::TOKEN_METADATA).unwrap(),
            "Bearer s3cret"
        );
        let mut without = Auth::new(None).unwrap();
        let req = without.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get(crate::TOKEN_METADATA).is_none());
        assert!(matches!(
            Auth::new(Some("line\nbreak")),
            Err(Error::BadToken)
        ));
    }

    #[test]
    fn error_chain_names_every_cause() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = Error::Tls {
            path: "ca.pem".into(),
            reason: "x".into(),
        };
        assert_eq!(error_chain(&inner), "refused");
        assert_eq!(error_chain(&outer), "TLS CA certificate ca.pem: x");
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Transport(#[source] std::io::Error);
        assert_eq!(error_chain(&Transport(inner)), "transport error: refused");
    }
}
