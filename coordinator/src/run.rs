//! `coordinator run`: the whole training run. Import and quantize, measure the float and
//! PTQ references, serve workers over gRPC (and start local ones if asked), drive the
//! event loop until the budget is spent, and write the outputs:
//!
//! - `model.ccq`: the best network by validation accuracy (the `.ccq` format; `coordinator
//!   eval --model` reads it);
//! - `report.json`: config, seed, accuracies, counters and history;
//! - `report.html` and SVG charts of the history and of confidence ([`crate::report`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use ccq_common::data::{self, Split};
use ccq_common::onnx;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tracing::info;

use crate::artifact;
use crate::checkpoint::{self, Checkpoint};
use crate::config::RunConfig;
use crate::eval::{float_evaluate, float_logits, quantize_from_train};
pub use crate::report::{Accuracy, RunReport};
use crate::state::{
    answer_during_setup, BlockTargets, Event, Setup, State, TeacherLogits, Telemetry,
};
use crate::Error;
use ccq_search::config::Fitness;
use ccq_search::trainer::Trainer;

pub use crate::service::MAX_REQUEST_BYTES;

/// A run as the CLI describes it.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: RunConfig,
    /// Workers started inside this process, talking gRPC over loopback.
    pub local_workers: usize,
    /// Threads for each local worker.
    pub worker_threads: usize,
    /// The cluster token workers (and, unless status is public, clients) must present.
    pub token: Option<String>,
    /// Allow listening beyond loopback without a token.
    pub insecure: bool,
    /// Continue the run whose checkpoint is in the output directory (a new run starts
    /// if there is none). Without it, a checkpoint there is an error: it belongs to an
    /// unfinished run that a new one would overwrite.
    pub resume: bool,
}

/// The config a run was started with, from the checkpoint in `dir` (`--resume DIR`
/// without `--config`). Its `out` becomes `dir`, wherever the run was started.
pub fn config_for_resume(dir: &Path) -> Result<RunConfig, Error> {
    let mut cfg = Checkpoint::load(dir)?.config;
    cfg.out = dir.to_path_buf();
    Ok(cfg)
}

