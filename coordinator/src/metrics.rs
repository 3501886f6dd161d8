//! The Prometheus endpoint of `coordinator run` (`--metrics ADDR` or
//! `cluster.metrics_listen`): `GET /metrics` answers the latest [`Telemetry`] in the text
//! exposition format 0.0.4.
//!
//! One route and one response per connection do not justify a web framework, so this is a
//! small HTTP/1.1 server on a tokio listener. The socket is open to whoever can reach it, so
//! it reads at most [`MAX_HEAD`] bytes within [`READ_TIMEOUT`], serves at most
//! [`MAX_CONNECTIONS`] connections at a time (more wait in the listen backlog), answers
//! anything it does not understand with a 4xx status and never panics on what it is sent.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::state::{Histogram, Telemetry};
use crate::Error;

/// The content type Prometheus expects for the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest request head (request line and headers) read; a scrape needs a few hundred bytes.
pub const MAX_HEAD: usize = 8 * 1024;

/// A client that has not sent its request head by then is disconnected, so idle
/// connections cannot pile up.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once. A scraper needs one; the cap keeps a flood of idle
/// connections from holding memory and file descriptors the run needs.
pub const MAX_CONNECTIONS: usize = 32;

/// The running endpoint; dropping it stops accepting connections.
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Where the endpoint listens (the real port when the address asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `/metrics` from `telemetry` until the returned server is dropped.
pub async fn spawn(
    addr: &str,
    telemetry: watch::Receiver<Option<Telemetry>>,
) -> Result<MetricsServer, Error> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        ccq_common::Error::setting(
            "cluster.metrics_listen",
            addr,
            format!("cannot listen: {e}"),
        )
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ccq_common::Error::io("metrics listener", e))?;
    info!("Prometheus metrics at http://{addr}/metrics");
    let task = tokio::spawn(serve(listener, telemetry));
    Ok(MetricsServer { addr, task })
}

/// Accepts connections forever, one task per connection, at most [`MAX_CONNECTIONS`] at
/// once: the next is accepted only when one ends.
pub async fn serve(listener: TcpListener, telemetry: watch::Receiver<Option<Telemetry>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return; // never closed
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let telemetry = telemetry.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, telemetry).await {
                        debug!(%peer, "metrics connection: {e}");
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!("metrics endpoint cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    telemetry: watch::Receiver<Option<Telemetry>>,
) -> std::io::Result<()> {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Head::Complete(head))) => respond(&head, telemetry.borrow().as_ref()),
        Ok(Ok(Head::TooLarge)) => Response::text(431, "request head too large\n"),
        Ok(Ok(Head::Truncated)) => Response::text(400, "incomplete request\n"),
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await?;
    // Lingering close: closing a socket with unread input resets the connection, and the
    // client can lose the response (a 431 after an oversized head), so drain a little first.
    let mut sink = [0u8; 1024];
    let drain = async {
        let mut total = 0;
        while total < 64 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    Ok(())
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The client closed its side before ending the head.
    Truncated,
}

/// Reads up to the blank line that ends the request head; the body, if any, is ignored.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() >= MAX_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

/// End of the head: CRLF CRLF, or bare LF LF from lenient clients.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    crlf.into_iter().chain(lf).min()
}

/// An HTTP response; every one closes the connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// HEAD: headers only.
    pub head_only: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
            head_only: false,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Unknown",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            out += "Allow: GET, HEAD\r\n";
        }
        out += "\r\n";
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The response to a request head (request line and headers, without the blank line).
pub fn respond(head: &[u8], telemetry: Option<&Telemetry>) -> Response {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::text(400, "the request line is not UTF-8\n");
    };
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Response::text(400, "expected `METHOD TARGET HTTP/1.x`\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(400, "only HTTP/1.x is served here\n");
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Response::text(404, "not found; the metrics are at /metrics\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Response::text(405, "only GET and HEAD\n"),
    };
    let mut response = match telemetry {
        Some(t) => Response {
            status: 200,
            content_type: CONTENT_TYPE,
            body: render(t),
            head_only: false,
        },
        None => Response::text(
            503,
            "the run is still setting up (float reference, quantization)\n",
        ),
    };
    response.head_only = head_only;
    response
}

