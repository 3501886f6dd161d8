//! The Prometheus endpoint of a real `coordinator run --metrics ADDR` process: every line
//! of a scrape is valid text exposition format 0.0.4, the counters of issue 4 are there
//! with values that agree with each other, and malformed requests get 4xx answers without
//! taking the endpoint down.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{free_addr, repo, write_tiny_mnist};

struct Process {
    child: Child,
    stderr: PathBuf,
}

impl Process {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A run config that outlasts the test (the test kills the process): a large budget, and
/// restarts instead of ending once every variable of the 2-bit network has frozen (which
/// takes this tiny run about two seconds).
fn write_config(dir: &Path) -> PathBuf {
    let data = dir.join("mnist");
    std::fs::create_dir_all(&data).unwrap();
    write_tiny_mnist(&data, 600, 100);
    let model = repo().join("common/tests/fixtures/mnist_cnn.onnx");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "seed = 5\nout = \"{}\"\n[model]\nonnx = \"{}\"\nmean = [0.13]\nstd = [0.31]\n\
             [data]\nsource = \"mnist:{}\"\nvalidation = 100\n[quant]\nweight_bits = 2\n\
             [eda]\npopulation = 8\ngroup_size = 32\n[search]\nbatch_size = 64\nrestarts = true\n\
             [budget]\nevaluations = 100000000\n[eval]\nevery_generations = 10\n\
             [cluster]\nshards = 2\n",
            dir.join("out").display(),
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    config
}

fn start(dir: &Path, config: &Path, metrics: SocketAddr) -> Process {
    let stderr = dir.join("coordinator.log");
    let child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["run", "--config"])
        .arg(config)
        .args(["--local-workers", "2", "--listen"])
        .arg(free_addr().to_string())
        .arg("--metrics")
        .arg(metrics.to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("start the coordinator binary");
    Process { child, stderr }
}

/// One HTTP exchange on a fresh connection: (status, headers, body).
fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(request)?;
    // Nothing more is coming: a server waiting for the rest of a head sees the end now.
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    Ok((status, head.to_string(), body.to_string()))
}

fn scrape(addr: SocketAddr) -> std::io::Result<(u16, String, String)> {
    exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n",
    )
}

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_metric_name(s) && !s.contains(':')
}

/// Go's ParseFloat, as Prometheus reads sample values.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => s.parse().ok(),
        _ => None,
    }
}

/// `name{a="x",b="y"} value [timestamp]`, with the format's three label-value escapes.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            let start = chars.peek().map(|&(i, _)| i).ok_or("unterminated labels")?;
            if after[start..].starts_with('}') {
                rest = &after[start + 1..];
                break;
            }
            let eq = after[start..].find('=').ok_or("label without =")? + start;
            let key = &after[start..eq];
            if !is_label_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} value is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    '\n' => return Err("raw newline in a label value".into()),
                    c => value.push(c),
                }
            }
            if labels.insert(key.to_string(), value).is_some() {
                return Err(format!("label {key} repeated"));
            }
            match chars.peek().map(|&(_, c)| c) {
                Some(',') => {
                    chars.next();
                }
                Some('}') => {}
                _ => return Err("expected , or } after a label".into()),
            }
        }
    }
    let mut fields = rest
        .strip_prefix(' ')
        .ok_or("no space before the value")?
        .split(' ');
    let value = fields.next().and_then(parse_value).ok_or("bad value")?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses a whole scrape, checking the format's rules across lines: one TYPE per family,
/// before its samples; a family's samples together; histograms well formed.
fn parse_exposition(text: &str) -> Result<(HashMap<String, String>, Vec<Sample>), String> {
    if !text.ends_with('\n') {
        return Err("the text must end with a newline".into());
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut finished_families: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let err = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let parts: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
            match parts[..] {
                ["TYPE", name, kind] => {
                    if !is_metric_name(name) {
                        return Err(err("bad name in TYPE".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(err(format!("unknown type {kind}")));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(err("second TYPE for a family".into()));
                    }
                    if samples
                        .iter()
                        .any(|s: &Sample| family(&types, &s.name) == name)
                    {
                        return Err(err("TYPE after the family's samples".into()));
                    }
                }
                ["HELP", name, ..] if !is_metric_name(name) => {
                    return Err(err("bad name in HELP".into()))
                }
                _ => {}
            }
            continue;
        }
        let sample = parse_sample(line).map_err(err)?;
        let fam = family(&types, &sample.name).to_string();
        if current.as_deref() != Some(&fam) {
            if finished_families.contains(&fam) {
                return Err(err(format!("samples of {fam} are not together")));
            }
            if let Some(previous) = current.replace(fam.clone()) {
                finished_families.push(previous);
            }
        }
        if types.get(&fam).map(String::as_str) == Some("histogram")
            && sample.name.ends_with("_bucket")
            && !sample.labels.contains_key("le")
        {
            return Err(err("histogram bucket without le".into()));
        }
        samples.push(sample);
    }
    Ok((types, samples))
}

/// The family a sample belongs to: histogram samples carry a suffix.
fn family<'a>(types: &HashMap<String, String>, name: &'a str) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).map(String::as_str) == Some("histogram") {
                return base;
            }
        }
    }
    name
}

