//! Checkpoints: the coordinator's whole run state in one file, so that a run killed at
//! any moment continues with `coordinator run --resume DIR` and ends bit-identical to the
//! same run uninterrupted.
//!
//! What is saved: the trainer (current codes, every distribution, the cycle's group
//! queue and the group in progress, both RNG stream positions, counters) and the event
//! loop's run state (the generation in flight, which a resumed run evaluates again from
//! scratch; validation/test measurements still running, with the codes they measure;
//! history; the best network so far; the network version). What is not: workers, jobs and
//! leases — a resumed coordinator starts with no workers, and they re-register.
//!
//! The file is `DIR/checkpoint.ccqck`: one header line `ccq-checkpoint <format> <length>
//! <fnv1a64 of the body>` and a JSON body. It is written to a temporary file, fsynced and
//! renamed over the old one (then the directory is fsynced), so a crash leaves either
//! the old or the new checkpoint, never a torn one. Reading checks the header, length and
//! checksum before parsing, and every part is validated against the rebuilt network
//! before anything is used: a corrupted, truncated, foreign or mismatched checkpoint is
//! refused with the reason, never half-loaded.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::history::EvalPoint;
use crate::Error;
use ccq_search::trainer::{Generation, TrainerSnapshot};

pub const FILE_NAME: &str = "checkpoint.ccqck";
/// Bumped whenever the body's meaning changes; older files are refused, not guessed at.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "ccq-checkpoint";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// FNV-1a of the post-training-quantized network the search started from: a resumed
    /// run rebuilds that network from the model and data and must find the same.
    pub network_fingerprint: String,
    pub run_id: String,
    pub config: RunConfig,
    /// Training images batches are drawn from (the split minus validation).
    pub search_len: usize,
    pub float_top1: f64,
    /// Seconds of search done before this checkpoint (wall-time budgets continue).
    pub search_seconds: f64,
    pub trainer: TrainerSnapshot,
    pub state: LoopSnapshot,
}

/// Where the run is. Part of a checkpoint: a finished run has nothing to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Training,
    Evaluating,
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Training => "training",
            Phase::Evaluating => "evaluating",
            Phase::Done => "done",
        }
    }
}

/// A validation/test measurement not finished when a checkpoint was taken: a resumed
/// run measures these codes again (the result is a function of the codes alone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingEval {
    pub point: EvalPoint,
    pub is_final: bool,
    pub codes: Vec<i8>,
}

/// The event loop's share of a checkpoint (the trainer's is [`TrainerSnapshot`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopSnapshot {
    pub phase: Phase,
    /// The generation being evaluated; a resumed run evaluates it again from scratch.
    pub generation: Option<Generation>,
    pub pending_evals: Vec<PendingEval>,
    pub history: Vec<EvalPoint>,
    /// Codes of the best network by validation, and where it was measured.
    pub best: Option<(Vec<i8>, EvalPoint)>,
    pub network_version: u64,
    pub last_best_loss: Option<f64>,
    pub last_train_top1: Option<f64>,
    pub last_train_secs: Option<f64>,
    pub stop_reason: Option<String>,
    pub ptq_top1: Option<f64>,
    pub workers_seen: u64,
}

impl LoopSnapshot {
    /// Checks every part against the network it will be used with (`net`, already
    /// restored) and the size of the search range, so that nothing is half-loaded.
    pub fn check(
        &self,
        net: &ccq_common::qnet::QNetwork,
        search_len: usize,
        origin: &str,
    ) -> Result<(), Error> {
        let bad = |reason: String| Error::Checkpoint {
            path: origin.to_string(),
            reason,
        };
        let n = net.num_vars();
        let codes_ok = |c: &[i8]| c.len() == n;
        if let Some((codes, _)) = &self.best {
            if !codes_ok(codes) {
                return Err(bad(format!(
                    "state.best holds {} codes, the network has {n}",
                    codes.len()
                )));
            }
        }
        if let Some(e) = self.pending_evals.iter().find(|e| !codes_ok(&e.codes)) {
            return Err(bad(format!(
                "state.pending_evals (generation {}) holds {} codes, the network has {n}",
                e.point.generation,
                e.codes.len()
            )));
        }
        if let Some(g) = &self.generation {
            let fits = g.vars.iter().all(|&v| (v as usize) < n)
                && !g.candidates.is_empty()
                && g.candidates.iter().all(|c| c.len() == g.vars.len())
                && g.images.iter().all(|&i| (i as usize) < search_len);
            if !fits {
                return Err(bad(format!(
                    "state.generation {} does not fit the network and data",
                    g.id
                )));
            }
        }
        if self.phase == Phase::Done {
            return Err(bad("the run it belongs to is finished".into()));
        }
        if let Some((codes, _)) = &self.best {
            // Checks every code against its layer's range.
            net.clone()
                .set_codes(codes)
                .map_err(|e| bad(format!("state.best: {e}")))?;
        }
        Ok(())
    }
}

