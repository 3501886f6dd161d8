#!/usr/bin/env python3
"""Builds the ONNX import fixtures of ccq-common (common/tests/fixtures/).

Each fixture is a small model written with onnx.helper and seeded random weights, chosen
so that together they exercise every lowering rule of common/src/onnx/:

  tiny_resnet  opset 13  CIFAR-style ResNet: Conv (no bias) + BatchNormalization + Relu,
                         identity and option-A shortcuts (Slice step 2 + channel Pad), Add,
                         GlobalAveragePool, Flatten, Gemm transB=1
  mnist_cnn    opset 11  Conv + bias, Relu, MaxPool, Reshape by a shape initializer,
                         Gemm transB=0 with alpha/beta != 1
  misc11       opset 11  strided/padded/dilated Conv, auto_pad SAME_UPPER, Identity,
                         Clip with min/max inputs (Constant node, initializer, absent),
                         AveragePool with count_include_pad 1 and 0, Dropout, Flatten,
                         MatMul + Add bias (initializer and Constant node)
  legacy9      opset 9   Clip, Slice and Pad with attributes, Conv + BatchNormalization
                         with tiny running variances (so that epsilon matters), MaxPool,
                         Flatten, MatMul + BatchNormalization over features
  misc17       opset 17  depthwise Conv, 1x1 Conv, BatchNormalization whose output feeds
                         two branches, Conv + bias + Add of a per-channel constant,
                         asymmetric kernel, Slice with negative bounds and a step, Pad
                         without a constant value, Add, padded MaxPool over signed values,
                         Dropout with a ratio input, Reshape [0, -1] from a Constant node,
                         Gemm with C of shape [1, K]
  mobile17     opset 17  a MobileNetV3/EfficientNet-style net in PyTorch's export forms:
                         stem Conv + BatchNormalization + HardSwish, depthwise Conv +
                         LeakyRelu (alpha 0.1), squeeze-excitation (GlobalAveragePool,
                         1x1 Conv, Relu, 1x1 Conv, HardSigmoid alpha 0.25 beta 0.45, Mul by
                         the [N, C, 1, 1] scale), grouped Conv (group 4) + BatchNormalization
                         + SiLU as Sigmoid then Mul(x, sigmoid), two branches (1x1 Conv +
                         Tanh, 3x3 Conv + Sigmoid) joined by Concat axis 1,
                         GlobalAveragePool, Flatten, Gemm
  mobile17_variants
               opset 17  the other forms: Mul(Sigmoid(x), x), Mul(scale, x) with the
                         [N, C, 1, 1] scale first, HardSigmoid and LeakyRelu with default
                         attributes, a Sigmoid read twice (not a SiLU), same-shape Mul,
                         Concat of three inputs along axis -3, grouped 1x1 Conv (group 3),
                         Tanh, HardSwish, Mul and Concat on [N, F] features between Gemms

For each fixture NAME it writes NAME.onnx, NAME.input.bin and NAME.output.bin
(little-endian float32, NCHW / [N, classes]) and NAME.json giving their shapes; the
outputs are ONNX Runtime's (one thread). When ../shared exists (see /work/shared/README.md)
it also writes resnet20_first8.{json,output.bin}: ONNX Runtime's logits of the shared
ResNet-20 on the first 8 images of the CIFAR-10 test batch, preprocessed with the model's
mean/std; the test rebuilds those inputs from the dataset itself.

Everything is seeded, so rerunning the script reproduces the fixtures byte for byte.
Requires numpy, onnx and onnxruntime.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "common" / "tests" / "fixtures"
SHARED = ROOT.parent / "shared"
INT64_MAX = np.iinfo(np.int64).max


class Builder:
    """Accumulates nodes and initializers; names follow PyTorch's export style."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.initializers = []

    def init(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name, shape, fan_in):
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
        return self.init(name, w)

    def small(self, name, shape, scale=0.1):
        return self.init(name, self.rng.normal(0.0, scale, size=shape).astype(np.float32))

    def node(self, op, inputs, name, **attrs):
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def constant(self, name, array):
        out = f"{name}_output_0"
        value = numpy_helper.from_array(np.asarray(array), name=f"{name}_value")
        self.nodes.append(helper.make_node("Constant", [], [out], name=name, value=value))
        return out

    def conv(self, x, cin, cout, name, k=3, bias=False, group=1, **attrs):
        kh, kw = (k, k) if isinstance(k, int) else k
        w = self.weight(f"{name}.weight", (cout, cin // group, kh, kw), cin // group * kh * kw)
        inputs = [x, w]
        if bias:
            inputs.append(self.small(f"{name}.bias", (cout,)))
        return self.node("Conv", inputs, name, kernel_shape=[kh, kw], group=group, **attrs)

    def bn(self, x, channels, name, var_scale=1.0):
        r = self.rng
        # With var_scale << 1 the variances are comparable to epsilon, which then matters;
        # the scales shrink alike to keep activations O(1).
        gain = np.sqrt(var_scale)
        params = [
            self.init(f"{name}.weight", (gain * r.uniform(0.5, 1.5, channels)).astype(np.float32)),
            self.init(f"{name}.bias", r.normal(0.0, 0.1, channels).astype(np.float32)),
            self.init(f"{name}.running_mean", r.normal(0.0, 0.1, channels).astype(np.float32)),
            self.init(f"{name}.running_var", (var_scale * r.uniform(0.5, 1.5, channels)).astype(np.float32)),
        ]
        return self.node("BatchNormalization", [x] + params, name, epsilon=1e-5, momentum=0.9)

    def model(self, name, opset, input_shape, output, classes):
        batch = "N"
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch] + list(input_shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, classes])],
            self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            producer_name="ccq make_onnx_fixtures.py",
        )
        # ONNX Runtime 1.2x reads IR version <= 10; pin it so that the bytes do not depend
        # on the installed onnx package's default.
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def tiny_resnet():
    b = Builder(seed=1)

    def block(x, cin, cout, stride, name):
        y = b.node("Relu", [b.bn(b.conv(x, cin, cout, f"{name}.conv1", strides=[stride] * 2, pads=[1] * 4),
                                 cout, f"{name}.bn1")], f"{name}.relu1")
        y = b.bn(b.conv(y, cout, cout, f"{name}.conv2", pads=[1] * 4), cout, f"{name}.bn2")
        if stride != 1 or cin != cout:
            # Option A (He et al.): x[:, :, ::2, ::2] zero-padded to cout channels.
            short = b.node("Slice", [x, b.init(f"{name}.starts", np.array([0, 0], np.int64)),
                                     b.init(f"{name}.ends", np.array([INT64_MAX, INT64_MAX], np.int64)),
                                     b.init(f"{name}.axes", np.array([2, 3], np.int64)),
                                     b.init(f"{name}.steps", np.array([2, 2], np.int64))],
                           f"{name}.shortcut.Slice")
            extra = (cout - cin) // 2
            short = b.node("Pad", [short, b.init(f"{name}.pads", np.array([0, extra, 0, 0, 0, extra, 0, 0], np.int64)),
                                   b.init(f"{name}.value", np.array([0.0], np.float32))],
                           f"{name}.shortcut.Pad", mode="constant")
        else:
            short = x
        return b.node("Relu", [b.node("Add", [y, short], f"{name}.Add")], f"{name}.relu2")

    x = b.node("Relu", [b.bn(b.conv("input", 3, 8, "conv1", pads=[1] * 4), 8, "bn1")], "relu")
    x = block(x, 8, 8, 1, "layer1.0")
    x = block(x, 8, 16, 2, "layer2.0")
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    logits = b.node("Gemm", [x, b.weight("linear.weight", (10, 16), 16), b.small("linear.bias", (10,))],
                    "linear", transB=1)
    return b.model("tiny_resnet", 13, (3, 16, 16), logits, 10), (3, 16, 16)