fn value(samples: &[Sample], name: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.is_empty())
        .map(|s| s.value)
}

/// Checks one histogram series: cumulative buckets, +Inf equal to _count; returns _count.
fn check_histogram(samples: &[Sample], name: &str, labels: &BTreeMap<String, String>) -> f64 {
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == format!("{name}_bucket"))
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| (parse_value(&s.labels["le"]).expect("numeric le"), s.value))
        .collect();
    assert!(buckets.len() >= 2, "{name}{labels:?} has too few buckets");
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(
        buckets.last().unwrap().0,
        f64::INFINITY,
        "{name} lacks +Inf"
    );
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name}{labels:?} buckets are not cumulative: {buckets:?}"
    );
    let series = |suffix: &str| {
        samples
            .iter()
            .find(|s| s.name == format!("{name}{suffix}") && &s.labels == labels)
            .unwrap_or_else(|| panic!("{name}{suffix}{labels:?} missing"))
            .value
    };
    let count = series("_count");
    assert_eq!(
        buckets.last().unwrap().1,
        count,
        "{name}: +Inf bucket != _count"
    );
    assert!(series("_sum") >= 0.0);
    count
}

#[test]
fn metrics_endpoint_serves_valid_prometheus_text_during_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let metrics = free_addr();
    let mut process = start(dir.path(), &config, metrics);

    // Scrape until the run has trained a little and measured its network.
    let deadline = Instant::now() + Duration::from_secs(180);
    let (head, text) = loop {
        assert!(
            Instant::now() < deadline,
            "no useful scrape in time; coordinator log:\n{}",
            process.logs()
        );
        if let Some(exit) = process.child.try_wait().unwrap() {
            panic!(
                "the coordinator exited ({exit}) before a useful scrape; log:\n{}",
                process.logs()
            );
        }
        match scrape(metrics) {
            Ok((200, head, body)) => {
                let (_, samples) = parse_exposition(&body)
                    .unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"));
                let ready = value(&samples, "ccq_generations_total").unwrap_or(0.0) >= 3.0
                    && value(&samples, "ccq_test_top1_percent").is_some()
                    && samples
                        .iter()
                        .filter(|s| s.name == "ccq_worker_job_duration_seconds_count")
                        .count()
                        == 2;
                if ready {
                    break (head, body);
                }
            }
            // 503 while setting up; refused before the port is bound.
            Ok((503, _, _)) | Err(_) => {}
            Ok((status, _, body)) => panic!("unexpected status {status}: {body}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let (types, samples) = parse_exposition(&text).unwrap();

    for (name, kind) in [
        ("ccq_evaluations_total", "counter"),
        ("ccq_generations_total", "counter"),
        ("ccq_adoptions_total", "counter"),
        ("ccq_jobs_completed_total", "counter"),
        ("ccq_jobs_retried_total", "counter"),
        ("ccq_worker_jobs_total", "counter"),
        ("ccq_best_fitness", "gauge"),
        ("ccq_test_top1_percent", "gauge"),
        ("ccq_val_top1_percent", "gauge"),
        ("ccq_evaluations_per_second", "gauge"),
        ("ccq_frozen_variables", "gauge"),
        ("ccq_free_variables", "gauge"),
        ("ccq_workers", "gauge"),
        ("ccq_job_duration_seconds", "histogram"),
        ("ccq_worker_job_duration_seconds", "histogram"),
    ] {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some(kind),
            "TYPE of {name}"
        );
    }
    let get = |name: &str| value(&samples, name).unwrap_or_else(|| panic!("no {name}\n{text}"));
    let generations = get("ccq_generations_total");
    let evaluations = get("ccq_evaluations_total");
    let jobs = get("ccq_jobs_completed_total");
    // Each generation evaluates 8 candidates, as jobs for both shards.
    assert!(
        evaluations >= 8.0 * generations,
        "{evaluations} evaluations, {generations} generations"
    );
    assert!(
        jobs >= 2.0 * generations,
        "{jobs} jobs for {generations} generations"
    );
    assert!(get("ccq_adoptions_total") <= generations);
    assert!(get("ccq_jobs_retried_total") >= 0.0);
    assert!((0.0..=100.0).contains(&get("ccq_test_top1_percent")));
    assert!((0.0..=100.0).contains(&get("ccq_val_top1_percent")));
    let fitness = get("ccq_best_fitness");
    assert!(
        fitness.is_finite() && fitness > 0.0,
        "cross-entropy {fitness}"
    );
    assert!(get("ccq_evaluations_per_second") >= 0.0);
    assert!(get("ccq_frozen_variables") + get("ccq_free_variables") > 0.0);
    assert_eq!(get("ccq_workers"), 2.0);

    // Two local workers, one per shard; their jobs add up to all accepted jobs.
    let per_worker: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "ccq_worker_jobs_total")
        .collect();
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    let mut shards: Vec<&str> = per_worker
        .iter()
        .map(|s| s.labels["shard"].as_str())
        .collect();
    shards.sort();
    assert_eq!(shards, ["0", "1"]);
    assert_eq!(per_worker.iter().map(|s| s.value).sum::<f64>(), jobs);

    // Every accepted job was timed, overall and per worker.
    assert_eq!(
        check_histogram(&samples, "ccq_job_duration_seconds", &BTreeMap::new()),
        jobs
    );
    let mut per_worker_count = 0.0;
    for w in &per_worker {
        let labels = BTreeMap::from([("worker".to_string(), w.labels["worker"].clone())]);
        let count = check_histogram(&samples, "ccq_worker_job_duration_seconds", &labels);
        assert_eq!(
            count, w.value,
            "worker {} jobs vs timings",
            w.labels["worker"]
        );
        per_worker_count += count;
    }
    assert_eq!(per_worker_count, jobs);

    // Counters only grow between scrapes.
    let (status, _, later) = scrape(metrics).unwrap();
    assert_eq!(status, 200);
    let (_, later) = parse_exposition(&later).unwrap();
    for name in [
        "ccq_evaluations_total",
        "ccq_generations_total",
        "ccq_jobs_completed_total",
    ] {
        assert!(
            value(&later, name).unwrap() >= get(name),
            "{name} went down"
        );
    }

    // Requests the endpoint does not serve get 4xx answers, and it keeps serving.
    let status = |req: &[u8]| exchange(metrics, req).map(|r| r.0).unwrap();
    assert_eq!(status(b"GET / HTTP/1.1\r\n\r\n"), 404);
    assert_eq!(status(b"GET /metrics/x HTTP/1.1\r\n\r\n"), 404);
    assert_eq!(status(b"DELETE /metrics HTTP/1.1\r\n\r\n"), 405);
    assert_eq!(status(b"\x00\x01\xfe garbage\r\n\r\n"), 400);
    assert_eq!(
        status(b"GET /metrics HTTP/1.1\r\n"),
        400,
        "closed before the blank line"
    );
    assert_eq!(status(&[b'A'; 20_000]), 431);
    let (status, head, body) = exchange(metrics, b"HEAD /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!((status, body.as_str()), (200, ""), "{head}");
    drop(TcpStream::connect(metrics).unwrap());
    assert_eq!(scrape(metrics).unwrap().0, 200);
}

#[test]
fn an_unusable_metrics_address_fails_the_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut process = start(dir.path(), &config, addr);
    let status = process.child.wait().unwrap();
    assert!(!status.success());
    let logs = process.logs();
    assert!(
        logs.contains("cluster.metrics_listen") && logs.contains(&addr.to_string()),
        "{logs}"
    );
    // It failed before the setup work, not after it.
    assert!(!logs.contains("measuring the float model"), "{logs}");
}

#[test]
fn the_format_checker_rejects_what_prometheus_would() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total 1\n\
              # TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    assert!(parse_exposition(ok).is_ok());
    for (bad, why) in [
        ("a 1", "no final newline"),
        ("1a 1\n", "name starts with a digit"),
        ("a{b=c} 1\n", "unquoted label value"),
        ("a{b=\"\\t\"} 1\n", "unknown escape"),
        ("a{b=\"x\",b=\"y\"} 1\n", "repeated label"),
        ("a one\n", "value is not a number"),
        ("a 1 2 3\n", "trailing field"),
        ("a 1\n# TYPE a gauge\n", "TYPE after samples"),
        ("# TYPE a gauge\n# TYPE a gauge\n", "TYPE twice"),
        ("# TYPE a nonsense\n", "unknown type"),
        ("a 1\nb 1\na 2\n", "family split"),
        ("# TYPE h histogram\nh_bucket 1\n", "bucket without le"),
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {why}");
    }
}
