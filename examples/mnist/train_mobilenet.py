#!/usr/bin/env python3
"""Train a small MobileNetV3-style float MNIST network with numpy only and export it as ONNX.

Reads the committed 8,000/2,000-digit subset in ../data/mnist-10k/ and trains (NCHW shapes,
every Conv before a BatchNormalization is bias-free)

    input [N,1,28,28]
    stem    Conv 3x3/2 1->16 -> BN -> HardSwish                                   [N,16,14,14]
    block1  depthwise 3x3 (group 16) -> BN -> Relu
            -> SE(GlobalAveragePool -> 1x1 16->8 -> Relu -> 1x1 8->16 -> HardSigmoid -> Mul)
            -> 1x1 16->16 -> BN -> Add(block input)                               [N,16,14,14]
    block2  1x1 16->48 -> BN -> HardSwish -> depthwise 3x3/2 -> BN -> HardSwish
            -> 1x1 48->24 -> BN                                                   [N,24,7,7]
    block3  1x1 24->72 -> BN -> HardSwish -> depthwise 3x3 -> BN -> HardSwish
            -> SE(72->24->72) -> 1x1 72->24 -> BN -> Add(block input)              [N,24,7,7]
    head    1x1 24->64 -> BN -> HardSwish -> GlobalAveragePool -> Flatten
            -> Gemm(64->10, transB=1) -> logits [N,10]

with Adam on mini-batches (BatchNorm in training mode with batch statistics, running
statistics kept for evaluation), and writes `mobilenet.onnx` (opset 17, laid out like a
PyTorch eval-mode export with BatchNormalization kept as separate nodes, HardSigmoid with
alpha=1/6, beta=0.5) plus `mobilenet.json` (input, output, preprocessing, parameter count,
float test accuracy measured with ONNX Runtime, architecture).

The model's input is `(pixel / 255 - 0.1307) / 0.3081`.

Deterministic: a fixed seed drives initialisation, shuffling and augmentation, and BLAS is
pinned to one thread (a multi-threaded GEMM may split its sums differently from run to run),
so running this twice on one machine writes byte-identical files.

`--check-gradients` compares the hand-written backward pass with central differences (float64,
a tiny batch, BatchNorm in training mode), prints the largest relative error per parameter
tensor and exits without training.

Needs numpy, onnx and onnxruntime.
Usage: python3 train_mobilenet.py [--out-dir DIR] [--epochs N] [--check-gradients]
"""

import os

# Must happen before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import copy
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE.parent / "data" / "mnist-10k"

SEED = 20240607
MEAN = 0.1307
STD = 0.3081
EPOCHS = 15
BATCH = 64
LR = 4e-3
MAX_SHIFT = 2  # random translation augmentation, in pixels

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
HSIG_ALPHA = np.float32(1.0 / 6.0)  # what PyTorch writes for Hardsigmoid / Hardswish
HSIG_BETA = np.float32(0.5)

STEM, B1_SE = 16, 8
B2_EXP, B2_OUT = 48, 24
B3_EXP, B3_SE = 72, 24
HEAD = 64
ARCHITECTURE = (
    f"MobileNetV3-style: stem Conv3x3/2(1->{STEM})-BN-HardSwish; "
    f"block1 DWConv3x3({STEM})-BN-Relu-SE({STEM}->{B1_SE}->{STEM},HardSigmoid)-Conv1x1({STEM}->{STEM})-BN-Add; "
    f"block2 Conv1x1({STEM}->{B2_EXP})-BN-HardSwish-DWConv3x3/2({B2_EXP})-BN-HardSwish-Conv1x1({B2_EXP}->{B2_OUT})-BN; "
    f"block3 Conv1x1({B2_OUT}->{B3_EXP})-BN-HardSwish-DWConv3x3({B3_EXP})-BN-HardSwish-SE({B3_EXP}->{B3_SE}->{B3_EXP},HardSigmoid)"
    f"-Conv1x1({B3_EXP}->{B2_OUT})-BN-Add; "
    f"head Conv1x1({B2_OUT}->{HEAD})-BN-HardSwish-GlobalAveragePool-Flatten-Gemm({HEAD}->10)"
)


