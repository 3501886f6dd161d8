//! The run configuration (`coordinator run --config FILE.toml`): what to train, on what
//! data, with which search settings and budget. Every field has a default except the
//! model and the data; unknown fields are errors, so a typo never silently does nothing.
//! Relative paths are taken relative to the current directory.

use std::path::{Path, PathBuf};

use ccq_common::data::DataSource;
use ccq_common::model::Normalization;
use ccq_common::quant::{Calibration, QuantConfig, Rounding, WeightScale};
use ccq_search::config::SearchConfig;
use ccq_search::eda::EdaParams;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A training run: the model and data, how they are quantized, how the search runs and
/// when it stops. Top-level fields first, then one table per section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seeds every random choice of the run (batches, candidates).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Output directory: `model.ccq`, `report.json`, `report.html`, the checkpoint.
    #[serde(default = "default_out")]
    pub out: PathBuf,
    /// The pretrained float network (required).
    pub model: ModelConfig,
    /// The training and test data (required).
    pub data: DataConfig,
    /// Post-training quantization: the starting point of the search.
    #[serde(default)]
    pub quant: QuantSection,
    /// The estimation-of-distribution algorithm and its groups.
    #[serde(default)]
    pub eda: EdaParams,
    /// The search strategy, generations per group, batch and fitness.
    #[serde(default)]
    pub search: SearchConfig,
    /// When the run stops.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// Validation and test measurements during the run.
    #[serde(default)]
    pub eval: EvalSchedule,
    /// Networking: listen address, shards, heartbeats, leases, TLS, metrics.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// When the run's state is written to disk for `--resume`.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

/// When the coordinator writes `OUT/checkpoint.ccqck` (always also on SIGTERM/SIGINT).
/// Checkpoints never change results. Each holds a copy of the codes (a byte per variable)
/// while it is written; the EDA model is shared with the search, copy on write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Every N generations (0 = not by generation count).
    pub every_generations: u64,
    /// At the first generation boundary after this many seconds (0 = not by time).
    pub every_secs: f64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_generations: 0,
            every_secs: 60.0,
        }
    }
}

/// The pretrained float network and the input normalisation it was trained with (folded
/// into the integer network's input lookup table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The pretrained float network, an ONNX file (opsets 9-17).
    pub onnx: PathBuf,
    /// Per-channel mean of pixel/255 the model was trained with (one value per input
    /// channel).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of pixel/255 the model was trained with.
    pub std: Vec<f32>,
}

/// Where the images come from, and how the training split is divided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `cifar10:DIR` (CIFAR-10 binary batches), `mnist:DIR` (IDX files, raw or .gz),
    /// `folder:DIR[?resize=N&crop=N&channels=rgb|bgr|gray]` (JPEG/PNG, one directory per
    /// class) or `npy:DIR[?layout=nhwc|nchw]` (x_train.npy, y_train.npy, ...): see
    /// [DATA.md](DATA.md). Workers read the same path on their machines.
    pub source: String,
    /// Images at the end of the training split held out for validation (model
    /// selection); batches are drawn from the rest.
    #[serde(default = "default_validation")]
    pub validation: usize,
    /// Evaluate on only the first N test images (reporting only).
    #[serde(default)]
    pub test_limit: Option<usize>,
}

/// Post-training quantization of the float model: the network the search starts from.
/// Weights are symmetric per output channel, activations u8 per tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct QuantSection {
    /// Bits per weight code (2 to 8).
    pub weight_bits: u8,
    /// Bits per activation (2 to 8).
    pub act_bits: u8,
    /// Training images the activation ranges are calibrated on.
    pub calib_images: usize,
    /// How activation ranges are calibrated: `max`, `mse` (clipped where the expected
    /// squared quantization error is least, for the activation bit width) or
    /// `percentile:P` (e.g. `percentile:99.99`).
    pub calibration: String,
    /// How each output channel's weight scale is chosen: `max` (its largest magnitude is
    /// the largest code, nothing clipped) or `mse` (the scale with the least squared
    /// rounding and clipping error of the channel's weights; clips a few large weights at
    /// 2-3 bits).
    pub weight_scale: String,
    /// How weights are rounded to codes at those scales: `gptq` (error feedback: layer by
    /// layer, each rounding error compensated by the weights not yet rounded, so that the
    /// layer's output on the calibration images stays close to the float layer's; the
    /// default, the better start at every precision measured) or `nearest` (each weight
    /// on its own; faster to set up). The search starts from, and stays near, these
    /// codes.
    pub rounding: String,
    /// Correct the integer biases after rounding so that each layer's mean
    /// pre-activation matches the float model's on the calibration images.
    pub bias_correction: bool,
    /// Weight bits of the first weight layer and of the logits layer (e.g. 8), when they
    /// should differ from `weight_bits`: mixed precision as commonly practised. Unset:
    /// every layer has `weight_bits`.
    pub first_last_bits: Option<u8>,
    /// Search a weight-scale multiplier per output channel of every hidden layer (not the
    /// logits layer) besides the codes: channel scale times `1 + k * channel_scale_step`
    /// for an integer `k` from -7 to 7 that starts at 0 and is searched like a code (at
    /// most `eda.radius` from 0, further only over restarts). In (0, 0.5], e.g. 0.0625.
    /// Unset: scales stay as quantized.
    pub channel_scale_step: Option<f64>,
    /// Search a clipping level for every activation whose readers can follow a new scale
    /// (written by a hidden layer or a residual add, read by hidden layers or adds):
    /// its scale times `1 + k * act_clip_step`, `k` from -7 to 7, starting at 0, searched
    /// like a code. In (0, 0.5], e.g. 0.0625. Unset: activation scales stay as calibrated.
    pub act_clip_step: Option<f64>,
}

