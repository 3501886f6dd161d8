//! Checkpoints: the coordinator's whole run state in one file, so that a run killed at
//! any moment continues with `coordinator run --resume DIR` and ends bit-identical to the
//! same run uninterrupted.
//!
//! What is saved: the trainer (current codes, every distribution, the cycle's group
//! queue and the group in progress, both RNG stream positions, counters) and the event
//! loop's run state (the network versions the generations in flight were sampled against
//! and the changes since the oldest of them, so that a resumed run evaluates those
//! generations again from scratch on the same networks; validation/test measurements still running, with the codes they measure;
//! history; the best network so far; the network version). What is not: workers, jobs and
//! leases — a resumed coordinator starts with no workers, and they re-register.
//!
//! The file is `DIR/checkpoint.ccqck`: one fixed-width header line
//! `ccq-checkpoint <format> <body length, 20 digits> <CRC32 of the body, 8 hex digits>`
//! and a binary body, the [`Checkpoint`] in postcard (compact binary serde: codes and
//! counts as single bytes or varints, no text). The body is streamed through a buffered
//! writer into a temporary file while its length and CRC32 are counted, the header is
//! patched in at the end, then the file is fsynced and renamed over the old one (and the
//! directory fsynced), so a crash leaves either the old or the new checkpoint, never a
//! torn one, and no encoded copy of the state is ever held in memory: a 25 M-variable
//! run checkpoints with little more than the snapshot itself (see `benches/checkpoint.rs`).
//!
//! Reading checks the header, the length against the file's, and the CRC32 over the
//! whole body before a single body byte is parsed; then every part is validated against
//! the rebuilt network before anything is used: a corrupted, truncated, foreign,
//! mismatched or older-format checkpoint (format 1 was JSON with an FNV-1a checksum) is
//! refused with the file, the reason and the versions, never half-loaded.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::history::EvalPoint;
use crate::Error;
use ccq_search::trainer::TrainerSnapshot;

