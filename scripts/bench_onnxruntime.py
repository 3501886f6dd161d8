#!/usr/bin/env python3
"""Measure ONNX Runtime on the same model, batch and thread count as `coordinator eval`,
so ccq's integer engine and ONNX Runtime are compared in one run on one machine.

    python3 scripts/bench_onnxruntime.py --model M.onnx [--model Q.onnx ...] \
        [--batch 256] [--threads 1] [--seconds 10]

Each --model is run on random inputs of the model's own input shape (normalized float, as
ccq's exported QDQ files and the original float models take); prints one JSON object per
model: {"model", "threads", "batch", "images_per_sec", "batches"}. Timing covers
session.run only, after two warm-up batches.

ONNX Runtime's own recommended int8 flow on a float model, for the other side of
issue #18's comparison: `quant_pre_process` (shape inference and graph optimisation), then
`quantize_static` with QDQ nodes, per-channel int8 weights, uint8 activations (U8S8, what
ONNX Runtime recommends for x86-64) and MinMax calibration on the first N training images
of a CIFAR-10 binary directory, normalized with --mean/--std:

    python3 scripts/bench_onnxruntime.py --ort-quantize F.onnx --calib cifar10:DIR \
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 [--calib-images 256] \
        [--out runs/F-ort-int8.onnx] [--threads 1]

writes the quantized model, and benchmarks it (and any --model) as above.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def bench(path, batch, threads, seconds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(2):
        sess.run(None, {inp.name: x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sess.run(None, {inp.name: x})
        n += 1
    elapsed = time.perf_counter() - start
    return {"model": path, "threads": threads, "batch": batch,
            "images_per_sec": n * batch / elapsed, "batches": n,
            "onnxruntime": ort.__version__}


def cifar_calibration(spec, count, mean, std):
    """The first `count` images of data_batch_1.bin, NCHW float32, normalized."""
    fmt, _, path = spec.partition(":")
    if fmt != "cifar10":
        raise SystemExit(f"--calib {spec}: only cifar10:DIR is supported")
    root = Path(path)
    if not (root / "data_batch_1.bin").exists():
        root = root / "cifar-10-batches-bin"
    raw = np.fromfile(root / "data_batch_1.bin", dtype=np.uint8).reshape(-1, 3073)[:count]
    x = raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    m = np.array(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.array(std, np.float32).reshape(1, 3, 1, 1)
    return (x - m) / s


def ort_quantize(float_model, out, calib):
    """ONNX Runtime's recommended static int8 quantization (QDQ, per-channel, U8S8)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name, images):
            self.batches = iter([{name: images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    name = ort.InferenceSession(float_model, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = str(Path(tmp) / "pre.onnx")
        quant_pre_process(float_model, pre)
        quantize_static(pre, out, Reader(name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return out


def floats(text):
    return [float(v) for v in text.split(",")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--ort-quantize", help="a float ONNX model to quantize with ONNX Runtime's own flow")
    ap.add_argument("--calib", help="cifar10:DIR: calibration images for --ort-quantize")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--mean", type=floats, default=[0.0, 0.0, 0.0])
    ap.add_argument("--std", type=floats, default=[1.0, 1.0, 1.0])
    ap.add_argument("--out", help="where --ort-quantize writes (default: beside the float model)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    models = list(a.model)
    if a.ort_quantize:
        if not a.calib:
            ap.error("--ort-quantize needs --calib cifar10:DIR")
        out = a.out or str(Path(a.ort_quantize).with_suffix("")) + "-ort-int8.onnx"
        models.append(ort_quantize(a.ort_quantize, out, cifar_calibration(a.calib, a.calib_images, a.mean, a.std)))
    if not models:
        ap.error("give --model and/or --ort-quantize")
    for m in models:
        print(json.dumps(bench(m, a.batch, a.threads, a.seconds)))


if __name__ == "__main__":
    main()