# ---------------------------------------------------------------- data


def read_idx(path, magic, dims):
    """Read a gzipped IDX file, checking its magic number and shape header."""
    raw = gzip.decompress(path.read_bytes())
    got = int.from_bytes(raw[0:4], "big")
    if got != magic:
        sys.exit(f"{path}: magic number {got:#x} at byte 0, expected {magic:#x}")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    start = 4 + 4 * dims
    n = int(np.prod(shape))
    if len(raw) - start != n:
        sys.exit(f"{path}: header says {shape} ({n} bytes) but {len(raw) - start} bytes follow byte {start}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def load_split(prefix):
    images = read_idx(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz", 0x803, 3)
    labels = read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz", 0x801, 1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        sys.exit(f"{prefix}: {images.shape} images vs {labels.shape} labels")
    return images, labels.astype(np.int64)


def normalize(images):
    """u8 [N,28,28] -> float32 NCHW [N,1,28,28], the model's input."""
    x = (images.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD)
    return x[:, None, :, :]


def random_shift(images, rng):
    """Translate each u8 image by up to MAX_SHIFT pixels, filling with background zeros."""
    n = images.shape[0]
    padded = np.pad(images, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT)))
    dy = rng.integers(0, 2 * MAX_SHIFT + 1, size=n)
    dx = rng.integers(0, 2 * MAX_SHIFT + 1, size=n)
    rows = dy[:, None] + np.arange(28)[None, :]  # [n, 28]
    cols = dx[:, None] + np.arange(28)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


# ---------------------------------------------------------------- layers
#
# Internally activations are NHWC (channels last, so 1x1 convolutions are plain matrix
# products and per-channel work broadcasts over the contiguous axis); weights are kept in
# the ONNX/PyTorch layout ([O, I/group, kH, kW]) so they export unchanged.
#
# Every layer has
#   init(rng, p, buf)          create its parameters in p and BatchNorm running stats in buf
#   forward(p, buf, x, train)  NHWC in, NHWC out; caches what backward needs on the layer
#   backward(p, dy, g)         gradient w.r.t. its input; parameter gradients go into g
#   export(nodes, x)           append ONNX nodes reading tensor x, return the output's name


def onnx_path(name):
    return "/" + name.replace(".", "/")