def mnist_cnn():
    b = Builder(seed=2)
    x = b.node("Relu", [b.conv("input", 1, 4, "conv1", k=5, bias=True)], "relu1")
    x = b.node("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Relu", [b.conv(x, 4, 8, "conv2", k=3, bias=True)], "relu2")
    x = b.node("MaxPool", [x], "pool2", kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Reshape", [x, b.init("flat_shape", np.array([-1, 200], np.int64))], "view")
    logits = b.node("Gemm", [x, b.weight("fc.weight", (200, 10), 200), b.small("fc.bias", (10,))],
                    "fc", transB=0, alpha=0.5, beta=2.0)
    return b.model("mnist_cnn", 11, (1, 28, 28), logits, 10), (1, 28, 28)


def misc11():
    b = Builder(seed=3)
    x = b.conv("input", 3, 6, "conv1", k=3, bias=True, strides=[2, 1], pads=[1, 0, 2, 1], dilations=[2, 1])
    x = b.node("Identity", [x], "identity")
    x = b.node("Clip", [x, b.constant("clip_min", np.array(-0.5, np.float32)),
                        b.constant("clip_max", np.array(1.0, np.float32))], "clip1")
    x = b.node("AveragePool", [x], "avgpool_incl", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    x = b.node("Dropout", [x], "dropout", ratio=0.3)
    x = b.conv(x, 6, 5, "conv2", k=2, bias=True, strides=[2, 2], auto_pad="SAME_UPPER")
    x = b.node("Clip", [x, "", b.init("clip2_max", np.array(0.8, np.float32))], "clip2")
    x = b.node("AveragePool", [x], "avgpool_excl", kernel_shape=[2, 2], strides=[2, 2],
               pads=[1, 0, 0, 1], count_include_pad=0)
    x = b.node("Flatten", [x], "flatten", axis=1)
    # 11x10 -> conv1 (6, 5, 9) -> pool (6, 5, 9) -> conv2 (5, 3, 5), SAME_UPPER padding
    # (0, 0) top/left and (1, 1) bottom/right -> pool (5, 2, 3)
    x = b.node("MatMul", [x, b.weight("fc1.weight", (30, 12), 30)], "fc1.MatMul")
    x = b.node("Add", [x, b.small("fc1.bias", (12,))], "fc1.Add")
    x = b.node("Relu", [x], "relu")
    x = b.node("MatMul", [x, b.weight("fc2.weight", (12, 7), 12)], "fc2.MatMul")
    bias = b.constant("fc2.bias", b.rng.normal(0.0, 0.1, (7,)).astype(np.float32))
    logits = b.node("Add", [bias, x], "fc2.Add")
    return b.model("misc11", 11, (3, 11, 10), logits, 7), (3, 11, 10)


def legacy9():
    b = Builder(seed=4)
    x = b.bn(b.conv("input", 4, 6, "conv", pads=[1] * 4), 6, "bn", var_scale=2e-5)
    x = b.node("Clip", [x], "relu6", min=0.0, max=6.0)
    x = b.node("Slice", [x], "slice", starts=[1, 1], ends=[5, 1000], axes=[1, 2])
    x = b.node("Pad", [x], "pad", pads=[0, 0, 1, 0, 0, 0, 0, 2], mode="constant", value=0.0)
    x = b.node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Flatten", [x], "flatten")
    # 8x8 -> conv (6, 8, 8) -> slice (4, 7, 8) -> pad (4, 8, 10) -> pool (4, 4, 5)
    x = b.node("MatMul", [x, b.weight("fc.weight", (80, 10), 80)], "fc")
    logits = b.bn(x, 10, "fc_bn")
    return b.model("legacy9", 9, (4, 8, 8), logits, 10), (4, 8, 8)


def misc17():
    b = Builder(seed=5)
    x = b.conv("input", 4, 4, "dw", k=3, bias=True, group=4, pads=[1] * 4)
    x = b.node("Relu", [b.bn(x, 4, "dw_bn")], "dw_relu")
    trunk = b.bn(b.conv(x, 4, 8, "pw", k=1), 8, "pw_bn")  # feeds both branches below
    s = b.node("Slice", [trunk, b.init("sl.starts", np.array([-6, 1], np.int64)),
                         b.init("sl.ends", np.array([-1, INT64_MAX], np.int64)),
                         b.init("sl.axes", np.array([1, -1], np.int64)),
                         b.init("sl.steps", np.array([1, 2], np.int64))], "slice")
    p = b.node("Pad", [s, b.init("pd.pads", np.array([0, 1, 0, 1, 0, 2, 1, 0], np.int64))], "pad")
    c = b.conv(trunk, 8, 8, "side", k=(1, 5), bias=True, pads=[1, 0, 0, 0])
    c = b.node("Add", [c, b.small("side.extra_bias", (1, 8, 1, 1))], "side.Add")  # folds into the bias
    # Max pooling over signed values (no Relu after it), so that padded cells must never win.
    x = b.node("MaxPool", [b.node("Add", [p, c], "add")], "pool", kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])
    x = b.node("Dropout", [x, b.init("drop.ratio", np.array(0.5, np.float32))], "dropout")
    # 9x9 -> slice (5, 9, 4) -> pad (8, 10, 5); side conv (8, 10, 5) -> pool (8, 5, 3)
    x = b.node("Reshape", [x, b.constant("flat_shape", np.array([0, -1], np.int64))], "reshape")
    logits = b.node("Gemm", [x, b.weight("fc.weight", (120, 10), 120), b.small("fc.bias", (1, 10))], "fc")
    return b.model("misc17", 17, (4, 9, 9), logits, 10), (4, 9, 9)


def mobile17():
    b = Builder(seed=6)
    x = b.bn(b.conv("input", 3, 8, "stem", strides=[2, 2], pads=[1] * 4), 8, "stem_bn")
    x = b.node("HardSwish", [x], "stem_act")
    x = b.conv(x, 8, 8, "dw", bias=True, group=8, pads=[1] * 4)
    x = b.node("LeakyRelu", [x], "dw_act", alpha=0.1)
    # Squeeze-excitation: a per-channel scale in [0, 1] from the pooled features.
    s = b.node("GlobalAveragePool", [x], "se.pool")
    s = b.node("Relu", [b.conv(s, 8, 4, "se.fc1", k=1, bias=True)], "se.relu")
    s = b.node("HardSigmoid", [b.conv(s, 4, 8, "se.fc2", k=1, bias=True)], "se.gate", alpha=0.25, beta=0.45)
    x = b.node("Mul", [x, s], "se.Mul")
    # Grouped, neither plain nor depthwise: 2 input and 3 output channels per group.
    x = b.bn(b.conv(x, 8, 12, "gconv", group=4, strides=[2, 2], pads=[1] * 4), 12, "gconv_bn")
    x = b.node("Mul", [x, b.node("Sigmoid", [x], "act.Sigmoid")], "act.Mul")  # nn.SiLU
    branch_a = b.node("Tanh", [b.conv(x, 12, 6, "branch_a", k=1, bias=True)], "branch_a.act")
    branch_b = b.node("Sigmoid", [b.conv(x, 12, 6, "branch_b", bias=True, pads=[1] * 4)], "branch_b.act")
    x = b.node("Concat", [branch_a, branch_b], "cat", axis=1)
    # 16x16 -> stem (8, 8, 8) -> gconv (12, 4, 4) -> cat (12, 4, 4) -> pool (12, 1, 1); a
    # small last map keeps the logits of random inputs apart.
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    logits = b.node("Gemm", [x, b.weight("fc.weight", (10, 12), 12), b.small("fc.bias", (10,))], "fc", transB=1)
    return b.model("mobile17", 17, (3, 16, 16), logits, 10), (3, 16, 16)


def mobile17_variants():
    b = Builder(seed=7)
    x = b.conv("input", 4, 8, "conv1", bias=True, pads=[1] * 4)
    x = b.node("Mul", [b.node("Sigmoid", [x], "act1.Sigmoid"), x], "act1.Mul")  # SiLU, Sigmoid first
    s = b.node("GlobalAveragePool", [x], "se.pool")
    s = b.node("HardSigmoid", [b.conv(s, 8, 8, "se.fc", k=1, bias=True)], "se.gate")
    y = b.node("Mul", [s, x], "se.Mul")  # the [N, C, 1, 1] scale first
    gate = b.node("Sigmoid", [y], "gate")  # read by the Mul and the Concat: no SiLU
    z = b.node("Mul", [y, gate], "gate.Mul")
    leaky = b.node("LeakyRelu", [y], "leaky")
    x = b.node("Concat", [z, gate, leaky], "cat", axis=-3)
    x = b.conv(x, 24, 12, "gconv", k=1, bias=True, group=3)  # 8 input, 4 output channels per group
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    f = b.node("Gemm", [x, b.weight("fc1.weight", (16, 12), 12), b.small("fc1.bias", (16,))], "fc1", transB=1)
    t = b.node("Tanh", [f], "fc1.tanh")
    h = b.node("HardSwish", [f], "fc1.hardswish")
    x = b.node("Concat", [b.node("Mul", [t, h], "fc1.Mul"), t], "fc1.cat", axis=1)
    logits = b.node("Gemm", [x, b.weight("fc2.weight", (5, 32), 32), b.small("fc2.bias", (5,))], "fc2", transB=1)
    return b.model("mobile17_variants", 17, (4, 6, 6), logits, 5), (4, 6, 6)


def ort_run(model_bytes, x):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    return y


def write_f32(path, array):
    path.write_bytes(np.ascontiguousarray(array, dtype="<f4").tobytes())


def write_fixture(name, model, input_shape, batch=4):
    data = model.SerializeToString()
    (FIXTURES / f"{name}.onnx").write_bytes(data)
    rng = np.random.default_rng(1000 + sum(map(ord, name)))
    x = rng.normal(0.0, 1.0, size=(batch,) + tuple(input_shape)).astype(np.float32)
    y = ort_run(data, x)
    write_f32(FIXTURES / f"{name}.input.bin", x)
    write_f32(FIXTURES / f"{name}.output.bin", y)
    meta = {
        "model": f"{name}.onnx",
        "input": {"file": f"{name}.input.bin", "shape": list(x.shape)},
        "output": {"file": f"{name}.output.bin", "shape": list(y.shape)},
        "reference": f"onnxruntime {ort.__version__}",
    }
    (FIXTURES / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: {len(data)} bytes, output {y.shape}")


def write_resnet20_logits(count=8):
    model_path = SHARED / "models" / "resnet20-cifar10.onnx"
    batch_path = SHARED / "datasets" / "cifar10-jpeg" / "cifar-10-batches-bin" / "test_batch.bin"
    if not (model_path.exists() and batch_path.exists()):
        print(f"skipping resnet20_first8: {SHARED} has no model or CIFAR-10 test batch")
        return
    pre = json.loads(model_path.with_suffix(".json").read_text())["preprocessing"]
    mean = np.array(pre["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(pre["std"], np.float32).reshape(1, 3, 1, 1)
    records = np.frombuffer(batch_path.read_bytes()[: count * 3073], np.uint8).reshape(count, 3073)
    labels = records[:, 0].astype(int).tolist()
    pixels = records[:, 1:].reshape(count, 3, 32, 32).astype(np.float32)
    x = ((pixels / np.float32(255.0) - mean) / std).astype(np.float32)
    y = ort_run(model_path.read_bytes(), x)
    write_f32(FIXTURES / "resnet20_first8.output.bin", y)
    meta = {
        "model": "../shared/models/resnet20-cifar10.onnx (not committed)",
        "images": f"first {count} records of test_batch.bin, (pixel / 255 - mean) / std, CHW",
        "labels": labels,
        "output": {"file": "resnet20_first8.output.bin", "shape": list(y.shape)},
        "reference": f"onnxruntime {ort.__version__}",
    }
    (FIXTURES / "resnet20_first8.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"resnet20_first8: logits {y.shape}, labels {labels}")


def main():
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for build in (tiny_resnet, mnist_cnn, misc11, legacy9, misc17, mobile17, mobile17_variants):
        model, input_shape = build()
        write_fixture(model.graph.name, model, input_shape)
    write_resnet20_logits()
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    print(f"fixtures: {total} bytes in {FIXTURES}")


if __name__ == "__main__":
    main()
