//! ONNX import and the float engine against ONNX Runtime.
//!
//! The fixtures in `tests/fixtures/` come from `scripts/make_onnx_fixtures.py`: small
//! models covering every lowering rule, random inputs and ONNX Runtime's outputs. The
//! ResNet-20 tests use the real model in `../shared` when it exists and skip otherwise
//! (fail under `CI=true`: see `support::skip`).
//! Error paths are tested on fixtures edited through `ccq_common::onnx::proto`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ccq_common::model::{Graph, Op, Shape, Unary};
use ccq_common::onnx::proto::{self, AttributeProto, ModelProto, NodeProto, TensorProto};
use ccq_common::onnx::{import_onnx, load_onnx};
use ccq_common::{float, Error};
use prost::Message;
use rand::{Rng, SeedableRng};

mod support;
use support::{shared, skip};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn shape_of(meta: &serde_json::Value) -> Vec<usize> {
    meta["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

struct Fixture {
    graph: Graph,
    input: Vec<f32>,
    n: usize,
    expected: Vec<f32>,
}

/// Imports fixture `name` and checks `float::forward` against ONNX Runtime's outputs.
fn check_fixture(name: &str) -> Fixture {
    let dir = fixtures();
    let meta = read_json(&dir.join(format!("{name}.json")));
    let graph = load_onnx(&dir.join(meta["model"].as_str().unwrap())).unwrap();
    let in_shape = shape_of(&meta["input"]);
    let out_shape = shape_of(&meta["output"]);
    let input = read_f32(&dir.join(meta["input"]["file"].as_str().unwrap()));
    let expected = read_f32(&dir.join(meta["output"]["file"].as_str().unwrap()));
    let n = in_shape[0];
    assert_eq!(
        graph.input_shape,
        Shape::new(in_shape[1], in_shape[2], in_shape[3])
    );
    assert_eq!(graph.num_classes(), out_shape[1]);

    let got = float::forward(&graph, &input, n);
    let diff = max_abs_diff(&got, &expected);
    assert!(diff <= 1e-4, "{name}: max abs diff {diff} to ONNX Runtime");
    Fixture {
        graph,
        input,
        n,
        expected,
    }
}

fn op_names(graph: &Graph) -> Vec<&'static str> {
    graph
        .nodes
        .iter()
        .map(|node| match node.op {
            Op::Conv(_) => "Conv",
            Op::Linear(_) => "Linear",
            Op::Relu => "Relu",
            Op::Clip { .. } => "Clip",
            Op::Add => "Add",
            Op::Unary(f) => f.name(),
            Op::Mul => "Mul",
            Op::Concat => "Concat",
            Op::MaxPool(_) => "MaxPool",
            Op::AveragePool(_) => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::Flatten => "Flatten",
            Op::Slice(_) => "Slice",
            Op::Pad(_) => "Pad",
        })
        .collect()
}

fn find_op<'g>(graph: &'g Graph, name: &str) -> &'g Op {
    &graph
        .nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no IR node '{name}'"))
        .op
}

/// The input values of the IR node `name`.
fn inputs_of(graph: &Graph, name: &str) -> Vec<usize> {
    graph
        .nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no IR node '{name}'"))
        .inputs
        .clone()
}

/// The value the IR node `name` produces.
fn value_of(graph: &Graph, name: &str) -> usize {
    1 + graph
        .nodes
        .iter()
        .position(|n| n.name == name)
        .unwrap_or_else(|| panic!("no IR node '{name}'"))
}

// ---- fixtures against ONNX Runtime --------------------------------------------------------

#[test]
fn tiny_resnet_matches_onnx_runtime() {
    let f = check_fixture("tiny_resnet");
    // BatchNormalization folded away, Flatten after GlobalAveragePool is a no-op.
    assert_eq!(
        op_names(&f.graph),
        [
            "Conv",
            "Relu", // stem
            "Conv",
            "Relu",
            "Conv",
            "Add",
            "Relu", // identity block
            "Conv",
            "Relu",
            "Conv",
            "Slice",
            "Pad",
            "Add",
            "Relu", // option-A block
            "GlobalAveragePool",
            "Linear",
        ]
    );
    let Op::Slice(slice) = find_op(&f.graph, "layer2.0.shortcut.Slice") else {
        panic!("not a slice")
    };
    assert_eq!(slice.step, [1, 2, 2]);
    assert_eq!(slice.start, [0, 0, 0]);
    let Op::Pad(pad) = find_op(&f.graph, "layer2.0.shortcut.Pad") else {
        panic!("not a pad")
    };
    assert_eq!((pad.before, pad.after), ([4, 0, 0], [4, 0, 0]));
    let Op::Conv(conv) = find_op(&f.graph, "layer2.0.conv1") else {
        panic!("not a conv")
    };
    assert_eq!((conv.stride, conv.pads), ([2, 2], [1, 1, 1, 1]));
    // The folded BatchNormalization left a non-zero bias on a bias-free Conv.
    assert!(conv.bias.iter().any(|&b| b != 0.0));
}