/// The checkpoint file of the run directory `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// 64-bit FNV-1a: detects torn and bit-flipped files (not an adversary; the token
/// protects the cluster, the filesystem protects the file).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The identity of a quantized network, as checkpoints and workers compare it.
pub fn network_fingerprint(net: &ccq_common::qnet::QNetwork) -> String {
    format!("{:016x}", fnv1a64(&net.to_bytes()))
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("a checkpoint always serialises");
        let mut out = format!(
            "{MAGIC} {FORMAT_VERSION} {} {:016x}\n",
            body.len(),
            fnv1a64(&body)
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Parses a checkpoint file's bytes; `origin` names the file in errors.
    pub fn decode(bytes: &[u8], origin: &str) -> Result<Checkpoint, Error> {
        let bad = |reason: String| Error::Checkpoint {
            path: origin.to_string(),
            reason,
        };
        let nl = bytes
            .iter()
            .take(128)
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("not a ccq checkpoint (no header line)".into()))?;
        let header = std::str::from_utf8(&bytes[..nl])
            .map_err(|_| bad("not a ccq checkpoint (header is not text)".into()))?;
        let fields: Vec<&str> = header.split(' ').collect();
        if fields.len() != 4 || fields[0] != MAGIC {
            return Err(bad(format!(
                "not a ccq checkpoint (header {header:?}, expected \"{MAGIC} <format> <length> <checksum>\")"
            )));
        }
        let format: u32 = fields[1]
            .parse()
            .map_err(|_| bad(format!("unreadable format version {:?}", fields[1])))?;
        if format != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {format}; this build reads version {FORMAT_VERSION} only"
            )));
        }
        let len: usize = fields[2]
            .parse()
            .map_err(|_| bad(format!("unreadable length {:?}", fields[2])))?;
        let sum = u64::from_str_radix(fields[3], 16)
            .map_err(|_| bad(format!("unreadable checksum {:?}", fields[3])))?;
        let body = &bytes[nl + 1..];
        if body.len() != len {
            return Err(bad(format!(
                "truncated or padded: the header promises {len} bytes, the file has {}",
                body.len()
            )));
        }
        let actual = fnv1a64(body);
        if actual != sum {
            return Err(bad(format!(
                "corrupted: checksum {actual:016x}, the header says {sum:016x}"
            )));
        }
        let ck: Checkpoint =
            serde_json::from_slice(body).map_err(|e| bad(format!("unreadable body: {e}")))?;
        ck.config
            .validate()
            .map_err(|e| bad(format!("config: {e}")))?;
        Ok(ck)
    }

    /// Reads `dir`'s checkpoint.
    pub fn load(dir: &Path) -> Result<Checkpoint, Error> {
        let p = path(dir);
        let bytes = std::fs::read(&p).map_err(|e| Error::Checkpoint {
            path: p.display().to_string(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "not found: nothing to resume (the run wrote no checkpoint yet, or DIR is not a run's output directory)".into()
            } else {
                e.to_string()
            },
        })?;
        Checkpoint::decode(&bytes, &p.display().to_string())
    }

    /// Refuses to continue this checkpoint under `cfg` if anything that shapes the
    /// search differs. Budgets, cluster settings, evaluation threads and the paths of
    /// the model and data may change (their contents are checked through the network
    /// fingerprint and split length).
    pub fn check_config(&self, cfg: &RunConfig, origin: &str) -> Result<(), Error> {
        let a = &self.config;
        let pairs: [(&str, String, String); 8] = [
            ("seed", a.seed.to_string(), cfg.seed.to_string()),
            (
                "model.mean/std",
                dbg(&(&a.model.mean, &a.model.std)),
                dbg(&(&cfg.model.mean, &cfg.model.std)),
            ),
            (
                "data.validation",
                a.data.validation.to_string(),
                cfg.data.validation.to_string(),
            ),
            (
                "data.test_limit",
                dbg(&a.data.test_limit),
                dbg(&cfg.data.test_limit),
            ),
            ("quant", dbg(&a.quant), dbg(&cfg.quant)),
            ("eda", dbg(&a.eda), dbg(&cfg.eda)),
            ("search", dbg(&a.search), dbg(&cfg.search)),
            (
                "eval.every_generations",
                a.eval.every_generations.to_string(),
                cfg.eval.every_generations.to_string(),
            ),
        ];
        for (field, was, now) in pairs {
            if was != now {
                return Err(Error::Checkpoint {
                    path: origin.to_string(),
                    reason: format!(
                        "written with {field} = {was}, but this run has {field} = {now}; resume with the run's own config (or none: --resume alone uses the checkpoint's)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Refuses a network (rebuilt from the model and data) that is not the one the
    /// checkpoint's search started from.
    pub fn check_network(
        &self,
        fingerprint: &str,
        search_len: usize,
        origin: &str,
    ) -> Result<(), Error> {
        if fingerprint != self.network_fingerprint {
            return Err(Error::Checkpoint {
                path: origin.to_string(),
                reason: format!(
                    "written for a different model: the quantized network built from {} and {} has fingerprint {fingerprint}, the checkpoint's has {}",
                    self.config.model.onnx.display(),
                    self.config.data.source,
                    self.network_fingerprint
                ),
            });
        }
        if search_len != self.search_len {
            return Err(Error::Checkpoint {
                path: origin.to_string(),
                reason: format!(
                    "written for a training split of {} search images, the data now gives {search_len}",
                    self.search_len
                ),
            });
        }
        Ok(())
    }
}

fn dbg<T: std::fmt::Debug>(v: &T) -> String {
    format!("{v:?}")
}

/// Writes `bytes` as `dir`'s checkpoint: temporary file, fsync, rename, fsync of the
/// directory. Readers see the old checkpoint or the new one, whole.
pub fn write_atomic(dir: &Path, bytes: &[u8]) -> Result<(), Error> {
    let target = path(dir);
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    let io = |p: &Path, e: std::io::Error| Error::from(ccq_common::Error::io(p, e));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
    // The rename itself is durable only once the directory is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccq_common::model::Normalization;
    use ccq_common::qnet::QNetwork;
    use ccq_common::quant::{quantize, Calibration, QuantConfig};
    use ccq_search::eda::EdaParams;
    use ccq_search::trainer::Trainer;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `OUT/checkpoint.ccqck` is the documented place: `--resume DIR` and the deployments
    /// look for it there. A directory without one has nothing to resume; a checkpoint
    /// that cannot be read says why instead.
    #[test]
    fn the_checkpoint_lives_in_the_run_directory_under_its_documented_name() {
        assert_eq!(
            path(Path::new("runs/x")),
            Path::new("runs/x/checkpoint.ccqck")
        );
        let dir = tempfile::tempdir().unwrap();
        let r = reason(Checkpoint::load(dir.path()));
        assert!(r.contains("nothing to resume"), "{r}");
        std::fs::create_dir(path(dir.path())).unwrap();
        let r = reason(Checkpoint::load(dir.path()));
        assert!(
            !r.contains("nothing to resume"),
            "a directory in its place: {r}"
        );
    }

    fn network() -> QNetwork {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../common/tests/fixtures/mnist_cnn.onnx");
        let graph = ccq_common::onnx::load_onnx(&path).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let pixels: Vec<u8> = (0..64 * 784).map(|_| rng.random()).collect();
        let q = QuantConfig {
            weight_bits: 2,
            act_bits: 8,
            calibration: Calibration::Max,
            bias_correction: false,
        };
        quantize(&graph, &Normalization::identity(1), &pixels, 64, &q).unwrap()
    }

    fn config() -> RunConfig {
        toml::from_str(
            "[model]\nonnx = \"m.onnx\"\nmean = [0.1]\nstd = [0.3]\n[data]\nsource = \"mnist:d\"\n\
             [budget]\nevaluations = 100\n",
        )
        .unwrap()
    }

    /// A checkpoint of a trainer a few generations in (with made-up fitness).
    fn sample() -> (Checkpoint, QNetwork) {
        let net = network();
        let cfg = config();
        let mut t = Trainer::new(
            net.clone(),
            EdaParams::default(),
            cfg.search.clone(),
            cfg.seed,
            500,
        )
        .unwrap();
        let mut gen = None;
        for _ in 0..3 {
            let g = t.next_generation().unwrap().unwrap();
            let stats: Vec<_> = (0..g.candidates.len())
                .map(|i| ccq_common::qnet::EvalStats {
                    loss_fixed: 1000 + (i as u64 * 37) % 11,
                    correct: 3,
                    images: g.images.len() as u64,
                })
                .collect();
            t.complete(&g, &stats).unwrap();
            gen = Some(g);
        }
        let point = EvalPoint {
            generation: 3,
            evaluations: 24,
            wall_seconds: 0.5,
            best_fitness: Some(2.25),
            train_top1: Some(10.0),
            val_top1: 11.0,
            val_loss: 2.0,
            test_top1: 12.5,
            network_version: 2,
            is_final: false,
        };
        let ck = Checkpoint {
            network_fingerprint: network_fingerprint(&net),
            run_id: "r-seed1".into(),
            config: cfg,
            search_len: 500,
            float_top1: 90.0,
            search_seconds: 1.5,
            trainer: t.snapshot(),
            state: LoopSnapshot {
                phase: Phase::Training,
                generation: gen,
                pending_evals: Vec::new(),
                history: vec![point.clone()],
                best: Some((t.network().codes(), point)),
                network_version: 2,
                last_best_loss: Some(2.25),
                last_train_top1: Some(10.0),
                last_train_secs: Some(1.0),
                stop_reason: None,
                ptq_top1: Some(9.0),
                workers_seen: 2,
            },
        };
        (ck, net)
    }

    fn reason(r: Result<Checkpoint, Error>) -> String {
        match r {
            Err(Error::Checkpoint { reason, .. }) => reason,
            Err(e) => panic!("not a checkpoint error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn round_trip_is_exact_and_the_trainer_continues_identically() {
        let (ck, net) = sample();
        let bytes = ck.encode();
        let back = Checkpoint::decode(&bytes, "ck").unwrap();
        assert_eq!(back.encode(), bytes, "re-encoding changes nothing");
        assert_eq!(back.trainer, ck.trainer);
        assert_eq!(back.state, ck.state);
        // The restored trainer draws exactly what the original draws next.
        let cfg = config();
        let mut a = Trainer::restore(
            net.clone(),
            cfg.search.clone(),
            cfg.seed,
            500,
            ck.trainer,
            "a",
        )
        .unwrap();
        let mut b =
            Trainer::restore(net, cfg.search.clone(), cfg.seed, 500, back.trainer, "b").unwrap();
        for _ in 0..3 {
            assert_eq!(a.next_generation().unwrap(), b.next_generation().unwrap());
        }
    }

    /// Written atomically into the run directory, read back whole, nothing left beside
    /// it; a second write replaces the first.
    #[test]
    fn write_atomic_then_load_gives_the_checkpoint_back() {
        let (ck, _) = sample();
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), b"an older checkpoint").unwrap();
        write_atomic(dir.path(), &ck.encode()).unwrap();
        let back = Checkpoint::load(dir.path()).unwrap();
        assert_eq!(back.encode(), ck.encode());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME], "no temporary file is left");
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let (ck, _) = sample();
        let bytes = ck.encode();
        let nl = bytes.iter().position(|&b| b == b'\n').unwrap();

        let r = reason(Checkpoint::decode(&bytes[..bytes.len() - 10], "ck"));
        assert!(r.starts_with("truncated"), "{r}");
        let mut flipped = bytes.clone();
        flipped[nl + 100] ^= 0x04;
        let r = reason(Checkpoint::decode(&flipped, "ck"));
        assert!(r.starts_with("corrupted: checksum"), "{r}");
        let r = reason(Checkpoint::decode(b"{\"json\": true}\n", "ck"));
        assert!(r.starts_with("not a ccq checkpoint"), "{r}");
        let r = reason(Checkpoint::decode(b"", "ck"));
        assert!(r.starts_with("not a ccq checkpoint"), "{r}");
        let mut v2 = b"ccq-checkpoint 2".to_vec();
        v2.extend_from_slice(&bytes[b"ccq-checkpoint 1".len()..]);
        let r = reason(Checkpoint::decode(&v2, "ck"));
        assert!(r.contains("format version 2"), "{r}");
        // A valid file whose body is not a checkpoint.
        let body = b"{\"hello\": 1}";
        let mut foreign =
            format!("ccq-checkpoint 1 {} {:016x}\n", body.len(), fnv1a64(body)).into_bytes();
        foreign.extend_from_slice(body);
        let r = reason(Checkpoint::decode(&foreign, "ck"));
        assert!(r.starts_with("unreadable body"), "{r}");
        // Four fields but another magic word: not ours, whatever follows.
        let mut other = b"ccq-checkpoinT".to_vec();
        other.extend_from_slice(&bytes[b"ccq-checkpoint".len()..]);
        let r = reason(Checkpoint::decode(&other, "ck"));
        assert!(r.starts_with("not a ccq checkpoint"), "{r}");
        // The right magic with a field missing.
        let r = reason(Checkpoint::decode(b"ccq-checkpoint 1 12\n{}", "ck"));
        assert!(r.starts_with("not a ccq checkpoint"), "{r}");
    }

    #[test]
    fn another_config_or_network_is_refused_naming_the_difference() {
        let (ck, net) = sample();
        let mut cfg = config();
        ck.check_config(&cfg, "ck").unwrap();
        cfg.budget.evaluations = Some(10_000); // budgets may grow on resume
        cfg.model.onnx = "elsewhere/m.onnx".into();
        ck.check_config(&cfg, "ck").unwrap();
        cfg.eda.population = 20;
        let e = ck.check_config(&cfg, "ck").unwrap_err().to_string();
        assert!(e.contains("eda"), "{e}");
        let mut cfg = config();
        cfg.seed = 99;
        let e = ck.check_config(&cfg, "ck").unwrap_err().to_string();
        assert!(e.contains("seed = 1") && e.contains("seed = 99"), "{e}");

        let fp = network_fingerprint(&net);
        ck.check_network(&fp, 500, "ck").unwrap();
        let mut other = net.clone();
        let mut codes = other.codes();
        codes[0] = if codes[0] == 0 { 1 } else { 0 };
        other.set_codes(&codes).unwrap();
        let e = ck
            .check_network(&network_fingerprint(&other), 500, "ck")
            .unwrap_err()
            .to_string();
        assert!(e.contains("different model"), "{e}");
        let e = ck.check_network(&fp, 400, "ck").unwrap_err().to_string();
        assert!(e.contains("500 search images"), "{e}");
    }

    /// Property: whatever the bytes — random, truncated, flipped, or a mutated body under
    /// a recomputed checksum (which reaches the JSON and the invariant checks) — decoding
    /// and restoring return a value or an error, never panic.
    /// Status shows the phase by the same name the checkpoint stores it under.
    #[test]
    fn phases_are_named_as_stored() {
        for (p, name) in [
            (Phase::Training, "training"),
            (Phase::Evaluating, "evaluating"),
            (Phase::Done, "done"),
        ] {
            assert_eq!(p.as_str(), name);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{name}\""));
        }
    }

    /// The loop's part is checked against the network and data it will be used with:
    /// every way it can fail to fit is refused with the field named, and the sample
    /// itself fits.
    #[test]
    fn loop_snapshots_that_do_not_fit_are_refused_naming_the_field() {
        let (ck, net) = sample();
        let len = ck.search_len;
        ck.state.check(&net, len, "ck").unwrap();
        let n = net.num_vars();
        let refused = |f: &dyn Fn(&mut LoopSnapshot), len: usize| {
            let mut s = ck.state.clone();
            f(&mut s);
            reason(s.check(&net, len, "ck").map(|_| ck.clone()))
        };
        let r = refused(
            &|s| s.best.as_mut().unwrap().0.pop().map(|_| ()).unwrap(),
            len,
        );
        assert!(
            r.contains(&format!(
                "state.best holds {} codes, the network has {n}",
                n - 1
            )),
            "{r}"
        );
        let r = refused(&|s| s.best.as_mut().unwrap().0[0] = 100, len);
        assert!(r.starts_with("state.best: "), "a code out of range: {r}");
        let r = refused(
            &|s| {
                s.pending_evals.push(PendingEval {
                    point: s.history[0].clone(),
                    is_final: false,
                    codes: vec![0; n + 1],
                })
            },
            len,
        );
        assert!(
            r.contains("state.pending_evals (generation 3) holds"),
            "{r}"
        );
        let g = ck.state.generation.clone().unwrap();
        let gen_refused = |f: &dyn Fn(&mut Generation), len: usize| {
            refused(&|s| f(s.generation.as_mut().unwrap()), len)
        };
        for (what, r) in [
            (
                "a variable past the network",
                gen_refused(&|g| g.vars[0] = n as u32, len),
            ),
            ("no candidates", gen_refused(&|g| g.candidates.clear(), len)),
            (
                "a short candidate",
                gen_refused(&|g| g.candidates[1].pop().map(|_| ()).unwrap(), len),
            ),
            (
                "an image past the data",
                gen_refused(&|g| g.images[0] = len as u64, len),
            ),
            (
                "less data than its images",
                gen_refused(&|_| (), *g.images.iter().max().unwrap() as usize),
            ),
        ] {
            assert!(
                r.contains(&format!("state.generation {} does not fit", g.id)),
                "{what}: {r}"
            );
        }
        // Data just large enough for the batch's largest index is fine.
        let enough = *g.images.iter().max().unwrap() as usize + 1;
        ck.state.check(&net, enough, "ck").unwrap();
        let r = refused(&|s| s.phase = Phase::Done, len);
        assert!(r.contains("is finished"), "{r}");
        // Nothing about the generation, evals or best is required.
        let mut bare = ck.state.clone();
        (bare.best, bare.generation) = (None, None);
        bare.check(&net, len, "ck").unwrap();
    }

    #[test]
    fn random_and_mutated_checkpoints_never_panic() {
        let (ck, net) = sample();
        let bytes = ck.encode();
        let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
        let body = &bytes[nl + 1..];
        let cfg = config();
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let (mut parsed, mut restored) = (0, 0);
        for round in 0..3000 {
            let candidate: Vec<u8> = match round % 4 {
                0 => (0..rng.random_range(0..200))
                    .map(|_| rng.random())
                    .collect(),
                1 => bytes[..rng.random_range(0..bytes.len())].to_vec(),
                2 => {
                    let mut b = bytes.clone();
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                    b
                }
                _ => {
                    // Change a digit or delimiter of the body and fix the header up.
                    let mut b = body.to_vec();
                    for _ in 0..rng.random_range(1..4) {
                        let i = rng.random_range(0..b.len());
                        b[i] = *b"0123456789-,[]{}\":.e"
                            .get(rng.random_range(0..20))
                            .unwrap();
                    }
                    let mut f =
                        format!("ccq-checkpoint 1 {} {:016x}\n", b.len(), fnv1a64(&b)).into_bytes();
                    f.extend_from_slice(&b);
                    f
                }
            };
            if let Ok(c) = Checkpoint::decode(&candidate, "fuzz") {
                parsed += 1;
                if Trainer::restore(
                    net.clone(),
                    cfg.search.clone(),
                    cfg.seed,
                    500,
                    c.trainer,
                    "fuzz",
                )
                .is_ok()
                {
                    restored += 1;
                }
            }
        }
        // The mutations must reach the deeper checks for the property to mean anything.
        assert!(parsed > 20, "only {parsed} mutated files parsed");
        assert!(
            restored < parsed,
            "no parsed mutation was caught by the restore checks ({parsed} parsed)"
        );
    }
}