def kaiming_fan_out(rng, shape):
    """torchvision MobileNetV3 init for convolutions: N(0, 2 / fan_out), fan_out = O * kH * kW."""
    fan_out = shape[0] * int(np.prod(shape[2:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)).astype(np.float32)


def pad_hw(x):
    return np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def window(xp, i, j, stride, oh, ow):
    """The [N,OH,OW,C] slab of padded input that kernel tap (i, j) multiplies."""
    return xp[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride, :]


class StemConv:
    """Full 3x3 convolution, pad 1, 1 input channel, no bias. Never needs an input gradient."""

    def __init__(self, name, cout, stride):
        self.name, self.cout, self.stride = name, cout, stride

    def init(self, rng, p, buf):
        p[self.name + ".weight"] = kaiming_fan_out(rng, (self.cout, 1, 3, 3))

    def forward(self, p, buf, x, train):
        n, h, w, _ = x.shape
        oh, ow = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
        xp = pad_hw(x)
        cols = np.concatenate([window(xp, i, j, self.stride, oh, ow) for i in range(3) for j in range(3)], axis=3)
        self.cols = cols.reshape(n * oh * ow, 9)  # tap order (i, j) row-major = weight layout
        out = self.cols @ p[self.name + ".weight"].reshape(self.cout, 9).T
        return out.reshape(n, oh, ow, self.cout)

    def backward(self, p, dy, g):
        g[self.name + ".weight"] = (dy.reshape(-1, self.cout).T @ self.cols).reshape(self.cout, 1, 3, 3)
        return None

    def export(self, nodes, x):
        out = onnx_path(self.name) + "/Conv_output_0"
        nodes.append(
            helper.make_node(
                "Conv", [x, self.name + ".weight"], [out], name=onnx_path(self.name) + "/Conv",
                dilations=[1, 1], group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[self.stride, self.stride],
            )
        )
        return out


class DepthwiseConv:
    """3x3 depthwise convolution (group = channels), pad 1, no bias, by shifted-slice accumulation."""

    def __init__(self, name, c, stride):
        self.name, self.c, self.stride = name, c, stride

    def init(self, rng, p, buf):
        p[self.name + ".weight"] = kaiming_fan_out(rng, (self.c, 1, 3, 3))

    def forward(self, p, buf, x, train):
        n, h, w, c = x.shape
        s = self.stride
        oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
        wt = p[self.name + ".weight"]
        xp = pad_hw(x)
        out = np.zeros((n, oh, ow, c), dtype=x.dtype)
        for i in range(3):
            for j in range(3):
                out += window(xp, i, j, s, oh, ow) * wt[:, 0, i, j]
        self.xp = xp
        return out

    def backward(self, p, dy, g):
        n, oh, ow, c = dy.shape
        s = self.stride
        wt = p[self.name + ".weight"]
        dxp = np.zeros_like(self.xp)
        dw = np.zeros_like(wt)
        for i in range(3):
            for j in range(3):
                dw[:, 0, i, j] = (dy * window(self.xp, i, j, s, oh, ow)).sum(axis=(0, 1, 2))
                window(dxp, i, j, s, oh, ow)[...] += dy * wt[:, 0, i, j]
        g[self.name + ".weight"] = dw
        return dxp[:, 1:-1, 1:-1, :]

    def export(self, nodes, x):
        out = onnx_path(self.name) + "/Conv_output_0"
        nodes.append(
            helper.make_node(
                "Conv", [x, self.name + ".weight"], [out], name=onnx_path(self.name) + "/Conv",
                dilations=[1, 1], group=self.c, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[self.stride, self.stride],
            )
        )
        return out


class PointwiseConv:
    """1x1 convolution without bias: a matrix product over the channel axis."""

    def __init__(self, name, cin, cout):
        self.name, self.cin, self.cout = name, cin, cout

    def init(self, rng, p, buf):
        p[self.name + ".weight"] = kaiming_fan_out(rng, (self.cout, self.cin, 1, 1))

    def forward(self, p, buf, x, train):
        self.x = x
        n, h, w, _ = x.shape
        out = x.reshape(-1, self.cin) @ p[self.name + ".weight"].reshape(self.cout, self.cin).T
        return out.reshape(n, h, w, self.cout)

    def backward(self, p, dy, g):
        wt = p[self.name + ".weight"].reshape(self.cout, self.cin)
        d = dy.reshape(-1, self.cout)
        g[self.name + ".weight"] = (d.T @ self.x.reshape(-1, self.cin)).reshape(self.cout, self.cin, 1, 1)
        return (d @ wt).reshape(self.x.shape)

    def export(self, nodes, x):
        out = onnx_path(self.name) + "/Conv_output_0"
        nodes.append(
            helper.make_node(
                "Conv", [x, self.name + ".weight"], [out], name=onnx_path(self.name) + "/Conv",
                dilations=[1, 1], group=1, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1],
            )
        )
        return out