#[test]
fn mnist_cnn_matches_onnx_runtime() {
    let f = check_fixture("mnist_cnn");
    assert_eq!(
        op_names(&f.graph),
        ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Linear"]
    );
    assert_eq!(f.graph.shape(7), Shape::new(200, 1, 1));
}

#[test]
fn misc11_matches_onnx_runtime() {
    let f = check_fixture("misc11");
    // Identity and Dropout vanish, the MatMul + Add pairs become two Linears.
    assert_eq!(
        op_names(&f.graph),
        [
            "Conv",
            "Clip",
            "AveragePool",
            "Conv",
            "Clip",
            "AveragePool",
            "Flatten",
            "Linear",
            "Relu",
            "Linear"
        ]
    );
    assert_eq!(
        find_op(&f.graph, "clip1"),
        &Op::Clip {
            min: -0.5,
            max: 1.0
        }
    );
    assert_eq!(
        find_op(&f.graph, "clip2"),
        &Op::Clip {
            min: f32::NEG_INFINITY,
            max: 0.8
        }
    );
    let Op::AveragePool(incl) = find_op(&f.graph, "avgpool_incl") else {
        panic!("not an average pool")
    };
    let Op::AveragePool(excl) = find_op(&f.graph, "avgpool_excl") else {
        panic!("not an average pool")
    };
    assert!(incl.count_include_pad && !excl.count_include_pad);
    let Op::Conv(conv) = find_op(&f.graph, "conv1") else {
        panic!("not a conv")
    };
    assert_eq!(
        (conv.stride, conv.pads, conv.dilation),
        ([2, 1], [1, 0, 2, 1], [2, 1])
    );
}

#[test]
fn legacy_opset9_matches_onnx_runtime() {
    let f = check_fixture("legacy9");
    assert_eq!(
        op_names(&f.graph),
        ["Conv", "Clip", "Slice", "Pad", "MaxPool", "Flatten", "Linear"]
    );
    assert_eq!(find_op(&f.graph, "relu6"), &Op::Clip { min: 0.0, max: 6.0 });
}

#[test]
fn misc17_matches_onnx_runtime() {
    let f = check_fixture("misc17");
    assert_eq!(
        op_names(&f.graph),
        ["Conv", "Relu", "Conv", "Slice", "Pad", "Conv", "Add", "MaxPool", "Flatten", "Linear"]
    );
    let Op::Conv(dw) = find_op(&f.graph, "dw") else {
        panic!("not a conv")
    };
    assert_eq!((dw.group, dw.in_channels, dw.out_channels), (4, 4, 4));
    let Op::Slice(slice) = find_op(&f.graph, "slice") else {
        panic!("not a slice")
    };
    // Channels -6..-1 of 8, every second column from 1.
    assert_eq!((slice.start, slice.step), ([2, 0, 1], [1, 1, 2]));
    assert_eq!(f.graph.shape(4), Shape::new(5, 9, 4));
}

#[test]
fn mobile17_matches_onnx_runtime() {
    let f = check_fixture("mobile17");
    // BatchNormalizations fold, the Sigmoid + Mul pair is one SiLU, Flatten is a no-op.
    assert_eq!(
        op_names(&f.graph),
        [
            "Conv",
            "HardSwish", // stem
            "Conv",
            "LeakyRelu", // depthwise
            "GlobalAveragePool",
            "Conv",
            "Relu",
            "Conv",
            "HardSigmoid",
            "Mul", // squeeze-excitation
            "Conv",
            "Sigmoid+Mul (SiLU)", // grouped
            "Conv",
            "Tanh",
            "Conv",
            "Sigmoid",
            "Concat",
            "GlobalAveragePool",
            "Linear",
        ]
    );
    let Op::Conv(dw) = find_op(&f.graph, "dw") else {
        panic!("not a conv")
    };
    assert_eq!((dw.group, dw.in_channels, dw.out_channels), (8, 8, 8));
    let Op::Conv(grouped) = find_op(&f.graph, "gconv") else {
        panic!("not a conv")
    };
    assert_eq!(
        (grouped.group, grouped.in_channels, grouped.out_channels),
        (4, 8, 12)
    );
    assert_eq!(grouped.weight.len(), 12 * 2 * 9);
    assert_eq!(
        find_op(&f.graph, "se.gate"),
        &Op::Unary(Unary::HardSigmoid {
            alpha: 0.25,
            beta: 0.45
        })
    );
    assert_eq!(
        find_op(&f.graph, "dw_act"),
        &Op::Unary(Unary::LeakyRelu { alpha: 0.1 })
    );
    // The feature map first, the [C, 1, 1] scale second.
    assert_eq!(
        inputs_of(&f.graph, "se.Mul"),
        [value_of(&f.graph, "dw_act"), value_of(&f.graph, "se.gate")]
    );
    // The fused node takes the Mul's name and reads the grouped Conv's output; the
    // Sigmoid is gone.
    assert_eq!(find_op(&f.graph, "act.Mul"), &Op::Unary(Unary::Silu));
    assert_eq!(
        inputs_of(&f.graph, "act.Mul"),
        [value_of(&f.graph, "gconv")]
    );
    assert!(f.graph.nodes.iter().all(|n| n.name != "act.Sigmoid"));
    assert_eq!(
        inputs_of(&f.graph, "cat"),
        [
            value_of(&f.graph, "branch_a.act"),
            value_of(&f.graph, "branch_b.act")
        ]
    );
    assert_eq!(
        f.graph.shape(value_of(&f.graph, "cat")),
        Shape::new(12, 4, 4)
    );
}