impl Default for QuantSection {
    fn default() -> Self {
        QuantSection {
            weight_bits: 4,
            act_bits: 8,
            calib_images: 512,
            calibration: "max".into(),
            weight_scale: "max".into(),
            rounding: "gptq".into(),
            bias_correction: false,
            first_last_bits: None,
            channel_scale_step: None,
            act_clip_step: None,
        }
    }
}

/// When the run stops: at the first limit reached. At least one must be set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Candidate evaluations (one candidate on one batch).
    pub evaluations: Option<u64>,
    /// Wall-clock seconds of search (not deterministic: prefer `evaluations`).
    pub wall_seconds: Option<f64>,
    /// Complete passes over the free variables.
    pub cycles: Option<u64>,
    /// Stop once validation top-1 (percent) reaches this.
    pub target_val_top1: Option<f64>,
}

/// Validation and test measurements of the current network during the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSchedule {
    /// Validation and test accuracy of the global network every N generations (and at
    /// the end). Scheduled by generation, not time, so runs stay reproducible. The
    /// workers measure, in blocks between training jobs; the coordinator adds the sums.
    pub every_generations: u64,
    /// Threads of the coordinator's own evaluations at setup: the float model's test
    /// accuracy and, with `search.fitness = "distill"`, the teacher's logits (0 = all
    /// cores).
    pub threads: usize,
}

impl Default for EvalSchedule {
    fn default() -> Self {
        EvalSchedule {
            every_generations: 100,
            threads: 0,
        }
    }
}

/// The coordinator's endpoint and how it treats its workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// gRPC listen address. Beyond loopback it needs a cluster token or `--insecure`.
    pub listen: String,
    /// Shards of the training data (default: the number of local workers, else 1).
    pub shards: Option<usize>,
    /// How often workers send a heartbeat, in milliseconds; a worker silent for three
    /// heartbeats is dropped and its job requeued.
    pub heartbeat_ms: u64,
    /// A job not answered within this many seconds goes to another worker.
    pub job_timeout_secs: f64,
    /// Whether `coordinator status` works without the cluster token (read-only).
    pub public_status: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless set).
    pub metrics_listen: Option<String>,
    /// TLS for the gRPC endpoint: the server's certificate chain and private key (PEM).
    /// Workers then connect to https://... with `--tls-ca`.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that local workers (`--local-workers`) trust.
    pub tls_ca: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: crate::DEFAULT_LISTEN.into(),
            shards: None,
            heartbeat_ms: 1000,
            job_timeout_secs: 120.0,
            public_status: true,
            metrics_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        }
    }
}

fn default_seed() -> u64 {
    1
}
fn default_out() -> PathBuf {
    PathBuf::from("runs/latest")
}
fn default_validation() -> usize {
    5000
}