class BatchNorm:
    """BatchNorm2d: batch statistics while training (running stats updated), running stats in eval."""

    def __init__(self, name, c):
        self.name, self.c = name, c

    def init(self, rng, p, buf):
        p[self.name + ".weight"] = np.ones(self.c, dtype=np.float32)
        p[self.name + ".bias"] = np.zeros(self.c, dtype=np.float32)
        buf[self.name + ".running_mean"] = np.zeros(self.c, dtype=np.float32)
        buf[self.name + ".running_var"] = np.ones(self.c, dtype=np.float32)

    def forward(self, p, buf, x, train):
        gamma, beta = p[self.name + ".weight"], p[self.name + ".bias"]
        if not train:
            mean, var = buf[self.name + ".running_mean"], buf[self.name + ".running_var"]
            return (x - mean) / np.sqrt(var + np.float32(BN_EPS)) * gamma + beta
        m = x.shape[0] * x.shape[1] * x.shape[2]
        mean = x.mean(axis=(0, 1, 2))
        xc = x - mean
        var = (xc * xc).mean(axis=(0, 1, 2))
        self.invstd = 1.0 / np.sqrt(var + BN_EPS)
        self.xhat = xc * self.invstd
        rm, rv = self.name + ".running_mean", self.name + ".running_var"
        mom = np.float32(BN_MOMENTUM)
        buf[rm] = ((1 - mom) * buf[rm] + mom * mean).astype(np.float32)
        buf[rv] = ((1 - mom) * buf[rv] + mom * var * (m / (m - 1))).astype(np.float32)
        return self.xhat * gamma + beta

    def backward(self, p, dy, g):
        gamma = p[self.name + ".weight"]
        g[self.name + ".weight"] = (dy * self.xhat).sum(axis=(0, 1, 2))
        g[self.name + ".bias"] = dy.sum(axis=(0, 1, 2))
        dxhat = dy * gamma
        mean_d = dxhat.mean(axis=(0, 1, 2))
        mean_dx = (dxhat * self.xhat).mean(axis=(0, 1, 2))
        return (dxhat - mean_d - self.xhat * mean_dx) * self.invstd

    def export(self, nodes, x):
        out = onnx_path(self.name) + "/BatchNormalization_output_0"
        ins = [x] + [self.name + s for s in (".weight", ".bias", ".running_mean", ".running_var")]
        nodes.append(
            helper.make_node(
                "BatchNormalization", ins, [out], name=onnx_path(self.name) + "/BatchNormalization",
                epsilon=BN_EPS, momentum=1.0 - BN_MOMENTUM,
            )
        )
        return out


def hard_sigmoid(x):
    """ONNX HardSigmoid with alpha=1/6, beta=0.5 (= PyTorch Hardsigmoid)."""
    return np.clip(x * HSIG_ALPHA + HSIG_BETA, 0, 1)


def hard_sigmoid_grad(x):
    z = x * HSIG_ALPHA + HSIG_BETA
    return ((z > 0) & (z < 1)) * HSIG_ALPHA


class Activation:
    """Relu or HardSwish (x * HardSigmoid(x))."""

    def __init__(self, name, kind):
        assert kind in ("Relu", "HardSwish")
        self.name, self.kind = name, kind

    def init(self, rng, p, buf):
        pass

    def forward(self, p, buf, x, train):
        self.x = x
        if self.kind == "Relu":
            return np.maximum(x, 0)
        return x * hard_sigmoid(x)

    def backward(self, p, dy, g):
        x = self.x
        if self.kind == "Relu":
            return dy * (x > 0)
        return dy * (hard_sigmoid(x) + x * hard_sigmoid_grad(x))

    def export(self, nodes, x):
        out = onnx_path(self.name) + f"/{self.kind}_output_0"
        nodes.append(helper.make_node(self.kind, [x], [out], name=onnx_path(self.name) + "/" + self.kind))
        return out