#[test]
fn mobile17_variants_matches_onnx_runtime() {
    let f = check_fixture("mobile17_variants");
    assert_eq!(
        op_names(&f.graph),
        [
            "Conv",
            "Sigmoid+Mul (SiLU)",
            "GlobalAveragePool",
            "Conv",
            "HardSigmoid",
            "Mul",
            "Sigmoid",
            "Mul",
            "LeakyRelu",
            "Concat",
            "Conv",
            "GlobalAveragePool",
            "Linear",
            "Tanh",
            "HardSwish",
            "Mul",
            "Concat",
            "Linear",
        ]
    );
    // Mul(Sigmoid(x), x) fuses like Mul(x, Sigmoid(x)).
    assert_eq!(find_op(&f.graph, "act1.Mul"), &Op::Unary(Unary::Silu));
    // Mul(scale, x) is stored as Mul(x, scale).
    assert_eq!(
        inputs_of(&f.graph, "se.Mul"),
        [
            value_of(&f.graph, "act1.Mul"),
            value_of(&f.graph, "se.gate")
        ]
    );
    // ONNX defaults.
    assert_eq!(
        find_op(&f.graph, "se.gate"),
        &Op::Unary(Unary::HardSigmoid {
            alpha: 0.2,
            beta: 0.5
        })
    );
    assert_eq!(
        find_op(&f.graph, "leaky"),
        &Op::Unary(Unary::LeakyRelu { alpha: 0.01 })
    );
    // The Concat also reads the Sigmoid, so Mul(y, Sigmoid(y)) is no SiLU here.
    assert_eq!(find_op(&f.graph, "gate"), &Op::Unary(Unary::Sigmoid));
    assert_eq!(
        inputs_of(&f.graph, "gate.Mul"),
        [value_of(&f.graph, "se.Mul"), value_of(&f.graph, "gate")]
    );
    assert_eq!(
        f.graph.shape(value_of(&f.graph, "cat")),
        Shape::new(24, 6, 6)
    );
    let Op::Conv(grouped) = find_op(&f.graph, "gconv") else {
        panic!("not a conv")
    };
    assert_eq!(grouped.group, 3);
    // Concat of [N, F] features: 16 + 16.
    assert_eq!(
        f.graph.shape(value_of(&f.graph, "fc1.cat")),
        Shape::new(32, 1, 1)
    );
}

#[test]
fn forward_all_returns_every_value_and_agrees_with_forward() {
    let f = check_fixture("tiny_resnet");
    let all = float::forward_all(&f.graph, &f.input, f.n);
    assert_eq!(all.len(), f.graph.nodes.len() + 1);
    for (v, values) in all.iter().enumerate() {
        assert_eq!(values.len(), f.n * f.graph.shape(v).len(), "value {v}");
    }
    assert_eq!(all[0], f.input);
    assert!(max_abs_diff(&all[f.graph.output], &f.expected) <= 1e-4);
    // Every Relu output is non-negative and some are positive.
    for (i, node) in f.graph.nodes.iter().enumerate() {
        if node.op == Op::Relu {
            assert!(all[i + 1].iter().all(|&v| v >= 0.0));
            assert!(all[i + 1].iter().any(|&v| v > 0.0));
        }
    }
}