impl RunConfig {
    pub fn load(path: &Path) -> Result<RunConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| ccq_common::Error::io(path, e))?;
        let in_file = |reason: String| Error::Config {
            path: path.display().to_string(),
            reason,
        };
        let cfg: RunConfig = toml::from_str(&text).map_err(|e| in_file(e.to_string()))?;
        // An impossible value names the file it came from, not only the field.
        cfg.validate().map_err(|e| in_file(e.to_string()))?;
        Ok(cfg)
    }

    /// Checks everything that can be checked without reading the model or data.
    pub fn validate(&self) -> Result<(), Error> {
        self.data_source()?;
        self.quant_config()?;
        self.eda.validate()?;
        let bad = |field: &str, value: String, reason: &str| -> Result<(), Error> {
            Err(ccq_common::Error::setting(field, value, reason).into())
        };
        if self.model.mean.len() != self.model.std.len() || self.model.mean.is_empty() {
            return bad(
                "model.mean/std",
                format!("{}/{}", self.model.mean.len(), self.model.std.len()),
                "need one value per input channel each",
            );
        }
        self.search.validate()?;
        if self.search.local_evaluations > 0 && self.quant.act_clip_step.is_some() {
            // A clip rescales its readers, which may lie past the block that scores it.
            return bad(
                "search.local_evaluations",
                self.search.local_evaluations.to_string(),
                "cannot go with quant.act_clip_step (a block cannot score an activation clip)",
            );
        }
        if self.eval.every_generations == 0 {
            return bad("eval.every_generations", "0".into(), "must be at least 1");
        }
        let b = &self.budget;
        if b.evaluations.is_none()
            && b.wall_seconds.is_none()
            && b.cycles.is_none()
            && b.target_val_top1.is_none()
        {
            return bad(
                "budget",
                "{}".into(),
                "set at least one of evaluations, wall_seconds, cycles, target_val_top1",
            );
        }
        let secs = self.checkpoint.every_secs;
        if secs.is_nan() || secs < 0.0 {
            return bad(
                "checkpoint.every_secs",
                secs.to_string(),
                "must be >= 0 (0 = not by time)",
            );
        }
        let c = &self.cluster;
        if c.tls_cert.is_some() != c.tls_key.is_some() {
            return bad(
                "cluster.tls_cert/tls_key",
                format!("{:?}/{:?}", c.tls_cert, c.tls_key),
                "give both or neither",
            );
        }
        if c.tls_ca.is_some() && c.tls_cert.is_none() {
            return bad(
                "cluster.tls_ca",
                format!("{:?}", c.tls_ca),
                "is for local workers of a TLS coordinator: set tls_cert and tls_key too",
            );
        }
        if self.cluster.shards == Some(0) {
            return bad("cluster.shards", "0".into(), "must be at least 1");
        }
        let timeout = self.cluster.job_timeout_secs;
        if timeout.is_nan() || timeout <= 0.0 || self.cluster.heartbeat_ms == 0 {
            return bad(
                "cluster",
                format!(
                    "{}s/{}ms",
                    self.cluster.job_timeout_secs, self.cluster.heartbeat_ms
                ),
                "job_timeout_secs and heartbeat_ms must be > 0",
            );
        }
        Ok(())
    }

    pub fn data_source(&self) -> Result<DataSource, Error> {
        Ok(self.data.source.parse()?)
    }

    pub fn quant_config(&self) -> Result<QuantConfig, Error> {
        let q = QuantConfig {
            weight_bits: self.quant.weight_bits,
            act_bits: self.quant.act_bits,
            calibration: self
                .quant
                .calibration
                .parse::<Calibration>()
                .map_err(in_quant_section)?,
            weight_scale: self
                .quant
                .weight_scale
                .parse::<WeightScale>()
                .map_err(in_quant_section)?,
            rounding: self
                .quant
                .rounding
                .parse::<Rounding>()
                .map_err(in_quant_section)?,
            bias_correction: self.quant.bias_correction,
            first_last_bits: self.quant.first_last_bits,
            channel_scale_step: self.quant.channel_scale_step,
            act_clip_step: self.quant.act_clip_step,
        };
        q.validate().map_err(in_quant_section)?;
        Ok(q)
    }

    pub fn normalization(&self) -> Normalization {
        Normalization {
            mean: self.model.mean.clone(),
            std: self.model.std.clone(),
        }
    }
}

