//! `coordinator eval`: measure a network's accuracy on a dataset split, either the float
//! reference (an ONNX model as is), the post-training-quantized integer network (an ONNX
//! model plus bit widths), or a trained integer network (`.ccq`, or a quantized ONNX file
//! from `coordinator export`).

use std::path::PathBuf;
use std::time::Instant;

use ccq_common::data::{self, DataSource, Dataset, Split};
use ccq_common::model::{Graph, Normalization};
use ccq_common::qnet::{cross_entropy, EvalStats, QNetwork};
use ccq_common::quant::{self, Calibration, QuantConfig, Rounding, WeightScale};
use ccq_common::{float, onnx};
use serde::Serialize;

use crate::Error;

/// What to evaluate and how; built from the CLI by `main`.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub model: PathBuf,
    pub data: DataSource,
    pub split: Split,
    pub normalization: Option<Normalization>,
    /// Quantize to these bits (ONNX input only); `None` evaluates the float model.
    pub quant: Option<QuantConfig>,
    pub calib_images: usize,
    pub threads: usize,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub split: String,
    /// `float` or e.g. `w4a8`.
    pub precision: String,
    /// Test top-1, percent.
    pub top1: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    pub images: u64,
    pub correct: u64,
    /// Inference only: excludes loading, calibration and quantization.
    pub images_per_sec: f64,
    pub threads: usize,
    pub calib_images: Option<usize>,
    /// Whether the biases were corrected after quantization (`None`: not quantized here).
    pub bias_correction: Option<bool>,
    /// How the weights were rounded to codes, `nearest` or `gptq` (`None`: not quantized
    /// here).
    pub rounding: Option<String>,
    pub load_seconds: f64,
    pub inference_seconds: f64,
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "model      {}", self.model)?;
        writeln!(
            f,
            "data       {} ({} split, {} images)",
            self.data, self.split, self.images
        )?;
        let how: Vec<&str> = [
            (self.rounding.as_deref() == Some("gptq")).then_some("GPTQ rounding"),
            (self.bias_correction == Some(true)).then_some("bias-corrected"),
        ]
        .into_iter()
        .flatten()
        .collect();
        match how.is_empty() {
            true => writeln!(f, "precision  {}", self.precision)?,
            false => writeln!(f, "precision  {} ({})", self.precision, how.join(", "))?,
        }
        writeln!(
            f,
            "top-1      {:.2} % ({} correct)",
            self.top1, self.correct
        )?;
        writeln!(f, "loss       {:.4} (mean cross-entropy)", self.loss)?;
        write!(
            f,
            "speed      {:.0} images/s on {} thread(s) ({:.2} s inference, {:.2} s loading/quantizing)",
            self.images_per_sec, self.threads, self.inference_seconds, self.load_seconds
        )
    }
}

/// Images evaluated per forward call and thread.
const BATCH: usize = 256;