class SqueezeExcite:
    """x * HardSigmoid(fc2(Relu(fc1(GlobalAveragePool(x))))), fc1/fc2 being 1x1 convs with bias."""

    def __init__(self, name, c, mid):
        self.name, self.c, self.mid = name, c, mid

    def init(self, rng, p, buf):
        p[self.name + ".fc1.weight"] = kaiming_fan_out(rng, (self.mid, self.c, 1, 1))
        p[self.name + ".fc1.bias"] = np.zeros(self.mid, dtype=np.float32)
        p[self.name + ".fc2.weight"] = kaiming_fan_out(rng, (self.c, self.mid, 1, 1))
        p[self.name + ".fc2.bias"] = np.zeros(self.c, dtype=np.float32)

    def forward(self, p, buf, x, train):
        w1 = p[self.name + ".fc1.weight"].reshape(self.mid, self.c)
        w2 = p[self.name + ".fc2.weight"].reshape(self.c, self.mid)
        s = x.mean(axis=(1, 2))  # [N,C]
        z1 = s @ w1.T + p[self.name + ".fc1.bias"]
        r = np.maximum(z1, 0)
        z2 = r @ w2.T + p[self.name + ".fc2.bias"]
        gate = hard_sigmoid(z2)
        self.cache = (x, s, z1, r, z2, gate)
        return x * gate[:, None, None, :]

    def backward(self, p, dy, g):
        x, s, z1, r, z2, gate = self.cache
        w1 = p[self.name + ".fc1.weight"].reshape(self.mid, self.c)
        w2 = p[self.name + ".fc2.weight"].reshape(self.c, self.mid)
        dz2 = (dy * x).sum(axis=(1, 2)) * hard_sigmoid_grad(z2)
        g[self.name + ".fc2.weight"] = (dz2.T @ r).reshape(self.c, self.mid, 1, 1)
        g[self.name + ".fc2.bias"] = dz2.sum(axis=0)
        dz1 = (dz2 @ w2) * (z1 > 0)
        g[self.name + ".fc1.weight"] = (dz1.T @ s).reshape(self.mid, self.c, 1, 1)
        g[self.name + ".fc1.bias"] = dz1.sum(axis=0)
        ds = dz1 @ w1
        hw = x.shape[1] * x.shape[2]
        return dy * gate[:, None, None, :] + (ds / hw)[:, None, None, :]

    def export(self, nodes, x):
        path = onnx_path(self.name)
        pooled, c1, r, c2, gate, out = (
            f"{path}/avgpool/GlobalAveragePool_output_0",
            f"{path}/fc1/Conv_output_0",
            f"{path}/relu/Relu_output_0",
            f"{path}/fc2/Conv_output_0",
            f"{path}/hardsigmoid/HardSigmoid_output_0",
            f"{path}/Mul_output_0",
        )
        one = dict(dilations=[1, 1], group=1, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1])
        nodes += [
            helper.make_node("GlobalAveragePool", [x], [pooled], name=f"{path}/avgpool/GlobalAveragePool"),
            helper.make_node("Conv", [pooled, self.name + ".fc1.weight", self.name + ".fc1.bias"], [c1], name=f"{path}/fc1/Conv", **one),
            helper.make_node("Relu", [c1], [r], name=f"{path}/relu/Relu"),
            helper.make_node("Conv", [r, self.name + ".fc2.weight", self.name + ".fc2.bias"], [c2], name=f"{path}/fc2/Conv", **one),
            helper.make_node("HardSigmoid", [c2], [gate], name=f"{path}/hardsigmoid/HardSigmoid", alpha=float(HSIG_ALPHA), beta=float(HSIG_BETA)),
            helper.make_node("Mul", [gate, x], [out], name=f"{path}/Mul"),
        ]
        return out


class Sequential:
    def __init__(self, layers):
        self.layers = layers

    def init(self, rng, p, buf):
        for layer in self.layers:
            layer.init(rng, p, buf)

    def forward(self, p, buf, x, train):
        for layer in self.layers:
            x = layer.forward(p, buf, x, train)
        return x

    def backward(self, p, dy, g):
        for layer in reversed(self.layers):
            dy = layer.backward(p, dy, g)
        return dy

    def export(self, nodes, x):
        for layer in self.layers:
            x = layer.export(nodes, x)
        return x


class Residual(Sequential):
    """Sequential whose output is added to its input."""

    def __init__(self, name, layers):
        super().__init__(layers)
        self.name = name

    def forward(self, p, buf, x, train):
        return x + super().forward(p, buf, x, train)

    def backward(self, p, dy, g):
        return dy + super().backward(p, dy, g)

    def export(self, nodes, x):
        y = super().export(nodes, x)
        out = onnx_path(self.name) + "/Add_output_0"
        nodes.append(helper.make_node("Add", [y, x], [out], name=onnx_path(self.name) + "/Add"))
        return out