/// ccq-common names quantization settings as `coordinator eval`'s flags do
/// (`weight_bits`); in a config file they live in `[quant]`, and the message must say so.
fn in_quant_section(e: ccq_common::Error) -> Error {
    match e {
        ccq_common::Error::InvalidSetting {
            field,
            value,
            reason,
        } => ccq_common::Error::InvalidSetting {
            field: format!("quant.{field}"),
            value,
            reason,
        }
        .into(),
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccq_search::config::Strategy;

    const VALID: &str = "[model]\nonnx = \"m.onnx\"\nmean = [0.1]\nstd = [0.3]\n\
                         [data]\nsource = \"mnist:d\"\n[quant]\nweight_bits = 4\n\
                         [budget]\nevaluations = 10\n";

    fn load(text: &str) -> Result<RunConfig, Error> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        RunConfig::load(&path).inspect_err(|e| {
            // Every refusal names the file.
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        })
    }

    #[test]
    fn rounding_is_gptq_unless_asked_for_and_unknown_names_are_refused_in_the_quant_section() {
        let plain = load(VALID).unwrap().quant_config().unwrap();
        assert_eq!(plain.rounding, Rounding::Gptq);
        let nearest =
            load(&VALID.replace("weight_bits = 4", "weight_bits = 2\nrounding = \"nearest\""))
                .unwrap()
                .quant_config()
                .unwrap();
        assert_eq!(nearest.rounding, Rounding::Nearest);
        let e = load(&VALID.replace("weight_bits = 4", "rounding = \"stochastic\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("quant") && e.contains("rounding") && e.contains("stochastic"),
            "{e}"
        );
    }

    #[test]
    fn bias_correction_is_off_unless_asked_for() {
        let plain = load(VALID).unwrap().quant_config().unwrap();
        assert!(!plain.bias_correction);
        let on = load(&VALID.replace("weight_bits = 4", "weight_bits = 3\nbias_correction = true"))
            .unwrap()
            .quant_config()
            .unwrap();
        assert!(on.bias_correction);
        assert_eq!(on.weight_bits, 3);
        let e = load(&VALID.replace("weight_bits = 4", "bias_correction = \"yes\"")).unwrap_err();
        assert!(e.to_string().contains("bias_correction"), "{e}");
    }

    #[test]
    fn impossible_values_name_the_file_and_the_config_field() {
        assert!(load(VALID).is_ok());
        for (from, to, says) in [
            (
                "weight_bits = 4",
                "weight_bits = 0",
                "quant.weight_bits = 0",
            ),
            (
                "weight_bits = 4",
                "weight_bits = 9",
                "quant.weight_bits = 9",
            ),
            (
                "weight_bits = 4",
                "act_bits = 1",
                "quant.act_bits = 1: must be 2..=8",
            ),
            (
                "weight_bits = 4",
                "calibration = \"mean\"",
                "quant.calibration = mean",
            ),
            (
                "weight_bits = 4",
                "weight_scale = \"minmax\"",
                "quant.weight_scale = minmax: expected 'max' or 'mse'",
            ),
            (
                "[budget]",
                "[eda]\npopulation = 1\n[budget]",
                "eda.population = 1",
            ),
            (
                "[budget]",
                "[eda]\ngroup_size = 0\n[budget]",
                "eda.group_size = 0",
            ),
            (
                "[budget]",
                "[search]\nhill_flips = 0\n[budget]",
                "search.hill_flips = 0",
            ),
            (
                "[budget]",
                "[search]\nstrategy = \"cc\"\n[budget]",
                "unknown variant `cc`",
            ),
            (
                "weight_bits = 4",
                "weight_bits = 4\nact_clip_step = 0.0625\n[search]\nlocal_evaluations = 100",
                "search.local_evaluations = 100: cannot go with quant.act_clip_step",
            ),
            (
                "[budget]",
                "[search]\nlocal_evaluations = 100\nstrategy = \"eda\"\n[budget]",
                "search.local_evaluations = 100: needs a strategy whose groups stay in one layer",
            ),
        ] {
            let err = load(&VALID.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(says), "{to}: {err}");
        }
    }

    #[test]
    fn strategies_parse_by_their_documented_names_and_default_to_eda_cc() {
        assert_eq!(load(VALID).unwrap().search.strategy, Strategy::EdaCc);
        for s in Strategy::ALL {
            let text = VALID.replace(
                "[budget]",
                &format!("[search]\nstrategy = \"{}\"\n[budget]", s.name()),
            );
            assert_eq!(load(&text).unwrap().search.strategy, s);
        }
    }

    #[test]
    fn unknown_fields_and_wrong_types_name_the_field() {
        let err = load(&VALID.replace("weight_bits = 4", "weight_bit = 4")).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `weight_bit`"),
            "{err}"
        );
        let err = load(&VALID.replace("weight_bits = 4", "weight_bits = \"4\"")).unwrap_err();
        assert!(err.to_string().contains("weight_bits"), "{err}");
    }

    #[test]
    fn every_committed_example_config_is_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut checked = 0;
        for dir in ["examples", "examples/experiments"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") {
                    RunConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                    checked += 1;
                }
            }
        }
        assert!(checked > 10, "only {checked} example configs found");
    }
}