/// Runs to completion (or `shutdown`), serving workers on `listener`.
pub async fn run(
    opts: RunOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport, Error> {
    let t0 = Instant::now();
    let cfg = opts.config.clone();
    cfg.validate()?;
    let source = cfg.data_source()?;
    let quant = cfg.quant_config()?;
    let norm = cfg.normalization();
    let out_dir = cfg.out.clone();
    std::fs::create_dir_all(&out_dir).map_err(|e| ccq_common::Error::io(&out_dir, e))?;
    // Before the setup, so that the metrics port fails fast and observers see setup too.
    let (telemetry, _) = tokio::sync::watch::channel::<Option<Telemetry>>(None);
    let _metrics = match &cfg.cluster.metrics_listen {
        Some(addr) => Some(crate::metrics::spawn(addr, telemetry.subscribe()).await?),
        None => None,
    };
    let resumed = open_checkpoint(&cfg, opts.resume)?;
    let ck_origin = checkpoint::path(&out_dir).display().to_string();
    let progress = crate::progress::spawn(telemetry.subscribe(), cfg.budget.evaluations);
    let run_id = match &resumed {
        Some(ck) => ck.run_id.clone(),
        None => format!(
            "{}-seed{}",
            cfg.out
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("run"),
            cfg.seed
        ),
    };

    // Serve gRPC from the start: during setup `status` reports the phase and workers are
    // asked to come back; the event loop takes over the same channel afterwards. Workers
    // inside this process connect like remote ones.
    let addr = listener
        .local_addr()
        .map_err(|e| ccq_common::Error::io("listener", e))?;
    if !addr.ip().is_loopback() && opts.token.is_none() && !opts.insecure {
        return Err(Error::Usage(format!(
            "refusing to listen on {addr} without a cluster token: anyone who reaches the port could \
             join the run; set --token or CCQ_TOKEN (workers need the same), or pass --insecure"
        )));
    }
    if cfg.cluster.tls_cert.is_some() && cfg.cluster.tls_ca.is_none() && opts.local_workers > 0 {
        return Err(Error::Usage(
            "local workers of a TLS coordinator need cluster.tls_ca: the CA (PEM) that signed cluster.tls_cert".into(),
        ));
    }
    let (tx, rx) = mpsc::channel(1024);
    let (stop_tx, _) = broadcast::channel::<()>(1);
    // Stops the server on every way out of this function, errors included.
    let _stop_server = StopOnDrop(stop_tx.clone());
    let mut stop_rx = stop_tx.subscribe();
    let (workers_api, monitor_api) =
        crate::service::services(tx.clone(), opts.token.clone(), cfg.cluster.public_status);
    // Without TCP_NODELAY every small reply waits for the peer's delayed ACK (~40 ms):
    // that, not computation, would bound the generation rate.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&cfg.cluster.tls_cert, &cfg.cluster.tls_key) {
        builder = builder
            .tls_config(server_tls(cert, key)?)
            .map_err(|e| Error::Config {
                path: cert.display().to_string(),
                reason: format!(
                    "cluster.tls_cert/tls_key: {}",
                    ccq_proto::client::error_chain(&e)
                ),
            })?;
    }
    let server = tokio::spawn(
        builder
            .add_service(workers_api)
            .add_service(monitor_api)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop_rx.recv().await;
            }),
    );
    let (phase, phase_rx) = tokio::sync::watch::channel("importing");
    let (ready, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let setup_responder = tokio::spawn(answer_until_ready(
        rx,
        ready_rx,
        run_id.clone(),
        phase_rx,
        t0,
    ));

    // Setup (import, float reference, calibration) can take minutes: a shutdown request
    // ends it at once; there is nothing to checkpoint yet.
    tokio::pin!(shutdown);
    let resuming = resumed.is_some();
    let setup = async {
        let graph = onnx::load_onnx(&cfg.model.onnx)?;
        let train_len = data::split_len(&source, Split::Train)?;
        if cfg.data.validation >= train_len {
            return Err(ccq_common::Error::setting(
                "data.validation",
                cfg.data.validation,
                format!("the training split has only {train_len} images"),
            )
            .into());
        }
        let search_len = train_len - cfg.data.validation;
        // Read once here so that unreadable validation images fail the run at start-up,
        // not in a worker later; workers measure, the coordinator keeps only the count.
        let validation = {
            let v = data::load(&source, Split::Train, Some(search_len..train_len))?;
            warn_if_one_class(&v.labels, &cfg.data.source);
            v.len()
        };
        let test_len = data::split_len(&source, Split::Test)?;
        let test = data::load(
            &source,
            Split::Test,
            Some(0..cfg.data.test_limit.map_or(test_len, |l| l.min(test_len))),
        )?;
        let s = graph.input_shape;
        if (s.c, s.h, s.w) != (test.channels, test.height, test.width) {
            return Err(ccq_common::Error::ShapeMismatch {
                expected: s.to_string(),
                found: format!(
                    "[{}, {}, {}] ({})",
                    test.channels, test.height, test.width, cfg.data.source
                ),
            }
            .into());
        }
        for split in [Split::Train, Split::Test] {
            data::check_classes(&source, split, graph.num_classes())?;
        }
        if norm.mean.len() != s.c {
            return Err(ccq_common::Error::setting(
                "model.mean",
                norm.mean.len(),
                format!("the model input has {} channels", s.c),
            )
            .into());
        }
        let eval_threads = match cfg.eval.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        };

        let float_top1 = match &resumed {
            Some(ck) => ck.float_top1,
            None => {
                phase.send_replace("measuring float reference");
                info!("measuring the float model on {} test images", test.len());
                let (g, n, t) = (graph.clone(), norm.clone(), test.clone());
                tokio::task::spawn_blocking(move || float_evaluate(&g, &n, &t, eval_threads).top1())
                    .await
                    .expect("float evaluation panicked")
            }
        };
        info!(
            "float test top-1 {float_top1:.2} %; quantizing to {}",
            format!("w{}a{}", quant.weight_bits, quant.act_bits)
        );
        phase.send_replace("calibrating");
        let net = {
            let (g, n, src, q, c) = (
                graph.clone(),
                norm.clone(),
                source.clone(),
                quant.clone(),
                cfg.quant.calib_images,
            );
            tokio::task::spawn_blocking(move || quantize_from_train(&g, &n, &src, &q, c))
                .await
                .expect("quantization panicked")?
        };
        let precision = net.precision();
        let variables = net.num_vars();
        let shards = cfg.cluster.shards.unwrap_or(opts.local_workers.max(1));
        let resumed_from_generation = resumed.as_ref().map(|ck| ck.trainer.progress.generations);
        let network_fingerprint = checkpoint::network_fingerprint(&net);
        // Block-local phase: the float model's codes at every block end for the local
        // pool, unless a resumed run is past the phase. A resumed run reads back the bits
        // it searched with (crate::artifact).
        let local_left = resumed
            .as_ref()
            .map_or(0, |ck| ck.trainer.progress.evaluations)
            < cfg.search.local_evaluations;
        let blocks = match local_left {
            false => None,
            true => {
                phase.send_replace("computing block targets");
                let (g, n, src, net, search, dir) = (
                    graph.clone(),
                    norm.clone(),
                    source.clone(),
                    net.clone(),
                    cfg.search.clone(),
                    out_dir.clone(),
                );
                let b = tokio::task::spawn_blocking(move || {
                    let float = FloatSetup {
                        graph: &g,
                        norm: &n,
                        source: &src,
                        threads: eval_threads,
                    };
                    block_targets(&float, &net, &search, search_len, &dir, resuming)
                })
                .await
                .expect("block targets panicked")?;
                info!(
                    "block-local phase: {} blocks, targets for {} images ({:.1} MB)",
                    b.ends.len(),
                    b.pool.len(),
                    b.ends.iter().map(|e| e.1.len()).sum::<usize>() as f64 / 1e6
                );
                Some(std::sync::Arc::new(b))
            }
        };
        let (trainer, restored) = match resumed {
            Some(ck) => {
                ck.check_network(&network_fingerprint, search_len, &ck_origin)?;
                let t = Trainer::restore(
                    net,
                    cfg.search.clone(),
                    cfg.seed,
                    search_len,
                    ck.trainer,
                    &ck_origin,
                )?;
                (t, Some((ck.state, ck.search_seconds)))
            }
            None => {
                let t = Trainer::new(
                    net,
                    cfg.eda.clone(),
                    cfg.search.clone(),
                    cfg.seed,
                    search_len,
                )?;
                (t, None)
            }
        };

        let teacher = match cfg.search.fitness {
            Fitness::Distill => {
                // A resumed run reads back the bits it searched with (crate::artifact).
                let classes = graph.num_classes();
                let saved = read_back(resuming, &artifact::TEACHER, &out_dir, || {
                    artifact::load_teacher(&out_dir, search_len, classes)
                })?;
                let logits = match saved {
                    Some(l) => l,
                    None => {
                        phase.send_replace("computing teacher logits");
                        info!("distillation: the float model's logits on the {search_len} search images");
                        let (g, n, src) = (graph.clone(), norm.clone(), source.clone());
                        let logits = tokio::task::spawn_blocking(move || {
                            let d = data::load(&src, Split::Train, Some(0..search_len))?;
                            Ok::<_, ccq_common::Error>(float_logits(&g, &n, &d, eval_threads))
                        })
                        .await
                        .expect("teacher logits panicked")?;
                        artifact::save_teacher(&out_dir, &logits, classes)?;
                        logits
                    }
                };
                Some(std::sync::Arc::new(TeacherLogits {
                    logits,
                    classes,
                    temperature: cfg.search.temperature,
                }))
            }
            Fitness::Loss | Fitness::Error => None,
        };

        let setup = Setup {
            run_id: run_id.clone(),
            config: cfg.clone(),
            data_source: source.to_string(),
            shards,
            search_len,
            validation,
            test: test.len(),
            float_top1,
            ptq_top1: None,
            network_fingerprint,
            search_seconds_before: restored.as_ref().map_or(0.0, |(_, secs)| *secs),
            instance: format!("{:016x}", rand::random::<u64>()),
            teacher,
            blocks,
        };
        let mut state = State::new(setup, trainer, telemetry.clone());
        if let Some((snap, _)) = restored {
            state.restore(snap, &ck_origin)?;
        }
        Ok::<_, Error>((
            state,
            precision,
            variables,
            shards,
            float_top1,
            resumed_from_generation,
        ))
    };
    let (state, precision, variables, shards, float_top1, resumed_from_generation) = tokio::select! {
        r = setup => r?,
        _ = &mut shutdown => return Err(Error::Interrupted(phase.borrow().to_string())),
    };
    let _ = ready.send(());
    let rx = setup_responder
        .await
        .expect("the setup responder never panics");
    info!(
        "listening on {addr}; {shards} shard(s), {} local worker(s)",
        opts.local_workers
    );
    let workers = spawn_local_workers(addr, &opts, &stop_tx);

    let search_start = Instant::now();
    let finished = state.run(rx, &mut shutdown).await?;
    drop(progress);
    let search_seconds = search_start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    for w in workers {
        let _ = w.await;
    }
    let _ = server.await;

    let (best_net, best_point) = finished.best;
    let model_file = out_dir.join("model.ccq");
    best_net.save(&model_file)?;
    let ptq = finished
        .history
        .first()
        .cloned()
        .unwrap_or_else(|| best_point.clone());
    let report = RunReport {
        run_id,
        seed: cfg.seed,
        precision,
        accuracy: Accuracy {
            float: float_top1,
            ptq: ptq.test_top1,
            final_: best_point.test_top1,
            ptq_val: ptq.val_top1,
            final_val: best_point.val_top1,
            last: finished.last.test_top1,
        },
        evaluations: finished.progress.evaluations,
        generations: finished.progress.generations,
        adoptions: finished.progress.adoptions,
        cycles: finished.progress.cycles,
        restarts: finished.progress.restarts,
        rollbacks: finished.progress.rollbacks,
        wall_seconds: t0.elapsed().as_secs_f64(),
        search_seconds,
        stop_reason: finished.stop_reason,
        selected: best_point,
        frozen_variables: finished.frozen,
        variables,
        workers_seen: finished.workers_seen,
        resumed_from_generation,
        layers: finished.layers,
        model_file: model_file.display().to_string(),
        history: finished.history,
        config: cfg,
    };
    crate::report::write(&report, &out_dir)?;
    if finished.complete {
        artifact::TEACHER.remove(&out_dir);
        artifact::BLOCKS.remove(&out_dir);
        // The outputs are final: nothing is left to resume.
        let ck = checkpoint::path(&out_dir);
        if ck.exists() {
            std::fs::remove_file(&ck).map_err(|e| ccq_common::Error::io(&ck, e))?;
        }
    }
    Ok(report)
}