pub fn run(cfg: &EvalConfig) -> Result<EvalReport, Error> {
    let start = Instant::now();
    let total = data::split_len(&cfg.data, cfg.split)?;
    let n = cfg.limit.map_or(total, |l| l.min(total));
    let dataset = data::load(&cfg.data, cfg.split, Some(0..n))?;
    let is_ccq = cfg.model.extension().is_some_and(|e| e == "ccq");
    // A trained .ccq network, or a quantized ONNX file written by `coordinator export`.
    let integer_net = if is_ccq {
        Some(QNetwork::load(&cfg.model)?)
    } else {
        onnx::load_quantized(&cfg.model, cfg.normalization.as_ref())?
    };

    let (precision, stats, calib, load_seconds, inference_seconds) = if let Some(net) = integer_net
    {
        if cfg.quant.is_some() {
            return Err(Error::Usage(
                "--weight-bits/--act-bits apply to float ONNX models; this network is already quantized".into(),
            ));
        }
        check_normalization(&net, cfg.normalization.as_ref())?;
        check_shape(
            net.input_value.c,
            net.input_value.h,
            net.input_value.w,
            &dataset,
        )?;
        data::check_classes(&cfg.data, cfg.split, net.num_classes)?;
        let load = start.elapsed().as_secs_f64();
        let t = Instant::now();
        let s = net.evaluate(&dataset.images, &dataset.labels, BATCH, cfg.threads);
        (net.precision(), s, None, load, t.elapsed().as_secs_f64())
    } else {
        let graph = onnx::load_onnx(&cfg.model)?;
        let s = graph.input_shape;
        check_shape(s.c, s.h, s.w, &dataset)?;
        data::check_classes(&cfg.data, cfg.split, graph.num_classes())?;
        let norm = cfg
            .normalization
            .clone()
            .unwrap_or_else(|| Normalization::identity(s.c));
        if norm.mean.len() != s.c || norm.std.len() != s.c {
            return Err(Error::Usage(format!(
                "--mean/--std need {} values (the model's input channels), got {} and {}",
                s.c,
                norm.mean.len(),
                norm.std.len()
            )));
        }
        match &cfg.quant {
            None => {
                let load = start.elapsed().as_secs_f64();
                let t = Instant::now();
                let stats = float_evaluate(&graph, &norm, &dataset, cfg.threads);
                (
                    "float".to_string(),
                    stats,
                    None,
                    load,
                    t.elapsed().as_secs_f64(),
                )
            }
            Some(q) => {
                let net = quantize_from_train(&graph, &norm, &cfg.data, q, cfg.calib_images)?;
                let load = start.elapsed().as_secs_f64();
                let t = Instant::now();
                let stats = net.evaluate(&dataset.images, &dataset.labels, BATCH, cfg.threads);
                (
                    net.precision(),
                    stats,
                    Some(cfg.calib_images),
                    load,
                    t.elapsed().as_secs_f64(),
                )
            }
        }
    };
    Ok(EvalReport {
        model: cfg.model.display().to_string(),
        data: cfg.data.to_string(),
        split: cfg.split.to_string(),
        precision,
        top1: stats.top1(),
        loss: stats.mean_loss(),
        images: stats.images,
        correct: stats.correct,
        images_per_sec: stats.images as f64 / inference_seconds.max(1e-9),
        threads: cfg.threads,
        calib_images: calib,
        bias_correction: calib.and(cfg.quant.as_ref().map(|q| q.bias_correction)),
        rounding: calib.and(cfg.quant.as_ref().map(|q| match q.rounding {
            Rounding::Nearest => "nearest".to_string(),
            Rounding::Gptq => "gptq".to_string(),
        })),
        load_seconds,
        inference_seconds,
    })
}

/// Post-training quantization calibrated on the first `calib_images` training images.
pub fn quantize_from_train(
    graph: &Graph,
    norm: &Normalization,
    source: &DataSource,
    q: &QuantConfig,
    calib_images: usize,
) -> Result<QNetwork, Error> {
    let total = data::split_len(source, Split::Train)?;
    let n = calib_images.clamp(1, total.max(1));
    let calib = data::load(source, Split::Train, Some(0..n))?;
    Ok(quant::quantize(graph, norm, &calib.images, calib.len(), q)?)
}

fn check_shape(c: usize, h: usize, w: usize, d: &Dataset) -> Result<(), Error> {
    if (c, h, w) != (d.channels, d.height, d.width) {
        return Err(ccq_common::Error::ShapeMismatch {
            expected: format!("[{c}, {h}, {w}]"),
            found: format!("[{}, {}, {}]", d.channels, d.height, d.width),
        }
        .into());
    }
    Ok(())
}

fn check_normalization(net: &QNetwork, given: Option<&Normalization>) -> Result<(), Error> {
    if let Some(n) = given {
        let same = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
        };
        if !same(&n.mean, &net.input.mean) || !same(&n.std, &net.input.std) {
            return Err(Error::Usage(format!(
                "--mean/--std differ from the ones this network was quantized with (mean {:?}, std {:?})",
                net.input.mean, net.input.std
            )));
        }
    }
    Ok(())
}

/// Float reference accuracy, batches split across threads.
pub fn float_evaluate(
    graph: &Graph,
    norm: &Normalization,
    d: &Dataset,
    threads: usize,
) -> EvalStats {
    let classes = graph.num_classes();
    let logits = float_logits(graph, norm, d, threads);
    let mut total = EvalStats::default();
    for (row, &label) in logits.chunks_exact(classes).zip(&d.labels) {
        let real: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        let (loss, ok) = cross_entropy(&real, label);
        total.loss_fixed += loss;
        total.correct += ok as u64;
        total.images += 1;
    }
    total
}

