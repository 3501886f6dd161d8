#!/usr/bin/env python3
"""Summarise a scripts/mutants.sh run and check every survivor against the equivalents list.

usage: mutants_report.py OUT_DIR EQUIVALENT_TXT

OUT_DIR holds one folder per scope, each with cargo-mutants' mutants.out/. A survivor is named
by its file, its description, the source line it mutates and the column, without the line
number, so the list survives edits elsewhere in the file and two alike mutants of one line
stay apart:

    common/src/fitness.rs: replace < with <= in eval_chunk @ Some(stage) if first + 1 < base.nodes.len() => { @ column 46 # reason

EQUIVALENT_TXT holds one such line per equivalent mutant, with " # " and the reason after the
source line; blank lines and lines starting with # are ignored. A mutant whose tests time
out made them hang: it is detected, and counted apart. Exit 1 when a missed mutant is not
listed, or a listed one has no reason.
"""
import json
import re
import sys
from datetime import datetime
from pathlib import Path

NAME = re.compile(r"^([^:]+):\d+:(\d+): (.*)$")


def read(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [l for l in path.read_text().splitlines() if l.strip()]


def mutated_line(mo: Path, diff_path: str) -> str:
    """The first source line the mutant's diff removes, whitespace-trimmed."""
    for line in read(mo / diff_path):
        if line.startswith("-") and not line.startswith("---"):
            return line[1:].strip()
    return ""


def survivors(mo: Path) -> list[tuple[str, str]]:
    """(cargo-mutants name, stable key) of every missed mutant of a scope."""
    out = []
    outcomes = mo / "outcomes.json"
    if outcomes.is_file():
        for o in json.loads(outcomes.read_text())["outcomes"]:
            if o.get("summary") != "MissedMutant":
                continue
            name = o["scenario"]["Mutant"]["name"]
            m = NAME.match(name)
            if not m:
                raise SystemExit(f"{mo}: unexpected mutant name {name!r}")
            file, col, desc = m.groups()
            key = f"{file}: {desc} @ {mutated_line(mo, o['diff_path'])} @ column {col}"
            out.append((name, key))
    return out


def wall_seconds(mo: Path) -> float | None:
    """How long cargo-mutants ran on a scope, baseline and every mutant included."""
    outcomes = mo / "outcomes.json"
    if not outcomes.is_file():
        return None
    d = json.loads(outcomes.read_text())
    try:
        # Nanosecond stamps with a Z; fromisoformat wants at most microseconds.
        stamp = lambda t: datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", t).replace("Z", "+00:00"))
        return round((stamp(d["end_time"]) - stamp(d["start_time"])).total_seconds(), 1)
    except (KeyError, ValueError):
        return None


def main() -> int:
    out_dir, equivalent_path = Path(sys.argv[1]), Path(sys.argv[2])
    equivalent: dict[str, str] = {}
    bad = []
    for n, line in enumerate(read(equivalent_path), 1):
        if line.startswith("#"):
            continue
        at = line.find(" @ column ")
        cut = line.find(" # ", at if at >= 0 else 0)
        if at < 0 or cut < 0 or not line[cut + 3 :].strip():
            bad.append(f"{equivalent_path}:{n}: not 'FILE: DESCRIPTION @ SOURCE LINE @ column N # reason'")
            continue
        equivalent[line[:cut].strip()] = line[cut + 3 :].strip()

    summary = {}
    unlisted = []
    for scope in sorted(p for p in out_dir.iterdir() if (p / "mutants.out").is_dir()):
        mo = scope / "mutants.out"
        counts = {k: len(read(mo / f"{k}.txt")) for k in ("caught", "missed", "timeout", "unviable")}
        missed = survivors(mo)
        counts["equivalent"] = sum(key in equivalent for _, key in missed)
        viable = counts["caught"] + counts["missed"] + counts["timeout"]
        detected = counts["caught"] + counts["timeout"]
        counts["detected_percent"] = round(100.0 * detected / viable, 1) if viable else 100.0
        non_equivalent = viable - counts["equivalent"]
        counts["detected_percent_of_non_equivalent"] = (
            round(100.0 * detected / non_equivalent, 1) if non_equivalent else 100.0
        )
        counts["wall_seconds"] = wall_seconds(mo)
        summary[scope.name] = counts
        unlisted += [key for _, key in missed if key not in equivalent]

    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'scope':<12} {'caught':>7} {'timeout':>8} {'missed':>7} {'equiv':>6} {'unviable':>9} {'detected':>9} {'wall':>8}")
    for scope, c in summary.items():
        wall = f"{c['wall_seconds'] / 60:.1f} min" if c["wall_seconds"] is not None else "?"
        print(
            f"{scope:<12} {c['caught']:>7} {c['timeout']:>8} {c['missed']:>7} {c['equivalent']:>6} "
            f"{c['unviable']:>9} {c['detected_percent']:>8}% {wall:>8}"
        )
    for line in bad:
        print(line)
    if unlisted:
        print(f"\n{len(unlisted)} surviving mutant(s) not listed in {equivalent_path}:")
        for key in unlisted:
            print(f"  {key}")
        print("Kill each with a test that fails on it, or list it there with the reason it is equivalent.")
    return 1 if unlisted or bad else 0


if __name__ == "__main__":
    sys.exit(main())