#[test]
fn images_are_independent_of_their_batch() {
    // mobile17 and its variants cover the ops that read two or more values per image
    // (broadcast Mul, Concat).
    for name in ["misc17", "mobile17", "mobile17_variants"] {
        let f = check_fixture(name);
        let per_image = f.graph.input_shape.len();
        let classes = f.graph.num_classes();
        let batch = float::forward(&f.graph, &f.input, f.n);
        for i in 0..f.n {
            let one = float::forward(&f.graph, &f.input[i * per_image..(i + 1) * per_image], 1);
            let diff = max_abs_diff(&one, &batch[i * classes..(i + 1) * classes]);
            assert!(diff <= 1e-6, "{name}, image {i}: {diff}");
        }
        assert!(float::forward(&f.graph, &[], 0).is_empty());
    }
}

// ---- the real ResNet-20 -------------------------------------------------------------------

/// The first `count` CIFAR-10 test images, preprocessed as the model's .json says, and
/// their labels.
fn cifar_test_images(shared: &Path, count: usize) -> (Vec<f32>, Vec<u8>) {
    let pre = &read_json(&shared.join("models/resnet20-cifar10.json"))["preprocessing"];
    let stat = |key: &str| -> Vec<f32> {
        pre[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let (mean, std) = (stat("mean"), stat("std"));
    let path = shared.join("datasets/cifar10-jpeg/cifar-10-batches-bin/test_batch.bin");
    let bytes = std::fs::read(&path).unwrap();
    let mut images = Vec::with_capacity(count * 3072);
    let mut labels = Vec::with_capacity(count);
    for record in bytes.chunks_exact(3073).take(count) {
        labels.push(record[0]);
        for (i, &pixel) in record[1..].iter().enumerate() {
            let c = i / 1024;
            images.push((pixel as f32 / 255.0 - mean[c]) / std[c]);
        }
    }
    assert_eq!(
        labels.len(),
        count,
        "{} holds fewer than {count} images",
        path.display()
    );
    (images, labels)
}

#[test]
fn resnet20_matches_onnx_runtime_logits() {
    let Some(shared) = shared("") else {
        return skip("../shared (ResNet-20 and CIFAR-10) is not available");
    };
    let graph = load_onnx(&shared.join("models/resnet20-cifar10.onnx")).unwrap();
    assert_eq!(graph.input_shape, Shape::new(3, 32, 32));
    assert_eq!(graph.num_classes(), 10);
    assert_eq!(
        op_names(&graph).iter().filter(|&&op| op == "Conv").count(),
        19
    );

    let meta = read_json(&fixtures().join("resnet20_first8.json"));
    let expected = read_f32(&fixtures().join("resnet20_first8.output.bin"));
    let (images, labels) = cifar_test_images(&shared, 8);
    let fixture_labels: Vec<u8> = meta["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(
        labels, fixture_labels,
        "the fixture was made from other images"
    );

    let logits = float::forward(&graph, &images, 8);
    let diff = max_abs_diff(&logits, &expected);
    assert!(diff <= 1e-3, "max abs diff {diff} to ONNX Runtime");
    for (got, want) in logits.chunks(10).zip(expected.chunks(10)) {
        assert_eq!(argmax(got), argmax(want));
    }
}

/// Float top-1 over the whole CIFAR-10 test batch; ONNX Runtime scores 81.03 % (8,103
/// images) on the shared JPEG copy. Run with `--ignored --nocapture` for the timing.
#[test]
#[ignore = "slow: 10,000 images through the float engine"]
fn resnet20_float_top1_on_full_test_batch() {
    let Some(shared) = shared("") else {
        return skip("../shared (ResNet-20 and CIFAR-10) is not available");
    };
    let graph = load_onnx(&shared.join("models/resnet20-cifar10.onnx")).unwrap();
    let (images, labels) = cifar_test_images(&shared, 10_000);
    let start = Instant::now();
    let mut correct = 0;
    for (chunk, chunk_labels) in images.chunks(256 * 3072).zip(labels.chunks(256)) {
        let logits = float::forward(&graph, chunk, chunk_labels.len());
        correct += logits
            .chunks(10)
            .zip(chunk_labels)
            .filter(|(row, &label)| argmax(row) == label as usize)
            .count();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ResNet-20 float top-1 on CIFAR-10 (JPEG q75 copy) test batch: {:.2} % ({correct}/10000), \
         {secs:.1} s single-threaded ({:.0} img/s)",
        correct as f64 / 100.0,
        10_000.0 / secs
    );
    // Rounding differences may flip an image or two whose top logits are nearly tied.
    assert!(
        (8100..=8106).contains(&correct),
        "{correct} correct, ONNX Runtime has 8103"
    );
}

// ---- error paths --------------------------------------------------------------------------

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(format!("{name}.onnx"))).unwrap()
}

fn fixture_model(name: &str) -> ModelProto {
    ModelProto::decode(fixture_bytes(name).as_slice()).unwrap()
}

