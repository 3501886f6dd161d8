//! `coordinator bench` in a tiny configuration (the MNIST quickstart model, a few hundred
//! generations): what it measures must be structurally right — every evaluation the run
//! counts was submitted by a no-op worker, each worker received the whole network exactly
//! once and change lists after, a 256-variable candidate fits in 1 KB, and the memory
//! accounting adds up to the parts the event loop holds. Speed is not asserted.

use std::path::PathBuf;

use super::{BenchOptions, ModelSpec};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_bench_counts_what_it_claims() {
    let scratch = tempfile::tempdir().unwrap();
    let opts = BenchOptions {
        model: ModelSpec::mnist(&repo()),
        evaluations: 3_200,
        workers: vec![1, 3],
        populations: vec![16],
        group_sizes: vec![256],
        memory_variables: 200_000,
        scratch: scratch.path().to_path_buf(),
    };
    let report = super::run(&opts).await.unwrap();

    assert_eq!(report.dispatch.len(), 2);
    for c in &report.dispatch {
        let case = format!("{} worker(s)", c.workers);
        assert!(c.worker_errors.is_empty(), "{case}: {:?}", c.worker_errors);
        // The budget is a multiple of the population: the run stops exactly there, and
        // every counted evaluation came back from a no-op worker.
        assert_eq!(c.evaluations, 3_200, "{case}");
        assert_eq!(c.generations, 200, "{case}");
        assert_eq!(c.evaluations_submitted, c.evaluations, "{case}");
        // One shard per worker, each shard's job carries every candidate.
        assert_eq!(c.jobs, c.generations * c.workers as u64, "{case}");
        assert_eq!(c.wire.job_candidates, c.evaluations * c.workers as u64);
        assert_eq!(c.jobs_per_worker.len(), c.workers);
        // The base network once per worker; afterwards only change lists, at most one
        // per network version and never for a job whose version the worker holds.
        assert_eq!(c.full_syncs_per_worker, vec![1; c.workers], "{case}");
        assert!(
            c.adoptions > 0,
            "{case}: made-up results must move the network"
        );
        assert!(c.wire.change_syncs <= c.generations * c.workers as u64);
        assert_eq!(
            c.wire.full_syncs
                + c.wire.change_syncs
                + c.wire.jobs_without_sync
                + c.wire.jobs_with_changes,
            c.jobs,
            "{case}: every job synced once, carried its changes or needed nothing"
        );
        // A worker holds its previous job's version, so the changes come inside the
        // jobs; a change-list round trip is left only after a (re-)registration.
        assert!(c.wire.jobs_with_changes > 0, "{case}");
        assert!(
            c.wire.change_syncs < c.wire.jobs_with_changes,
            "{case}: {} change syncs, {} jobs with changes",
            c.wire.change_syncs,
            c.wire.jobs_with_changes
        );
        // Groups are layer-local: the MNIST CNN's two larger layers give 256-variable
        // groups, and such a candidate costs well under 1 KB in its job.
        assert!(c.wire.full_group_jobs > 0, "{case}");
        assert!(
            c.wire.max_full_group_job_bytes_per_candidate <= 1024.0,
            "{case}: {}",
            c.wire.max_full_group_job_bytes_per_candidate
        );
        assert!(c.evals_per_sec > 0.0);
    }
    assert_eq!(report.wire.rows.len(), 2);
    assert!(report.targets.wire_met && report.targets.full_network_once_per_worker);

    // Memory accounting: radius 1 gives 3 probabilities (u16) per variable, plus a base
    // code and a span; one byte per variable for each flat copy of the codes.
    for m in std::iter::once(&report.memory.model).chain(&report.memory.synthetic) {
        let a = &m.accounting;
        let n = m.variables;
        assert!(
            a.eda >= 8 * n && a.eda < 8 * n + 4096,
            "{}: eda {}",
            m.name,
            a.eda
        );
        assert_eq!((a.trainer_codes, a.best_codes, a.eval_codes), (n, n, n));
        // Codes, a reference copy and a packed copy of the weights.
        assert!(
            a.network >= 3 * n && a.network == a.eval_network,
            "{}",
            m.name
        );
        let steady = (a.eda + a.trainer_codes + a.network + a.best_codes) as f64 / n as f64;
        assert!((m.bytes_per_variable - steady).abs() < 1e-9);
        assert!(m.bytes_per_variable_peak > m.bytes_per_variable);
        assert!(m.full_network_bytes_per_variable > 1.0);
    }
    let synthetic = report.memory.synthetic.as_ref().unwrap();
    assert!(synthetic.variables.abs_diff(200_000) < 3_100);
    assert_eq!(report.memory.eda_only.as_ref().unwrap().variables, 200_000);
}

