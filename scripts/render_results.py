#!/usr/bin/env python3
"""Renders docs/RESULTS.md (and its SVG plots) from the committed grid reports.

Inputs: the experiment configs (examples/experiments/*.toml, which define the cells) and
the reports scripts/run_grid.py copied to docs/results/grid/<cell>-seed<N>.json. Every
number, command and machine description on the page comes from those files; a cell
without reports is listed as "not run yet". Run from anywhere:
  python3 scripts/render_results.py
"""

import json
import math
import re
import statistics
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "examples" / "experiments"
REPORTS = ROOT / "docs" / "results" / "grid"
PLOTS = ROOT / "docs" / "img" / "results"
OUT = ROOT / "docs" / "RESULTS.md"
FINDINGS = ROOT / "docs" / "results" / "findings.md"
# Float controls written by scripts/adabn_control.py.
CONTROLS = ROOT / "docs" / "results" / "control"

# Display order and names; the keys are the configs' `search.strategy` values.
METHODS = {
    "eda-cc": "EDA+CC, confidence groups, one generation at a time (ccq)",
    "cc-random": "CC, random groups",
    "cc-layer": "CC, layer-by-layer groups",
    "eda": "EDA without CC",
    "hill": "(1+λ) local search",
    "eda-cc-distill": "EDA+CC, distillation fitness",
    "eda-cc-confirm": "EDA+CC, adoption confirmed on a fresh batch",
    "eda-cc-restarts": "EDA+CC, restarts when every variable froze",
    "eda-cc-confirm-restarts": "EDA+CC, confirmed adoption and restarts",
    "eda-cc-window4": "EDA+CC, 4 generations in flight (window)",
    "eda-cc-window16": "EDA+CC, 16 generations in flight (window)",
    "eda-cc-window32": "EDA+CC, 32 generations in flight (window)",
    "eda-cc-confirm-b1024-p95": "EDA+CC, confirmed adoption, 1,024-image batches, p0 = 0.95 (a quarter of the evaluations)",
    "eda-cc-confirm-restarts-b1024-p95": "EDA+CC, confirmed adoption, 1,024-image batches, p0 = 0.95, restarts (a quarter of the evaluations)",
    "eda-cc-confirm-margin2-restarts-b1024-p95": "EDA+CC, confirmed adoption by a margin of 2 standard errors, 1,024-image batches, p0 = 0.95, restarts (a quarter of the evaluations)",
    "eda-cc-confirm-rollback-b1024-p95": "EDA+CC, confirmed adoption, 1,024-image batches, p0 = 0.95, back to the best network 0.3 validation points below it (a quarter of the evaluations)",
    "eda-cc-confirm-margin2-restarts-rollback-b1024-p95": "EDA+CC, confirmed adoption by a margin of 2 standard errors, 1,024-image batches, p0 = 0.95, restarts, back to the best network 0.3 validation points below it (a quarter of the evaluations)",
    "eda-cc-margin1": "EDA+CC, adoption by a margin of 1 standard error",
    "eda-cc-margin2": "EDA+CC, adoption by a margin of 2 standard errors",
    "eda-cc-margin2-b1024-p95": "EDA+CC, adoption by a margin of 2 standard errors, 1,024-image batches, p0 = 0.95 (a quarter of the evaluations)",
    "eda-cc-scales": "EDA+CC, searched channel scales (step 1/16)",
    "eda-cc-confirm-scales": "EDA+CC, confirmed adoption, searched channel scales (step 1/16)",
    "eda-cc-confirm-b1024-p95-scales": "EDA+CC, confirmed adoption, 1,024-image batches, p0 = 0.95, searched channel scales (step 1/16)",
    "eda-cc-clips": "EDA+CC, searched activation clips (step 1/16)",
    "eda-cc-local10k": "EDA+CC, first 10,000 evaluations scored block-locally",
    "rtn": "RTN (no search)",
}
MODELS = {"mnist": "MNIST quickstart CNN (2,000 test digits)",
          "mobilenet": "MobileNetV3-style model of the worked example (examples/mnist/mobilenet.onnx, 2,000 test digits)",
          "mnist100k": "MNIST quickstart CNN, 100,000 evaluations per run (five times the budget above)", "mnistx10": "MNIST quickstart CNN, ten times the quickstart search's budget (50,000 evaluations of 1,024 images)", "resnet20x10": "ResNet-20, CIFAR-10 JPEG q75 copy, ten times the W3A8 recipe's budget (50,000 evaluations of 1,024 images)", "resnet20": "ResNet-20, CIFAR-10 JPEG q75 copy (10,000 test images)"}
