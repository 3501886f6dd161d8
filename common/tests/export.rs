//! Exporting integer networks: the QDQ ONNX round trip through ccq's own importer, the
//! plain-array JSON, and — where Python has `onnxruntime` and `onnx` — ONNX Runtime on the
//! exported file against ccq's integer engine, via `scripts/check_export.py`.
//!
//! Networks are post-training quantizations of the fixture models on seeded random images,
//! and of the MNIST example model on the MNIST digits shipped in `examples/data`. The
//! ResNet-20 checks use the real model and CIFAR-10 in `../shared` when they exist.

use std::path::{Path, PathBuf};
use std::process::Command;

use ccq_common::data::{self, DataSource, Split};
use ccq_common::export::{self, Format};
use ccq_common::model::Normalization;
use ccq_common::onnx::proto::{self, ModelProto};
use ccq_common::onnx::{self as onnx_import, qdq};
use ccq_common::qnet::{Activations, QNetwork, QOp, VarKind};
use ccq_common::quant::{quantize, QuantConfig};
use ccq_common::Error;
use prost::Message;
use rand::{Rng, SeedableRng};

mod support;
use support::{shared, skip};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.onnx"))
}

fn cfg(weight_bits: u8, act_bits: u8) -> QuantConfig {
    QuantConfig::new(weight_bits, act_bits)
}

fn random_images(len: usize, n: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len * n).map(|_| rng.random()).collect()
}

/// A fixture model quantized on random images (calibration and evaluation alike).
fn fixture_net(name: &str, q: &QuantConfig) -> QNetwork {
    let graph = onnx_import::load_onnx(&fixture(name)).unwrap();
    let c = graph.input_shape.c;
    let norm = Normalization {
        mean: vec![0.45; c],
        std: vec![0.25; c],
    };
    let n = 64;
    let calib = random_images(graph.input_shape.len(), n, 7);
    quantize(&graph, &norm, &calib, n, q).unwrap()
}

/// The MNIST example model quantized on the first 512 training digits.
fn mnist_net(q: &QuantConfig) -> (QNetwork, DataSource) {
    let source = DataSource::new(
        data::DataFormat::Mnist,
        repo().join("examples/data/mnist-10k"),
    );
    let graph = onnx_import::load_onnx(&repo().join("examples/mnist/mnist-cnn.onnx")).unwrap();
    let norm = Normalization {
        mean: vec![0.1307],
        std: vec![0.3081],
    };
    let calib = data::load(&source, Split::Train, Some(0..512)).unwrap();
    let net = quantize(&graph, &norm, &calib.images, calib.len(), q).unwrap();
    (net, source)
}

fn reimport(bytes: &[u8], norm: Option<&Normalization>) -> ccq_common::Result<QNetwork> {
    let model = ModelProto::decode(bytes).unwrap();
    assert!(qdq::is_qdq(&model));
    qdq::import_qdq(&model, "exported.onnx", norm)
}

fn logits(net: &QNetwork, images: &[u8], n: usize) -> Vec<f64> {
    let mut acts = Activations::default();
    net.forward(images, n, &mut acts);
    acts.logits
        .iter()
        .map(|&l| l as f64 * net.logit_scale)
        .collect()
}

