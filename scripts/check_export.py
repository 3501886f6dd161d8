#!/usr/bin/env python3
"""Checks a network exported by `coordinator export` against ccq's own integer engine.

    coordinator export --model runs/mnist-quickstart --format onnx-qdq --out q.onnx \
        --data mnist:examples/data/mnist-10k --reference ref.npz
    python3 scripts/check_export.py --onnx q.onnx --reference ref.npz

`ref.npz` (written by `coordinator export --reference`) holds the raw test images, their
labels, the input normalisation and ccq's logits on them. For `--onnx`, the exported model
must pass `onnx.checker` (full check, with shape inference); ONNX Runtime then runs it on
the normalised images, and the script prints both top-1 accuracies, how often the two
arg-maxes agree and the largest logit difference. For `--arrays` (the `json` export), a
NumPy re-implementation of the integer formulas in docs/EXPORT.md runs the plain arrays and
must reproduce ccq's integer logits bit for bit.

Exit status: 0 when every check passes; 1 when the checker fails, the top-1 accuracies
differ by more than --max-top1-gap points, or the arrays do not reproduce ccq exactly;
2 on bad usage. --json prints one JSON object instead of the summary.
"""

import argparse
import json
import sys

import numpy as np


def normalised(images, mean, std):
    # The same f32 operations, in the same order, as ccq's Normalization::apply.
    x = images.astype(np.float32) / np.float32(255.0)
    shape = (1, -1, 1, 1)
    return (x - mean.reshape(shape)) / std.reshape(shape)


def top1(logits, labels):
    # np.argmax takes the first maximum, as ccq does.
    return 100.0 * float(np.mean(np.argmax(logits, axis=1) == labels))


def run_onnx(path, ref, optimize, batch):
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimize]
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    images = ref["images"]
    out = []
    for i in range(0, len(images), batch):
        x = normalised(images[i : i + batch], ref["mean"], ref["std"])
        out.append(sess.run(None, {name: x})[0])
    return np.concatenate(out).astype(np.float64), ort.__version__


# ---- the integer engine of docs/EXPORT.md, in NumPy ------------------------------------


def requant(acc, mult, shift):
    """round_half_up(acc * mult / 2^shift), saturated to i32; per-channel mult/shift."""
    acc = acc.astype(np.int64)
    mult = np.asarray(mult, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    v = (acc * mult + (np.int64(1) << (shift - 1))) >> shift
    return np.clip(v, -(2**31), 2**31 - 1)


def windows(x, kh, kw, sh, sw, dh, dw, pads, fill):
    """NHWC -> [N, OH, OW, KH*KW, C] patches, padded with `fill`."""
    t, l, b, r = pads
    x = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=fill)
    n, h, w, c = x.shape
    oh = (h - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w - (dw * (kw - 1) + 1)) // sw + 1
    cols = [
        x[:, y * dh : y * dh + sh * (oh - 1) + 1 : sh, z * dw : z * dw + sw * (ow - 1) + 1 : sw, :]
        for y in range(kh)
        for z in range(kw)
    ]
    return np.stack(cols, axis=3)