/// The float model's logits on every image of `d`, image by image (`classes` each),
/// batches split across threads. Each image's logits depend only on the image, not on
/// the batch or the split.
pub fn float_logits(graph: &Graph, norm: &Normalization, d: &Dataset, threads: usize) -> Vec<f32> {
    let n = d.len();
    let il = d.image_len();
    let classes = graph.num_classes();
    let per = n.div_ceil(threads.max(1)).max(1);
    let mut out = Vec::with_capacity(n * classes);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n.div_ceil(per))
            .map(|t| {
                let (lo, hi) = (t * per, ((t + 1) * per).min(n));
                scope.spawn(move || {
                    let mut part = Vec::with_capacity((hi - lo) * classes);
                    let mut i = lo;
                    while i < hi {
                        let m = 64.min(hi - i);
                        let x = quant::normalize(
                            norm,
                            graph.input_shape,
                            &d.images[i * il..(i + m) * il],
                            m,
                        );
                        part.extend(float::forward(graph, &x, m));
                        i += m;
                    }
                    part
                })
            })
            .collect();
        for h in handles {
            out.extend(h.join().expect("float evaluation thread panicked"));
        }
    });
    out
}

/// The `--mean`/`--std` pair of `eval` and `export`: both or neither.
pub fn normalization_flags(
    mean: &Option<Vec<f32>>,
    std: &Option<Vec<f32>>,
) -> Result<Option<Normalization>, Error> {
    match (mean, std) {
        (None, None) => Ok(None),
        (Some(m), Some(s)) => Ok(Some(Normalization {
            mean: m.clone(),
            std: s.clone(),
        })),
        _ => Err(Error::Usage("--mean and --std go together".into())),
    }
}

/// The post-training quantization flags of `eval` and `export`. A float model is
/// quantized (these settings validated) only when `--weight-bits` is given.
#[derive(Debug, Clone, clap::Args)]
pub struct QuantArgs {
    /// Quantize a float model's weights to this many bits (2-8): the integer network.
    #[arg(long)]
    pub weight_bits: Option<u8>,
    /// Activation bits (2-8) of the integer network.
    #[arg(long, default_value_t = 8)]
    pub act_bits: u8,
    /// Training images used to calibrate activation ranges.
    #[arg(long, default_value_t = 512)]
    pub calib_images: usize,
    /// `max`, `mse` (least squared quantization error) or `percentile:P` (e.g.
    /// percentile:99.99).
    #[arg(long, default_value = "max")]
    pub calibration: String,
    /// How each output channel's weight scale is chosen: `max` (largest magnitude, nothing
    /// clipped) or `mse` (least squared rounding and clipping error).
    #[arg(long, default_value = "max")]
    pub weight_scale: String,
    /// How weights are rounded to codes: `gptq` (error feedback that keeps each layer's
    /// output on the calibration images close to the float layer's; the default, as in
    /// a run config) or `nearest`.
    #[arg(long, default_value = "gptq")]
    pub rounding: String,
    /// Correct the integer biases so that each layer's mean pre-activation matches the
    /// float model's on the calibration images.
    #[arg(long)]
    pub bias_correction: bool,
    /// Weight bits (2-8) of the first weight layer and the logits layer, when they should
    /// differ from --weight-bits (e.g. 8: mixed precision as commonly practised).
    #[arg(long)]
    pub first_last_bits: Option<u8>,
}