COLORS = {"eda-cc": "#d62728", "cc-random": "#1f77b4", "cc-layer": "#2ca02c", "eda": "#9467bd", "hill": "#ff7f0e", "eda-cc-distill": "#8c564b", "eda-cc-confirm": "#e377c2", "eda-cc-restarts": "#17becf", "eda-cc-confirm-restarts": "#bcbd22", "eda-cc-window4": "#ff9896", "eda-cc-window16": "#c5b0d5", "eda-cc-window32": "#c49c94", "eda-cc-confirm-b1024-p95": "#000000", "eda-cc-confirm-restarts-b1024-p95": "#9edae5", "eda-cc-confirm-margin2-restarts-b1024-p95": "#dbdb8d", "eda-cc-margin1": "#aec7e8", "eda-cc-margin2": "#393b79", "eda-cc-margin2-b1024-p95": "#637939", "eda-cc-scales": "#8c6d31", "eda-cc-confirm-scales": "#e7969c", "eda-cc-confirm-b1024-p95-scales": "#843c39", "eda-cc-clips": "#5254a3", "eda-cc-local10k": "#7b4173", "eda-cc-confirm-rollback-b1024-p95": "#e6550d", "eda-cc-confirm-margin2-restarts-rollback-b1024-p95": "#31a354", "rtn": "#7f7f7f"}
# A precision may carry the suffix "bc": the searches start from the bias-corrected RTN
# network ([quant] bias_correction = true) instead of plain RTN; "ws": weight scales
# chosen by the least squared error ([quant] weight_scale = "mse") instead of max-abs;
# "gq": the searches start from the GPTQ-rounded network ([quant] rounding = "gptq").
# The widest int8 kernel path the machine has (scripts/run_grid.py records it; older
# reports do not).
ISA = {"avx512_vnni": "AVX-512 VNNI", "avx512bw": "AVX-512, no VNNI", "avx2": "AVX2, no AVX-512"}
CELL_RX = re.compile(r"^(?P<model>[a-z0-9]+)-(?P<prec>w\d+a\d+(?:mse)?(?:ws)?(?:gq)?(?:bc)?(?:fl\d+)?)-(?P<strategy>[a-z0-9-]+)$")


def end_below_best(report):
    """Validation points between the best measurement of a run and its last (the network at
    the end of the search): issue #15's late decline."""
    vals = [p["val_top1"] for p in report["history"]]
    return max(vals) - vals[-1]


