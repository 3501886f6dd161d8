//! `coordinator export`: writes an integer network for other runtimes (the formats of
//! [`ccq_common::export`]; docs/EXPORT.md), and optionally ccq's own logits on a dataset
//! split as a reference for `scripts/check_export.py`.
//!
//! The network comes from a run (its output directory or `model.ccq`), from a quantized
//! ONNX file (a previous export), or from a float ONNX model quantized here exactly as
//! `coordinator eval --weight-bits` does it.

use std::path::{Path, PathBuf};

use ccq_common::data::{self, DataSource, Split};
use ccq_common::export::{self, Format};
use ccq_common::model::Normalization;
use ccq_common::onnx;
use ccq_common::qnet::QNetwork;
use ccq_common::quant::QuantConfig;
use serde::Serialize;

use crate::eval::quantize_from_train;
use crate::Error;

/// `coordinator export` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// A run's output directory or its model.ccq, a quantized ONNX file written by this
    /// command, or a float ONNX model (then give --weight-bits and --data).
    #[arg(long)]
    pub model: PathBuf,
    /// onnx-qdq (float ONNX with QuantizeLinear/DequantizeLinear pairs) or json (plain
    /// integer arrays); see docs/EXPORT.md.
    #[arg(long, default_value = "onnx-qdq")]
    pub format: String,
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// A data source (`cifar10:DIR`, `mnist:DIR`, `folder:DIR`, `npy:DIR`; docs/DATA.md):
    /// calibration images for a float model, and the images
    /// of --reference.
    #[arg(long)]
    pub data: Option<String>,
    /// Split of --data that --reference runs.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Per-channel mean of pixel/255, comma separated (float models and ONNX files without
    /// ccq metadata).
    #[arg(long, value_delimiter = ',')]
    pub mean: Option<Vec<f32>>,
    /// Per-channel std of pixel/255, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub std: Option<Vec<f32>>,
    /// Quantization of a float model (as `coordinator eval --weight-bits` does it).
    #[command(flatten)]
    pub quant: crate::eval::QuantArgs,
    /// Also write ccq's logits on --split of --data to this .npz, for
    /// scripts/check_export.py.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Only the first N images of the split in --reference.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

impl ExportArgs {
    pub fn config(&self) -> Result<ExportConfig, Error> {
        let normalization = crate::eval::normalization_flags(&self.mean, &self.std)?;
        let quant = self.quant.config()?;
        Ok(ExportConfig {
            model: self.model.clone(),
            format: self.format.parse()?,
            out: self.out.clone(),
            data: self.data.as_deref().map(str::parse).transpose()?,
            normalization,
            quant,
            calib_images: self.quant.calib_images,
            reference: self.reference.clone(),
            split: self.split.parse()?,
            limit: self.limit,
        })
    }
}

/// What to export and where; built from the CLI by `main`.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// A run directory, a `.ccq` network, a quantized ONNX export or a float ONNX model.
    pub model: PathBuf,
    pub format: Format,
    pub out: PathBuf,
    /// Calibration data for a float model, and the data of `reference`.
    pub data: Option<DataSource>,
    pub normalization: Option<Normalization>,
    /// Post-training quantization of a float ONNX model.
    pub quant: Option<QuantConfig>,
    pub calib_images: usize,
    /// Also write ccq's logits on `split` of `data` here (NumPy `.npz`).
    pub reference: Option<PathBuf>,
    pub split: Split,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub model: String,
    pub precision: String,
    pub format: String,
    pub out: String,
    pub bytes: usize,
    /// onnx-qdq only: input codes (channel, pixel value) on which ONNX's QuantizeLinear
    /// and ccq's input table disagree.
    pub input_mismatches: Option<usize>,
    pub reference: Option<ReferenceReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReferenceReport {
    pub file: String,
    pub images: usize,
    /// ccq's integer engine on those images, percent.
    pub top1: f64,
}

impl std::fmt::Display for ExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exported {} ({}) as {} to {} ({} bytes)",
            self.model, self.precision, self.format, self.out, self.bytes
        )?;
        if let Some(m) = self.input_mismatches.filter(|&m| m > 0) {
            write!(
                f,
                "\nnote: {m} input codes (channel, pixel) round differently in ONNX's \
                 QuantizeLinear than in ccq's input table"
            )?;
        }
        if let Some(r) = &self.reference {
            write!(
                f,
                "\nreference: ccq's logits on {} images (top-1 {:.2} %) in {}",
                r.images, r.top1, r.file
            )?;
        }
        Ok(())
    }
}