pub const FILE_NAME: &str = "checkpoint.ccqck";
/// Bumped whenever the body's meaning changes; older files are refused, not guessed at.
/// 1: JSON body, FNV-1a checksum. 2: postcard body, CRC32. 3: the trainer's snapshot
/// carries the candidate awaiting confirmation (`search.acceptance = "confirm"`). 4: the
/// run config's quant section has `weight_scale` (postcard is not self-describing: a new
/// field moves every byte after it). 5: `search.window`: the trainer holds every
/// generation in flight, the loop their networks' versions and the changes since. 6: the
/// run config's quant section has `rounding`. 7: the search section has `margin`. 8: the
/// quant section has `channel_scale_step`. 9: and `act_clip_step`; networks carry clips.
/// 10: the search section has `local_evaluations` and `local_images`; a generation in
/// flight carries `local`. 11: `search.window` is optional (unset: sized to the network).
/// 12: the search section has `rollback`; the trainer's progress counts `rollbacks`.
pub const FORMAT_VERSION: u32 = 12;
const MAGIC: &str = "ccq-checkpoint";
/// Room for the header line: `MAGIC`, the format, 20 digits of length, 8 of CRC.
const MAX_HEADER: usize = 128;
/// Scratch space the streaming decoder copies each string through (paths, ids, reasons);
/// a longer string is refused as an unreadable body.
const MAX_STRING: usize = 64 << 10;
/// Buffer of the streamed write and read: big enough that the per-byte encoder's calls
/// become few large system calls.
const IO_BUFFER: usize = 1 << 20;

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
    /// The network version each generation in flight (the trainer's, oldest first) was
    /// sampled against; a resumed run evaluates them again from scratch.
    pub in_flight_versions: Vec<u64>,
    /// The network's changes from the oldest of those versions to `network_version`, one
    /// list per version as (variable, code before, code after): what rebuilds the older
    /// networks.
    pub recent_changes: Vec<Vec<(u32, i8, i8)>>,
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
    /// restored), so that nothing is half-loaded. The generations in flight are the
    /// trainer's, checked when it is restored.
    pub fn check(&self, net: &ccq_common::qnet::QNetwork, origin: &str) -> Result<(), Error> {
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
        let oldest = self
            .network_version
            .checked_sub(self.recent_changes.len() as u64)
            .ok_or_else(|| {
                bad(format!(
                    "state.recent_changes holds {} versions before version {}",
                    self.recent_changes.len(),
                    self.network_version
                ))
            })?;
        if let Some(v) =
            (self.in_flight_versions.iter()).find(|&&v| v < oldest || v > self.network_version)
        {
            return Err(bad(format!(
                "state.in_flight_versions names version {v}, outside {oldest}..={}",
                self.network_version
            )));
        }
        if !self.in_flight_versions.is_sorted() {
            return Err(bad("state.in_flight_versions is not in order".into()));
        }
        if let Some(&(v, ..)) = self
            .recent_changes
            .iter()
            .flatten()
            .find(|c| c.0 as usize >= n)
        {
            return Err(bad(format!(
                "state.recent_changes names variable {v}, the network has {n}"
            )));
        }
        // Undone from the current network, the changes must give codes in range.
        let undo: Vec<(u32, i8)> = (self.recent_changes.iter().rev())
            .flat_map(|e| e.iter().rev().map(|&(v, old, _)| (v, old)))
            .collect();
        let redo: Vec<(u32, i8)> = (self.recent_changes.iter().flatten())
            .map(|&(v, _, new)| (v, new))
            .collect();
        let mut older = net.clone();
        older
            .apply_changes(&undo)
            .and_then(|()| older.apply_changes(&redo))
            .map_err(|e| bad(format!("state.recent_changes: {e}")))?;
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

/// 64-bit FNV-1a, for the network fingerprint: an identity, not a guard against damage
/// (the checkpoint body has its CRC32 for that).
struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

impl Write for Fnv1a64 {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The identity of a quantized network, as checkpoints compare it: FNV-1a of its binary
/// form ([`ccq_common::qnet::QNetwork::to_bytes`]), hashed as it is produced rather than
/// from a copy.
pub fn network_fingerprint(net: &ccq_common::qnet::QNetwork) -> String {
    let h = net
        .write_bytes(BufWriter::with_capacity(64 << 10, Fnv1a64::default()))
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .expect("hashing a network never fails");
    format!("{:016x}", h.0)
}

/// The header line of a body of `len` bytes with CRC32 `crc`. Fixed width, so that the
/// writer can reserve it, stream the body, and patch the real values in.
fn header(len: u64, crc: u32) -> String {
    format!("{MAGIC} {FORMAT_VERSION} {len:020} {crc:08x}\n")
}

/// A checkpoint's binary encoding, produced while it is written ([`write_atomic`]) so
/// that it never exists whole in memory.
pub struct Encoding<'a>(&'a Checkpoint);

impl Encoding<'_> {
    /// The whole file in memory: for tests and small checkpoints only. Same bytes as
    /// [`write_atomic`] writes.
    pub fn to_vec(&self) -> Vec<u8> {
        let body = postcard::to_stdvec(self.0).expect("a checkpoint always serialises");
        let mut out = header(body.len() as u64, crc32fast::hash(&body)).into_bytes();
        out.extend_from_slice(&body);
        out
    }
}