def run_arrays(path, ref):
    net = json.load(open(path))
    images = ref["images"].astype(np.int64)
    n = len(images)
    lut = np.array(net["input"]["lut"], dtype=np.int64)
    # Raw CHW pixels -> NHWC codes through the per-channel table.
    codes = np.stack([lut[c][images[:, c]] for c in range(lut.shape[0])], axis=-1)
    vals = [codes]
    shapes = {v["id"]: v["shape"] for v in net["values"]}
    zps = {v["id"]: v["zero_point"] for v in net["values"]}
    logits = None
    for node in net["nodes"]:
        op = node["op"]
        if op in ("add", "mul"):
            a, b = (vals[i] for i in node["inputs"])
        elif op != "concat":
            x = vals[node["input"]]
        if op == "conv":
            kh, kw = node["kernel"]
            o, i, g = node["out_channels"], node["in_channels"], node.get("groups", 1)
            ipg, opg = i // g, o // g
            w = np.array(node["weights"], dtype=np.int64).reshape(o, kh * kw * ipg)
            p = windows(
                x.astype(np.int64) - node["input_zero_point"],
                kh, kw, *node["stride"], *node["dilation"], node["pads"], 0,
            )
            # Group k: output channels k*opg.. read input channels k*ipg.. only.
            acc = np.concatenate(
                [
                    p[..., k * ipg : (k + 1) * ipg].reshape(*p.shape[:3], -1)
                    @ w[k * opg : (k + 1) * opg].T
                    for k in range(g)
                ],
                axis=-1,
            ) + np.array(node["bias"], dtype=np.int64)
            if node["requant"] is None:
                logits = acc.reshape(n, -1)
                break
            rq = node["requant"]
            y = node["output_zero_point"] + requant(acc, rq["multiplier"], rq["shift"])
            y = np.maximum(y, node["clamp_min"])
            y = np.minimum(y, node["clamp_max"])
        elif op == "add":
            s = (a.astype(np.int64) - node["a_zero_point"]) * node["a_multiplier"] + (
                b.astype(np.int64) - node["b_zero_point"]
            ) * node["b_multiplier"]
            sh = node["shift"]
            y = node["output_zero_point"] + ((s + (1 << (sh - 1))) >> sh)
            y = np.minimum(np.maximum(y, node["clamp_min"]), node["clamp_max"])
        elif op in ("max_pool", "avg_pool"):
            kh, kw = node["kernel"]
            valid = windows(np.ones_like(x[..., :1]), kh, kw, *node["stride"], 1, 1, node["pads"], 0)
            if op == "max_pool":
                y = windows(x, kh, kw, *node["stride"], 1, 1, node["pads"], 0).max(axis=3)
            else:
                fill = zps[node["input"]] if node["count_include_pad"] else 0
                s = windows(x.astype(np.int64), kh, kw, *node["stride"], 1, 1, node["pads"], fill).sum(axis=3)
                count = kh * kw if node["count_include_pad"] else valid.sum(axis=3)
                # A window with no input cell gives the zero point, as in ccq.
                y = np.where(count == 0, zps[node["input"]], (s + count // 2) // np.maximum(count, 1))
        elif op == "global_avg_pool":
            count = x.shape[1] * x.shape[2]
            s = x.astype(np.int64).sum(axis=(1, 2), keepdims=True)
            y = (s + count // 2) // count
        elif op == "slice":
            h, w, c = shapes[node["output"]]
            (c0, h0, w0), (cs, hs, ws) = node["start"], node["step"]
            y = x[:, h0 : h0 + hs * h : hs, w0 : w0 + ws * w : ws, c0 : c0 + cs * c : cs]
        elif op == "pad":
            h, w, c = shapes[node["output"]]
            bc, bh, bw = node["before"]
            y = np.full((n, h, w, c), zps[node["output"]], dtype=np.int64)
            y[:, bh : bh + x.shape[1], bw : bw + x.shape[2], bc : bc + x.shape[3]] = x
        elif op == "flatten":
            y = x.reshape(n, 1, 1, -1)
        elif op == "clamp":
            y = np.minimum(np.maximum(x, node["min"]), node["max"])
        elif op == "lookup":
            y = np.array(node["table"], dtype=np.int64)[x]
        elif op == "mul":
            # b is a's shape or [N, 1, 1, C]; NumPy broadcasts the latter over H and W.
            prod = (a.astype(np.int64) - node["a_zero_point"]) * (b.astype(np.int64) - node["b_zero_point"])
            y = node["output_zero_point"] + requant(prod, node["multiplier"], node["shift"])
            y = np.minimum(np.maximum(y, node["clamp_min"]), node["clamp_max"])
        elif op == "concat":
            parts = [np.array(t, dtype=np.int64)[vals[i]] for i, t in zip(node["inputs"], node["tables"])]
            y = np.concatenate(parts, axis=-1)
        else:
            raise SystemExit(f"{path}: unknown op '{op}'")
        vals.append(y.astype(np.int64))
    if logits is None:
        raise SystemExit(f"{path}: no logits layer")
    rq = net["logits"]["requant"]
    return requant(logits, rq["multiplier"], rq["shift"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--onnx", help="an onnx-qdq export")
    what.add_argument("--arrays", help="a json (plain arrays) export")
    ap.add_argument("--reference", required=True, help="the .npz from `coordinator export --reference`")
    ap.add_argument("--optimize", choices=["all", "basic", "disable"], default="all",
                    help="ONNX Runtime graph optimisation level (all: QDQ pairs fused into integer kernels)")
    ap.add_argument("--max-top1-gap", type=float, default=0.1, help="allowed top-1 difference, points")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--limit", type=int, help="use only the first N images")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    ref = dict(np.load(args.reference))
    if args.limit is not None:
        for k in ("images", "labels", "logits", "logits_int"):
            ref[k] = ref[k][: args.limit]
    labels = ref["labels"].astype(np.int64)
    ccq = ref["logits"].astype(np.float64)
    report = {"images": int(len(labels)), "top1_ccq": top1(ccq, labels)}
    ok = True
    if args.onnx:
        report["model"] = args.onnx
        try:
            logits, version = run_onnx(args.onnx, ref, args.optimize, args.batch)
            report["checker"] = "passed"
        except Exception as e:  # the checker's and the runtime's errors alike
            report["checker"] = f"failed: {e}"
            logits, version = None, None
        report["onnxruntime"] = version
        report["optimize"] = args.optimize
        if logits is None:
            ok = False
        else:
            diff = np.abs(logits - ccq)
            report.update(
                top1_other=top1(logits, labels),
                argmax_agreement=100.0 * float(np.mean(np.argmax(logits, 1) == np.argmax(ccq, 1))),
                max_abs_logit_diff=float(diff.max()),
                mean_abs_logit_diff=float(diff.mean()),
                max_abs_logit=float(np.abs(ccq).max()),
                logit_scale=float(ref["logit_scale"]),
            )
            ok = abs(report["top1_other"] - report["top1_ccq"]) <= args.max_top1_gap
    else:
        report["model"] = args.arrays
        ints = run_arrays(args.arrays, ref)
        same = np.array_equal(ints, ref["logits_int"].astype(np.int64))
        report.update(
            top1_other=top1(ints, labels),
            bit_exact=bool(same),
            max_abs_int_logit_diff=int(np.abs(ints - ref["logits_int"]).max()),
        )
        ok = same
    report["ok"] = bool(ok)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['model']}: {report['images']} images")
        print(f"  ccq integer engine  top-1 {report['top1_ccq']:.2f} %")
        if "checker" in report:
            print(f"  onnx.checker        {report['checker']}")
        if "top1_other" in report:
            other = f"onnxruntime {report.get('onnxruntime')} ({args.optimize})" if args.onnx else "numpy arrays"
            print(f"  {other:<19} top-1 {report['top1_other']:.2f} %")
        if "argmax_agreement" in report:
            print(f"  arg-max agreement   {report['argmax_agreement']:.2f} %")
            print(
                f"  logit difference    max {report['max_abs_logit_diff']:.4g}, mean "
                f"{report['mean_abs_logit_diff']:.3g} (largest |logit| {report['max_abs_logit']:.3g}, "
                f"ccq logit step {report['logit_scale']:.3g})"
            )
        if "bit_exact" in report:
            print(f"  integer logits      {'bit-exact' if report['bit_exact'] else 'DIFFER'}")
        print("  OK" if ok else "  FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