pub fn run(cfg: &ExportConfig) -> Result<ExportReport, Error> {
    let net = load_network(cfg)?;
    let (bytes, input_mismatches) = match cfg.format {
        Format::OnnxQdq => {
            let e = export::to_onnx_qdq(&net)?;
            (e.bytes, Some(e.input_mismatches))
        }
        other => (export::export(&net, other)?, None),
    };
    write(&cfg.out, &bytes)?;
    let reference = match &cfg.reference {
        None => None,
        Some(file) => {
            let source = cfg.data.as_ref().ok_or_else(|| {
                Error::Usage("--reference needs --data (the images to run)".into())
            })?;
            let total = data::split_len(source, cfg.split)?;
            let n = cfg.limit.map_or(total, |l| l.min(total));
            let dataset = data::load(source, cfg.split, Some(0..n))?;
            let r = export::reference_npz(&net, &dataset)?;
            write(file, &r.npz)?;
            Some(ReferenceReport {
                file: file.display().to_string(),
                images: r.images,
                top1: r.top1(),
            })
        }
    };
    Ok(ExportReport {
        model: cfg.model.display().to_string(),
        precision: net.precision(),
        format: cfg.format.to_string(),
        out: cfg.out.display().to_string(),
        bytes: bytes.len(),
        input_mismatches,
        reference,
    })
}

/// The integer network `cfg.model` names (see the module docs).
pub fn load_network(cfg: &ExportConfig) -> Result<QNetwork, Error> {
    let path = if cfg.model.is_dir() {
        cfg.model.join("model.ccq")
    } else {
        cfg.model.clone()
    };
    let already_quantized = |net: QNetwork| {
        if cfg.quant.is_some() {
            return Err(Error::Usage(format!(
                "{} is already quantized; drop --weight-bits",
                path.display()
            )));
        }
        Ok(net)
    };
    let net = if path.extension().is_some_and(|e| e == "ccq") {
        Some(QNetwork::load(&path)?)
    } else {
        onnx::load_quantized(&path, cfg.normalization.as_ref())?
    };
    if let Some(net) = net {
        if let Some(n) = &cfg.normalization {
            if n.mean != net.input.mean || n.std != net.input.std {
                return Err(Error::Usage(format!(
                    "--mean/--std differ from the ones {} was quantized with (mean {:?}, std {:?})",
                    path.display(),
                    net.input.mean,
                    net.input.std
                )));
            }
        }
        return already_quantized(net);
    }
    let (Some(q), Some(source)) = (&cfg.quant, &cfg.data) else {
        return Err(Error::Usage(format!(
            "{} is a float model: give --weight-bits and --data (calibration images) to \
             quantize it",
            path.display()
        )));
    };
    let graph = onnx::load_onnx(&path)?;
    let c = graph.input_shape.c;
    let norm = cfg
        .normalization
        .clone()
        .unwrap_or_else(|| Normalization::identity(c));
    quantize_from_train(&graph, &norm, source, q, cfg.calib_images)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|e| ccq_common::Error::io(path, e).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    }

    fn args(extra: &[&str]) -> ExportArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            export: ExportArgs,
        }
        let base = [
            "export",
            "--model",
            "examples/mnist/mnist-cnn.onnx",
            "--out",
            "x",
        ];
        let mut cli = Cli::try_parse_from(base.iter().chain(extra)).unwrap();
        cli.export.model = repo("examples/mnist/mnist-cnn.onnx");
        cli.export
    }

    #[test]
    fn a_float_model_is_quantized_exported_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let data = format!("mnist:{}", repo("examples/data/mnist-10k").display());
        let mut a = args(&["--weight-bits", "4", "--mean", "0.1307", "--std", "0.3081"]);
        a.data = Some(data.clone());
        a.out = dir.path().join("m.onnx");
        a.reference = Some(dir.path().join("ref.npz"));
        a.limit = Some(100);
        let report = run(&a.config().unwrap()).unwrap();
        assert_eq!(report.precision, "w4a8");
        let reference = report.reference.unwrap();
        assert_eq!(reference.images, 100);
        assert!(reference.top1 > 80.0, "{}", reference.top1);

        // The export is a model `export` (and `eval`) read as the same integer network.
        let mut again = args(&["--format", "json"]);
        again.model = dir.path().join("m.onnx");
        again.out = dir.path().join("m.json");
        let back = run(&again.config().unwrap()).unwrap();
        assert_eq!(back.precision, "w4a8");
        assert!(dir.path().join("m.json").is_file());

        // ... but not one to quantize again, or to read with another normalisation.
        let mut twice = args(&["--weight-bits", "4"]);
        twice.model = dir.path().join("m.onnx");
        let err = run(&twice.config().unwrap()).unwrap_err();
        assert!(err.to_string().contains("already quantized"), "{err}");
        let mut other = args(&["--mean", "0.5", "--std", "0.5"]);
        other.model = dir.path().join("m.onnx");
        let err = run(&other.config().unwrap()).unwrap_err();
        assert!(err.to_string().contains("--mean/--std differ"), "{err}");
    }

    #[test]
    fn usage_errors_say_what_is_missing() {
        let err = run(&args(&[]).config().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("--weight-bits and --data"),
            "{err}"
        );
        let err = args(&["--format", "tflite"]).config().unwrap_err();
        assert!(err.to_string().contains("onnx-qdq, json"), "{err}");
        let err = args(&["--mean", "0.1"]).config().unwrap_err();
        assert!(err.to_string().contains("go together"), "{err}");
    }
}