/// Counts and checksums what passes through to `inner`, and keeps the first I/O error
/// (the encoder reports a failed write only as "buffer full").
struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
    error: Option<std::io::Error>,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.inner.write(buf) {
            Ok(n) => {
                self.crc.update(&buf[..n]);
                self.len += n as u64;
                Ok(n)
            }
            Err(e) => {
                let kept = std::io::Error::new(e.kind(), e.to_string());
                self.error.get_or_insert(kept);
                Err(e)
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Checkpoint {
    /// The binary encoding, for [`write_atomic`] (or [`Encoding::to_vec`] in tests).
    pub fn encode(&self) -> Encoding<'_> {
        Encoding(self)
    }

    /// Parses a checkpoint file's bytes; `origin` names the file in errors.
    pub fn decode(bytes: &[u8], origin: &str) -> Result<Checkpoint, Error> {
        Checkpoint::read_from(std::io::Cursor::new(bytes), bytes.len() as u64, origin)
    }

    /// Reads `dir`'s checkpoint, streaming: the file is read twice (once for the CRC,
    /// once to decode), never held whole in memory.
    pub fn load(dir: &Path) -> Result<Checkpoint, Error> {
        let p = path(dir);
        let origin = p.display().to_string();
        let io = |e: std::io::Error| Error::Checkpoint {
            path: origin.clone(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "not found: nothing to resume (the run wrote no checkpoint yet, or DIR is not a run's output directory)".into()
            } else {
                e.to_string()
            },
        };
        let f = File::open(&p).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        Checkpoint::read_from(f, len, &origin)
    }

    /// Header, then length, then CRC, then the body: nothing of the body is parsed before
    /// the file is known whole and undamaged.
    fn read_from<R: Read + Seek>(
        mut r: R,
        file_len: u64,
        origin: &str,
    ) -> Result<Checkpoint, Error> {
        let bad = |reason: String| Error::Checkpoint {
            path: origin.to_string(),
            reason,
        };
        let io = |e: std::io::Error| bad(format!("read failed: {e}"));
        let mut head = Vec::with_capacity(MAX_HEADER);
        (&mut r)
            .take(MAX_HEADER as u64)
            .read_to_end(&mut head)
            .map_err(io)?;
        let nl = head
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("not a ccq checkpoint (no header line)".into()))?;
        let (len, crc) = parse_header(&head[..nl]).map_err(bad)?;
        let body_start = nl as u64 + 1;
        let actual_len = file_len.saturating_sub(body_start);
        if actual_len != len {
            return Err(bad(format!(
                "truncated or padded: the header promises {len} bytes, the file has {actual_len}"
            )));
        }
        // Pass 1: the CRC over the whole body.
        r.seek(SeekFrom::Start(body_start)).map_err(io)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; IO_BUFFER];
        let mut body = (&mut r).take(len);
        loop {
            let n = body.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        drop(buf);
        let actual = hasher.finalize();
        if actual != crc {
            return Err(bad(format!(
                "corrupted: checksum (CRC32) {actual:08x}, the header says {crc:08x}"
            )));
        }
        // Pass 2: decode, streaming.
        r.seek(SeekFrom::Start(body_start)).map_err(io)?;
        let reader = BufReader::with_capacity(IO_BUFFER, r.take(len));
        let mut scratch = vec![0u8; MAX_STRING];
        let (ck, (mut rest, _)): (Checkpoint, _) = postcard::from_io((reader, &mut scratch))
            .map_err(|e| bad(format!("unreadable body: {e}")))?;
        let mut probe = [0u8; 1];
        if rest.read(&mut probe).map_err(io)? != 0 {
            return Err(bad(
                "unreadable body: bytes after the checkpoint (written by another build?)".into(),
            ));
        }
        ck.config
            .validate()
            .map_err(|e| bad(format!("config: {e}")))?;
        Ok(ck)
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

/// Parses the header line into (body length, CRC32), refusing anything but this
/// build's format by name.
fn parse_header(line: &[u8]) -> Result<(u64, u32), String> {
    let header = std::str::from_utf8(line)
        .map_err(|_| "not a ccq checkpoint (header is not text)".to_string())?;
    let fields: Vec<&str> = header.split(' ').collect();
    if fields.len() != 4 || fields[0] != MAGIC {
        return Err(format!(
            "not a ccq checkpoint (header {header:?}, expected \"{MAGIC} <format> <length> <checksum>\")"
        ));
    }
    let format: u32 = fields[1]
        .parse()
        .map_err(|_| format!("unreadable format version {:?}", fields[1]))?;
    if format != FORMAT_VERSION {
        let what = if format == 1 {
            " (JSON, written by ccq before checkpoints became binary)"
        } else {
            ""
        };
        return Err(format!(
            "format version {format}{what}; this build reads version {FORMAT_VERSION} only: \
             finish that run with the build that wrote it, or start the run again"
        ));
    }
    let len: u64 = fields[2]
        .parse()
        .map_err(|_| format!("unreadable length {:?}", fields[2]))?;
    let crc = u32::from_str_radix(fields[3], 16)
        .ok()
        .filter(|_| fields[3].len() == 8)
        .ok_or_else(|| format!("unreadable checksum {:?}", fields[3]))?;
    Ok((len, crc))
}

/// Writes `body` as `dir`'s checkpoint: streamed through a buffer into a temporary file
/// (header reserved, then patched with the body's length and CRC32), fsync, rename, fsync
/// of the directory. Readers see the old checkpoint or the new one, whole.
pub fn write_atomic(dir: &Path, body: &Encoding<'_>) -> Result<(), Error> {
    let target = path(dir);
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    let io = |p: &Path, e: std::io::Error| Error::from(ccq_common::Error::io(p, e));
    let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    let placeholder = header(0, 0);
    f.write_all(placeholder.as_bytes())
        .map_err(|e| io(&tmp, e))?;
    let mut w = BufWriter::with_capacity(
        IO_BUFFER,
        CrcWriter {
            inner: f,
            crc: crc32fast::Hasher::new(),
            len: 0,
            error: None,
        },
    );
    let encoded = postcard::to_io(body.0, &mut w).map(|_| ());
    let flushed = w.flush();
    let crc_writer = w.into_inner().map_err(|e| io(&tmp, e.into_error()))?;
    if let Some(e) = crc_writer.error {
        return Err(io(&tmp, e));
    }
    flushed.map_err(|e| io(&tmp, e))?;
    encoded.map_err(|e| io(&tmp, std::io::Error::other(e)))?;
    let (mut f, len, crc) = (crc_writer.inner, crc_writer.len, crc_writer.crc.finalize());
    let head = header(len, crc);
    debug_assert_eq!(head.len(), placeholder.len(), "the header is fixed-width");
    f.seek(SeekFrom::Start(0)).map_err(|e| io(&tmp, e))?;
    f.write_all(head.as_bytes()).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
    // The rename itself is durable only once the directory is.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccq_common::model::Normalization;
    use ccq_common::qnet::QNetwork;
    use ccq_common::quant::{quantize, Calibration, QuantConfig, Rounding, WeightScale};
    use ccq_search::eda::EdaParams;
    use ccq_search::trainer::{Pending, Trainer};
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
            weight_scale: WeightScale::Max,
            rounding: Rounding::Nearest,
            bias_correction: false,
            first_last_bits: None,
            channel_scale_step: None,
            act_clip_step: None,
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
        for _ in 0..3 {
            let g = t.next_generation().unwrap().unwrap();
            let stats: Vec<_> = (0..g.candidates.len())
                .map(|i| ccq_common::qnet::EvalStats {
                    loss_fixed: 1000 + (i as u64 * 37) % 11,
                    correct: 3,
                    images: g.images.len() as u64,
                    paired_sq: 0,
                })
                .collect();
            t.complete(&g, &stats).unwrap();
        }
        // One generation in flight, sampled against the current network.
        t.next_generation().unwrap().unwrap();
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
            trainer: TrainerSnapshot {
                // A candidate awaiting confirmation travels with the trainer.
                pending: Some(Pending {
                    vars: vec![0, 1],
                    codes: t.network().codes()[..2].to_vec(),
                    layer: 0,
                }),
                ..t.snapshot()
            },
            state: LoopSnapshot {
                phase: Phase::Training,
                in_flight_versions: vec![2],
                recent_changes: vec![vec![(0, 0, 0)], vec![(1, 0, 0), (2, 0, 0)]],
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
        let bytes = ck.encode().to_vec();
        let back = Checkpoint::decode(&bytes, "ck").unwrap();
        assert_eq!(back.encode().to_vec(), bytes, "re-encoding changes nothing");
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

    /// Written atomically into the run directory, streamed to the same bytes as the
    /// in-memory encoding, read back whole, nothing left beside it; a second write
    /// replaces the first.
    #[test]
    fn write_atomic_then_load_gives_the_checkpoint_back() {
        let (ck, _) = sample();
        let dir = tempfile::tempdir().unwrap();
        let mut older = ck.clone();
        older.run_id = "an older run".into();
        write_atomic(dir.path(), &older.encode()).unwrap();
        write_atomic(dir.path(), &ck.encode()).unwrap();
        let on_disk = std::fs::read(path(dir.path())).unwrap();
        assert_eq!(
            on_disk,
            ck.encode().to_vec(),
            "streamed = in-memory encoding"
        );
        let back = Checkpoint::load(dir.path()).unwrap();
        assert_eq!(back.run_id, "r-seed1");
        assert_eq!(back.encode().to_vec(), on_disk);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME], "no temporary file is left");
        // The header is one readable line: format, body length, CRC32 of the body.
        let nl = on_disk.iter().position(|&b| b == b'\n').unwrap();
        let body = &on_disk[nl + 1..];
        assert_eq!(
            std::str::from_utf8(&on_disk[..nl]).unwrap(),
            format!(
                "ccq-checkpoint {FORMAT_VERSION} {:020} {:08x}",
                body.len(),
                crc32fast::hash(body)
            )
        );
        // Binary, not JSON: the trainer's codes travel as one byte each.
        assert!(
            body.len() < serde_json::to_vec(&ck).unwrap().len() / 2,
            "binary body {} bytes",
            body.len()
        );
    }

    /// A write that fails (here: the directory is gone) names the temporary file and
    /// leaves the previous checkpoint alone.
    #[test]
    fn a_failed_write_names_the_file() {
        let (ck, _) = sample();
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let e = write_atomic(&gone, &ck.encode()).unwrap_err().to_string();
        assert!(e.contains(".checkpoint.ccqck.tmp"), "{e}");
    }

    /// A file as this build writes it, around any body.
    fn file_with_body(body: &[u8]) -> Vec<u8> {
        let mut f = header(body.len() as u64, crc32fast::hash(body)).into_bytes();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let (ck, _) = sample();
        let bytes = ck.encode().to_vec();
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
        let next = FORMAT_VERSION + 1;
        let mut newer = format!("ccq-checkpoint {next}").into_bytes();
        newer.extend_from_slice(&bytes[format!("ccq-checkpoint {FORMAT_VERSION}").len()..]);
        let r = reason(Checkpoint::decode(&newer, "ck"));
        assert!(
            r.contains(&format!(
                "format version {next}; this build reads version {FORMAT_VERSION}"
            )),
            "{r}"
        );
        // A valid file whose body is not a checkpoint.
        let r = reason(Checkpoint::decode(&file_with_body(b"\x05hello"), "ck"));
        assert!(r.starts_with("unreadable body"), "{r}");
        // A checkpoint with something after it.
        let mut body = bytes[nl + 1..].to_vec();
        body.push(0);
        let r = reason(Checkpoint::decode(&file_with_body(&body), "ck"));
        assert!(r.contains("bytes after the checkpoint"), "{r}");
        // Four fields but another magic word: not ours, whatever follows.
        let mut other = b"ccq-checkpoinT".to_vec();
        other.extend_from_slice(&bytes[b"ccq-checkpoint".len()..]);
        let r = reason(Checkpoint::decode(&other, "ck"));
        assert!(r.starts_with("not a ccq checkpoint"), "{r}");
        // The right magic with a field missing.
        let r = reason(Checkpoint::decode(b"ccq-checkpoint 2 12\n{}", "ck"));
        assert!(r.starts_with("not a ccq checkpoint"), "{r}");
    }

    fn fnv(bytes: &[u8]) -> u64 {
        let mut h = Fnv1a64::default();
        h.update(bytes);
        h.0
    }

    /// FNV-1a as published (the fingerprint's hash): the empty input is the offset basis,
    /// "a" a known value.
    #[test]
    fn the_fingerprint_hash_is_fnv1a_64() {
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    /// A checkpoint of the first format (JSON body, FNV-1a checksum), as builds before
    /// binary checkpoints wrote it, is refused naming both versions and the file.
    #[test]
    fn a_json_checkpoint_of_format_1_is_refused_by_version() {
        let (ck, _) = sample();
        let body = serde_json::to_vec(&ck).unwrap();
        let mut v1 = format!("ccq-checkpoint 1 {} {:016x}\n", body.len(), fnv(&body)).into_bytes();
        v1.extend_from_slice(&body);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), &v1).unwrap();
        let e = Checkpoint::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&path(dir.path()).display().to_string())
                && e.contains("format version 1 (JSON")
                && e.contains(&format!("this build reads version {FORMAT_VERSION} only")),
            "{e}"
        );
    }

    /// Every truncation of a checkpoint, at every byte, is refused; so is every byte
    /// flip (a CRC32 catches all single-byte errors); none panics.
    #[test]
    fn every_truncation_and_every_flip_is_refused() {
        let (ck, _) = sample();
        let bytes = ck.encode().to_vec();
        for cut in 0..bytes.len() {
            let r = reason(Checkpoint::decode(&bytes[..cut], "cut"));
            assert!(
                r.starts_with("truncated") || r.starts_with("not a ccq checkpoint"),
                "cut at {cut}: {r}"
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let mut b = bytes.clone();
            let i = rng.random_range(0..b.len());
            b[i] ^= rng.random_range(1..=255u8);
            // Refused whatever the byte: header damage by name, body damage by CRC.
            let _ = reason(Checkpoint::decode(&b, "flip"));
        }
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
    /// a recomputed CRC (which reaches the decoder and the invariant checks) — decoding
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
        ck.state.check(&net, "ck").unwrap();
        let n = net.num_vars();
        let refused = |f: &dyn Fn(&mut LoopSnapshot)| {
            let mut s = ck.state.clone();
            f(&mut s);
            reason(s.check(&net, "ck").map(|_| ck.clone()))
        };
        let r = refused(&|s| s.best.as_mut().unwrap().0.pop().map(|_| ()).unwrap());
        assert!(
            r.contains(&format!(
                "state.best holds {} codes, the network has {n}",
                n - 1
            )),
            "{r}"
        );
        let r = refused(&|s| s.best.as_mut().unwrap().0[0] = 100);
        assert!(r.starts_with("state.best: "), "a code out of range: {r}");
        let r = refused(&|s| {
            s.pending_evals.push(PendingEval {
                point: s.history[0].clone(),
                is_final: false,
                codes: vec![0; n + 1],
            })
        });
        assert!(
            r.contains("state.pending_evals (generation 3) holds"),
            "{r}"
        );
        let codes = net.codes();
        for (what, f, expect) in [
            (
                "a version after the network's",
                (&|s: &mut LoopSnapshot| s.in_flight_versions[0] = 3) as &dyn Fn(&mut LoopSnapshot),
                "state.in_flight_versions names version 3, outside 0..=2",
            ),
            (
                "a version older than the changes reach",
                &|s| s.recent_changes.pop().map(|_| ()).unwrap(),
                "state.in_flight_versions names version 0, outside 1..=2",
            ),
            (
                "more changes than versions",
                &|s| s.recent_changes.extend([vec![], vec![]]),
                "state.recent_changes holds 4 versions before version 2",
            ),
            (
                "versions out of order",
                &|s| s.in_flight_versions = vec![2, 1],
                "state.in_flight_versions is not in order",
            ),
            (
                "a variable past the network",
                &|s| s.recent_changes[1][0].0 = n as u32,
                "state.recent_changes names variable",
            ),
            (
                "a code out of range",
                &|s| s.recent_changes[1][0].1 = 100,
                "state.recent_changes: ",
            ),
        ] {
            let r = refused(&|s| {
                s.in_flight_versions = vec![0];
                for e in s.recent_changes.iter_mut().flatten() {
                    (e.1, e.2) = (codes[e.0 as usize], codes[e.0 as usize]);
                }
                f(s)
            });
            assert!(r.contains(expect), "{what}: {r}");
        }
        let r = refused(&|s| s.phase = Phase::Done);
        assert!(r.contains("is finished"), "{r}");
        // Versions at both ends of what the changes reach are fine.
        let mut edges = ck.state.clone();
        edges.in_flight_versions = vec![0, 2];
        edges.check(&net, "ck").unwrap();
        // Nothing about generations in flight, evals or best is required.
        let mut bare = ck.state.clone();
        bare.best = None;
        (bare.in_flight_versions, bare.recent_changes) = (Vec::new(), Vec::new());
        bare.check(&net, "ck").unwrap();
    }

    #[test]
    fn random_and_mutated_checkpoints_never_panic() {
        let (ck, net) = sample();
        let bytes = ck.encode().to_vec();
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
                    // Change a few body bytes to small values (counts, codes, varint
                    // ends) and fix the header up.
                    let mut b = body.to_vec();
                    for _ in 0..rng.random_range(1..4) {
                        let i = rng.random_range(0..b.len());
                        b[i] = rng.random_range(0..4);
                    }
                    file_with_body(&b)
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