/// `coordinator scale` in a tiny configuration (the MNIST model, two short cases): the
/// cost model is made of sane parts, every case ran for its wall-time budget against
/// emulated workers that all answered, and the shares it reports are fractions whose
/// parts are consistent, with a window of 4 generations in flight. Speed and efficiency
/// values are not asserted.
#[test]
fn tiny_scale_emulation_reports_consistent_shares() {
    let scratch = tempfile::tempdir().unwrap();
    let opts = super::scale::ScaleOptions {
        model: ModelSpec::mnist(&repo()),
        workers: vec![1, 3],
        replicas: 1,
        // Generations in flight: the emulated workers take jobs of several at once.
        window: 4,
        seconds: 3.0,
        coordinator_threads: 1,
        calibration_images: 64,
        scratch: scratch.path().to_path_buf(),
        simulate: vec![1, 3, 64],
        round_trip_secs: 1e-4,
        coordinator_secs_per_request: None,
        simulate_evaluations: 2_000,
        costs: None,
    };
    let report = super::scale::run(&opts).unwrap();
    let cost = &report.cost;
    assert!(cost.base_per_image_secs > 0.0, "{cost:?}");
    assert!(cost.layers.len() >= 2, "{cost:?}");
    assert!(
        cost.layers
            .windows(2)
            .all(|w| w[0].first_var < w[1].first_var),
        "layers in variable order: {cost:?}"
    );
    assert!(cost
        .layers
        .iter()
        .all(|l| l.candidate_per_image_secs >= 0.0));
    // A job's cost grows with its images and candidates; its useful part never exceeds it.
    let var = cost.layers[1].first_var;
    assert!(cost.job_secs(64, 15, var) > cost.job_secs(32, 15, var));
    assert!(cost.job_secs(64, 15, var) >= cost.job_secs(64, 3, var));
    assert!(cost.useful_secs(32, 16, 15, var, 256) <= cost.job_secs(32, 15, var));
    // A quarter of the candidates: a quarter of the base forward is useful, not all.
    let quarter = cost.useful_secs(32, 4, 4, var, 256);
    assert!(quarter < cost.job_secs(32, 4, var), "{quarter}");

    assert_eq!(
        report.cases.iter().map(|c| c.workers).collect::<Vec<_>>(),
        [1, 3]
    );
    for c in &report.cases {
        let case = format!("{} worker(s)", c.workers);
        assert!(c.worker_errors.is_empty(), "{case}: {:?}", c.worker_errors);
        assert_eq!(c.shards, c.workers, "{case}");
        assert!(
            c.stop_reason.contains("wall-time"),
            "{case}: the budget ends the case, not freezing: {}",
            c.stop_reason
        );
        assert!(c.evaluations > 0 && c.generations > 0 && c.measurements >= 2);
        // At least one job per shard per generation.
        assert!(c.jobs >= c.generations * c.shards as u64, "{case}");
        // Most jobs come with the previous result's reply, not from a poll of their own.
        assert!(
            c.polls * 2 < c.jobs,
            "{case}: {} polls for {} jobs",
            c.polls,
            c.jobs
        );
        assert!(c.window_seconds > 0.0 && c.evals_per_sec > 0.0, "{case}");
        // Evaluations as the trainer counts them: the window holds at most all of them.
        assert!(
            c.evals_per_sec * c.window_seconds <= c.evaluations as f64 * 1.001,
            "{case}: {} evaluations/s over {} s, {} in all",
            c.evals_per_sec,
            c.window_seconds,
            c.evaluations
        );
        assert!(
            c.jobs_in_window > 0 && c.coordinator_cpu_micros_per_job > 0.0,
            "{case}"
        );
        // Useful work is part of the waiting, both fractions of W x the window (a job
        // that ended inside the window may have begun just before it).
        assert!(c.efficiency > 0.0, "{case}");
        assert!(c.efficiency <= c.worker_busy_fraction + 1e-9, "{case}");
        assert!(
            c.worker_busy_fraction < 1.2,
            "{case}: {}",
            c.worker_busy_fraction
        );
        assert!(c.coordinator_cpu_secs >= 0.0);
    }
    assert_eq!(report.cases[0].rate_ratio, Some(1.0));
    assert!(report.cases[1].rate_ratio.is_some());

    // The simulated cases: the coordinator's cost per request as the 3-worker case
    // measured it; as many evaluations as the emulated case of the same size made, on
    // the same trajectory (made-up sums are a function of the codes), so the same
    // generations; 64 workers, never emulated, run for the given budget.
    let sim = report.simulation.as_ref().unwrap();
    let measured = report.cases[1].coordinator_cpu_micros_per_job;
    assert!((sim.coordinator_secs_per_request * 1e6 - measured).abs() < 1e-6);
    assert_eq!(report.simulated.len(), 3);
    assert_eq!(report.validation.len(), 2);
    for (s, e) in report.simulated.iter().zip(&report.cases) {
        assert_eq!(s.workers, e.workers);
        assert_eq!(s.evaluations, e.evaluations, "{} workers", s.workers);
        assert_eq!(s.generations, e.generations, "{} workers", s.workers);
    }
    for (v, e) in report.validation.iter().zip(&report.cases) {
        assert_eq!((v.workers, v.generations), (e.workers, e.generations));
    }
    let big = &report.simulated[2];
    assert_eq!(big.evaluations, 2_000);
    for s in report.simulated.iter().chain(&report.validation) {
        assert!(s.evals_per_sec > 0.0 && s.efficiency > 0.0, "{s:?}");
        assert!(s.efficiency <= s.worker_busy_fraction + 1e-9, "{s:?}");
        assert!(s.worker_busy_fraction <= 1.0 + 1e-9, "{s:?}");
        assert!(s.coordinator_busy_fraction <= 1.0 + 1e-9, "{s:?}");
    }
    // 64 workers on one generation of 4 at a time cannot all be busy.
    assert!(big.worker_busy_fraction < report.simulated[0].worker_busy_fraction);
}