/// The exposition text for one snapshot.
pub fn render(t: &Telemetry) -> String {
    let s = &t.status;
    let mut e = Exposition::default();
    e.family(
        "ccq_run_info",
        "gauge",
        "The run and its phase (constant 1).",
    );
    e.sample(
        "ccq_run_info",
        &[("run_id", &s.run_id), ("phase", &s.phase)],
        "1",
    );
    let counters: [(&str, &str, u64); 6] = [
        (
            "ccq_evaluations_total",
            "Candidate evaluations (one candidate on one batch).",
            s.evaluations,
        ),
        (
            "ccq_generations_total",
            "Completed generations.",
            t.generations,
        ),
        (
            "ccq_adoptions_total",
            "Generations whose best candidate replaced the global network's codes.",
            t.adoptions,
        ),
        (
            "ccq_jobs_completed_total",
            "Worker jobs whose results were accepted.",
            t.jobs_completed,
        ),
        (
            "ccq_jobs_retried_total",
            "Jobs handed out again after a worker was lost, timed out or sent a bad result.",
            t.jobs_retried,
        ),
        (
            "ccq_network_version",
            "Changes applied to the global network so far.",
            s.network_version,
        ),
    ];
    for (name, help, value) in counters {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        e.family(name, kind, help);
        e.sample(name, &[], &value.to_string());
    }
    let gauges: [(&str, &str, Option<f64>); 12] = [
        (
            "ccq_best_fitness",
            "Batch cross-entropy of the latest generation's best candidate.",
            Some(s.best_fitness),
        ),
        (
            "ccq_train_top1_percent",
            "Batch top-1 of the latest generation's best candidate.",
            s.train_top1,
        ),
        (
            "ccq_val_top1_percent",
            "Validation top-1 of the global network at its latest evaluation.",
            s.val_top1,
        ),
        (
            "ccq_test_top1_percent",
            "Test top-1 of the global network at its latest evaluation.",
            s.test_top1,
        ),
        (
            "ccq_float_top1_percent",
            "Test top-1 of the float model (reference).",
            Some(s.float_top1),
        ),
        (
            "ccq_ptq_top1_percent",
            "Test top-1 after post-training quantization (reference).",
            Some(s.ptq_top1),
        ),
        (
            "ccq_evaluations_per_second",
            "Recent evaluation rate.",
            Some(s.evaluations_per_sec),
        ),
        (
            "ccq_frozen_variables",
            "Weight variables whose code is fixed.",
            Some(s.frozen_variables as f64),
        ),
        (
            "ccq_free_variables",
            "Weight variables still searched.",
            Some(s.free_variables as f64),
        ),
        (
            "ccq_mean_confidence",
            "Mean confidence of the EDA over all variables.",
            Some(s.mean_confidence),
        ),
        (
            "ccq_elapsed_seconds",
            "Seconds since the search started.",
            Some(s.elapsed_secs),
        ),
        (
            "ccq_eta_seconds",
            "Estimated seconds until the budget is spent.",
            s.eta_secs,
        ),
    ];
    for (name, help, value) in gauges {
        e.family(name, "gauge", help);
        // An unknown value is left out rather than exported as NaN, which alerts mishandle.
        if let Some(v) = value.filter(|v| v.is_finite()) {
            e.sample(name, &[], &number(v));
        }
    }
    e.family("ccq_workers", "gauge", "Live workers.");
    e.sample("ccq_workers", &[], &s.workers.len().to_string());
    e.family(
        "ccq_worker_jobs_total",
        "counter",
        "Jobs completed per live worker.",
    );
    for w in &s.workers {
        e.sample(
            "ccq_worker_jobs_total",
            &[
                ("worker", &w.id.to_string()),
                ("shard", &w.shard.to_string()),
            ],
            &w.jobs_done.to_string(),
        );
    }
    e.family(
        "ccq_job_duration_seconds",
        "histogram",
        "Job latency from assignment to accepted result.",
    );
    e.histogram("ccq_job_duration_seconds", &[], &t.job_seconds);
    e.family(
        "ccq_worker_job_duration_seconds",
        "histogram",
        "Job latency per worker.",
    );
    for (id, h) in &t.worker_job_seconds {
        e.histogram(
            "ccq_worker_job_duration_seconds",
            &[("worker", &id.to_string())],
            h,
        );
    }
    e.out
}

#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.out += name;
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// Buckets are cumulative in the exposition format; [`Histogram`] keeps them per bucket.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        let bounds = h.bounds.iter().map(|&b| number(b)).chain(["+Inf".into()]);
        for (le, count) in bounds.zip(&h.counts) {
            cumulative += count;
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, &cumulative.to_string());
        }
        self.sample(&format!("{name}_sum"), labels, &number(h.sum));
        self.sample(&format!("{name}_count"), labels, &cumulative.to_string());
    }
}

