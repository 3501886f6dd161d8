#!/usr/bin/env python3
"""Writes ImageNet-sized networks with seeded random weights, to measure what ccq's integer
engine costs at 224 × 224 (README "Your own model", docs/PERFORMANCE.md). Accuracy is not
the point (the weights are random); the graph and the arithmetic are a real ResNet-18's.

    python3 scripts/make_big_models.py --out runs/big-models

resnet18.onnx  opset 13  torchvision's ResNet-18 layout: Conv 7×7/2 + BatchNormalization +
                         Relu, MaxPool 3×3/2, four stages of two basic blocks (64, 128, 256,
                         512 channels; 1×1/2 Conv + BatchNormalization shortcuts), Add,
                         GlobalAveragePool, Flatten, Gemm to 10 classes. 11.2 M weights.

The files are large (45 MB) and never committed. Needs numpy and onnx.
"""

import argparse
from pathlib import Path

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/big-models"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = resnet18()
    onnx.save(model, args.out / "resnet18.onnx")
    weights = sum(int(onnx.numpy_helper.to_array(t).size) for t in model.graph.initializer)
    print(f"{args.out / 'resnet18.onnx'}: {weights:,} parameters")


if __name__ == "__main__":
    main()
