#!/usr/bin/env python3
"""Applies, one at a time, the mutations that would quietly ruin the search, and checks that
the test suite fails on each. Every file is restored afterwards, also on Ctrl-C.

usage: python3 scripts/named_mutants.py [--markdown]
       python3 scripts/named_mutants.py --check   # only that every mutation still applies (CI)

These are the mutations a reviewer names (issue "Tests that the search searches"); cargo-mutants
(scripts/mutants.sh) covers the mechanical ones. Each entry: what it breaks, the file, the exact
text replaced, the replacement, and the tests that must catch it.
"""
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEARCH_TESTS = ["cargo", "test", "--release", "--no-fail-fast", "-p", "ccq-search", "--lib", "--tests"]
CLUSTER_TESTS = ["cargo", "test", "--release", "--no-fail-fast", "-p", "ccq-tests", "--test", "cluster"]
COMMON_TESTS = ["cargo", "test", "--release", "--no-fail-fast", "-p", "ccq-common", "--lib"]

MUTATIONS = [
    (
        "the distribution learns from the worst top_k candidates",
        "search/src/trainer.rs",
        "let selected: Vec<&Vec<i8>> = order[..k]",
        "let selected: Vec<&Vec<i8>> = order[n - k..]",
        SEARCH_TESTS,
    ),
    (
        "never adopting",
        "search/src/trainer.rs",
        "let wins = best != 0 && key(best) < key(0) && self.credible(&stats[best], &stats[0]);",
        "let wins = false;",
        SEARCH_TESTS,
    ),
    (
        "adopting the best non-context candidate even when it is worse than the context",
        "search/src/trainer.rs",
        "let best = order[0];\n        let wins = best != 0 && key(best) < key(0) && self.credible(&stats[best], &stats[0]);",
        "let best = order.iter().copied().find(|&i| i != 0).unwrap_or(0);\n"
        "        let wins = best != 0;",
        SEARCH_TESTS,
    ),
    (
        "not pinning newly frozen variables at their mode",
        "search/src/trainer.rs",
        "if self.codes[v as usize] != mode {",
        "if false && self.codes[v as usize] != mode {",
        SEARCH_TESTS,
    ),
    (
        "summing a batch's losses in f32 (rounding depends on how the batch is split)",
        "common/src/qnet.rs",
        "            s.loss_fixed += loss;",
        "            s.loss_fixed = (s.loss_fixed as f32 + loss as f32) as u64;",
        CLUSTER_TESTS,
    ),
    (
        "adding the shards' partial sums in f32 (rounding depends on arrival order)",
        "common/src/qnet.rs",
        "            loss_fixed: self.loss_fixed.checked_add(other.loss_fixed)?,",
        "            loss_fixed: (self.loss_fixed as f32 + other.loss_fixed as f32) as u64,",
        COMMON_TESTS,
    ),
    (
        "dropping one shard's results",
        "coordinator/src/state/jobs.rs",
        "            *sum = sum.checked_add(r).expect(\"checked above\");",
        "            if j.shard != 1 {\n                *sum = sum.checked_add(r).expect(\"checked above\");\n            }",
        CLUSTER_TESTS,
    ),
]


def check() -> int:
    """Every text to mutate is in its file exactly once (CI runs this: a refactor that
    moves the code must move the mutation with it)."""
    bad = [f"{path}: the text to mutate for '{what}' is not there exactly once"
           for what, path, old, _, _ in MUTATIONS if (ROOT / path).read_text().count(old) != 1]
    for b in bad:
        print(b, file=sys.stderr)
    return 2 if bad else 0


def main() -> int:
    if "--check" in sys.argv:
        return check()
    # A SIGTERM must restore the mutated file too: turn it into an exception.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rows = []
    failed_to_catch = 0
    for what, path, old, new, tests in MUTATIONS:
        file = ROOT / path
        original = file.read_text()
        if original.count(old) != 1:
            print(f"{path}: the text to mutate for '{what}' is not there exactly once", file=sys.stderr)
            return 2
        try:
            file.write_text(original.replace(old, new))
            start = time.time()
            r = subprocess.run(tests, cwd=ROOT, capture_output=True, text=True)
            secs = time.time() - start
        finally:
            file.write_text(original)
        out = r.stdout + r.stderr
        failing = sorted({l.split()[1] for l in out.splitlines() if l.startswith("test ") and l.endswith("FAILED")})
        compiled = "could not compile" not in out
        caught = r.returncode != 0 and compiled and bool(failing)
        failed_to_catch += not caught
        status = "caught" if caught else ("DID NOT COMPILE" if not compiled else "MISSED")
        print(f"{status:8} {what} ({path}; {' '.join(tests[3:])}; {secs:.0f} s)")
        for t in failing:
            print(f"         fails: {t}")
        rows.append((what, path, status, failing))
    if "--markdown" in sys.argv:
        print("\n| mutation | file | result | failing tests |\n|---|---|---|---|")
        for what, path, status, failing in rows:
            print(f"| {what} | `{path}` | {status} | {', '.join(f'`{t}`' for t in failing)} |")
    return 1 if failed_to_catch else 0


if __name__ == "__main__":
    sys.exit(main())
