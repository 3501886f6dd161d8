#!/usr/bin/env python3
"""Draws the README's scaling plot (docs/img/scaling.svg) from the committed
`coordinator scale --json` reports in docs/results/scale/, and prints the worker busy
fractions the README's table quotes.

E(W) = rate(W) / (W x rate(1)), each series relative to its own one-worker point: the
emulated cases (`stream-window{1,32}.json`, real coordinator, emulated workers) and the
simulated ones (`stream-equal-window{1,32,128}.json`, 100,000 evaluations for every W).
The x axis is log2 of the number of workers. Run from anywhere:
    python3 scripts/plot_scaling.py
"""
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCALE = ROOT / "docs" / "results" / "scale"
OUT = ROOT / "docs" / "img" / "scaling.svg"

SERIES = [
    ("emulated, L = 1", "stream-window1.json", "cases", "#1f77b4", ""),
    ("simulated, L = 1", "stream-equal-window1.json", "simulated", "#1f77b4", "6 4"),
    ("emulated, L = 32", "stream-window32.json", "cases", "#d62728", ""),
    ("simulated, L = 32", "stream-equal-window32.json", "simulated", "#d62728", "6 4"),
    ("simulated, L = 128", "stream-equal-window128.json", "simulated", "#2ca02c", "6 4"),
]


def series(file, key):
    """[(workers, E(W), worker busy fraction)] of one report's cases, in worker order."""
    cases = sorted(json.loads((SCALE / file).read_text())[key], key=lambda c: c["workers"])
    one = next(c for c in cases if c["workers"] == 1)
    return [(c["workers"], c["efficiency"] / one["efficiency"], c["worker_busy_fraction"]) for c in cases]


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main():
    data = [(label, color, dash, series(file, key)) for label, file, key, color, dash in SERIES]
    W, H, L, R, T, B = 720, 400, 60, 200, 36, 48
    pw, ph = W - L - R, H - T - B
    x1 = math.log2(max(w for *_, pts in data for w, _, _ in pts))

    def px(w):
        return L + math.log2(w) / x1 * pw

    def py(e):
        return T + (1 - e / 1.1) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="20" font-size="14">ResNet-20 W4A8: scale-out efficiency E(W) against workers</text>']
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{L - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for w in (1, 2, 8, 32, 128, 512):
        out.append(f'<line x1="{px(w):.1f}" x2="{px(w):.1f}" y1="{T + ph}" y2="{T + ph + 4}" stroke="black"/>')
        out.append(f'<text x="{px(w):.1f}" y="{T + ph + 18}" text-anchor="middle">{w}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 8}" text-anchor="middle">workers W (log scale)</text>')
    out.append(f'<text transform="translate(16 {T + ph / 2}) rotate(-90)" text-anchor="middle">E(W)</text>')
    # Issue #16's targets: E(32) >= 0.85, E(128) >= 0.70.
    for w, e in ((32, 0.85), (128, 0.70)):
        out.append(f'<circle cx="{px(w):.1f}" cy="{py(e):.1f}" r="5" fill="none" stroke="black"/>')
    legend_y = T + 6
    for label, color, dash, pts in data:
        poly = " ".join(f"{px(w):.1f},{py(e):.1f}" for w, e, _ in pts)
        out.append(f'<polyline points="{poly}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        out.append(f'<line x1="{L + pw + 12}" x2="{L + pw + 36}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        out.append(f'<text x="{L + pw + 42}" y="{legend_y + 4}">{esc(label)}</text>')
        legend_y += 18
    out.append(f'<circle cx="{L + pw + 24}" cy="{legend_y}" r="5" fill="none" stroke="black"/>')
    out.append(f'<text x="{L + pw + 42}" y="{legend_y + 4}">target (#16)</text>')
    out.append("</svg>")
    OUT.write_text("\n".join(out) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    print("worker busy fraction:")
    for label, _, _, pts in data:
        print(f"  {label}: " + ", ".join(f"W={w} {b:.2f}" for w, _, b in pts))


if __name__ == "__main__":
    main()
