#!/usr/bin/env python3
"""Measure ONNX Runtime on the same model, batch and thread count as `coordinator eval`,
so ccq's integer engine and ONNX Runtime are compared in one run on one machine.

    python3 scripts/bench_onnxruntime.py --model M.onnx [--model Q.onnx ...] \
        [--batch 256] [--threads 1] [--seconds 10]

Each --model is run on random inputs of the model's own input shape (normalized float, as
ccq's exported QDQ files and the original float models take); prints one JSON object per
model: {"model", "threads", "batch", "images_per_sec", "batches"}. Timing covers
session.run only, after two warm-up batches.
"""
import argparse
import json
import time

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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    for m in a.model:
        print(json.dumps(bench(m, a.batch, a.threads, a.seconds)))


if __name__ == "__main__":
    main()