/// What computes the float model's outputs at setup: its graph, the input normalisation,
/// the data and the threads to use.
struct FloatSetup<'a> {
    graph: &'a ccq_common::model::Graph,
    norm: &'a ccq_common::model::Normalization,
    source: &'a data::DataSource,
    threads: usize,
}

/// A setup artifact a resumed run reads back instead of recomputing (the float engine's
/// last bits depend on the CPU): `load`ed from `dir` when `resuming` and it is there.
fn read_back<T>(
    resuming: bool,
    what: &artifact::Artifact,
    dir: &std::path::Path,
    load: impl FnOnce() -> Result<Option<T>, Error>,
) -> Result<Option<T>, Error> {
    if !resuming {
        return Ok(None);
    }
    let saved = load()?;
    if saved.is_some() {
        info!(
            "resuming: read back {}, as the run computed it",
            what.path(dir).display()
        );
    }
    Ok(saved)
}

/// The block-local phase's targets: read back from `dir` when `resuming` and they are
/// there, otherwise computed with the float model and saved there.
fn block_targets(
    float: &FloatSetup,
    net: &ccq_common::qnet::QNetwork,
    search: &ccq_search::config::SearchConfig,
    search_len: usize,
    dir: &std::path::Path,
    resuming: bool,
) -> Result<BlockTargets, Error> {
    let pool = search.local_pool(search_len);
    let ends = net.block_ends();
    let per_image: Vec<usize> = ends.iter().map(|&e| net.nodes[e].out.len()).collect();
    let saved = read_back(resuming, &artifact::BLOCKS, dir, || {
        artifact::load_blocks(dir, pool.len(), &per_image)
    })?;
    let codes = match saved {
        Some(codes) => codes,
        None => {
            let codes = float_block_codes(float, net, &ends, &pool, search_len)?;
            artifact::save_blocks(dir, pool.len(), &codes)?;
            codes
        }
    };
    let end_of_layer = (net.layers.iter())
        .map(|l| net.block_end(l.node).map(|e| e as u32))
        .collect();
    Ok(BlockTargets {
        pool,
        ends: ends.iter().map(|&e| e as u32).zip(codes).collect(),
        end_of_layer,
    })
}

