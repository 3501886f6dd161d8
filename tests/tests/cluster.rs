//! End-to-end: a real coordinator and real workers over loopback gRPC.

use ccq_common::data::{self, DataSource, Split};
use ccq_common::fitness;
use ccq_common::qnet::{BlockTarget, QNetwork, Targets, Teacher};
use ccq_coordinator::eval::{float_logits, quantize_from_train};
use ccq_search::config::Fitness;
use ccq_search::trainer::Trainer;
use ccq_tests::{spawn_cluster, tiny_config, write_tiny_mnist};

/// The same seed gives a byte-identical network and identical history whether one worker
/// holds all the data, three workers hold a third each, or three workers share one shard
/// (the coordinator then spreads each generation's candidates across them) — with one
/// generation at a time and with eight in flight (`search.window`), where results arrive
/// in any order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_and_three_workers_train_the_identical_network() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 700, 120, 1);
    let mut by_window = Vec::new();
    for window in [1, 8] {
        let mut models = Vec::new();
        let mut histories = Vec::new();
        for (workers, shards) in [(1, None), (3, None), (3, Some(1))] {
            let out = dir
                .path()
                .join(format!("run-{window}-{workers}-{shards:?}"));
            let mut cfg = tiny_config(dir.path(), &out, 320);
            cfg.cluster.shards = shards;
            cfg.search.window = Some(window);
            let report = spawn_cluster(cfg, workers).await.finish().await;
            assert_eq!(report.evaluations, 320);
            assert!(report.workers_seen >= workers as u64);
            models.push(std::fs::read(out.join("model.ccq")).unwrap());
            let h: Vec<_> = report
                .history
                .iter()
                .map(|p| {
                    (
                        p.generation,
                        p.evaluations,
                        p.best_fitness.map(f64::to_bits),
                        p.val_top1.to_bits(),
                        p.network_version,
                    )
                })
                .collect();
            assert!(h.len() > 10, "one history row per generation");
            histories.push(h);
        }
        for k in 1..3 {
            assert_eq!(
                histories[0], histories[k],
                "window {window}: history depends on the number of workers"
            );
            assert!(
                models[0] == models[k],
                "window {window}: model.ccq depends on the number of workers"
            );
        }
        by_window.push(histories.swap_remove(0));
    }
    assert_ne!(by_window[0], by_window[1], "a window searches differently");
}

/// Every generation's best fitness, as the cluster summed it from its shards, equals a
/// single-process evaluation of the same candidates on the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_fitness_equals_single_process_evaluation() {
    cluster_matches_replay(Fitness::Loss, false, false).await;
}

/// The same with the distillation fitness: the teacher logits the jobs carry are the
/// float model's on the job's images, so the cluster's sums equal a replay that
/// computes them in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_distillation_equals_single_process_evaluation() {
    cluster_matches_replay(Fitness::Distill, false, false).await;
}

/// With searched channel scales and activation clips: workers that catch up on several
/// versions' changes at once hold the coordinator's network exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_with_scales_and_clips_equals_single_process_evaluation() {
    cluster_matches_replay(Fitness::Loss, true, false).await;
}

/// With a block-local phase (the first half of the run): the block targets the jobs
/// carry are the float model's codes at the end of each generation's block for the
/// job's images, on two shards, and the phase hands over to the labels on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_block_local_phase_equals_single_process_evaluation() {
    cluster_matches_replay(Fitness::Loss, false, true).await;
}

