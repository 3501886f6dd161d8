#!/usr/bin/env python3
"""Writes ImageNet-sized networks with seeded random weights, to measure what ccq's integer
engine costs at 224 × 224 (README "Your own model", docs/PERFORMANCE.md). Accuracy is not
the point (the weights are random); the graphs and the arithmetic are a real ResNet-18's
and a real MobileNetV2's.

    python3 scripts/make_big_models.py --out runs/big-models

resnet18.onnx      opset 13  torchvision's ResNet-18 layout: Conv 7×7/2 + BatchNormalization +
                             Relu, MaxPool 3×3/2, four stages of two basic blocks (64, 128,
                             256, 512 channels; 1×1/2 Conv + BatchNormalization shortcuts),
                             Add, GlobalAveragePool, Flatten, Gemm to 10 classes. 11.2 M
                             weights, 1.8 GFLOPs per image.
mobilenet_v2.onnx  opset 13  torchvision's MobileNetV2 layout (width 1.0): Conv 3×3/2 32 +
                             BatchNormalization + ReLU6 (Clip 0..6), 17 inverted residual
                             blocks by torchvision's (t, c, n, s) table (expand 1×1 + BN +
                             ReLU6 unless t = 1, depthwise 3×3 Conv with group = channels +
                             BN + ReLU6, project 1×1 + BN, Add when stride 1 and in = out),
                             Conv 1×1 1280 + BN + ReLU6, GlobalAveragePool, Flatten, Gemm to
                             10 classes. 2.2 M weights, 0.3 GMACs per image.

Both keep BatchNormalization as separate nodes, as a PyTorch eval-mode export does (ccq
folds them). The files are large (45 MB and 9 MB) and never committed. Needs numpy and onnx.
"""

import argparse
from pathlib import Path

import numpy as np
import onnx

from make_onnx_fixtures import Builder


def resnet18(classes=10):
    b = Builder(seed=18)

    def block(x, cin, cout, stride, name):
        y = b.node("Relu", [b.bn(b.conv(x, cin, cout, f"{name}.conv1", strides=[stride] * 2, pads=[1] * 4),
                                 cout, f"{name}.bn1")], f"{name}.relu1")
        y = b.bn(b.conv(y, cout, cout, f"{name}.conv2", pads=[1] * 4), cout, f"{name}.bn2")
        if stride != 1 or cin != cout:
            short = b.bn(b.conv(x, cin, cout, f"{name}.downsample.0", k=1, strides=[stride] * 2),
                         cout, f"{name}.downsample.1")
        else:
            short = x
        return b.node("Relu", [b.node("Add", [y, short], f"{name}.Add")], f"{name}.relu2")

    x = b.node("Relu", [b.bn(b.conv("input", 3, 64, "conv1", k=7, strides=[2, 2], pads=[3] * 4), 64, "bn1")], "relu")
    x = b.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin = 64
    for stage, cout in enumerate([64, 128, 256, 512], start=1):
        for i in range(2):
            stride = 2 if (stage > 1 and i == 0) else 1
            x = block(x, cin, cout, stride, f"layer{stage}.{i}")
            cin = cout
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "avgpool")], "flatten", axis=1)
    logits = b.node("Gemm", [x, b.weight("fc.weight", (classes, 512), 512), b.small("fc.bias", (classes,))],
                    "fc", transB=1)
    return b.model("resnet18", 13, (3, 224, 224), logits, classes)


# torchvision's MobileNetV2 inverted residual settings: expansion t, output channels c,
# repeats n, stride s of the first repeat.
MOBILENET_V2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(classes=10):
    b = Builder(seed=2)

    def relu6(x, name):
        # PyTorch exports ReLU6 as Clip with constant bounds (opset >= 11).
        return b.node("Clip", [x, b.constant(f"{name}.min", np.array(0.0, np.float32)),
                               b.constant(f"{name}.max", np.array(6.0, np.float32))], name)

    def conv_bn(x, cin, cout, name, k, stride=1, group=1, act=True):
        y = b.bn(b.conv(x, cin, cout, f"{name}.0", k=k, group=group, strides=[stride] * 2,
                        pads=[k // 2] * 4), cout, f"{name}.1")
        return relu6(y, f"{name}.2") if act else y

    def inverted_residual(x, cin, cout, stride, t, name):
        hidden = cin * t
        y, i = x, 0
        if t != 1:
            y = conv_bn(y, cin, hidden, f"{name}.conv.{i}", k=1)
            i += 1
        y = conv_bn(y, hidden, hidden, f"{name}.conv.{i}", k=3, stride=stride, group=hidden)
        i += 1
        y = b.bn(b.conv(y, hidden, cout, f"{name}.conv.{i}", k=1), cout, f"{name}.conv.{i + 1}")
        if stride == 1 and cin == cout:
            y = b.node("Add", [x, y], f"{name}.Add")
        return y

    x = conv_bn("input", 3, 32, "features.0", k=3, stride=2)
    cin, index = 32, 1
    for t, c, n, s in MOBILENET_V2_SETTINGS:
        for i in range(n):
            x = inverted_residual(x, cin, c, s if i == 0 else 1, t, f"features.{index}")
            cin, index = c, index + 1
    x = conv_bn(x, cin, 1280, f"features.{index}", k=1)
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "avgpool")], "flatten", axis=1)
    logits = b.node("Gemm", [x, b.weight("classifier.1.weight", (classes, 1280), 1280),
                             b.small("classifier.1.bias", (classes,))], "classifier.1", transB=1)
    return b.model("mobilenet_v2", 13, (3, 224, 224), logits, classes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/big-models"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in [("resnet18.onnx", resnet18), ("mobilenet_v2.onnx", mobilenet_v2)]:
        model = build()
        onnx.save(model, args.out / name)
        weights = sum(int(onnx.numpy_helper.to_array(t).size) for t in model.graph.initializer)
        print(f"{args.out / name}: {weights:,} parameters")


if __name__ == "__main__":
    main()
