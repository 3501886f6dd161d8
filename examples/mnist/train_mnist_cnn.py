#!/usr/bin/env python3
"""Train the quickstart's small float MNIST CNN with numpy only and export it as ONNX.

Reads the committed 8,000/2,000-digit subset in ../data/mnist-10k/, trains

    input [N,1,28,28]
    -> Conv(1->8, 5x5, bias) -> Relu -> MaxPool 2x2
    -> Conv(8->16, 5x5, bias) -> Relu -> MaxPool 2x2
    -> Reshape([-1, 256]) -> Gemm(256->10, transB=1, bias) -> logits [N,10]

with Adam on mini-batches, and writes `mnist-cnn.onnx` (opset 13, laid out like a PyTorch
eval-mode export, which is what ccq's importer targets) plus `mnist-cnn.json` (input, output,
preprocessing, parameter count, float test accuracy measured with ONNX Runtime).

The model's input is `(pixel / 255 - 0.1307) / 0.3081`.

Deterministic: a fixed seed drives initialisation, shuffling and augmentation, and BLAS is
pinned to one thread (a multi-threaded GEMM may split its sums differently from run to run),
so running this twice on one machine writes byte-identical files.

Needs numpy, onnx and onnxruntime. Usage: python3 train_mnist_cnn.py [--out-dir DIR]
"""

import os

# Must happen before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
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
EPOCHS = 12
BATCH = 64
LR = 2e-3
MAX_SHIFT = 2  # random translation augmentation, in pixels

C1, C2, K = 8, 16, 5
FLAT = C2 * 4 * 4


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


def im2col(x, k):
    """[N,C,H,W] -> ([N*OH*OW, C*k*k], OH, OW) for a stride-1, unpadded k x k convolution."""
    n, c, h, w = x.shape
    oh, ow = h - k + 1, w - k + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # [N,C,OH,OW,k,k]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * k * k)
    return cols, oh, ow


def conv_forward(x, w, b):
    n = x.shape[0]
    o, _, k, _ = w.shape
    cols, oh, ow = im2col(x, k)
    out = cols @ w.reshape(o, -1).T + b  # [N*OH*OW, O]
    return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2), cols


def conv_backward(dout, x_shape, cols, w, need_dx):
    n, c, h, wd = x_shape
    o, _, k, _ = w.shape
    oh, ow = dout.shape[2], dout.shape[3]
    d = dout.transpose(0, 2, 3, 1).reshape(n * oh * ow, o)
    dw = (d.T @ cols).reshape(w.shape)
    db = d.sum(axis=0)
    if not need_dx:
        return None, dw, db
    dcols = (d @ w.reshape(o, -1)).reshape(n, oh, ow, c, k, k)
    dx = np.zeros(x_shape, dtype=dout.dtype)
    # col2im: each kernel offset contributes one shifted [N,C,OH,OW] slab.
    for i in range(k):
        for j in range(k):
            dx[:, :, i : i + oh, j : j + ow] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dx, dw, db


def maxpool_forward(x):
    """2x2, stride 2. Returns the output and the argmax within each window (first max wins)."""
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    arg = win.argmax(axis=-1)
    return np.take_along_axis(win, arg[..., None], axis=-1)[..., 0], arg