fn argmax(row: &[f64]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

// ---- QDQ round trip through ccq's importer ----------------------------------------------

/// Everything integer survives exactly; scales survive to f32 precision; requantization
/// multipliers are recomputed from those scales, so they may move in their last bits only.
/// On how many of 200 random images the two networks' arg-max classes agree.
fn argmax_agreement(a: &QNetwork, b: &QNetwork) -> usize {
    let n = 200;
    let images = random_images(a.image_len(), n, 11);
    let (x, y) = (logits(a, &images, n), logits(b, &images, n));
    let k = a.num_classes;
    (0..n)
        .filter(|&i| argmax(&x[i * k..(i + 1) * k]) == argmax(&y[i * k..(i + 1) * k]))
        .count()
}

fn assert_same_network(a: &QNetwork, b: &QNetwork) {
    let close = |x: f64, y: f64| ((x - y) / x).abs() < 1e-6;
    assert_eq!(a.nodes.len(), b.nodes.len());
    assert_eq!((a.weight_bits, a.act_bits), (b.weight_bits, b.act_bits));
    assert_eq!(a.input.mean, b.input.mean);
    assert_eq!(a.input.std, b.input.std);
    assert_eq!(a.input_value.zp, b.input_value.zp);
    assert!(close(a.input_value.scale, b.input_value.scale));
    assert_eq!(a.layers, b.layers, "the decision-variable map");
    assert_eq!(a.codes(), b.codes());
    for (x, y) in a.nodes.iter().zip(&b.nodes) {
        assert_eq!(x.inputs, y.inputs, "node {}", x.name);
        assert_eq!(
            (x.out.h, x.out.w, x.out.c, x.out.zp),
            (y.out.h, y.out.w, y.out.c, y.out.zp),
            "node {}",
            x.name
        );
        assert!(close(x.out.scale, y.out.scale), "node {}", x.name);
        match (&x.op, &y.op) {
            (QOp::Conv(p), QOp::Conv(q)) => {
                assert_eq!(p.geom, q.geom, "node {}", x.name);
                assert_eq!(p.bias, q.bias, "node {}", x.name);
                assert_eq!(p.input_zp, q.input_zp, "node {}", x.name);
                match (&p.stage, &q.stage) {
                    (Some(s), Some(t)) => {
                        assert_eq!((s.out_zp, s.min, s.max), (t.out_zp, t.min, t.max));
                        for (r, u) in s.requant.iter().zip(&t.requant) {
                            assert!(close(r.to_real(), u.to_real()), "node {}", x.name);
                        }
                    }
                    (None, None) => {}
                    _ => panic!("node {}: output stage lost or invented", x.name),
                }
            }
            (QOp::Add(p), QOp::Add(q)) => {
                assert_eq!(
                    (p.a_zp, p.b_zp, p.out_zp, p.min, p.max),
                    (q.a_zp, q.b_zp, q.out_zp, q.min, q.max)
                );
                let ratio = |m: i32, s: u8| m as f64 / (1u64 << s) as f64;
                assert!((ratio(p.a_mult, p.shift) - ratio(q.a_mult, q.shift)).abs() < 1e-5);
                assert!((ratio(p.b_mult, p.shift) - ratio(q.b_mult, q.shift)).abs() < 1e-5);
            }
            (p, q) => assert_eq!(format!("{p:?}"), format!("{q:?}"), "node {}", x.name),
        }
    }
    for (r, u) in a.logit_requant.iter().zip(&b.logit_requant) {
        assert!(close(r.to_real(), u.to_real()));
    }
    assert!(close(a.logit_scale, b.logit_scale));
}

#[test]
fn qdq_export_reimports_as_the_same_integer_network() {
    // mnist_cnn: Conv/ReLU/MaxPool and a Gemm after a flatten of a 7x7 map (the column
    // permutation); tiny_resnet: residual Add, strided Slice, channel Pad, global pooling.
    // a4 puts a Clip before every activation QuantizeLinear.
    for (name, q) in [
        ("mnist_cnn", cfg(2, 8)),
        ("mnist_cnn", cfg(4, 4)),
        ("tiny_resnet", cfg(4, 8)),
        ("tiny_resnet", cfg(8, 3)),
        // misc17: a depthwise convolution (the group attribute), a padded MaxPool.
        ("misc17", cfg(4, 8)),
        // Mixed precision: 8-bit first and logits layers around 3-bit ones.
        (
            "tiny_resnet",
            QuantConfig {
                first_last_bits: Some(8),
                ..cfg(3, 8)
            },
        ),
    ] {
        let net = fixture_net(name, &q);
        let exported = export::to_onnx_qdq(&net).unwrap();
        let back = reimport(&exported.bytes, None).unwrap();
        assert_same_network(&net, &back);
        assert_eq!(back.precision(), net.precision(), "{name} {q:?}");
        let ranges = |n: &QNetwork| -> Vec<_> {
            n.layers
                .iter()
                .map(|l| (l.offset, l.len, l.lo, l.hi))
                .collect()
        };
        assert_eq!(ranges(&back), ranges(&net), "{name} {q:?}: variable ranges");

        // The networks compute the same thing up to the recomputed multipliers.
        let (agree, n) = (argmax_agreement(&net, &back), 200);
        assert!(
            agree >= n - 2,
            "{name} {q:?}: arg-max agrees on {agree}/{n}"
        );
    }
}

/// tiny_resnet W4A8 with channel scales and activation clips (step 1/8), their codes
/// moved to -2, 0, 1 and 3 in turn; and its number of weight codes (where they start).
fn scaled_tiny_resnet() -> (QNetwork, usize) {
    let q = QuantConfig {
        channel_scale_step: Some(0.125),
        act_clip_step: Some(0.125),
        ..cfg(4, 8)
    };
    let mut net = fixture_net("tiny_resnet", &q);
    let weights: usize = (net.layers.iter())
        .filter(|l| l.kind == VarKind::Weights)
        .map(|l| l.len)
        .sum();
    let moves: Vec<(u32, i8)> = (weights..net.num_vars())
        .map(|v| (v as u32, [-2i8, 0, 1, 3][v % 4]))
        .collect();
    net.apply_changes(&moves).unwrap();
    (net, weights)
}

/// A network with searched channel scales and activation clips exports the weight and
/// activation scales it runs (bias codes as the clips made them, at `s_in` times those
/// scales): the file reimports as a plain network (no scale or clip variables) with
/// those scales and the same integer parameters.
#[test]
fn channel_scales_export_as_the_weight_scales_they_run() {
    let (net, weights) = scaled_tiny_resnet();
    let back = reimport(&export::to_onnx_qdq(&net).unwrap().bytes, None).unwrap();
    assert_eq!(
        back.num_vars(),
        weights,
        "the file holds no scale variables"
    );
    assert_eq!(back.codes()[..], net.codes()[..weights]);
    for l in back.layers.iter() {
        let (a, b) = (net.conv(l.node), back.conv(l.node));
        assert_eq!(a.bias, b.bias, "{}", l.name);
        for (x, y) in a.weight_scales().iter().zip(&b.w_scale) {
            assert!(((x - y) / x).abs() < 1e-6, "{}: {x} vs {y}", l.name);
        }
        if let (Some(s), Some(t)) = (&a.stage, &b.stage) {
            for (r, u) in s.requant.iter().zip(&t.requant) {
                let (r, u) = (r.to_real(), u.to_real());
                assert!(((r - u) / r).abs() < 1e-6, "{}: {r} vs {u}", l.name);
            }
        }
    }
    let agree = argmax_agreement(&net, &back);
    assert!(agree >= 198, "arg-max agrees on {agree}/200");
}

#[test]
fn the_reimported_input_table_follows_onnx_rounding() {
    let net = fixture_net("tiny_resnet", &cfg(4, 8));
    let exported = export::to_onnx_qdq(&net).unwrap();
    let back = reimport(&exported.bytes, None).unwrap();
    let (scale, zp) = (back.input_value.scale as f32, back.input_value.zp);
    let mut differing = 0;
    for c in 0..3 {
        for p in 0..=255u8 {
            let x = (f32::from(p) / 255.0 - 0.45) / 0.25;
            let code = back.input.lut[c * 256 + p as usize];
            assert_eq!(code, export::onnx_quantize(x, scale, zp));
            differing += usize::from(code != net.input.lut[c * 256 + p as usize]);
        }
    }
    assert_eq!(differing, exported.input_mismatches);
}

#[test]
fn exported_models_declare_what_a_runtime_needs() {
    let net = fixture_net("mnist_cnn", &cfg(4, 8));
    let model = ModelProto::decode(export::to_onnx_qdq(&net).unwrap().bytes.as_slice()).unwrap();
    assert_eq!(model.opset_import[0].version, export::ONNX_OPSET);
    let graph = model.graph.as_ref().unwrap();
    assert_eq!(graph.input[0].name, "input");
    assert_eq!(graph.output[0].name, "logits");
    let meta = |key: &str| {
        model
            .metadata_props
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    };
    assert_eq!(meta("ccq.mean").as_deref(), Some("0.45"));
    assert_eq!(meta("ccq.weight_bits").as_deref(), Some("4"));
    // Weights are int8 codes in the file, exactly the network's (OIHW for this 1-channel
    // first layer is the same order as OHWI).
    let first = graph
        .initializer
        .iter()
        .find(|t| t.name.ends_with(".weight.codes"))
        .unwrap();
    assert_eq!(first.data_type, proto::DataType::Int8 as i32);
    let codes: Vec<i8> = first.raw_data.iter().map(|&b| b as i8).collect();
    assert_eq!(codes, net.conv(0).codes);
    // Every node name is unique (ONNX Runtime refuses duplicates).
    let mut names: Vec<&str> = graph.node.iter().map(|n| n.name.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before);
}

#[test]
fn a_float_model_is_not_taken_for_a_quantized_one() {
    let found = onnx_import::load_quantized(&fixture("mnist_cnn"), None).unwrap();
    assert!(found.is_none());
}

#[test]
fn import_errors_name_the_problem() {
    let net = fixture_net("mnist_cnn", &cfg(4, 8));
    let bytes = export::to_onnx_qdq(&net).unwrap().bytes;

    // Without the ccq metadata the normalisation must come from the caller.
    let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
    model.metadata_props.clear();
    let err = qdq::import_qdq(&model, "bare.onnx", None).unwrap_err();
    assert!(err.to_string().contains("--mean"), "{err}");
    let norm = Normalization {
        mean: vec![0.45],
        std: vec![0.25],
    };
    let back = qdq::import_qdq(&model, "bare.onnx", Some(&norm)).unwrap();
    // The bit widths are then the narrowest that hold the codes.
    assert!(back.weight_bits <= 4);

    // Asymmetric weights cannot be represented.
    let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let zp = graph
        .initializer
        .iter_mut()
        .find(|t| t.name.ends_with(".weight.zero_point"))
        .unwrap();
    zp.raw_data[0] = 3;
    let err = qdq::import_qdq(&model, "asym.onnx", None).unwrap_err();
    match &err {
        Error::UnsupportedOp { node, reason, .. } => {
            assert!(node.ends_with(".weight/dequantize"), "{node}");
            assert!(reason.contains("zero point"), "{reason}");
        }
        other => panic!("unexpected error {other}"),
    }

    // A requantization through MaxPool is not what ccq's engine does.
    let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let pool = graph
        .node
        .iter()
        .find(|n| n.op_type == "MaxPool")
        .unwrap()
        .name
        .clone();
    let scale = graph
        .initializer
        .iter_mut()
        .find(|t| t.name == format!("{pool}.scale"))
        .unwrap();
    scale.raw_data = 0.5f32.to_le_bytes().to_vec();
    let err = qdq::import_qdq(&model, "requant.onnx", None).unwrap_err();
    assert!(err.to_string().contains("MaxPool"), "{err}");

    // An unknown op is named with its node.
    let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    graph
        .node
        .iter_mut()
        .find(|n| n.op_type == "MaxPool")
        .unwrap()
        .op_type = "LpPool".into();
    let err = qdq::import_qdq(&model, "lp.onnx", None).unwrap_err();
    assert!(err.to_string().contains("LpPool"), "{err}");
}

// ---- the plain arrays ---------------------------------------------------------------------

#[test]
fn json_arrays_carry_every_integer_parameter() {
    let net = fixture_net("tiny_resnet", &cfg(4, 8));
    let doc: serde_json::Value =
        serde_json::from_slice(&export::export(&net, Format::Json).unwrap()).unwrap();
    assert_eq!(doc["format"], "ccq-integer-arrays");
    assert_eq!(doc["nodes"].as_array().unwrap().len(), net.nodes.len());
    assert_eq!(doc["values"].as_array().unwrap().len(), net.nodes.len() + 1);
    let ints = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let lut: Vec<i64> = doc["input"]["lut"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(&ints)
        .collect();
    assert_eq!(
        lut,
        net.input
            .lut
            .iter()
            .map(|&x| i64::from(x))
            .collect::<Vec<_>>()
    );
    for (node, json) in net.nodes.iter().zip(doc["nodes"].as_array().unwrap()) {
        match &node.op {
            QOp::Conv(c) => {
                assert_eq!(json["op"], "conv");
                let w: Vec<i64> = c.codes.iter().map(|&x| i64::from(x)).collect();
                assert_eq!(ints(&json["weights"]), w);
                let b: Vec<i64> = c.bias.iter().map(|&x| i64::from(x)).collect();
                assert_eq!(ints(&json["bias"]), b);
                match &c.stage {
                    Some(s) => {
                        let m: Vec<i64> =
                            s.requant.iter().map(|r| i64::from(r.multiplier)).collect();
                        assert_eq!(ints(&json["requant"]["multiplier"]), m);
                        assert_eq!(json["clamp_min"], s.min);
                    }
                    None => assert!(json["requant"].is_null()),
                }
            }
            QOp::Add(p) => {
                assert_eq!(json["op"], "add");
                assert_eq!(json["a_multiplier"], p.a_mult);
                assert_eq!(json["shift"], p.shift);
            }
            _ => assert_eq!(json["input"], node.inputs[0]),
        }
    }
    let m: Vec<i64> = net
        .logit_requant
        .iter()
        .map(|r| i64::from(r.multiplier))
        .collect();
    assert_eq!(ints(&doc["logits"]["requant"]["multiplier"]), m);
}

#[test]
fn reference_archive_holds_ccq_logits() {
    let (net, source) = mnist_net(&cfg(4, 8));
    let data = data::load(&source, Split::Test, Some(0..10)).unwrap();
    let r = export::reference_npz(&net, &data).unwrap();
    assert_eq!(r.images, 10);
    let stats = net.evaluate(&data.images, &data.labels, 4, 1);
    assert_eq!(r.correct as u64, stats.correct);
    assert_eq!(&r.npz[..4], b"PK\x03\x04");
}

// ---- ONNX Runtime and the NumPy engine (Python) ------------------------------------------

/// Why the Python checks cannot run here, if they cannot.
fn python_missing() -> Option<String> {
    match Command::new("python3")
        .args(["-c", "import numpy, onnx, onnxruntime"])
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "python3 lacks numpy/onnx/onnxruntime ({})",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Some(format!("no python3 ({e})")),
    }
}

/// Runs `scripts/check_export.py` with `args` and returns its JSON report.
fn check_export(args: &[&str]) -> serde_json::Value {
    let script = repo().join("scripts/check_export.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "check_export.py printed no report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Exports `net`, writes ccq's reference logits on `data`, and checks both with Python:
/// ONNX Runtime on the QDQ model (top-1 within 0.1 points of ccq, logits close) and the
/// NumPy engine on the JSON arrays (bit-exact integer logits).
fn assert_runtimes_agree(label: &str, net: &QNetwork, data: &data::Dataset, arrays: bool) {
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("model.onnx");
    let json = dir.path().join("model.json");
    let reference = dir.path().join("reference.npz");
    std::fs::write(&onnx, export::to_onnx_qdq(net).unwrap().bytes).unwrap();
    std::fs::write(&json, export::export(net, Format::Json).unwrap()).unwrap();
    std::fs::write(&reference, export::reference_npz(net, data).unwrap().npz).unwrap();

    let run = |optimize: &str| {
        check_export(&[
            "--onnx",
            onnx.to_str().unwrap(),
            "--reference",
            reference.to_str().unwrap(),
            "--optimize",
            optimize,
        ])
    };
    let mut r = run("all");
    println!("{label}: {r}");
    // ONNX Runtime fuses QDQ pairs into int8 kernels. On CPUs where those use VPMADDUBSW
    // (u8 x s8 pairs summed into i16), a pair of products can saturate: 2 * 255 * |w| >
    // 32767 needs |w| >= 65, so only 8-bit weights can. That is ONNX Runtime's documented
    // trade-off, not a property of the file: then the file's meaning is checked with the
    // fusion off (each QDQ pair computed as written).
    let max_code = net
        .codes()
        .iter()
        .map(|c| c.unsigned_abs())
        .max()
        .unwrap_or(0);
    // Saturation shows as disagreement: in the argmax, or (a small network whose logits
    // span little) only in the logits' distance.
    let agrees = |r: &serde_json::Value| {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let range = f("max_abs_logit");
        f("argmax_agreement") >= 99.0
            && f("max_abs_logit_diff") <= 0.05 * range
            && f("mean_abs_logit_diff") <= 0.002 * range
    };
    if !agrees(&r) && max_code >= 65 {
        println!(
            "{label}: ONNX Runtime's fused int8 kernels disagree with 8-bit weights \
             (u8s8 saturation); checking the graph unfused"
        );
        r = run("disable");
        println!("{label} (unfused): {r}");
    }
    assert_eq!(r["checker"], "passed", "{label}: {r}");
    let f = |k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{label}: no {k} in {r}"))
    };
    assert!(
        (f("top1_other") - f("top1_ccq")).abs() <= 0.1,
        "{label}: top-1 ONNX Runtime {} vs ccq {}",
        f("top1_other"),
        f("top1_ccq")
    );
    // The runtimes differ by roundings only: ties (half up in ccq, half to even in ONNX),
    // f32 instead of exact products, and ccq's final rounding of the logits to its common
    // scale. One-code differences deep in a network move a logit by a few percent of the
    // logit range at most, and on average by far less.
    let range = f("max_abs_logit");
    assert!(f("max_abs_logit_diff") <= 0.05 * range, "{label}: {r}");
    assert!(f("mean_abs_logit_diff") <= 0.002 * range, "{label}: {r}");
    assert!(f("argmax_agreement") >= 99.0, "{label}: {r}");

    if arrays {
        let r = check_export(&[
            "--arrays",
            json.to_str().unwrap(),
            "--reference",
            reference.to_str().unwrap(),
        ]);
        println!("{label} arrays: {r}");
        assert_eq!(r["bit_exact"], true, "{label}: {r}");
    }
}

#[test]
fn onnx_runtime_agrees_with_the_integer_engine_on_mnist() {
    if let Some(why) = python_missing() {
        return skip(&why);
    }
    for q in [cfg(2, 8), cfg(4, 8), cfg(4, 4)] {
        let (net, source) = mnist_net(&q);
        let test = data::load(&source, Split::Test, None).unwrap();
        assert_runtimes_agree(&format!("mnist {}", net.precision()), &net, &test, true);
    }
}

#[test]
fn onnx_runtime_agrees_on_residual_networks() {
    if let Some(why) = python_missing() {
        return skip(&why);
    }
    // Random images and labels: top-1 is meaningless, but agreement and logits are not.
    let net = fixture_net("tiny_resnet", &cfg(4, 8));
    let n = 500;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let data = data::Dataset {
        channels: 3,
        height: 16,
        width: 16,
        num_classes: 10,
        images: random_images(net.image_len(), n, 5),
        labels: (0..n).map(|_| rng.random_range(0..10)).collect(),
        first_index: 0,
    };
    assert_runtimes_agree("tiny_resnet w4a8", &net, &data, true);
    // With searched channel scales and activation clips moved off 1: the file runs them
    // as ccq does.
    let (scaled, _) = scaled_tiny_resnet();
    assert!(scaled.clips.iter().any(|c| c.code != 0));
    assert_runtimes_agree(
        "tiny_resnet w4a8 with scales and clips",
        &scaled,
        &data,
        true,
    );
}

#[test]
fn onnx_runtime_agrees_on_mobile_networks() {
    if let Some(why) = python_missing() {
        return skip(&why);
    }
    // The worked example's MobileNet-style model on the digits: depthwise convolutions,
    // HardSwish and HardSigmoid tables, squeeze-excitation products.
    let source = DataSource::new(
        data::DataFormat::Mnist,
        repo().join("examples/data/mnist-10k"),
    );
    let graph = onnx_import::load_onnx(&repo().join("examples/mnist/mobilenet.onnx")).unwrap();
    let norm = Normalization {
        mean: vec![0.1307],
        std: vec![0.3081],
    };
    let calib = data::load(&source, Split::Train, Some(0..512)).unwrap();
    let test = data::load(&source, Split::Test, None).unwrap();
    for q in [cfg(4, 8), cfg(8, 8)] {
        let net = quantize(&graph, &norm, &calib.images, calib.len(), &q).unwrap();
        assert_runtimes_agree(&format!("mobilenet {}", net.precision()), &net, &test, true);
    }
    // The fixtures with every other new op (grouped Conv, Sigmoid, Tanh, LeakyRelu, SiLU,
    // Concat), on random images.
    for name in ["mobile17", "mobile17_variants"] {
        let net = fixture_net(name, &cfg(8, 8));
        let n = 500;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let data = data::Dataset {
            channels: net.input_value.c,
            height: net.input_value.h,
            width: net.input_value.w,
            num_classes: net.num_classes,
            images: random_images(net.image_len(), n, 5),
            labels: (0..n)
                .map(|_| rng.random_range(0..net.num_classes as u8))
                .collect(),
            first_index: 0,
        };
        assert_runtimes_agree(&format!("{name} w8a8"), &net, &data, true);
    }
}

#[test]
fn onnx_runtime_agrees_on_resnet20_cifar10() {
    let Some(shared) = shared("") else {
        return skip("../shared (ResNet-20 and CIFAR-10) is not available");
    };
    if let Some(why) = python_missing() {
        return skip(&why);
    }
    let graph = onnx_import::load_onnx(&shared.join("models/resnet20-cifar10.onnx")).unwrap();
    let norm = Normalization {
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    };
    let source = DataSource::new(
        data::DataFormat::Cifar10,
        shared.join("datasets/cifar10-jpeg/cifar-10-batches-bin"),
    );
    let calib = data::load(&source, Split::Train, Some(0..512)).unwrap();
    let test = data::load(&source, Split::Test, None).unwrap();
    for q in [cfg(4, 8), cfg(8, 8)] {
        let net = quantize(&graph, &norm, &calib.images, calib.len(), &q).unwrap();
        // The NumPy engine would take minutes on 10,000 ResNet-20 images; the MNIST and
        // fixture tests cover it.
        assert_runtimes_agree(&format!("resnet20 {}", net.precision()), &net, &test, false);
    }
}