async fn cluster_matches_replay(kind: Fitness, scales_and_clips: bool, block_local: bool) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 700, 120, 2);
    let out = dir.path().join("run");
    let mut cfg = tiny_config(dir.path(), &out, 160);
    cfg.search.fitness = kind;
    cfg.search.temperature = 2.0;
    // The replay below runs one generation at a time; so must the cluster.
    cfg.search.window = Some(1);
    if scales_and_clips {
        cfg.quant.channel_scale_step = Some(0.25);
        cfg.quant.act_clip_step = Some(0.25);
    }
    if block_local {
        cfg.search.local_evaluations = 80;
        cfg.search.local_images = 64;
    }
    let report = spawn_cluster(cfg.clone(), 2).await.finish().await;

    // Replay the run in this process: the same trainer, candidates evaluated locally.
    let source: DataSource = cfg.data.source.parse().unwrap();
    let graph = ccq_common::onnx::load_onnx(&cfg.model.onnx).unwrap();
    let net = quantize_from_train(
        &graph,
        &cfg.normalization(),
        &source,
        &cfg.quant_config().unwrap(),
        cfg.quant.calib_images,
    )
    .unwrap();
    let train = data::load(&source, Split::Train, None).unwrap();
    let search_len = train.len() - cfg.data.validation;
    let classes = graph.num_classes();
    let teacher = float_logits(&graph, &cfg.normalization(), &train, 1);
    let (pool, ends) = (cfg.search.local_pool(search_len), net.block_ends());
    let il = train.image_len();
    let pool_pixels: Vec<u8> = (pool.iter())
        .flat_map(|&i| train.images[i as usize * il..(i as usize + 1) * il].to_vec())
        .collect();
    let blocks = ccq_common::blocks::targets(
        &graph,
        &cfg.normalization(),
        &net,
        &ends,
        &pool_pixels,
        pool.len(),
    )
    .unwrap();
    let mut phases = (0, 0);
    let mut trainer = Trainer::new(
        net,
        cfg.eda.clone(),
        cfg.search.clone(),
        cfg.seed,
        search_len,
    )
    .unwrap();
    let mut local = Vec::new();
    while trainer.progress().evaluations < 160 {
        let g = trainer
            .next_generation()
            .unwrap()
            .expect("free variables remain");
        let il = train.image_len();
        let pixels: Vec<u8> = g
            .images
            .iter()
            .flat_map(|&i| train.images[i as usize * il..(i as usize + 1) * il].to_vec())
            .collect();
        let labels: Vec<u8> = g.images.iter().map(|&i| train.labels[i as usize]).collect();
        let rows: Vec<f32> = g
            .images
            .iter()
            .flat_map(|&i| teacher[i as usize * classes..(i as usize + 1) * classes].to_vec())
            .collect();
        let node = trainer.network().layers[g.layer as usize].node;
        let end = g.local.then(|| trainer.network().block_end(node)).flatten();
        let codes: Vec<u8> = end.map_or(Vec::new(), |e| {
            let (k, per) = (
                ends.iter().position(|&x| x == e).unwrap(),
                trainer.network().nodes[e].out.len(),
            );
            (g.images.iter())
                .flat_map(|i| {
                    let at = pool.binary_search(i).unwrap();
                    blocks[k][at * per..(at + 1) * per].to_vec()
                })
                .collect()
        });
        if g.local {
            phases.0 += 1;
        } else {
            phases.1 += 1;
        }
        let targets = Targets {
            block: end.map(|node| BlockTarget {
                node,
                codes: &codes,
            }),
            labels: &labels,
            teacher: (kind == Fitness::Distill).then_some(Teacher {
                logits: &rows,
                temperature: 2.0,
            }),
        };
        let stats = fitness::evaluate_candidates(
            trainer.network(),
            &pixels,
            &targets,
            &g.vars,
            &g.candidates,
            1,
        )
        .unwrap();
        let outcome = trainer.complete(&g, &stats).unwrap();
        local.push(outcome.best_loss);
    }
    let cluster: Vec<f64> = report
        .history
        .iter()
        .filter(|p| p.generation > 0 && p.best_fitness.is_some())
        .filter_map(|p| p.best_fitness)
        .collect();
    // History holds one row per generation (every_generations = 1) plus the final row.
    assert!(cluster.len() >= local.len());
    assert_eq!(&cluster[..local.len()], &local[..]);
    if block_local {
        assert!(phases.0 > 0 && phases.1 > 0, "both phases ran: {phases:?}");
    }
    // And the network the run wrote is the one the replay's validation would select.
    let written = QNetwork::load(&out.join("model.ccq")).unwrap();
    assert_eq!(written.num_vars(), trainer.network().num_vars());
}

/// With a cluster token, workers with a wrong or missing token are refused with a clear
/// message, and the run (served by a worker with the right token) ends exactly as an
/// undisturbed run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_without_the_token_are_refused_and_the_run_is_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 500, 100, 3);
    let clean_out = dir.path().join("clean");
    spawn_cluster(tiny_config(dir.path(), &clean_out, 160), 1)
        .await
        .finish()
        .await;

    let out = dir.path().join("guarded");
    let cluster =
        ccq_tests::spawn_cluster_with_token(tiny_config(dir.path(), &out, 160), 1, Some("s3cret"))
            .await;
    for (token, expect) in [
        (Some("wrong"), "wrong cluster token"),
        (None, "requires the cluster token"),
    ] {
        let intruder =
            ccq_tests::worker_config(format!("http://{}", cluster.addr), "intruder", token);
        // Retries while the coordinator sets up, then is refused for good.
        let err = ccq_worker::run(intruder, std::future::pending())
            .await
            .unwrap_err();
        assert!(matches!(err, ccq_worker::Error::Refused(_)), "{err}");
        assert!(err.to_string().contains(expect), "{err}");
    }
    let report = cluster.finish().await;
    assert_eq!(report.workers_seen, 1, "no intruder was ever registered");
    let a = std::fs::read(clean_out.join("model.ccq")).unwrap();
    let b = std::fs::read(out.join("model.ccq")).unwrap();
    assert!(a == b, "the guarded run ended differently");
}

/// Listening beyond loopback without a token is refused before anything starts.
#[tokio::test]
async fn listening_beyond_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_mnist(dir.path(), 200, 50, 4);
    let cfg = tiny_config(dir.path(), &dir.path().join("out"), 16);
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let opts = ccq_coordinator::run::RunOptions {
        config: cfg,
        local_workers: 0,
        worker_threads: 1,
        token: None,
        insecure: false,
        resume: false,
    };
    let err = ccq_coordinator::run::run(opts, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("without a cluster token"), "{err}");
}