fn import_model(model: &ModelProto) -> ccq_common::Result<Graph> {
    import_onnx(&model.encode_to_vec(), "edited.onnx")
}

fn graph_mut(model: &mut ModelProto) -> &mut proto::GraphProto {
    model.graph.as_mut().unwrap()
}

fn node_mut<'m>(model: &'m mut ModelProto, name: &str) -> &'m mut NodeProto {
    graph_mut(model)
        .node
        .iter_mut()
        .find(|n| n.name == name)
        .unwrap()
}

fn initializer_mut<'m>(model: &'m mut ModelProto, name: &str) -> &'m mut TensorProto {
    graph_mut(model)
        .initializer
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap()
}

fn attr_mut<'n>(node: &'n mut NodeProto, name: &str) -> &'n mut AttributeProto {
    node.attribute.iter_mut().find(|a| a.name == name).unwrap()
}

/// The node and op of an UnsupportedOp error, and its reason.
fn unsupported(result: ccq_common::Result<Graph>) -> (String, String, String) {
    match result {
        Err(Error::UnsupportedOp { node, op, reason }) => (node, op, reason),
        other => panic!("expected UnsupportedOp, got {other:?}"),
    }
}

/// The node and reason of an InvalidModel error.
fn invalid(result: ccq_common::Result<Graph>) -> (String, String) {
    match result {
        Err(Error::InvalidModel { node, reason }) => (node, reason),
        other => panic!("expected InvalidModel, got {other:?}"),
    }
}

#[test]
fn edited_fixture_still_imports_unchanged() {
    // The error tests below edit decoded fixtures; this checks that decoding and
    // re-encoding through the crate's proto messages loses nothing the importer reads.
    let original = load_onnx(&fixtures().join("misc11.onnx")).unwrap();
    assert_eq!(import_model(&fixture_model("misc11")).unwrap(), original);
}

#[test]
fn truncated_file_is_a_decode_error_naming_it() {
    let bytes = fixture_bytes("tiny_resnet");
    let err = import_onnx(&bytes[..bytes.len() / 2], "half.onnx").unwrap_err();
    assert!(
        matches!(&err, Error::OnnxDecode { path, .. } if path == "half.onnx"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("half.onnx: not a valid ONNX model"),
        "{err}"
    );
}

#[test]
fn random_bytes_are_a_decode_error() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let bytes: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    let err = import_onnx(&bytes, "noise.bin").unwrap_err();
    assert!(
        matches!(&err, Error::OnnxDecode { path, .. } if path == "noise.bin"),
        "{err:?}"
    );
    // An empty file decodes as an empty message, which has no graph.
    let err = import_onnx(&[], "empty.onnx").unwrap_err();
    let no_graph = matches!(&err, Error::OnnxDecode { reason, .. } if reason.contains("no graph"));
    assert!(no_graph, "{err:?}");
}

#[test]
fn nonexistent_file_error_names_the_path() {
    let path = Path::new("/nonexistent/dir/model.onnx");
    let err = load_onnx(path).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path: p, .. } if p == path),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("/nonexistent/dir/model.onnx"),
        "{err}"
    );
}

#[test]
fn unsupported_op_names_node_op_and_supported_ops() {
    let mut model = fixture_model("tiny_resnet");
    node_mut(&mut model, "layer1.0.relu1").op_type = "Elu".into();
    let (node, op, reason) = unsupported(import_model(&model));
    assert_eq!((node.as_str(), op.as_str()), ("layer1.0.relu1", "Elu"));
    for listed in [
        "Conv (any group)",
        "BatchNormalization",
        "Gemm",
        "Slice",
        "Pad",
        "Sigmoid",
        "HardSwish",
        "Mul",
        "Concat (axis 1)",
    ] {
        assert!(
            reason.contains(listed),
            "reason does not list {listed}: {reason}"
        );
    }
}