def maxpool_backward(dout, arg, x_shape):
    n, c, h, w = x_shape
    dwin = np.zeros((n, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(dwin, arg[..., None], dout[..., None], axis=-1)
    return dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x_shape)


# ---------------------------------------------------------------- model

PARAM_NAMES = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"]


def init_params(rng):
    """PyTorch-style default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)

    return {
        "conv1.weight": uniform((C1, 1, K, K), K * K),
        "conv1.bias": uniform((C1,), K * K),
        "conv2.weight": uniform((C2, C1, K, K), C1 * K * K),
        "conv2.bias": uniform((C2,), C1 * K * K),
        "fc.weight": uniform((10, FLAT), FLAT),
        "fc.bias": uniform((10,), FLAT),
    }


def forward(p, x, train=False):
    z1, cols1 = conv_forward(x, p["conv1.weight"], p["conv1.bias"])
    a1 = np.maximum(z1, 0)
    m1, arg1 = maxpool_forward(a1)
    z2, cols2 = conv_forward(m1, p["conv2.weight"], p["conv2.bias"])
    a2 = np.maximum(z2, 0)
    m2, arg2 = maxpool_forward(a2)
    flat = m2.reshape(m2.shape[0], -1)
    logits = flat @ p["fc.weight"].T + p["fc.bias"]
    if not train:
        return logits
    cache = (x.shape, cols1, z1, arg1, m1.shape, cols2, z2, arg2, m2.shape, flat)
    return logits, cache


def backward(p, dlogits, cache):
    x_shape, cols1, z1, arg1, m1_shape, cols2, z2, arg2, m2_shape, flat = cache
    g = {"fc.weight": dlogits.T @ flat, "fc.bias": dlogits.sum(axis=0)}
    dm2 = (dlogits @ p["fc.weight"]).reshape(m2_shape)
    dz2 = maxpool_backward(dm2, arg2, z2.shape) * (z2 > 0)
    dm1, g["conv2.weight"], g["conv2.bias"] = conv_backward(dz2, m1_shape, cols2, p["conv2.weight"], True)
    dz1 = maxpool_backward(dm1, arg1, z1.shape) * (z1 > 0)
    _, g["conv1.weight"], g["conv1.bias"] = conv_backward(dz1, x_shape, cols1, p["conv1.weight"], False)
    return g


def softmax_xent(logits, labels):
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = labels.shape[0]
    loss = -logp[np.arange(n), labels].mean()
    dlogits = np.exp(logp)
    dlogits[np.arange(n), labels] -= 1.0
    return float(loss), (dlogits / n).astype(np.float32)


def predict(p, x, batch=500):
    return np.concatenate([forward(p, x[i : i + batch]) for i in range(0, len(x), batch)])


# ---------------------------------------------------------------- training


def train(train_images, train_labels, test_x, test_labels):
    rng = np.random.default_rng(SEED)
    p = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n = len(train_labels)
    steps_per_epoch = (n + BATCH - 1) // BATCH
    total_steps = EPOCHS * steps_per_epoch
    step = 0
    for epoch in range(1, EPOCHS + 1):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        x_all = normalize(random_shift(train_images[order], rng))
        y_all = train_labels[order]
        loss_sum, correct = 0.0, 0
        for s in range(0, n, BATCH):
            x, y = x_all[s : s + BATCH], y_all[s : s + BATCH]
            logits, cache = forward(p, x, train=True)
            loss, dlogits = softmax_xent(logits, y)
            loss_sum += loss * len(y)
            correct += int((logits.argmax(axis=1) == y).sum())
            grads = backward(p, dlogits, cache)
            step += 1
            # Cosine decay to zero: the last epochs settle into a minimum instead of bouncing.
            lr = LR * 0.5 * (1.0 + np.cos(np.pi * (step - 1) / total_steps))
            for k in p:
                m[k] = beta1 * m[k] + (1 - beta1) * grads[k]
                v[k] = beta2 * v[k] + (1 - beta2) * grads[k] * grads[k]
                m_hat = m[k] / (1 - beta1**step)
                v_hat = v[k] / (1 - beta2**step)
                p[k] = (p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
        test_acc = 100.0 * (predict(p, test_x).argmax(axis=1) == test_labels).mean()
        print(
            f"epoch {epoch:2d}/{EPOCHS}  loss {loss_sum / n:.4f}  train acc {100.0 * correct / n:6.2f} %"
            f"  (augmented)  numpy test acc {test_acc:6.2f} %  {time.perf_counter() - t0:5.1f} s",
            flush=True,
        )
    return p


# ---------------------------------------------------------------- export


def build_onnx(p):
    """The graph as a PyTorch eval-mode export of this network looks (opset 13)."""
    inits = [numpy_helper.from_array(p[k], k) for k in PARAM_NAMES]
    inits.append(numpy_helper.from_array(np.array([-1, FLAT], dtype=np.int64), "flatten.shape"))
    conv = dict(kernel_shape=[K, K], pads=[0, 0, 0, 0], strides=[1, 1], dilations=[1, 1], group=1)
    pool = dict(kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2], ceil_mode=0)
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["/conv1/Conv_output_0"], name="/conv1/Conv", **conv),
        helper.make_node("Relu", ["/conv1/Conv_output_0"], ["/relu1/Relu_output_0"], name="/relu1/Relu"),
        helper.make_node("MaxPool", ["/relu1/Relu_output_0"], ["/pool1/MaxPool_output_0"], name="/pool1/MaxPool", **pool),
        helper.make_node("Conv", ["/pool1/MaxPool_output_0", "conv2.weight", "conv2.bias"], ["/conv2/Conv_output_0"], name="/conv2/Conv", **conv),
        helper.make_node("Relu", ["/conv2/Conv_output_0"], ["/relu2/Relu_output_0"], name="/relu2/Relu"),
        helper.make_node("MaxPool", ["/relu2/Relu_output_0"], ["/pool2/MaxPool_output_0"], name="/pool2/MaxPool", **pool),
        helper.make_node("Reshape", ["/pool2/MaxPool_output_0", "flatten.shape"], ["/Reshape_output_0"], name="/Reshape"),
        helper.make_node("Gemm", ["/Reshape_output_0", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mnist_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="ccq train_mnist_cnn.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_logits(model_bytes, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where to write mnist-cnn.onnx/.json (default: next to this script)")
    args = ap.parse_args()

    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("t10k")
    test_x = normalize(test_images)
    print(f"data: {len(train_labels)} train / {len(test_labels)} test digits from {DATA_DIR}")

    t0 = time.perf_counter()
    p = train(train_images, train_labels, test_x, test_labels)
    train_seconds = time.perf_counter() - t0
    n_params = int(sum(v.size for v in p.values()))
    print(f"training took {train_seconds:.1f} s; {n_params} parameters")

    model = build_onnx(p)
    model_bytes = model.SerializeToString()
    ort_out = ort_logits(model_bytes, test_x)
    np_out = predict(p, test_x)
    max_diff = float(np.abs(ort_out - np_out).max())
    if not max_diff < 1e-4:
        sys.exit(f"ONNX Runtime disagrees with the numpy forward pass: max |logit diff| = {max_diff:.3e}")
    print(f"ONNX Runtime reproduces the numpy forward pass: max |logit diff| = {max_diff:.2e} (< 1e-4) on {len(test_labels)} test digits")
    ort_acc = 100.0 * float((ort_out.argmax(axis=1) == test_labels).mean())
    print(f"float test accuracy (ONNX Runtime, {len(test_labels)} test digits): {ort_acc:.2f} %")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "mnist-cnn.onnx"
    onnx_path.write_bytes(model_bytes)
    sidecar = {
        "model": onnx_path.name,
        "architecture": "Conv(1->8,5x5)-Relu-MaxPool(2)-Conv(8->16,5x5)-Relu-MaxPool(2)-Reshape(-1,256)-Gemm(256->10)",
        "input": {"name": "input", "layout": "NCHW", "shape": [None, 1, 28, 28], "dtype": "float32"},
        "output": {"name": "logits", "shape": [None, 10], "meaning": "class logits"},
        "preprocessing": {"scale": "pixel / 255", "mean": [MEAN], "std": [STD]},
        "parameters": n_params,
        "float_test_accuracy": round(ort_acc, 2),
        "test_set": "examples/data/mnist-10k t10k-* (2,000 digits; not the official MNIST test split)",
        "accuracy_measured_with": f"onnxruntime {ort.__version__}",
        "trained_by": f"examples/mnist/{Path(__file__).name} (numpy, seed {SEED}, {EPOCHS} epochs, Adam, batch {BATCH})",
    }
    json_path = args.out_dir / "mnist-cnn.json"
    json_path.write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"wrote {onnx_path} ({len(model_bytes)} bytes) and {json_path}")


if __name__ == "__main__":
    main()
