#!/usr/bin/env python3
"""Float control for the results grid: the float ResNet-20 with its BatchNorm statistics
re-estimated on training images of the data it is measured on (AdaBN, Li et al. 2016).

The shared CIFAR-10 copy is a JPEG (q75) re-encoding, so part of what a search on it gains
over the float model may be adaptation to the copy rather than anything quantization-
specific. This control measures how much plain re-estimation of the BatchNorm statistics
recovers, with no search and no quantization, so RESULTS.md can tell the two apart.

Method: for each BatchNormalization node in graph order, its input is computed on the
first N images of the search split (training images 0..45,000; the validation split, the
last 5,000, is not used), with every earlier BatchNorm already re-estimated; the node's
running mean and (biased) variance are replaced by that population's per-channel mean and
variance. Scale, shift and epsilon are kept. Then top-1 is measured on the validation
split and the test split for the original and the adapted model, with ONNX Runtime (fp32,
no graph changes besides the statistics).

Usage (from the repository root; needs onnx, onnxruntime and numpy from PyPI):
  python3 scripts/adabn_control.py                    # N = 10,000, writes the JSON below
  python3 scripts/adabn_control.py --images 45000     # the whole search split

Writes docs/results/control/resnet20-float-adabn.json (scripts/render_results.py shows it).
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "resnet20-cifar10.onnx"
DATA = SHARED / "datasets" / "cifar10-jpeg" / "cifar-10-batches-bin"
OUT = ROOT / "docs" / "results" / "control" / "resnet20-float-adabn.json"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
VALIDATION = 5000  # the last training images, as [data] validation = 5000 in the grid
BATCH = 500


def read_batches(names):
    records = []
    for name in names:
        raw = np.fromfile(DATA / name, dtype=np.uint8)
        if raw.size % 3073:
            raise SystemExit(f"{DATA / name}: {raw.size} bytes is not a whole number of 3,073-byte records")
        records.append(raw.reshape(-1, 3073))
    r = np.concatenate(records)
    return r[:, 1:].reshape(-1, 3, 32, 32), r[:, 0].astype(np.int64)


def normalise(pixels):
    return (pixels.astype(np.float32) / 255.0 - MEAN) / STD


def session(model, outputs=None):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if outputs:
        del m.graph.output[:]
        for name in outputs:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def top1(model, pixels, labels):
    s = session(model)
    correct = 0
    for i in range(0, len(labels), BATCH):
        logits = s.run(None, {"input": normalise(pixels[i:i + BATCH])})[0]
        correct += int((logits.argmax(1) == labels[i:i + BATCH]).sum())
    return round(100.0 * correct / len(labels), 2)


def adapt(model, pixels):
    """Re-estimates every BatchNorm's statistics in graph order; returns a new model."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    for node in [n for n in m.graph.node if n.op_type == "BatchNormalization"]:
        s = session(m, [node.input[0]])
        total, sq, count = None, None, 0
        for i in range(0, len(pixels), BATCH):
            x = s.run(None, {"input": normalise(pixels[i:i + BATCH])})[0].astype(np.float64)
            per = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
            total = per.sum(1) if total is None else total + per.sum(1)
            sq = (per * per).sum(1) if sq is None else sq + (per * per).sum(1)
            count += per.shape[1]
        mean = total / count
        var = np.maximum(sq / count - mean * mean, 0.0)
        for name, value in ((node.input[3], mean), (node.input[4], var)):
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000, help="search-split images to estimate on")
    args = ap.parse_args()
    start = time.time()
    train_px, train_y = read_batches([f"data_batch_{i}.bin" for i in range(1, 6)])
    test_px, test_y = read_batches(["test_batch.bin"])
    search_len = len(train_y) - VALIDATION
    if not 0 < args.images <= search_len:
        raise SystemExit(f"--images must be 1..{search_len}")
    val_px, val_y = train_px[search_len:], train_y[search_len:]
    model = onnx.load(MODEL)
    adapted = adapt(model, train_px[:args.images])
    result = {
        "control": "resnet20 float + AdaBN",
        "what": "float ResNet-20, BatchNorm mean/variance re-estimated layer by layer on the first "
                f"{args.images} training images of the search split (no quantization, no search)",
        "data": "CIFAR-10 (JPEG q75 copy)",
        "estimation_images": args.images,
        "float": {"val_top1": top1(model, val_px, val_y), "test_top1": top1(model, test_px, test_y)},
        "adabn": {"val_top1": top1(adapted, val_px, val_y), "test_top1": top1(adapted, test_px, test_y)},
        "command": f"python3 scripts/adabn_control.py --images {args.images}",
        "onnxruntime": ort.__version__,
        "machine": {"cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                                 if l.startswith("model name")), platform.machine())},
        "seconds": round(time.time() - start, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
