#!/usr/bin/env python3
"""Runs the results grid of issue #9 (examples/experiments/*.toml x seeds), resumably.

Each cell x seed is its own run directory, runs/grid/<cell>/seed<N>/. A run whose
report.json exists is skipped; a run that was interrupted (a checkpoint but no report) is
resumed with `coordinator run --resume`. Every finished report is copied, without model
weights, to docs/results/grid/<cell>-seed<N>.json together with the exact command and the
machine it ran on; scripts/render_results.py renders docs/RESULTS.md from those copies.

Usage (from the repository root; builds the release binaries first):
  python3 scripts/run_grid.py                       # every cell, seeds 1, 2, 3
  python3 scripts/run_grid.py --filter mnist --seed 1 --seed 2
  python3 scripts/run_grid.py --filter 'resnet20-w4a8' --dry-run

Seeds are the outer loop, so one complete pass over the cells finishes before the next
seed starts: an interrupted grid still covers every cell once.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "examples" / "experiments"
RUNS = Path("runs") / "grid"
REPORTS = ROOT / "docs" / "results" / "grid"


def cells(pattern):
    """Experiment configs whose name matches `pattern` (a regular expression), in a
    fixed order: MNIST before ResNet-20, then by name."""
    found = sorted(EXPERIMENTS.glob("*.toml"), key=lambda p: (not p.name.startswith("mnist"), p.name))
    rx = re.compile(pattern) if pattern else None
    return [p for p in found if rx is None or rx.search(p.stem)]


def finished(run_dir):
    """Whether the run in `run_dir` ended. A run stopped by a signal (Ctrl-C, a killed
    grid) writes its report too, with stop reason "interrupted": that one is resumed from
    its checkpoint, never counted."""
    report = run_dir / "report.json"
    if not report.exists():
        return False
    try:
        return json.loads(report.read_text()).get("stop_reason") != "interrupted"
    except (OSError, ValueError):
        return False


def machine():
    """What the numbers were measured on, read from the system rather than typed."""
    cpu = platform.processor() or platform.machine()
    # The model name alone does not tell the engine's kernel path: virtual machines name
    # AMD EPYCs with and without AVX-512 alike, and the int8 kernels run ~4x apart.
    isa = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and isa is None:
                flags = set(line.split(":", 1)[1].split())
                isa = next((f for f in ("avx512_vnni", "avx512bw", "avx2") if f in flags), "none")
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "memory_gb": mem_gb, "os": platform.platform()}


def commit():
    """HEAD, marked -dirty when code differs from it. Documentation (docs/, *.md) is not
    code: the grid itself rewrites the report copies under docs/ while it runs."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs", ":!*.md"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def free_port():
    """A loopback port free right now: the default port may be taken by another run on
    a shared machine. The port has no influence on results, so it is not recorded."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "release" / "coordinator"


def copy_report(cell, seed, run_dir, command, wall, built):
    """The committed copy: the run's report.json plus how it was produced. The report
    holds accuracies, history and per-layer statistics, never weights (those are in
    model.ccq, which stays in the run directory)."""
    report = json.loads((run_dir / "report.json").read_text())
    report.pop("model_file", None)
    report["grid"] = {
        "cell": cell,
        "config": str((EXPERIMENTS / f"{cell}.toml").relative_to(ROOT)),
        "command": command,
        "machine": machine(),
        # The commit the binary was built from (read once, right after the build: the
        # checkout may move on while a long grid runs).
        "commit": built,
        "process_seconds": round(wall, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    REPORTS.mkdir(parents=True, exist_ok=True)
    dest = REPORTS / f"{cell}-seed{seed}.json"
    dest.write_text(json.dumps(report, indent=1) + "\n")
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, action="append", help="seed to run (repeatable; default 1, 2, 3)")
    ap.add_argument("--filter", default="", help="regular expression on the cell name, e.g. 'mnist' or 'w4a8-(eda-cc|hill)'")
    ap.add_argument("--local-workers", type=int, default=2)
    ap.add_argument("--nice", type=int, default=19, help="niceness of the runs (the machine is shared)")
    ap.add_argument("--dry-run", action="store_true", help="print what would run and stop")
    ap.add_argument("--no-build", action="store_true", help="use the existing release binary")
    args = ap.parse_args()
    seeds = args.seed or [1, 2, 3]
    todo = cells(args.filter)
    if not todo:
        sys.exit(f"no experiment in {EXPERIMENTS} matches {args.filter!r}")

    os.chdir(ROOT)
    if not args.dry_run and not args.no_build:
        subprocess.run(["nice", "-n", str(args.nice), "cargo", "build", "--release", "--bin", "coordinator", "--bin", "worker"], check=True)
    exe = binary()
    # The commit the binary was built from: recorded beside it when this script builds,
    # read back with --no-build (HEAD may have moved on since).
    stamp = exe.parent / "ccq-grid-commit"
    if not args.dry_run and not args.no_build:
        stamp.write_text(commit() + "\n")
    built = stamp.read_text().strip() if stamp.exists() else commit() + " (binary not built by run_grid)"

    plan = []
    for seed in seeds:
        for cfg in todo:
            run_dir = RUNS / cfg.stem / f"seed{seed}"
            plan.append((cfg, seed, run_dir))
    done = [p for p in plan if finished(p[2])]
    print(f"grid: {len(plan)} runs ({len(todo)} cells x seeds {seeds}), {len(done)} already finished", flush=True)

    for i, (cfg, seed, run_dir) in enumerate(plan, 1):
        cell = cfg.stem
        tag = f"[{i}/{len(plan)}] {cell} seed {seed}"
        if finished(run_dir):
            # Finished earlier: make sure its committed copy exists too.
            if not (REPORTS / f"{cell}-seed{seed}.json").exists() and not args.dry_run:
                copy_report(cell, seed, run_dir, "(copied from an earlier run)", 0.0, "unknown")
            print(f"{tag}: done, skipped", flush=True)
            continue
        # The command as a user would type it (cargo run), and as it is executed.
        shown = ["cargo", "run", "--release", "--bin", "coordinator", "--", "run"]
        tail = ["--config", str(cfg.relative_to(ROOT)), "--local-workers", str(args.local_workers)]
        fresh = tail + ["--out", str(run_dir), "--seed", str(seed)]
        # The recorded command is always the fresh run's: a resumed run gives the same
        # result (checkpoints never change results).
        command = " ".join(shlex.quote(a) for a in shown + fresh)
        if (run_dir / "checkpoint.ccqck").exists():
            # The checkpoint holds the run's config (seed included).
            tail = ["--resume", str(run_dir), "--local-workers", str(args.local_workers)]
            what = "resuming"
        else:
            tail = fresh
            what = "running"
        print(f"{tag}: {what}: {command}", flush=True)
        if args.dry_run:
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(run_dir / "log.txt", "a") as log:
            listen = ["--listen", f"127.0.0.1:{free_port()}"]
            rc = subprocess.run(["nice", "-n", str(args.nice), str(exe), "run"] + tail + listen, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.monotonic() - start
        if rc != 0 or not (run_dir / "report.json").exists():
            print(f"{tag}: FAILED (exit {rc}) after {wall:.0f} s; see {run_dir / 'log.txt'}", flush=True)
            sys.exit(1)
        dest = copy_report(cell, seed, run_dir, command, wall, built)
        acc = json.loads(dest.read_text())["accuracy"]
        print(f"{tag}: {wall:.0f} s, test top-1 {acc.get('final')} % (float {acc.get('float')}, ptq {acc.get('ptq')}) -> {dest.relative_to(ROOT)}", flush=True)
    if shutil.which("python3") and not args.dry_run:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "render_results.py")], check=True)


if __name__ == "__main__":
    main()