/// The float model's codes at each of `ends` for the training images `pool`, per end,
/// image by image, on `float.threads` threads.
fn float_block_codes(
    float: &FloatSetup,
    net: &ccq_common::qnet::QNetwork,
    ends: &[usize],
    pool: &[u64],
    search_len: usize,
) -> Result<Vec<Vec<u8>>, Error> {
    let d = data::load(float.source, Split::Train, Some(0..search_len))?;
    let il = d.image_len();
    let pixels: Vec<u8> = (pool.iter())
        .flat_map(|&i| &d.images[i as usize * il..(i as usize + 1) * il])
        .copied()
        .collect();
    drop(d);
    let per = pool.len().div_ceil(float.threads.max(1)).max(1);
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..pool.len().div_ceil(per))
            .map(|t| {
                let (lo, hi) = (t * per, ((t + 1) * per).min(pool.len()));
                let pixels = &pixels[lo * il..hi * il];
                scope.spawn(move || {
                    ccq_common::blocks::targets(float.graph, float.norm, net, ends, pixels, hi - lo)
                })
            })
            .collect();
        (handles.into_iter())
            .map(|h| h.join().expect("block targets thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok((0..ends.len())
        .map(|k| parts.iter().flat_map(|p| &p[k]).copied().collect())
        .collect())
}

