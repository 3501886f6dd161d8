#!/usr/bin/env bash
# Checks deploy/k8s without a cluster:
#   1. schema validation of every manifest (kubernetes-validate, strict: unknown fields are
#      errors) for the oldest and the newest Kubernetes version we claim, plus a negative
#      control proving the validator rejects a broken manifest;
#   2. the wiring schema validation cannot see (deploy/k8s_wiring.py): Service <-> pods,
#      workers -> Service DNS name, Indexed Job index -> shard, Secret/ConfigMap/claim
#      names, run config in step with the quickstart, arguments accepted by the real
#      binaries; with a self-test that breaks the manifests and requires each break caught.
#
#   deploy/test-k8s.sh
set -euo pipefail

start=$SECONDS
step() { printf '[test-k8s %4ds] %s\n' "$((SECONDS - start))" "$*"; }
fail() { printf '[test-k8s %4ds] FAIL: %s\n' "$((SECONDS - start))" "$*" >&2; exit 1; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
K8S_VERSIONS=(1.34.0 1.37.0)

step "installing kubernetes-validate and PyYAML from PyPI"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    'kubernetes-validate==1.37.0' 'PyYAML>=6' || fail "pip install kubernetes-validate failed"

mapfile -t manifests < <(python3 -c '
import yaml
k = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))
print("\n".join("deploy/k8s/" + r for r in k["resources"]))')
manifests+=(deploy/k8s/extras/*.yaml)
for v in "${K8S_VERSIONS[@]}"; do
    step "schema validation against Kubernetes $v: ${manifests[*]#deploy/k8s/}"
    kubernetes-validate --strict --quiet -k "$v" "${manifests[@]}" ||
        fail "manifests are not valid Kubernetes $v"
done

step "negative control: a misspelt field must be rejected"
broken="$(mktemp --suffix=.yaml)"
trap 'rm -f "$broken"' EXIT
sed 's/^  parallelism:/  paralelism:/' deploy/k8s/workers.yaml >"$broken"
grep -q paralelism "$broken" || fail "the negative control did not change anything"
if kubernetes-validate --strict --quiet -k "${K8S_VERSIONS[-1]}" "$broken" >/dev/null 2>&1; then
    fail "kubernetes-validate accepted a Job with 'paralelism': it is not really validating"
fi

# The binaries whose command lines the manifests' arguments must satisfy (a no-op build
# when test-compose.sh or cargo test built them already).
step "cargo build --release --bin coordinator --bin worker"
nice -n 19 cargo build --release --bin coordinator --bin worker
bin_dir="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release"
step "wiring checks (binaries from $bin_dir)"
python3 deploy/k8s_wiring.py --self-test --bin-dir "$bin_dir"
step "PASS"