def load_cells():
    cells = {}
    for path in sorted(EXPERIMENTS.glob("*.toml")):
        m = CELL_RX.match(path.stem)
        if not m:
            continue
        cfg = tomllib.loads(path.read_text())
        # A method is the strategy, suffixed with the fitness and the acceptance rule when
        # they are not the defaults.
        strategy = cfg.get("search", {}).get("strategy", "eda-cc")
        fitness = cfg.get("search", {}).get("fitness", "loss")
        if fitness != "loss":
            strategy = f"{strategy}-{fitness}"
        acceptance = cfg.get("search", {}).get("acceptance", "batch")
        if acceptance != "batch":
            strategy = f"{strategy}-{acceptance}"
        margin = cfg.get("search", {}).get("margin", 0)
        if margin != 0:
            if margin != int(margin):
                raise SystemExit(f"{path}: search.margin {margin}: grid cells use whole margins")
            strategy = f"{strategy}-margin{int(margin)}"
        if cfg.get("search", {}).get("restarts", False):
            strategy = f"{strategy}-restarts"
        rollback = cfg.get("search", {}).get("rollback")
        if rollback is not None:
            if rollback != 0.3:
                raise SystemExit(f"{path}: search.rollback {rollback}: grid cells use 0.3")
            strategy = f"{strategy}-rollback"
        # Unset, the window follows the network with batch acceptance (search.window), so
        # a cell that adopts by batch states it; confirmation runs one at a time.
        window = cfg.get("search", {}).get("window")
        if window is None:
            if acceptance == "batch":
                raise SystemExit(f"{path}: grid cells adopting by batch set search.window")
            window = 1
        if window != 1:
            strategy = f"{strategy}-window{window}"
        batch = cfg.get("search", {}).get("batch_size", 256)
        if batch != 256:
            strategy = f"{strategy}-b{batch}"
        p0 = cfg.get("eda", {}).get("p0", 0.8)
        if p0 != 0.8:
            strategy = f"{strategy}-p{round(p0 * 100)}"
        step = cfg.get("quant", {}).get("channel_scale_step")
        if step is not None:
            if step != 0.0625:
                raise SystemExit(f"{path}: quant.channel_scale_step {step}: grid cells use 0.0625")
            strategy = f"{strategy}-scales"
        clip = cfg.get("quant", {}).get("act_clip_step")
        if clip is not None:
            if clip != 0.0625:
                raise SystemExit(f"{path}: quant.act_clip_step {clip}: grid cells use 0.0625")
            strategy = f"{strategy}-clips"
        local = cfg.get("search", {}).get("local_evaluations", 0)
        if local:
            if local % 1000 or cfg.get("search", {}).get("local_images", 1024) != 1024:
                raise SystemExit(f"{path}: search.local_evaluations {local}: grid cells use thousands and 1,024 images")
            strategy = f"{strategy}-local{local // 1000}k"
        # The start is named in the precision ("gq": GPTQ rounding); every cell names its
        # rounding, since the config's default changed from round to nearest to GPTQ.
        rounding = cfg.get("quant", {}).get("rounding")
        if rounding != ("gptq" if "gq" in m["prec"] else "nearest"):
            raise SystemExit(f"{path}: precision {m['prec']} but quant.rounding = {rounding!r}")
        if strategy != m["strategy"]:
            raise SystemExit(f"{path}: name says {m['strategy']}, search.strategy/fitness/acceptance say {strategy}")
        cells[path.stem] = {
            "model": m["model"],
            "prec": m["prec"],
            "strategy": strategy,
            "budget": cfg.get("budget", {}).get("evaluations"),
            "config": str(path.relative_to(ROOT)),
            "reports": [],
        }
    for path in sorted(REPORTS.glob("*-seed*.json")):
        cell, seed = path.stem.rsplit("-seed", 1)
        if cell not in cells:
            raise SystemExit(f"{path}: no experiment config {cell}.toml")
        report = json.loads(path.read_text())
        if report.get("stop_reason") == "interrupted":
            raise SystemExit(f"{path}: an interrupted run, not a result: delete it and resume the run")
        report["_seed"] = int(seed)
        report["_file"] = str(path.relative_to(ROOT))
        cells[cell]["reports"].append(report)
    return cells


def mean_std(values):
    if not values:
        return None
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else None
    return m, s, len(values)


def fmt(ms, digits=2):
    if ms is None:
        return "not run yet"
    m, s, n = ms
    if s is None:
        return f"{m:.{digits}f} (n=1)"
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={n})"


def prec_key(p):
    w, a, mse, ws, gq, bc, fl = re.match(r"w(\d+)a(\d+)(mse)?(ws)?(gq)?(bc)?(fl\d+)?", p).groups()
    return (-int(w), -int(a), mse is not None, ws is not None, gq is not None, bc is not None, fl or "")