/// The checkpoint to continue from, if resuming and there is one; refuses to start a
/// new run over an unfinished one's checkpoint.
fn open_checkpoint(cfg: &RunConfig, resume: bool) -> Result<Option<Checkpoint>, Error> {
    let path = checkpoint::path(&cfg.out);
    let origin = path.display().to_string();
    if !path.exists() {
        if resume {
            info!("no checkpoint at {origin}; starting a new run");
        }
        return Ok(None);
    }
    if !resume {
        return Err(Error::Usage(format!(
            "{origin} holds the checkpoint of an unfinished run: `coordinator run --resume {}` continues it; delete the file to start over",
            cfg.out.display()
        )));
    }
    let ck = Checkpoint::load(&cfg.out)?;
    ck.check_config(cfg, &origin)?;
    info!(
        "resuming {} from generation {} ({})",
        ck.run_id, ck.trainer.progress.generations, origin
    );
    Ok(Some(ck))
}

/// The server's TLS identity from PEM files, each error naming its file.
fn server_tls(cert: &Path, key: &Path) -> Result<tonic::transport::ServerTlsConfig, Error> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| ccq_common::Error::io(p, e));
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    Ok(tonic::transport::ServerTlsConfig::new().identity(identity))
}

fn spawn_local_workers(
    addr: SocketAddr,
    opts: &RunOptions,
    stop: &broadcast::Sender<()>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let threads = opts.worker_threads;
    (0..opts.local_workers)
        .map(|i| {
            let scheme = if opts.config.cluster.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            let cfg = ccq_worker::WorkerConfig {
                coordinator: format!("{scheme}://{addr}"),
                tls_ca: opts.config.cluster.tls_ca.clone(),
                shard: None,
                threads,
                name: format!("local-{i}"),
                data_override: None,
                give_up_after: None,
                token: opts.token.clone(),
            };
            let mut stop = stop.subscribe();
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.recv().await;
                };
                if let Err(e) = ccq_worker::run(cfg, shutdown).await {
                    tracing::error!("local worker {i} failed: {e}");
                }
            })
        })
        .collect()
}

/// Sends the stop signal when dropped.
struct StopOnDrop(broadcast::Sender<()>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Answers events while the run is being set up, until `ready`; then hands the channel
/// back for the event loop.
async fn answer_until_ready(
    mut rx: mpsc::Receiver<Event>,
    mut ready: tokio::sync::oneshot::Receiver<()>,
    run_id: String,
    phase: tokio::sync::watch::Receiver<&'static str>,
    t0: Instant,
) -> mpsc::Receiver<Event> {
    loop {
        tokio::select! {
            biased;
            _ = &mut ready => return rx,
            ev = rx.recv() => match ev {
                Some(ev) => answer_during_setup(ev, &run_id, *phase.borrow(), t0.elapsed().as_secs_f64()),
                None => return rx,
            },
        }
    }
}

/// A validation hold-out of a single class cannot select a model: it is what the end of a
/// class-sorted training split looks like (arrays saved in class order, say). Warned, not
/// refused: a one-class dataset is odd but possible.
fn warn_if_one_class(labels: &[u8], source: &str) {
    if let Some(&first) = labels.first() {
        if labels.len() > 1 && labels.iter().all(|&l| l == first) {
            tracing::warn!(
                "every one of the {} validation images (the end of the training split of {source}) \
                 is class {first}: the training split looks sorted by class, so validation \
                 cannot select a model; shuffle the records (docs/DATA.md)",
                labels.len()
            );
        }
    }
}
