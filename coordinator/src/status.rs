//! `coordinator status`: a read-only client of the coordinator's Status RPC, printing a
//! compact summary and worker table (or JSON), optionally refreshing until the run ends.

use std::process::ExitCode;
use std::time::Duration;

use ccq_proto::v1::monitor_client::MonitorClient;
use ccq_proto::v1::{StatusRequest, StatusResponse};
use serde_json::json;

/// Exit code for an unreachable coordinator (scripts depend on it).
pub const UNREACHABLE: u8 = 2;

pub fn main(
    addr: &str,
    token: Option<&str>,
    tls_ca: Option<&std::path::Path>,
    as_json: bool,
    watch: Option<f64>,
) -> ExitCode {
    let url = if addr.contains("://") {
        addr.to_string()
    } else if tls_ca.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        loop {
            let s = match fetch(&url, token, tls_ca).await {
                Ok(s) => s,
                Err(Failure::Unreachable(e)) => {
                    eprintln!("error: coordinator at {url} is unreachable: {e}");
                    return ExitCode::from(UNREACHABLE);
                }
                Err(Failure::Refused(e)) => {
                    eprintln!("error: coordinator at {url} refused the request: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if as_json {
                println!("{}", to_json(&s));
            } else {
                if watch.is_some() {
                    // Clear the screen and home the cursor: refresh in place.
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", render(&s));
            }
            match watch {
                Some(secs) if s.phase != "done" => {
                    tokio::time::sleep(Duration::from_secs_f64(secs.max(0.2))).await
                }
                _ => return ExitCode::SUCCESS,
            }
        }
    })
}

enum Failure {
    /// No answer: wrong address, nothing listening, network trouble.
    Unreachable(String),
    /// An answer that says no (e.g. the token).
    Refused(String),
}

async fn fetch(
    url: &str,
    token: Option<&str>,
    tls_ca: Option<&std::path::Path>,
) -> Result<StatusResponse, Failure> {
    let endpoint = ccq_proto::client::endpoint(url, tls_ca)
        .map_err(|e| Failure::Refused(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Failure::Unreachable(ccq_proto::client::error_chain(&e)))?;
    let auth = ccq_proto::client::Auth::new(token).map_err(|e| Failure::Refused(e.to_string()))?;
    let mut client = MonitorClient::with_interceptor(channel, auth);
    client
        .status(StatusRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                Failure::Refused(s.message().to_string())
            }
            _ => Failure::Unreachable(s.message().to_string()),
        })
}

pub fn to_json(s: &StatusResponse) -> serde_json::Value {
    let nan_null = |x: f64| if x.is_finite() { json!(x) } else { json!(null) };
    json!({
        "run_id": s.run_id,
        "phase": s.phase,
        "elapsed_secs": s.elapsed_secs,
        "cycle": s.cycle,
        "group": s.group,
        "generation": s.generation,
        "layer": s.layer,
        "evaluations": s.evaluations,
        "evaluations_per_sec": s.evaluations_per_sec,
        "best_fitness": nan_null(s.best_fitness),
        "train_top1": s.train_top1,
        "val_top1": s.val_top1,
        "test_top1": s.test_top1,
        "train_measured_secs": s.train_measured_secs,
        "test_measured_secs": s.test_measured_secs,
        "float_top1": nan_null(s.float_top1),
        "ptq_top1": nan_null(s.ptq_top1),
        "frozen_variables": s.frozen_variables,
        "free_variables": s.free_variables,
        "mean_confidence": s.mean_confidence,
        "eta_secs": s.eta_secs,
        "network_version": s.network_version,
        "window": s.window,
        "generations_in_flight": s.generations_in_flight,
        "waiting_for_measurement": s.waiting_for_measurement,
        "rollbacks": s.rollbacks,
        "waiting_for_workers": s.waiting_for_workers,
        "workers": s.workers.iter().map(|w| json!({
            "id": w.id,
            "name": w.name,
            "shard": w.shard,
            "state": w.state,
            "jobs_done": w.jobs_done,
            "jobs_in_flight": w.jobs_in_flight,
            "last_heartbeat_secs": w.last_heartbeat_secs,
            "images_per_sec": w.images_per_sec,
            "address": w.address,
        })).collect::<Vec<_>>(),
    })
}