class Classifier:
    """GlobalAveragePool -> Flatten -> Gemm (transB=1). NHWC [N,H,W,C] in, logits [N,10] out."""

    def __init__(self, name, cin, classes):
        self.name, self.cin, self.classes = name, cin, classes

    def init(self, rng, p, buf):
        # torchvision MobileNetV3: Linear weights N(0, 0.01), zero bias.
        p[self.name + ".weight"] = (rng.standard_normal((self.classes, self.cin)) * 0.01).astype(np.float32)
        p[self.name + ".bias"] = np.zeros(self.classes, dtype=np.float32)

    def forward(self, p, buf, x, train):
        self.in_shape = x.shape
        self.f = x.mean(axis=(1, 2))
        return self.f @ p[self.name + ".weight"].T + p[self.name + ".bias"]

    def backward(self, p, dy, g):
        g[self.name + ".weight"] = dy.T @ self.f
        g[self.name + ".bias"] = dy.sum(axis=0)
        n, h, w, c = self.in_shape
        df = (dy @ p[self.name + ".weight"]) / (h * w)
        return np.broadcast_to(df[:, None, None, :], self.in_shape)

    def export(self, nodes, x):
        nodes += [
            helper.make_node("GlobalAveragePool", [x], ["/avgpool/GlobalAveragePool_output_0"], name="/avgpool/GlobalAveragePool"),
            helper.make_node("Flatten", ["/avgpool/GlobalAveragePool_output_0"], ["/Flatten_output_0"], name="/Flatten", axis=1),
            helper.make_node(
                "Gemm", ["/Flatten_output_0", self.name + ".weight", self.name + ".bias"], ["logits"],
                name=onnx_path(self.name) + "/Gemm", alpha=1.0, beta=1.0, transB=1,
            ),
        ]
        return "logits"


# ---------------------------------------------------------------- model


def conv_bn(name, conv, c, act=None):
    layers = [conv, BatchNorm(name + ".bn", c)]
    if act:
        layers.append(Activation(name + ".act", act))
    return layers


def build_model():
    return Sequential(
        conv_bn("stem", StemConv("stem.conv", STEM, 2), STEM, "HardSwish")
        + [
            Residual(
                "block1",
                conv_bn("block1.dw", DepthwiseConv("block1.dw.conv", STEM, 1), STEM, "Relu")
                + [SqueezeExcite("block1.se", STEM, B1_SE)]
                + conv_bn("block1.project", PointwiseConv("block1.project.conv", STEM, STEM), STEM),
            )
        ]
        + conv_bn("block2.expand", PointwiseConv("block2.expand.conv", STEM, B2_EXP), B2_EXP, "HardSwish")
        + conv_bn("block2.dw", DepthwiseConv("block2.dw.conv", B2_EXP, 2), B2_EXP, "HardSwish")
        + conv_bn("block2.project", PointwiseConv("block2.project.conv", B2_EXP, B2_OUT), B2_OUT)
        + [
            Residual(
                "block3",
                conv_bn("block3.expand", PointwiseConv("block3.expand.conv", B2_OUT, B3_EXP), B3_EXP, "HardSwish")
                + conv_bn("block3.dw", DepthwiseConv("block3.dw.conv", B3_EXP, 1), B3_EXP, "HardSwish")
                + [SqueezeExcite("block3.se", B3_EXP, B3_SE)]
                + conv_bn("block3.project", PointwiseConv("block3.project.conv", B3_EXP, B2_OUT), B2_OUT),
            )
        ]
        + conv_bn("head", PointwiseConv("head.conv", B2_OUT, HEAD), HEAD, "HardSwish")
        + [Classifier("classifier", HEAD, 10)]
    )


def init_params(model, rng):
    p, buf = {}, {}
    model.init(rng, p, buf)
    return p, buf


def forward(model, p, buf, x, train=False):
    """NCHW input -> logits. In training mode BatchNorm uses (and updates buf with) batch stats."""
    return model.forward(p, buf, x.transpose(0, 2, 3, 1), train)


def backward(model, p, dlogits):
    g = {}
    model.backward(p, dlogits, g)
    return g


def softmax_xent(logits, labels):
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = labels.shape[0]
    loss = -logp[np.arange(n), labels].mean()
    dlogits = np.exp(logp)
    dlogits[np.arange(n), labels] -= 1.0
    return float(loss), (dlogits / n).astype(logits.dtype)


def predict(model, p, buf, x, batch=500):
    return np.concatenate([forward(model, p, buf, x[i : i + batch]) for i in range(0, len(x), batch)])


# ---------------------------------------------------------------- gradient check