#[test]
fn grouped_conv_imports_and_runs() {
    // Half the input channels per group: weight [8, 4, 3, 3] with group=2 (mobile17
    // checks grouped convolution against ONNX Runtime).
    let mut model = fixture_model("tiny_resnet");
    let w = initializer_mut(&mut model, "layer1.0.conv2.weight");
    w.dims = vec![8, 4, 3, 3];
    w.raw_data.truncate(8 * 4 * 9 * 4);
    attr_mut(node_mut(&mut model, "layer1.0.conv2"), "group").i = 2;
    let graph = import_model(&model).unwrap();
    let Op::Conv(conv) = find_op(&graph, "layer1.0.conv2") else {
        panic!("not a conv")
    };
    assert_eq!((conv.group, conv.in_channels, conv.out_channels), (2, 8, 8));
    let input = vec![0.5; graph.input_shape.len()];
    assert!(float::forward(&graph, &input, 1)
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn group_not_dividing_the_channels_is_an_invalid_model() {
    // mobile17's gconv: 8 input channels, weight [12, 2, 3, 3], group=4.
    let mut model = fixture_model("mobile17");
    attr_mut(node_mut(&mut model, "gconv"), "group").i = 3;
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "gconv");
    assert_eq!(
        reason,
        "group=3 does not divide the 8 input channels (input shape [8, 8, 8])"
    );

    // 10 output channels cannot be split into 4 groups.
    let mut model = fixture_model("mobile17");
    let w = initializer_mut(&mut model, "gconv.weight");
    w.dims = vec![10, 2, 3, 3];
    w.raw_data.truncate(10 * 2 * 9 * 4);
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "gconv");
    assert_eq!(
        reason,
        "group=4 does not divide the 10 output channels of the weight [10, 2, 3, 3]"
    );

    // group divides the input, but the weight has the wrong channels per group.
    let mut model = fixture_model("mobile17");
    attr_mut(node_mut(&mut model, "gconv"), "group").i = 2;
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "gconv");
    assert!(
        reason.contains("with group=2 expects 4 input channels"),
        "{reason}"
    );
}

#[test]
fn mul_with_an_unsupported_broadcast_is_refused() {
    // A one-channel SE scale, [N, 1, 1, 1] against [N, 8, 8, 8]: valid ONNX, no IR form.
    let mut model = fixture_model("mobile17");
    let w = initializer_mut(&mut model, "se.fc2.weight");
    w.dims = vec![1, 4, 1, 1];
    w.raw_data.truncate(4 * 4);
    let b = initializer_mut(&mut model, "se.fc2.bias");
    b.dims = vec![1];
    b.raw_data.truncate(4);
    let (node, op, reason) = unsupported(import_model(&model));
    assert_eq!((node.as_str(), op.as_str()), ("se.Mul", "Mul"));
    assert!(
        reason.starts_with(
            "broadcasting 'dw_act_output_0' [N, 8, 8, 8] and 'se.gate_output_0' [N, 1, 1, 1] \
             is not supported"
        ),
        "{reason}"
    );

    // [N, 16] features against an [N, 12, 1, 1] value: mixed ranks.
    let mut model = fixture_model("mobile17_variants");
    node_mut(&mut model, "fc1.Mul").input[1] = "pool_output_0".into();
    let (node, op, reason) = unsupported(import_model(&model));
    assert_eq!((node.as_str(), op.as_str()), ("fc1.Mul", "Mul"));
    assert!(reason.contains("[N, 16] and"), "{reason}");

    // 8 channels against 4: no broadcast at all.
    let mut model = fixture_model("mobile17");
    node_mut(&mut model, "se.Mul").input[1] = "se.relu_output_0".into();
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "se.Mul");
    assert_eq!(
        reason,
        "its inputs 'dw_act_output_0' [N, 8, 8, 8] and 'se.relu_output_0' [N, 4, 1, 1] do \
         not broadcast"
    );

    // A constant factor, in either position.
    for position in [0, 1] {
        let mut model = fixture_model("mobile17");
        node_mut(&mut model, "se.Mul").input[position] = "se.fc2.bias".into();
        let (node, op, reason) = unsupported(import_model(&model));
        assert_eq!((node.as_str(), op.as_str()), ("se.Mul", "Mul"));
        assert!(
            reason.starts_with("Mul by a constant ('se.fc2.bias', dims [8]) is not supported"),
            "{reason}"
        );
    }
}

#[test]
fn sigmoid_with_a_second_reader_is_not_fused() {
    // branch_a reads the SiLU's Sigmoid too, so the Sigmoid must stay.
    let mut model = fixture_model("mobile17");
    node_mut(&mut model, "branch_a").input[0] = "act.Sigmoid_output_0".into();
    let graph = import_model(&model).unwrap();
    assert_eq!(find_op(&graph, "act.Sigmoid"), &Op::Unary(Unary::Sigmoid));
    assert_eq!(
        inputs_of(&graph, "act.Mul"),
        [value_of(&graph, "gconv"), value_of(&graph, "act.Sigmoid")]
    );
    assert_eq!(
        inputs_of(&graph, "branch_a"),
        [value_of(&graph, "act.Sigmoid")]
    );
    assert!(graph.nodes.iter().all(|n| n.op != Op::Unary(Unary::Silu)));

    // Nor is Mul(x, Sigmoid(y)): here the Sigmoid's only reader multiplies it by the
    // SiLU's output instead of the Sigmoid's own input.
    let mut model = fixture_model("mobile17_variants");
    node_mut(&mut model, "cat").input[1] = "se.Mul_output_0".into();
    node_mut(&mut model, "gate.Mul").input[0] = "act1.Mul_output_0".into();
    let graph = import_model(&model).unwrap();
    assert_eq!(find_op(&graph, "gate"), &Op::Unary(Unary::Sigmoid));
    assert_eq!(find_op(&graph, "gate.Mul"), &Op::Mul);
}