impl QuantArgs {
    /// The validated quantization settings, or `None` without `--weight-bits`.
    pub fn config(&self) -> Result<Option<QuantConfig>, Error> {
        let Some(weight_bits) = self.weight_bits else {
            if self.first_last_bits.is_some() {
                return Err(Error::Usage(
                    "--first-last-bits needs --weight-bits (it changes how a model is quantized)"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let q = QuantConfig {
            weight_bits,
            act_bits: self.act_bits,
            calibration: self.calibration.parse::<Calibration>()?,
            weight_scale: self.weight_scale.parse::<WeightScale>()?,
            rounding: self.rounding.parse::<Rounding>()?,
            bias_correction: self.bias_correction,
            first_last_bits: self.first_last_bits,
            channel_scale_step: None,
            act_clip_step: None,
        };
        q.validate()?;
        Ok(Some(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quant_args(flags: &[&str]) -> Result<Option<QuantConfig>, Error> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            quant: QuantArgs,
        }
        let argv = std::iter::once("eval").chain(flags.iter().copied());
        Cli::try_parse_from(argv).unwrap().quant.config()
    }

    #[test]
    fn quantization_flags_build_validated_settings_or_name_the_bad_one() {
        assert_eq!(quant_args(&[]).unwrap(), None, "a float model stays float");
        let q = quant_args(&["--weight-bits", "3", "--weight-scale", "mse"])
            .unwrap()
            .unwrap();
        assert_eq!((q.weight_bits, q.act_bits), (3, 8));
        assert_eq!(q.weight_scale, WeightScale::Mse);
        assert_eq!(q.calibration, Calibration::Max);
        for (flags, says) in [
            (
                &["--weight-bits", "3", "--weight-scale", "minmax"][..],
                "weight_scale = minmax",
            ),
            (
                &["--weight-bits", "3", "--calibration", "mean"],
                "calibration = mean",
            ),
            (&["--weight-bits", "9"], "weight_bits = 9"),
            (
                &["--first-last-bits", "8"],
                "--first-last-bits needs --weight-bits",
            ),
        ] {
            let err = quant_args(flags).unwrap_err().to_string();
            assert!(err.contains(says), "{flags:?}: {err}");
        }
    }

    fn mnist(bias_correction: bool) -> EvalConfig {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        EvalConfig {
            model: repo.join("examples/mnist/mnist-cnn.onnx"),
            data: format!("mnist:{}", repo.join("examples/data/mnist-10k").display())
                .parse()
                .unwrap(),
            split: Split::Test,
            normalization: normalization_flags(&Some(vec![0.1307]), &Some(vec![0.3081])).unwrap(),
            quant: Some(QuantConfig {
                weight_bits: 2,
                act_bits: 8,
                calibration: Calibration::Max,
                weight_scale: WeightScale::Max,
                rounding: Rounding::Nearest,
                bias_correction,
                first_last_bits: None,
                channel_scale_step: None,
                act_clip_step: None,
            }),
            calib_images: 256,
            threads: 1,
            limit: None,
        }
    }

    /// On the committed MNIST digits, 2-bit round-to-nearest loses most of the float
    /// model's accuracy; correcting the biases wins a large part of it back, and the
    /// report says which of the two it measured.
    #[test]
    fn bias_correction_recovers_accuracy_lost_by_rounding_and_is_reported() {
        let plain = run(&mnist(false)).unwrap();
        let corrected = run(&mnist(true)).unwrap();
        assert_eq!(plain.images, 2000);
        assert_eq!(plain.bias_correction, Some(false));
        assert_eq!(corrected.bias_correction, Some(true));
        assert!(
            corrected.top1 > plain.top1 + 5.0,
            "bias-corrected {} vs plain {}",
            corrected.top1,
            plain.top1
        );
        assert!(corrected.to_string().contains("w2a8 (bias-corrected)"));
        assert!(!plain.to_string().contains("bias-corrected"));
    }

    /// Error-feedback rounding, asked for by flag, keeps far more of the float model's
    /// accuracy at 2 bits than rounding to nearest, and the report says it was used.
    #[test]
    fn gptq_rounding_by_flag_recovers_two_bit_accuracy_and_is_reported() {
        let plain = run(&mnist(false)).unwrap();
        let q = quant_args(&["--weight-bits", "2", "--rounding", "gptq"])
            .unwrap()
            .unwrap();
        assert_eq!(q.rounding, Rounding::Gptq);
        let gptq = run(&EvalConfig {
            quant: Some(q),
            ..mnist(false)
        })
        .unwrap();
        assert!(
            gptq.top1 > plain.top1 + 30.0,
            "gptq {} vs nearest {}",
            gptq.top1,
            plain.top1
        );
        assert_eq!(gptq.rounding.as_deref(), Some("gptq"));
        assert!(gptq.to_string().contains("w2a8 (GPTQ rounding)"), "{gptq}");
        let e = quant_args(&["--weight-bits", "2", "--rounding", "floor"]).unwrap_err();
        assert!(e.to_string().contains("rounding"), "{e}");
    }
}