def check_gradients(train_images, train_labels, n=4, per_tensor=6, h=1e-5, abs_noise=1e-9):
    """Central differences vs. backward, float64, BatchNorm in training mode. Returns max rel err."""
    rng = np.random.default_rng(SEED + 1)
    model = build_model()
    p, buf = init_params(model, rng)
    # Non-trivial BatchNorm affine parameters and SE/classifier biases, so every path carries signal.
    p = {k: v.astype(np.float64) + (0.1 * rng.standard_normal(v.shape) if k.endswith(".bias") else 0) for k, v in p.items()}
    for k in p:
        if k.endswith(".bn.weight"):
            p[k] = 1.0 + 0.2 * rng.standard_normal(p[k].shape)
    p["classifier.weight"] *= 30.0
    pick = rng.choice(len(train_labels), size=n, replace=False)
    x = normalize(train_images[pick]).astype(np.float64)
    y = train_labels[pick]

    def loss_of(params):
        return softmax_xent(forward(model, params, copy.deepcopy(buf), x, train=True), y)

    loss, dlogits = loss_of(p)
    forward(model, p, copy.deepcopy(buf), x, train=True)
    g = backward(model, p, dlogits)
    print(f"gradient check: {n} digits, float64, BatchNorm in training mode, central differences h={h:g}, loss {loss:.4f}")
    worst = 0.0  # largest relative error among elements whose absolute error is above noise
    for k in p:
        idx = [tuple(int(rng.integers(s)) for s in p[k].shape) for _ in range(per_tensor)]
        rel, ab = [], []
        for i in idx:
            old = p[k][i]
            p[k][i] = old + h
            lp, _ = loss_of(p)
            p[k][i] = old - h
            lm, _ = loss_of(p)
            p[k][i] = old
            num = (lp - lm) / (2 * h)
            ana = float(g[k][i])
            ab.append(abs(num - ana))
            rel.append(abs(num - ana) / max(abs(num) + abs(ana), 1e-300))
            if ab[-1] > abs_noise:
                worst = max(worst, rel[-1])
        note = ""
        if float(np.abs(g[k]).max()) < 1e-12:
            # A bias feeding (through convs, adds) only into BatchNorms in training mode: the
            # batch mean subtraction cancels it, so the true gradient is 0 and both sides are noise.
            note = "  gradient identically 0 (absorbed by a later BatchNorm)"
        print(f"  {k:28s} max rel err {max(rel):.2e}  max abs err {max(ab):.1e}  |grad| up to {float(np.abs(g[k]).max()):.1e}{note}")
    print(f"max relative error over all {len(p)} parameter tensors (elements with abs err > {abs_noise:g}): {worst:.2e}")
    return worst


# ---------------------------------------------------------------- training