/// `--costs` takes an earlier report's cost model; a file that is not one, or whose costs
/// cannot be times, is refused naming the file.
#[test]
fn costs_from_a_report_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(
        &good,
        r#"{"cost": {"fixed_secs": 0.0, "base_per_image_secs": 2.5e-4, "population": 16,
            "group_size": 128, "seconds": 1.0, "layers": [
            {"layer": 0, "first_var": 0, "variables": 432, "candidate_per_image_secs": 1e-4},
            {"layer": 2, "first_var": 432, "variables": 2304, "candidate_per_image_secs": 5e-5}]}}"#,
    )
    .unwrap();
    let c = super::scale::read_costs(&good).unwrap();
    assert_eq!(c.layers.len(), 2);
    assert!((c.job_secs(10, 1, 500) - 10.0 * (2.5e-4 + 5e-5)).abs() < 1e-12);

    for (name, text) in [
        ("not-json.json", "calibrated: 190 ms"),
        ("no-cost.json", r#"{"cases": []}"#),
        (
            "negative.json",
            r#"{"cost": {"fixed_secs": -1.0, "base_per_image_secs": 2.5e-4, "population": 16,
                "group_size": 128, "seconds": 1.0, "layers": [
                {"layer": 0, "first_var": 0, "variables": 4, "candidate_per_image_secs": 0.0}]}}"#,
        ),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let e = super::scale::read_costs(&file).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
}