#[test]
fn concat_off_the_channel_axis_is_refused() {
    let mut model = fixture_model("mobile17");
    attr_mut(node_mut(&mut model, "cat"), "axis").i = 2;
    let (node, op, reason) = unsupported(import_model(&model));
    assert_eq!((node.as_str(), op.as_str()), ("cat", "Concat"));
    assert_eq!(
        reason,
        "Concat along axis 2 of [N, 6, 4, 4] is not supported; only along channels (axis 1; \
         also -3 for [N, C, H, W] or -1 for [N, F] inputs) is"
    );

    // The batch axis, written from the end.
    attr_mut(node_mut(&mut model, "cat"), "axis").i = -4;
    let (_, _, reason) = unsupported(import_model(&model));
    assert!(reason.starts_with("Concat along axis -4"), "{reason}");

    attr_mut(node_mut(&mut model, "cat"), "axis").i = 4;
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "cat");
    assert!(reason.contains("out of range"), "{reason}");

    node_mut(&mut model, "cat").attribute.clear();
    let (_, reason) = invalid(import_model(&model));
    assert_eq!(reason, "attribute 'axis' is missing");
}

#[test]
fn concat_of_different_sizes_is_an_invalid_model() {
    // branch_a is [N, 6, 4, 4]; dw_act is [N, 8, 8, 8].
    let mut model = fixture_model("mobile17");
    node_mut(&mut model, "cat").input[1] = "dw_act_output_0".into();
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "cat");
    assert!(
        reason.contains("[N, 6, 4, 4]") && reason.contains("[N, 8, 8, 8]"),
        "{reason}"
    );

    // [N, C, H, W] with [N, F].
    let mut model = fixture_model("mobile17_variants");
    node_mut(&mut model, "fc1.cat").input[1] = "pool_output_0".into();
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "fc1.cat");
    assert!(reason.contains("differ in rank"), "{reason}");
}

#[test]
fn activation_attributes_must_be_finite() {
    let mut model = fixture_model("mobile17");
    attr_mut(node_mut(&mut model, "se.gate"), "alpha").f = f32::NAN;
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "se.gate");
    assert!(reason.contains("alpha=NaN"), "{reason}");

    let mut model = fixture_model("mobile17");
    attr_mut(node_mut(&mut model, "dw_act"), "alpha").f = f32::INFINITY;
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "dw_act");
    assert!(reason.contains("alpha=inf"), "{reason}");
}

#[test]
fn missing_conv_weight_is_an_invalid_model() {
    let mut model = fixture_model("tiny_resnet");
    graph_mut(&mut model)
        .initializer
        .retain(|t| t.name != "layer1.0.conv1.weight");
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "layer1.0.conv1");
    assert!(
        reason.contains("'layer1.0.conv1.weight' is missing"),
        "{reason}"
    );
}

#[test]
fn corrupt_initializer_names_tensor_and_node() {
    let mut model = fixture_model("tiny_resnet");
    initializer_mut(&mut model, "conv1.weight")
        .raw_data
        .truncate(100);
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "conv1");
    assert!(
        reason.contains("conv1.weight") && reason.contains("100 bytes"),
        "{reason}"
    );
}

#[test]
fn reshape_that_is_not_a_flatten_is_unsupported() {
    let mut model = fixture_model("mnist_cnn");
    let shape = initializer_mut(&mut model, "flat_shape");
    *shape = TensorProto {
        name: "flat_shape".into(),
        dims: vec![3],
        data_type: proto::DataType::Int64 as i32,
        int64_data: vec![-1, 8, 25],
        ..Default::default()
    };
    let (node, op, reason) = unsupported(import_model(&model));
    assert_eq!((node.as_str(), op.as_str()), ("view", "Reshape"));
    assert!(reason.contains("[-1, 8, 25]"), "{reason}");
}

#[test]
fn batch_norm_whose_input_feeds_another_node_is_rejected() {
    // Make the identity shortcut of layer1.0 read conv1's raw output, which bn1 also reads.
    let mut model = fixture_model("tiny_resnet");
    node_mut(&mut model, "layer1.0.Add").input[1] = "conv1_output_0".into();
    let (node, op, reason) = unsupported(import_model(&model));
    assert_eq!((node.as_str(), op.as_str()), ("bn1", "BatchNormalization"));
    assert!(reason.contains("also feeds other nodes"), "{reason}");
}