def train(model, train_images, train_labels, test_x, test_labels, epochs):
    rng = np.random.default_rng(SEED)
    p, buf = init_params(model, rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n = len(train_labels)
    steps_per_epoch = (n + BATCH - 1) // BATCH
    total_steps = epochs * steps_per_epoch
    step = 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        x_all = normalize(random_shift(train_images[order], rng))
        y_all = train_labels[order]
        loss_sum, correct = 0.0, 0
        for s in range(0, n, BATCH):
            x, y = x_all[s : s + BATCH], y_all[s : s + BATCH]
            if len(y) < 2:
                continue  # BatchNorm needs more than one value per channel
            logits = forward(model, p, buf, x, train=True)
            loss, dlogits = softmax_xent(logits, y)
            loss_sum += loss * len(y)
            correct += int((logits.argmax(axis=1) == y).sum())
            grads = backward(model, p, dlogits)
            step += 1
            # Cosine decay to zero: the last epochs settle into a minimum instead of bouncing.
            lr = LR * 0.5 * (1.0 + np.cos(np.pi * (step - 1) / total_steps))
            for k in p:
                m[k] = beta1 * m[k] + (1 - beta1) * grads[k]
                v[k] = beta2 * v[k] + (1 - beta2) * grads[k] * grads[k]
                m_hat = m[k] / (1 - beta1**step)
                v_hat = v[k] / (1 - beta2**step)
                p[k] = (p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
        test_acc = 100.0 * (predict(model, p, buf, test_x).argmax(axis=1) == test_labels).mean()
        print(
            f"epoch {epoch:2d}/{epochs}  loss {loss_sum / n:.4f}  train acc {100.0 * correct / n:6.2f} %"
            f"  (augmented)  numpy test acc {test_acc:6.2f} %  {time.perf_counter() - t0:5.1f} s",
            flush=True,
        )
    return p, buf


# ---------------------------------------------------------------- export


def build_onnx(model, p, buf):
    """The graph as a PyTorch eval-mode export of this network looks (opset 17, BN kept separate)."""
    nodes = []
    model.export(nodes, "input")
    params = {**p, **buf}
    used = []
    for node in nodes:
        used += [name for name in node.input if name in params and name not in used]
    inits = [numpy_helper.from_array(params[k], k) for k in used]
    if set(used) != set(params):
        raise AssertionError(f"parameters not used by the graph: {sorted(set(params) - set(used))}")
    graph = helper.make_graph(
        nodes,
        "mnist_mobilenet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 10])],
        initializer=inits,
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ccq train_mobilenet.py")
    model_proto.ir_version = 8
    onnx.checker.check_model(model_proto, full_check=True)
    return model_proto


def ort_logits(model_bytes, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where to write mobilenet.onnx/.json (default: next to this script)")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default: {EPOCHS})")
    ap.add_argument("--check-gradients", action="store_true", help="compare backward with numeric gradients on a tiny batch, then exit")
    args = ap.parse_args()

    train_images, train_labels = load_split("train")
    if args.check_gradients:
        worst = check_gradients(train_images, train_labels)
        sys.exit(0 if worst < 1e-5 else f"gradient check failed: max relative error {worst:.2e} >= 1e-5")

    test_images, test_labels = load_split("t10k")
    test_x = normalize(test_images)
    print(f"data: {len(train_labels)} train / {len(test_labels)} test digits from {DATA_DIR}")

    model = build_model()
    t0 = time.perf_counter()
    p, buf = train(model, train_images, train_labels, test_x, test_labels, args.epochs)
    train_seconds = time.perf_counter() - t0
    n_params = int(sum(v.size for v in p.values()))
    n_buffers = int(sum(v.size for v in buf.values()))
    print(f"training took {train_seconds:.1f} s; {n_params} parameters (+{n_buffers} BatchNorm running-stat values)")

    onnx_model = build_onnx(model, p, buf)
    model_bytes = onnx_model.SerializeToString()
    ort_out = ort_logits(model_bytes, test_x)
    np_out = predict(model, p, buf, test_x)
    max_diff = float(np.abs(ort_out - np_out).max())
    if not max_diff < 1e-4:
        sys.exit(f"ONNX Runtime disagrees with the numpy forward pass: max |logit diff| = {max_diff:.3e}")
    print(f"ONNX Runtime reproduces the numpy forward pass: max |logit diff| = {max_diff:.2e} (< 1e-4) on {len(test_labels)} test digits")
    ort_acc = 100.0 * float((ort_out.argmax(axis=1) == test_labels).mean())
    print(f"float test accuracy (ONNX Runtime, {len(test_labels)} test digits): {ort_acc:.2f} %")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_file = args.out_dir / "mobilenet.onnx"
    onnx_file.write_bytes(model_bytes)
    sidecar = {
        "model": onnx_file.name,
        "architecture": ARCHITECTURE,
        "input": {"name": "input", "layout": "NCHW", "shape": [None, 1, 28, 28], "dtype": "float32"},
        "output": {"name": "logits", "shape": [None, 10], "meaning": "class logits"},
        "preprocessing": {"scale": "pixel / 255", "mean": [MEAN], "std": [STD]},
        "parameters": n_params,
        "float_test_accuracy": round(ort_acc, 2),
        "test_set": "examples/data/mnist-10k t10k-* (2,000 digits; not the official MNIST test split)",
        "accuracy_measured_with": f"onnxruntime {ort.__version__}",
        "trained_by": f"examples/mnist/{Path(__file__).name} (numpy, seed {SEED}, {args.epochs} epochs, Adam, batch {BATCH})",
    }
    json_file = args.out_dir / "mobilenet.json"
    json_file.write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"wrote {onnx_file} ({len(model_bytes)} bytes) and {json_file}")


if __name__ == "__main__":
    main()
