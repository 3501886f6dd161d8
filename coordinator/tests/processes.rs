//! Real processes: a `coordinator run` and two `worker` processes on loopback, watched with
//! `coordinator status`; plus the command-line error paths of `eval` and `status`.

use std::process::{Command, Stdio};
use std::time::Duration;

mod support;
use support::{
    assert_workers_leave, coordinator, finishes, free_addr, repo, spawn_worker, wait_for,
    write_tiny_mnist, Killed,
};

fn free_port() -> u16 {
    free_addr().port()
}

#[test]
fn coordinator_and_worker_processes_train_and_finish() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 600, 100);
    let out = dir.path().join("run");
    let model = repo().join("common/tests/fixtures/mnist_cnn.onnx");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "seed = 3\nout = \"{}\"\n[model]\nonnx = \"{}\"\nmean = [0.13]\nstd = [0.31]\n\
             [data]\nsource = \"mnist:{}\"\nvalidation = 100\n[quant]\nweight_bits = 2\n\
             [eda]\npopulation = 8\ngroup_size = 32\n[search]\nbatch_size = 64\n\
             [budget]\nevaluations = 2400\n[eval]\nevery_generations = 50\n\
             [cluster]\nshards = 2\nheartbeat_ms = 200\n",
            out.display(),
            model.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Workers first: they retry until the coordinator serves.
    let workers: Vec<Killed> = (0..2).map(|_| spawn_worker(&addr)).collect();
    let mut coord = Killed(
        Command::new(coordinator())
            .args(["run", "--config"])
            .arg(&config)
            .args(["--listen", &addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start coordinator"),
    );

    // While it runs, `coordinator status --json` shows the live run with both workers.
    let mut seen = None;
    let live = wait_for(Duration::from_secs(60), || {
        let o = Command::new(coordinator())
            .args(["status", "--json", "--addr", &addr])
            .output()
            .unwrap();
        if !o.status.success() {
            return false;
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ok = v["workers"].as_array().is_some_and(|w| w.len() == 2) && v["phase"] == "training";
        if ok {
            seen = Some(v);
        }
        ok
    });
    assert!(live, "status never showed a training run with 2 workers");
    let v = seen.unwrap();
    for key in [
        "phase",
        "evaluations",
        "evaluations_per_sec",
        "best_fitness",
        "test_top1",
        "frozen_variables",
        "free_variables",
        "generations_in_flight",
    ] {
        assert!(v.get(key).is_some(), "status lacks {key}: {v}");
    }
    // The run's window, resolved from the network when the config leaves it unset.
    assert!(
        v["window"].as_u64().is_some_and(|w| w >= 1),
        "status window: {v}"
    );
    let shards: Vec<u64> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["shard"].as_u64().unwrap())
        .collect();
    assert!(
        shards.contains(&0) && shards.contains(&1),
        "each worker got its own shard: {shards:?}"
    );

    assert!(
        finishes(&mut coord, 120),
        "the run did not finish successfully"
    );
    // Workers exit 0 on their own once the coordinator says the run is done.
    assert_workers_leave(workers);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["evaluations"], 2400);
    for key in ["float", "ptq", "final"] {
        assert!(
            report["accuracy"][key].is_number(),
            "report lacks accuracy.{key}"
        );
    }
    // The written network is what `coordinator eval` measures as the final test accuracy.
    let o = Command::new(coordinator())
        .args(["eval", "--model"])
        .arg(out.join("model.ccq"))
        .args([
            "--data",
            &format!("mnist:{}", dir.path().display()),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["top1"], report["accuracy"]["final"]);
    assert_eq!(e["precision"], "w2a8");
}

#[test]
fn status_of_an_unreachable_coordinator_exits_2() {
    let port = free_port();
    let o = Command::new(coordinator())
        .args(["status", "--addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line, no stack trace: {err}");
    assert!(err.contains("unreachable"), "{err}");
}

#[test]
fn eval_reports_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 50, 20);
    let data = format!("mnist:{}", dir.path().display());
    let run = |args: &[&str]| {
        let o = Command::new(coordinator())
            .arg("eval")
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let cifar_model = repo().join("common/tests/fixtures/tiny_resnet.onnx");
    let mnist_model = repo().join("common/tests/fixtures/mnist_cnn.onnx");
    // A 3-channel model on 1-channel data.
    let e = run(&["--model", cifar_model.to_str().unwrap(), "--data", &data]);
    assert!(e.contains("shape mismatch"), "{e}");
    // Missing model file names the path.
    let e = run(&["--model", "/nonexistent/m.onnx", "--data", &data]);
    assert!(e.contains("/nonexistent/m.onnx"), "{e}");
    // Bad data source, bad split, bad bits, mismatched mean/std.
    let m = mnist_model.to_str().unwrap();
    assert!(run(&["--model", m, "--data", "imagenet:/x"]).contains("imagenet"));
    assert!(run(&["--model", m, "--data", &data, "--split", "val"]).contains("val"));
    assert!(run(&["--model", m, "--data", &data, "--weight-bits", "9"]).contains("weight_bits"));
    assert!(
        run(&["--model", m, "--data", &data, "--mean", "0.1,0.2", "--std", "1,1"])
            .contains("--mean/--std")
    );
    // A truncated dataset file names the file.
    std::fs::write(
        dir.path().join("t10k-images-idx3-ubyte"),
        [0u8, 0, 8, 3, 0, 0],
    )
    .unwrap();
    let e = run(&["--model", m, "--data", &data]);
    assert!(e.contains("t10k-images-idx3-ubyte"), "{e}");
}