/// A float as Prometheus (Go's ParseFloat) reads it.
fn number(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        x.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{RunStatus, WorkerRow};
    use std::collections::BTreeMap;

    fn histogram(bounds: &[f64], counts: &[u64], sum: f64) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: counts.to_vec(),
            sum,
            count: counts.iter().sum(),
        }
    }

    fn telemetry() -> Telemetry {
        Telemetry {
            status: RunStatus {
                run_id: "odd \"run\"\\x\ny".into(),
                phase: "training".into(),
                evaluations: 1600,
                evaluations_per_sec: 123.5,
                best_fitness: f64::NAN,
                test_top1: Some(65.5),
                val_top1: None,
                float_top1: 98.1,
                ptq_top1: 28.55,
                frozen_variables: 10,
                free_variables: 90,
                workers: vec![
                    WorkerRow {
                        id: 3,
                        shard: 1,
                        jobs_done: 7,
                        ..Default::default()
                    },
                    WorkerRow {
                        id: 4,
                        shard: 0,
                        jobs_done: 2,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
            generations: 100,
            adoptions: 81,
            jobs_completed: 9,
            jobs_retried: 1,
            job_seconds: histogram(&[0.1, 1.0], &[2, 5, 2], 9.5),
            worker_job_seconds: BTreeMap::from([(3, histogram(&[0.1, 1.0], &[0, 7, 0], 3.5))]),
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn histograms_are_cumulative_and_end_at_count() {
        let text = render(&telemetry());
        let job: Vec<&str> = lines(&text)
            .into_iter()
            .filter(|l| l.starts_with("ccq_job_duration_seconds"))
            .collect();
        assert_eq!(
            job,
            [
                "ccq_job_duration_seconds_bucket{le=\"0.1\"} 2",
                "ccq_job_duration_seconds_bucket{le=\"1\"} 7",
                "ccq_job_duration_seconds_bucket{le=\"+Inf\"} 9",
                "ccq_job_duration_seconds_sum 9.5",
                "ccq_job_duration_seconds_count 9",
            ]
        );
        assert!(text.contains("ccq_worker_job_duration_seconds_bucket{worker=\"3\",le=\"1\"} 7\n"));
        assert!(text.contains("ccq_worker_job_duration_seconds_count{worker=\"3\"} 7\n"));
    }

    #[test]
    fn label_values_are_escaped_and_unknown_values_left_out() {
        let text = render(&telemetry());
        assert!(text
            .contains("ccq_run_info{run_id=\"odd \\\"run\\\"\\\\x\\ny\",phase=\"training\"} 1\n"));
        // NaN fitness and a missing validation accuracy: the family is declared, no sample.
        assert!(text.contains("# TYPE ccq_best_fitness gauge\n"));
        assert!(!lines(&text)
            .iter()
            .any(|l| l.starts_with("ccq_best_fitness")));
        assert!(!lines(&text)
            .iter()
            .any(|l| l.starts_with("ccq_val_top1_percent")));
        assert!(text.contains("\nccq_test_top1_percent 65.5\n"));
        assert!(text.contains("\nccq_ptq_top1_percent 28.55\n"));
    }

    #[test]
    fn counters_and_workers_come_from_the_snapshot() {
        let text = render(&telemetry());
        for expected in [
            "ccq_evaluations_total 1600",
            "ccq_generations_total 100",
            "ccq_adoptions_total 81",
            "ccq_jobs_completed_total 9",
            "ccq_jobs_retried_total 1",
            "ccq_workers 2",
            "ccq_worker_jobs_total{worker=\"3\",shard=\"1\"} 7",
            "ccq_worker_jobs_total{worker=\"4\",shard=\"0\"} 2",
            "ccq_frozen_variables 10",
            "ccq_free_variables 90",
            "ccq_evaluations_per_second 123.5",
        ] {
            assert!(
                lines(&text).contains(&expected),
                "missing {expected:?} in\n{text}"
            );
        }
        // Every family is declared once, before its samples.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.insert(name.to_string()), "{name} declared twice");
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                    .unwrap_or(name);
                assert!(declared.contains(family), "{name} before its TYPE");
            }
        }
    }

    #[test]
    fn requests_get_the_right_status() {
        let t = telemetry();
        let status = |head: &[u8]| respond(head, Some(&t)).status;
        assert_eq!(status(b"GET /metrics HTTP/1.1\r\nHost: x"), 200);
        assert_eq!(status(b"GET /metrics?x=1 HTTP/1.0"), 200);
        assert_eq!(status(b"GET / HTTP/1.1"), 404);
        assert_eq!(status(b"GET /metricsx HTTP/1.1"), 404);
        assert_eq!(status(b"POST /metrics HTTP/1.1"), 405);
        assert_eq!(status(b"GET /metrics"), 400);
        assert_eq!(status(b"GET  /metrics HTTP/1.1"), 400);
        assert_eq!(status(b"PRI * HTTP/2.0"), 400);
        assert_eq!(status(b"\xff\xfe /metrics HTTP/1.1"), 400);
        assert_eq!(status(b""), 400);
        assert_eq!(respond(b"GET /metrics HTTP/1.1", None).status, 503);

        let head = respond(b"HEAD /metrics HTTP/1.1", Some(&t));
        let bytes = head.to_bytes();
        assert!(bytes.ends_with(b"\r\n\r\n"), "HEAD has no body");
        let length = format!("Content-Length: {}\r\n", render(&t).len());
        assert!(String::from_utf8(bytes).unwrap().contains(&length));
    }

    /// Idle connections beyond the cap wait in the backlog instead of each holding a
    /// task; as soon as one ends, the waiting scrape is served.
    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(Some(telemetry()));
        let server = tokio::spawn(serve(listener, rx));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut scrape = TcpStream::connect(addr).await.unwrap();
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        let early = tokio::time::timeout(Duration::from_millis(300), scrape.read(&mut first)).await;
        assert!(early.is_err(), "served past the cap: {early:?}");
        drop(idle.pop());
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), scrape.read_to_end(&mut response))
            .await
            .expect("served once a slot is free")
            .unwrap();
        assert!(
            response.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&response)
        );
        server.abort();
    }

    #[test]
    fn head_end_accepts_crlf_and_bare_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(20));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