def prec_label(p):
    """W3A8, W3A8 + BC for a bias-corrected start, W3A8 + 8-bit first/last for mixed
    precision (`first_last_bits`), W4A4 + MSE clip for activation ranges calibrated by
    the least squared quantization error (`calibration = "mse"`), W3A8 + MSE weight scales
    for weight scales chosen the same way (`weight_scale = "mse"`)."""
    label = p.upper().replace("MSE", " + MSE clip").replace("BC", " + BC")
    label = label.replace("WS", " + MSE weight scales").replace("GQ", " + GPTQ start")
    return re.sub(r"FL(\d+)", r" + \1-bit first/last", label)


def history_curve(reports, x_key):
    """Mean test top-1 over seeds at each evaluation point (evaluations are scheduled by
    generation, so every seed of a cell measures at the same evaluation counts); the x
    value is the mean over seeds too (wall seconds differ from seed to seed)."""
    points = defaultdict(list)
    for r in reports:
        for h in r.get("history", []):
            if h.get("test_top1") is not None:
                points[h["evaluations"]].append((h[x_key], h["test_top1"]))
    curve = []
    for ev in sorted(points):
        pts = points[ev]
        if len(pts) == len(reports):
            curve.append((statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)))
    return curve


def nice_ticks(lo, hi, n=5):
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=mag * 10)
    first = math.ceil(lo / step) * step
    ticks = []
    t = first
    while t <= hi + 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def svg_plot(path, title, xlabel, lines, levels):
    """A line chart: `lines` = [(label, color, [(x, y)])], `levels` = [(label, y, dash)]."""
    W, H, L, R, T, B = 720, 400, 60, 210, 36, 48
    xs = [x for _, _, pts in lines for x, _ in pts] or [0, 1]
    ys = [y for _, _, pts in lines for _, y in pts] + [y for _, y, _ in levels]
    x0, x1 = 0.0, max(xs) or 1.0
    y0, y1 = min(ys), max(ys)
    pad = max((y1 - y0) * 0.05, 0.5)
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = W - L - R, H - T - B

    def px(x):
        return L + (x - x0) / (x1 - x0) * pw

    def py(y):
        return T + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="20" font-size="14">{esc(title)}</text>']
    for t in nice_ticks(y0, y1):
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{L - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in nice_ticks(x0, x1):
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{T + ph}" y2="{T + ph + 4}" stroke="black"/>')
        out.append(f'<text x="{px(t):.1f}" y="{T + ph + 18}" text-anchor="middle">{t:g}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 8}" text-anchor="middle">{esc(xlabel)}</text>')
    out.append(f'<text transform="translate(16 {T + ph / 2}) rotate(-90)" text-anchor="middle">test top-1 (%)</text>')
    legend_y = T + 6
    for label, y, dash in levels:
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="black" stroke-dasharray="{dash}"/>')
        out.append(f'<line x1="{L + pw + 12}" x2="{L + pw + 36}" y1="{legend_y}" y2="{legend_y}" stroke="black" stroke-dasharray="{dash}"/>')
        out.append(f'<text x="{L + pw + 42}" y="{legend_y + 4}">{esc(label)} {y:.2f} %</text>')
        legend_y += 18
    for label, color, pts in lines:
        if not pts:
            continue
        poly = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{poly}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<line x1="{L + pw + 12}" x2="{L + pw + 36}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{L + pw + 42}" y="{legend_y + 4}">{esc(label)}</text>')
        legend_y += 18
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def comparison(entries, precs):
    """Where the method (eda-cc) does and does not beat each baseline, in words, from the
    means; differences smaller than the larger of the two standard deviations are called
    ties, and a pair with a single seed on either side is not decided at all (one seed has
    no spread to compare against)."""
    out = []
    for p in precs:
        ours = entries.get((p, "eda-cc"))
        if ours is None or not ours[1]["reports"]:
            continue
        m0, s0, n0 = mean_std([r["accuracy"]["final"] for r in ours[1]["reports"]])
        beats, ties, loses, undecided = [], [], [], []
        for strategy in METHODS:
            other = entries.get((p, strategy))
            if strategy == "eda-cc" or other is None or not other[1]["reports"]:
                continue
            m1, s1, n1 = mean_std([r["accuracy"]["final"] for r in other[1]["reports"]])
            spread = max(s0 or 0.0, s1 or 0.0)
            text = f"{strategy} ({m1:.2f})"
            if strategy != "rtn" and min(n0, n1) < 2:
                # rtn is deterministic: one seed is all there is to know.
                undecided.append(text)
            elif abs(m0 - m1) <= spread:
                ties.append(text)
            elif m0 > m1:
                beats.append(text)
            else:
                loses.append(text)
        if not (beats or ties or loses or undecided):
            continue
        parts = []
        if beats:
            parts.append("beats " + ", ".join(beats))
        if ties:
            parts.append("is within one standard deviation of " + ", ".join(ties))
        if loses:
            parts.append("**is below** " + ", ".join(loses))
        if undecided:
            parts.append("is not compared with " + ", ".join(undecided) + " (a single seed on one side)")
        out.append(f"- {prec_label(p)}: eda-cc ({m0:.2f}) " + "; ".join(parts) + ".")
    if out:
        out = ["At equal evaluation budgets, by mean test top-1:", ""] + out + [""]
    return out


# Issue #9's accuracy targets, per model and precision: a number, or "float" for the
# float model's test top-1 as the report records it.
# A "+ BC", "+ MSE clip", "+ MSE weight scales" or "+ GPTQ start" precision (another
# post-training start, the same uniform precision) has the target of its precision.
TARGETS = {("resnet20", "w4a8"): "float", ("resnet20", "w3a8"): 80.0, ("resnet20", "w4a4"): 77.0,
           ("resnet20", "w2a8"): 60.0, ("mnist", "w2a8"): 97.0}


def first_reach(report, target):
    """(search seconds, evaluations) of the first measurement during the search whose
    test top-1 reached `target`, or None."""
    for h in report.get("history", []):
        if h.get("test_top1") is not None and h["test_top1"] >= target:
            return h["wall_seconds"], h["evaluations"]
    return None


def targets(model, entries, precs):
    """Per target cell and method: the output network's test top-1 against the target,
    and when the global network first reached it during the search."""
    rows = []
    for p in precs:
        goal = TARGETS.get((model, re.sub(r"(mse)?(ws)?(gq)?(bc)?$", "", p)))
        if goal is None:
            continue
        for strategy in METHODS:
            hit = entries.get((p, strategy))
            if strategy == "rtn" or hit is None or not hit[1]["reports"]:
                continue
            rs = hit[1]["reports"]
            level = rs[0]["accuracy"]["float"] if goal == "float" else goal
            outputs = sum(r["accuracy"]["final"] >= level for r in rs)
            reached = [first_reach(r, level) for r in rs]
            times = [t for t in reached if t is not None]
            when = (f"{len(times)}/{len(rs)}; first at {statistics.fmean(t[0] for t in times) / 60:.1f} min, "
                    f"{statistics.fmean(t[1] for t in times):,.0f} evaluations (mean of those)" if times else f"0/{len(rs)}")
            rows.append(f"| {prec_label(p)} ≥ {level:.2f} | {strategy} | {fmt(mean_std([r['accuracy']['final'] for r in rs]))} | "
                        f"{outputs}/{len(rs)} | {when} |")
    if not rows:
        return []
    return ["Targets: the output network's test top-1, how many seeds' output networks reach the "
            "target, and how many seeds' global networks reached it during the search, when (search wall time) "
            "and after how many evaluations.", "",
            "| target | method | output test top-1 | outputs ≥ target | reached during the search |",
            "|---|---|---|---|---|"] + rows + [""]


def main():
    cells = load_cells()
    by_model = defaultdict(dict)
    for name, c in cells.items():
        by_model[c["model"]][(c["prec"], c["strategy"])] = (name, c)
    PLOTS.mkdir(parents=True, exist_ok=True)
    for old in PLOTS.glob("*.svg"):
        old.unlink()

    md = ["# Results", "",
          "<!-- Generated by scripts/render_results.py from docs/results/grid/*.json; do not edit by hand. -->", "",
          "Test top-1 (%) of the network each run outputs (selected by validation accuracy on a split held out "
          "from the training data; the test split is only measured, never used for a choice), mean ± sample "
          "standard deviation over seeds. Every search strategy of a model gets the same budget of fitness "
          "evaluations (one candidate scored on one training batch), stated per cell below. Strategies: "
          "`eda-cc` = EDA + cooperative coevolution with confidence-based groups, equal confidences in a seeded "
          "random order (ccq's method; before commit b5c4844 ties went by index, which made its first cycle "
          "identical to `cc-layer`), `cc-random` / "
          "`cc-layer` = the same with random / static layer-by-layer groups, `eda` = EDA without cooperative "
          "coevolution (all variables sampled jointly), `hill` = (1+λ) random local search in the same "
          "restricted space, `eda-cc-distill` = ccq's method with the distillation fitness (`[search] fitness = \"distill\"`: "
          "KL divergence to the float model's outputs on the batch instead of cross-entropy on the labels), "
          "`eda-cc-confirm` = ccq's method adopting a candidate only when it beats the current network on its "
          "batch and again on a fresh batch (`[search] acceptance = \"confirm\"`: the confirmation scores just the "
          "two, 2 evaluations of the same budget), `-marginZ` = a candidate beats the current network only when "
          "its mean loss on the batch is lower by more than Z standard errors of the per-image paired loss "
          "difference (`[search] margin = Z`; no extra evaluations), `-restarts` = when every variable has frozen, the distributions are "
          "re-centred on the current codes and the search goes on (`[search] restarts = true`), "
          "`-rollback` = at each measurement of the global network the search waits for its result and, "
          "when it reads more than 0.3 validation points below the run's best, goes back to the best network "
          "and re-centres the distributions there (`[search] rollback = 0.3`), "
          "`-windowL` = L generations in flight, each sampled against the network as it was when the "
          "generation L before it merged (`[search] window = L`; unset, one group in 64 of the network's "
          "with batch acceptance, at most 32: 32 for ResNet-20, 1 for the MNIST CNN); "
          "every cell without it runs one generation at a time (`window = 1`, set in its config), "
          "`-b1024` = 1,024-image batches (`[search] batch_size = 1024`; such cells get a quarter of the evaluations, "
          "so that every cell scores the same number of images), `-p95` = each variable starts with probability 0.95 "
          "on its current code instead of 0.8 (`[eda] p0 = 0.95`: smaller steps), "
          "`rtn` = round-to-nearest post-training quantization (no search). A precision "
          "marked + BC (e.g. W3A8 + BC) starts every search from the bias-corrected RTN network "
          "(`[quant] bias_correction = true`: after rounding, each layer's integer biases are shifted so that "
          "its mean pre-activation per channel on the calibration images matches the float model's) instead "
          "of plain RTN; its `rtn` entry is that corrected network without search. A precision marked + GPTQ start "
          "starts from the network whose codes error-feedback rounding chose (`[quant] rounding = \"gptq\"`: layer by "
          "layer, each rounding error compensated by the weights not yet rounded, so that the layer's output on the "
          "calibration images stays close to the float layer's; the search's codes are then centred on those); its "
          "`rtn` entry is that network without search. "
          "Regenerate: `python3 scripts/run_grid.py` (runs what is missing), then `python3 scripts/render_results.py`.", ""]

    for model in sorted(by_model, key=lambda m: (m != "mnist", m)):
        entries = by_model[model]
        precs = sorted({p for p, _ in entries}, key=prec_key)
        all_reports = [r for _, c in entries.values() for r in c["reports"]]
        md += [f"## {MODELS.get(model, model)}", ""]
        floats = sorted({r["accuracy"]["float"] for r in all_reports})
        md += ["| method | " + " | ".join(prec_label(p) for p in precs) + " |", "|---" * (len(precs) + 1) + "|"]
        md.append("| float | " + " | ".join(
            (f"{floats[0]:.2f}" if len(floats) == 1 else ", ".join(f"{f:.2f}" for f in floats)) if floats else "not run yet"
            for _ in precs) + " |")
        for strategy, label in METHODS.items():
            if not any(s == strategy for _, s in entries):
                continue
            row = []
            for p in precs:
                hit = entries.get((p, strategy))
                if hit is None:
                    if strategy == "rtn":
                        # No rtn cell at this precision: the starting point every search
                        # report records is the same RTN network.
                        ptq = sorted({r["accuracy"]["ptq"] for (pp, _), (_, c) in entries.items() if pp == p for r in c["reports"]})
                        row.append(f"{ptq[0]:.2f} (start of the searches)" if len(ptq) == 1 else "—")
                    else:
                        row.append("—")
                    continue
                row.append(fmt(mean_std([r["accuracy"]["final"] for r in hit[1]["reports"]])))
            md.append(f"| {label} | " + " | ".join(row) + " |")
        md.append("")
        if model == "resnet20" and any(s == "eda-cc" and p == "w8a8" for p, s in entries):
            md += ["W8A8 is the control: RTN at 8 bits loses nothing, so whatever the search gains there over the "
                   "float model is adaptation to this (JPEG) copy of the data, not recovery from quantization.", ""]
        control = CONTROLS / f"{model}-float-adabn.json"
        if control.exists():
            c = json.loads(control.read_text())
            # What it means is said in findings.md; here only what was measured.
            md += [f"Float control, AdaBN: the float model with every BatchNorm's mean and variance re-estimated "
                   f"on {c['estimation_images']:,} images of the search split, layer by layer (no quantization, no search): "
                   f"test {c['adabn']['test_top1']:.2f} % against {c['float']['test_top1']:.2f} %, validation "
                   f"{c['adabn']['val_top1']:.2f} % against {c['float']['val_top1']:.2f} % "
                   f"({c['data']}; `{c['command']}`, ONNX Runtime {c['onnxruntime']}, {c['machine']['cpu']}, "
                   f"{c['finished'][:10]}).", ""]

        md += ["Per cell: budget, evaluations done, search time and whole-run time (mean over seeds), the "
               "network at the end of the search (not selected by validation), and how far that network's "
               "validation top-1 is below the best the run measured (points, per seed in seed order; #15 asks "
               "for at most 0.3).", "",
               "| cell | budget (evaluations) | seeds | evaluations | search s | run s | test top-1 at the end | end below best validation | why the search stopped |",
               "|---|---|---|---|---|---|---|---|---|"]
        for (p, strategy), (name, c) in sorted(entries.items(), key=lambda kv: (prec_key(kv[0][0]), list(METHODS).index(kv[0][1]))):
            rs = c["reports"]
            budget = "— (no search)" if strategy == "rtn" else f"{c['budget']:,}"
            if not rs:
                md.append(f"| {name} | {budget} | 0 | not run yet | | | | | |")
                continue
            seeds = ", ".join(str(r["_seed"]) for r in sorted(rs, key=lambda r: r["_seed"]))
            ev = statistics.fmean(r["evaluations"] for r in rs)
            ss = statistics.fmean(r.get("search_seconds", 0.0) for r in rs)
            ws = statistics.fmean(r["wall_seconds"] for r in rs)
            last = fmt(mean_std([r["accuracy"]["last"] for r in rs]))
            reasons = defaultdict(int)
            for r in rs:
                # The budget line names the count reached, which a last generation may carry past the budget.
                reasons[re.sub(r"evaluation budget \(\d+\) spent", "evaluation budget spent", r.get("stop_reason", "?"))] += 1
            why = "; ".join(f"{k} ({n}×)" if len(reasons) > 1 else k for k, n in reasons.items())
            gap = " / ".join(f"{end_below_best(r):.2f}" for r in sorted(rs, key=lambda r: r["_seed"]))
            md.append(f"| {name} | {budget} | {seeds} | {ev:,.0f} | {ss:.1f} | {ws:.1f} | {last} | {gap} | {why} |")
        md.append("")
        md += comparison(entries, precs)
        md += targets(model, entries, precs)

        plotted = False
        for p in precs:
            lines_t, lines_e = [], []
            for strategy in METHODS:
                hit = entries.get((p, strategy))
                if strategy == "rtn" or hit is None or not hit[1]["reports"]:
                    continue
                rs = hit[1]["reports"]
                lines_t.append((strategy, COLORS[strategy], history_curve(rs, "wall_seconds")))
                lines_e.append((strategy, COLORS[strategy], history_curve(rs, "evaluations")))
            if not lines_t:
                continue
            reports = [r for (pp, _), (_, c) in entries.items() if pp == p for r in c["reports"]]
            levels = [("float", reports[0]["accuracy"]["float"], "6 4"), ("RTN", reports[0]["accuracy"]["ptq"], "2 3")]
            if not plotted:
                md += ["Time to accuracy: test top-1 of the global network during the search (mean over seeds), "
                       "against search wall time and against evaluations; one line per method, the float model "
                       "and the RTN start drawn as levels.", ""]
                plotted = True
            stem = f"{model}-{p}"
            svg_plot(PLOTS / f"{stem}-time.svg", f"{model} {prec_label(p)}: test top-1 vs search time", "search wall time (s)", lines_t, levels)
            svg_plot(PLOTS / f"{stem}-evals.svg", f"{model} {prec_label(p)}: test top-1 vs evaluations", "fitness evaluations", lines_e, levels)
            rel = PLOTS.relative_to(ROOT / "docs")
            md += [f"![{model} {p} vs time]({rel}/{stem}-time.svg)", f"![{model} {p} vs evaluations]({rel}/{stem}-evals.svg)", ""]

    # The reading of the grid is written by hand (docs/results/findings.md) and placed here,
    # so the numbers above and their interpretation sit on one page.
    if FINDINGS.exists():
        md += ["## What the grid says", "", FINDINGS.read_text().strip(), ""]

    md += ["## Not run yet", ""]
    missing = [name for name, c in cells.items() if not c["reports"]]
    short = [(name, len(c["reports"])) for name, c in cells.items() if 0 < len(c["reports"]) < 3]
    if missing:
        md += [f"- `{name}` ({cells[name]['config']})" for name in missing]
    else:
        md.append("Every cell has at least one seed.")
    if short:
        md += ["", "Cells with fewer than 3 seeds: " + ", ".join(f"`{n}` ({k})" for n, k in short) + "."]
    md.append("")

    md += ["## How each number was produced", "",
           "Exact command of every run (from the repository root; `scripts/run_grid.py` runs the same with "
           "the release binary under `nice -n 19`), the commit it ran at, and its report:", "",
           "| report | command | commit |", "|---|---|---|"]
    machines = {}
    for name, c in cells.items():
        for r in sorted(c["reports"], key=lambda r: r["_seed"]):
            g = r.get("grid", {})
            md.append(f"| [{Path(r['_file']).name}](results/grid/{Path(r['_file']).name}) | `{g.get('command', '?')}` | {g.get('commit', '?')} |")
            m = g.get("machine")
            if m:
                key = json.dumps(m, sort_keys=True)
                machines.setdefault(key, (m, set()))[1].add(g.get("finished", "")[:10])
    md += ["", "Machines:", ""]
    for m, days in machines.values():
        days = sorted(d for d in days if d)
        when = f", runs finished {days[0]} to {days[-1]}" if len(days) > 1 else (f", {days[0]}" if days else "")
        isa = f" ({ISA.get(m['isa'], m['isa'])})" if m.get("isa") else ""
        md.append(f"- {m.get('cpu')}{isa}, {m.get('cores')} cores, {m.get('memory_gb')} GB, {m.get('os')}{when}"
                  " (shared with other work, builds and tests at times: wall times are noisy; evaluation "
                  "counts are not)")
    if not machines:
        md.append("- none yet")
    md.append("")
    OUT.write_text("\n".join(md))
    print(f"wrote {OUT.relative_to(ROOT)} ({sum(len(c['reports']) for c in cells.values())} reports, {len(missing)} cells not run yet)")


if __name__ == "__main__":
    main()
