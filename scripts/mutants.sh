#!/usr/bin/env bash
# Mutation testing of the code that decides what the search learns: the search crate
# (EDA, grouping, strategies, trainer), the fitness sums, requantization and the
# checkpoint restore checks. Uses cargo-mutants at a pinned version (installed here).
#
#   scripts/mutants.sh full          every mutant in scope; writes target/mutants/summary.json
#                                    (copy it to docs/mutants/summary.json to record the run)
#   scripts/mutants.sh diff [BASE]   only mutants in lines changed since BASE (default: the
#                                    commit that last recorded docs/mutants/summary.json);
#                                    at most $CCQ_MUTANTS_MAX (default 60) of them — past
#                                    that it stops and asks for a full run. What CI runs.
#
# A mutant that survives (no test fails) must either be killed by a better test or be
# listed, with a one-line reason, in docs/mutants/equivalent.txt. The run fails when a
# survivor is not listed. See docs/MUTANTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=27.1.0
if [[ "$(cargo mutants --version 2>/dev/null || true)" != "cargo-mutants $VERSION" ]]; then
  echo "mutants: installing cargo-mutants $VERSION"
  cargo install --locked --quiet cargo-mutants --version "$VERSION"
fi

mode=${1:-full}
# The mutation profile (Cargo.toml) builds the mutated crates for fast incremental rebuilds.
# A mutant's tests take ~1-3 s: one that runs 10 s (3x the unmutated run, at least 10 s) is
# stuck in a loop, not slow, and waiting the default 20 s for each of those costs minutes.
common_args=(--no-shuffle --profile mutation --timeout-multiplier 3 --minimum-test-timeout 10)
out=target/mutants
guarded=(search/src common/src coordinator/src)
case $mode in
  full)
    # Mutants are built in this tree, whose target/ is warm, rather than in a cold copy
    # (three cold builds cost ~20 min on 2 cores). cargo-mutants restores every file it
    # mutates; the guarded code must be committed so that an interrupted run is undone by
    # the trap below and a recorded run names the commit it measured.
    if ! git diff --quiet HEAD -- "${guarded[@]}"; then
      echo "mutants: commit the changes under ${guarded[*]} first (a full run mutates the tree in place)" >&2
      exit 2
    fi
    trap 'git checkout --quiet HEAD -- "${guarded[@]}"' EXIT
    common_args+=(--in-place)
    ;;
  diff)
    base=${2:-$(git log -1 --format=%H -- docs/mutants/summary.json)}
    if [[ -z $base ]]; then
      echo "mutants: no recorded full run (docs/mutants/summary.json); run 'scripts/mutants.sh full'" >&2
      exit 2
    fi
    mkdir -p "$out"
    git diff "$base" -- "${guarded[@]}" > "$out/change.diff"
    if [[ ! -s $out/change.diff ]]; then
      echo "mutants: no change to the guarded code since $(git log -1 --format='%h %s' "$base")"
      exit 0
    fi
    common_args+=(--in-diff "$out/change.diff")
    # A fresh CI clone is mutated in place (no copy of the tree; every file is restored);
    # locally, leave the working tree alone. The first scope with mutants pays one cold
    # build of the mutation profile (several minutes on 2 cores).
    [[ ${CI:-} == true ]] && common_args+=(--in-place)
    ;;
  *)
    echo "usage: scripts/mutants.sh full | diff [BASE]" >&2
    exit 2
    ;;
esac

# One scope per package, so that each mutant runs only the tests that can see it: the
# search crate's unit and behaviour tests; the library unit tests of common (fitness sums,
# requantization, block-local targets and losses) and of the coordinator (checkpoint
# restore checks). fitness.rs's
# delta_pays_off is a cost model that only picks the faster of bit-identical paths, so its
# mutants change speed, never results: left out. Doc tests and the
# slow process tests are left out on purpose: they take minutes and guard other things.
# The targets are --cargo-arg, not --cargo-test-arg: cargo-mutants builds each mutant with
# its own `cargo test --no-run` before testing it, and only --cargo-arg reaches that build;
# without it every mutant also built the crate's integration tests, binaries and
# non-test library (twice the build time for common, four times for the coordinator).
scopes=(
  "search|-p ccq-search --cargo-arg=--lib --cargo-arg=--tests"
  "common|-p ccq-common -f common/src/fitness.rs -f common/src/qnet.rs -f common/src/kernels/mod.rs -f common/src/blocks.rs --re fitness\.rs|EvalStats::|image_loss|paired_term|cross_entropy|distillation|log_softmax|argmax|block_loss|Targets<|QNetwork::stats|QNetwork::image_results|QNetwork::block_end|QNetwork::check_block|blocks\.rs|Requant:: -E delta_pays_off|slice_value|pad_value --cargo-arg=--lib"
  "coordinator|-p ccq-coordinator -f coordinator/src/checkpoint.rs --cargo-arg=--lib"
)

split_args() { # "a b --re x|y c" -> array, keeping the regex whole
  local IFS=' '
  read -r -a args <<< "$1"
}

declare -A count
if [[ $mode == diff ]]; then
  total=0
  for scope in "${scopes[@]}"; do
    split_args "${scope#*|}"
    # A failed listing must stop the run, not count as "no mutants here" and skip the scope.
    list=$(cargo mutants --list "${common_args[@]}" "${args[@]}")
    n=$(grep -c . <<< "$list" || true)
    echo "mutants: scope ${scope%%|*}: $n"
    count[${scope%%|*}]=$n
    total=$((total + n))
  done
  max=${CCQ_MUTANTS_MAX:-60}
  echo "mutants: $total mutants in the lines changed since ${base:0:12}"
  if (( total > max )); then
    echo "mutants: more than $max: too many for CI. Run 'scripts/mutants.sh full', kill or list" \
      "the survivors, and commit target/mutants/summary.json as docs/mutants/summary.json." >&2
    exit 1
  fi
fi

rm -rf "$out"/search "$out"/common "$out"/coordinator
for scope in "${scopes[@]}"; do
  name=${scope%%|*}
  split_args "${scope#*|}"
  if [[ ${count[$name]:-1} == 0 ]]; then
    continue
  fi
  mkdir -p "$out/$name"
  echo "mutants: scope $name"
  # cargo-mutants exits 2 when mutants survive and 3 on timeouts; the report below decides,
  # so that listed equivalents do not fail the run. 0 also covers "no mutants here".
  set +e
  cargo mutants "${common_args[@]}" --output "$out/$name" "${args[@]}"
  rc=$?
  set -e
  if (( rc != 0 && rc != 2 && rc != 3 )); then
    echo "mutants: scope $name: cargo-mutants failed (exit $rc)" >&2
    exit "$rc"
  fi
done

python3 scripts/mutants_report.py "$out" docs/mutants/equivalent.txt