#[test]
fn batch_norm_after_a_non_linear_op_is_rejected() {
    let mut model = fixture_model("tiny_resnet");
    node_mut(&mut model, "layer1.0.bn1").input[0] = "relu_output_0".into();
    let (node, op, reason) = unsupported(import_model(&model));
    assert_eq!(
        (node.as_str(), op.as_str()),
        ("layer1.0.bn1", "BatchNormalization")
    );
    assert!(reason.contains("'relu' (Relu)"), "{reason}");
}

#[test]
fn slice_or_pad_of_the_batch_axis_is_unsupported() {
    let mut model = fixture_model("tiny_resnet");
    let axes = initializer_mut(&mut model, "layer2.0.axes");
    axes.raw_data = [0i64, 3].iter().flat_map(|a| a.to_le_bytes()).collect();
    let (node, op, reason) = unsupported(import_model(&model));
    assert_eq!(
        (node.as_str(), op.as_str()),
        ("layer2.0.shortcut.Slice", "Slice")
    );
    assert!(reason.contains("batch axis"), "{reason}");

    let mut model = fixture_model("tiny_resnet");
    let pads = initializer_mut(&mut model, "layer2.0.pads");
    pads.raw_data = [1i64, 4, 0, 0, 0, 4, 0, 0]
        .iter()
        .flat_map(|a| a.to_le_bytes())
        .collect();
    let (node, op, reason) = unsupported(import_model(&model));
    assert_eq!(
        (node.as_str(), op.as_str()),
        ("layer2.0.shortcut.Pad", "Pad")
    );
    assert!(reason.contains("batch axis"), "{reason}");
}

#[test]
fn add_of_different_shapes_is_an_invalid_model() {
    // The option-A shortcut without its channel padding: [16, 8, 8] + [8, 8, 8].
    let mut model = fixture_model("tiny_resnet");
    node_mut(&mut model, "layer2.0.Add").input[1] = "layer2.0.shortcut.Slice_output_0".into();
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "layer2.0.Add");
    assert!(
        reason.contains("[N, 16, 8, 8]") && reason.contains("[N, 8, 8, 8]"),
        "{reason}"
    );
}

#[test]
fn conv_channel_mismatch_is_an_invalid_model() {
    // layer1.0.conv1 expects 8 channels; feed it the 3-channel image.
    let mut model = fixture_model("tiny_resnet");
    node_mut(&mut model, "layer1.0.conv1").input[0] = "input".into();
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "layer1.0.conv1");
    assert!(reason.contains("expects 8 input channels"), "{reason}");
}

#[test]
fn linear_feature_mismatch_is_an_invalid_model() {
    // Skip the second pooling: the Gemm then sees 8*10*10 features instead of 200.
    let mut model = fixture_model("mnist_cnn");
    node_mut(&mut model, "view").input[0] = "relu2_output_0".into();
    let shape = initializer_mut(&mut model, "flat_shape");
    shape.raw_data.clear();
    shape.int64_data = vec![0, -1];
    let (node, reason) = invalid(import_model(&model));
    assert_eq!(node, "fc");
    assert!(
        reason.contains("expects 200 input features, the input has 800"),
        "{reason}"
    );
}

#[test]
fn graph_must_have_one_output() {
    let mut model = fixture_model("tiny_resnet");
    let extra = graph_mut(&mut model).output[0].clone();
    graph_mut(&mut model).output.push(extra);
    let (_, reason) = invalid(import_model(&model));
    assert!(reason.contains("2 outputs"), "{reason}");
}

#[test]
fn import_never_panics_on_damaged_files() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut outcomes = [0usize; 2];
    for name in [
        "tiny_resnet",
        "mnist_cnn",
        "misc11",
        "legacy9",
        "misc17",
        "mobile17",
        "mobile17_variants",
    ] {
        let bytes = fixture_bytes(name);
        let mut cases: Vec<Vec<u8>> = (0..bytes.len())
            .step_by(97)
            .map(|cut| bytes[..cut].to_vec())
            .collect();
        for _ in 0..300 {
            let mut damaged = bytes.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..damaged.len());
                damaged[at] = rng.random();
            }
            cases.push(damaged);
        }
        for case in cases {
            let result = import_onnx(&case, name);
            outcomes[result.is_ok() as usize] += 1;
            // Whatever imports must also run (on models of sane size).
            if let Ok(graph) = result {
                let total: usize = (0..=graph.nodes.len()).map(|v| graph.shape(v).len()).sum();
                if total < 10_000_000 {
                    let input = vec![0.5; graph.input_shape.len()];
                    assert_eq!(float::forward(&graph, &input, 1).len(), graph.num_classes());
                }
            }
        }
    }
    // Both outcomes occur: flipping a weight byte still imports, cutting a file does not.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}