pub fn render(s: &StatusResponse) -> String {
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2} %"));
    let mut out = String::new();
    out += &format!(
        "run {}  phase {}  elapsed {:.0} s",
        s.run_id, s.phase, s.elapsed_secs
    );
    if let Some(eta) = s.eta_secs {
        out += &format!("  eta {eta:.0} s");
    }
    out += "\n";
    if !s.waiting_for_workers.is_empty() {
        out += &format!("WAITING: {}\n", s.waiting_for_workers);
    }
    out += &format!(
        "cycle {}  group {}  generation {}  layer {}",
        s.cycle,
        s.group,
        s.generation,
        if s.layer.is_empty() { "-" } else { &s.layer }
    );
    // Before the run starts (or from an old coordinator) the window is unknown: 0.
    if s.window > 0 {
        out += &format!("  in flight {}/{}", s.generations_in_flight, s.window);
    }
    if s.waiting_for_measurement {
        out += "  (waiting for its measurement)";
    }
    out += "\n";
    out += &format!(
        "evaluations {} ({:.1}/s)  best fitness {:.4}",
        s.evaluations, s.evaluations_per_sec, s.best_fitness
    );
    if s.rollbacks > 0 {
        out += &format!("  back to the best network {} time(s)", s.rollbacks);
    }
    out += "\n";
    let at = |t: Option<f64>| t.map_or(String::new(), |t| format!(" (at {t:.0} s)"));
    out += &format!(
        "top-1: float {:.2} %  ptq {:.2} %  batch {}{}\n       val {}  test {}{}\n",
        s.float_top1,
        s.ptq_top1,
        pct(s.train_top1),
        at(s.train_measured_secs),
        pct(s.val_top1),
        pct(s.test_top1),
        at(s.test_measured_secs)
    );
    out += &format!(
        "variables: {} frozen, {} free, mean confidence {:.3}\n\n",
        s.frozen_variables, s.free_variables, s.mean_confidence
    );
    // Fits 80 columns: name and address are cut; `--json` has them whole.
    out += &format!(
        "{:>4} {:<12} {:<21} {:>5} {:<5} {:>7} {:>5} {:>7}\n",
        "id", "name", "address", "shard", "state", "jobs", "beat", "img/s"
    );
    for w in &s.workers {
        let name: String = w.name.chars().take(12).collect();
        let address: String = w.address.chars().take(21).collect();
        out += &format!(
            "{:>4} {:<12} {:<21} {:>5} {:<5} {:>7} {:>4.1}s {:>7.0}\n",
            w.id,
            name,
            address,
            w.shard,
            w.state,
            w.jobs_done,
            w.last_heartbeat_secs,
            w.images_per_sec
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status line says how many generations are in flight out of the window, and
    /// says nothing of a window it does not know (a run not started yet).
    #[test]
    fn render_shows_the_window_when_known() {
        let mut s = StatusResponse {
            generation: 120,
            window: 32,
            generations_in_flight: 7,
            ..Default::default()
        };
        assert!(
            render(&s).contains("generation 120  layer -  in flight 7/32\n"),
            "{}",
            render(&s)
        );
        assert_eq!(to_json(&s)["window"], 32);
        assert_eq!(to_json(&s)["generations_in_flight"], 7);
        s.window = 0;
        assert!(!render(&s).contains("in flight"), "{}", render(&s));
    }

    /// With `search.rollback` the status says when the search waits for a measurement
    /// and how often it went back to its best network; without, neither.
    #[test]
    fn render_shows_the_wait_for_a_measurement_and_the_rollbacks() {
        let mut s = StatusResponse {
            generation: 64,
            window: 1,
            ..Default::default()
        };
        let plain = render(&s);
        assert!(
            !plain.contains("waiting") && !plain.contains("back to"),
            "{plain}"
        );
        s.waiting_for_measurement = true;
        s.rollbacks = 3;
        let shown = render(&s);
        assert!(
            shown.contains("in flight 0/1  (waiting for its measurement)\n"),
            "{shown}"
        );
        assert!(
            shown.contains("back to the best network 3 time(s)\n"),
            "{shown}"
        );
        assert_eq!(to_json(&s)["waiting_for_measurement"], true);
        assert_eq!(to_json(&s)["rollbacks"], 3);
    }
}
