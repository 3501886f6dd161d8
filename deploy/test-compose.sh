#!/usr/bin/env bash
# The container test: the docker-compose cluster really trains, survives losing a worker
# and reports from the host. CI runs it (a Docker engine and docker-compose, no images, no
# registry). Steps:
#   1. build the base image offline and the ccq image (deploy/build-image.sh);
#   2. bring up deploy/docker-compose.yml: coordinator + 3 workers on the MNIST quickstart;
#   3. `coordinator status --addr` from the host until all 3 workers are in and searching;
#   4. SIGKILL one worker mid-run: the coordinator must drop it; start it again: it must
#      register again and the search must go on;
#   5. `docker stop` another (SIGTERM): it must exit by itself within seconds; once the
#      coordinator has dropped it, start it again: it must take back its shard;
#   6. the run finishes: coordinator and workers exit 0, and the output volume holds
#      report.json with the final accuracy and model.ccq, whose accuracy `coordinator eval`
#      on the host reproduces;
#   7. everything is torn down (also on failure, after printing the containers' logs).
# Fails loudly, never skips, when Docker is missing.
#
#   deploy/test-compose.sh
# Settings: CCQ_TEST_TIMEOUT (seconds for the whole run to finish, default 1800).
set -euo pipefail

start=$SECONDS
step() { printf '[test-compose %4ds] %s\n' "$((SECONDS - start))" "$*"; }
fail() {
    printf '[test-compose %4ds] FAIL: %s\n' "$((SECONDS - start))" "$*" >&2
    exit 1
}

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

command -v docker >/dev/null || fail "docker is not installed: this test needs a Docker engine"
docker info >/dev/null 2>&1 || fail "the Docker engine is not reachable (is dockerd running?)"
if command -v docker-compose >/dev/null; then
    compose_cmd=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
else
    fail "neither docker-compose nor 'docker compose' is installed"
fi
command -v python3 >/dev/null || fail "python3 is needed to read JSON"
if ! command -v debootstrap >/dev/null; then
    # A fresh machine (CI) has Debian's package mirror but not the tool.
    [[ $(id -u) == 0 ]] || fail "debootstrap is missing and installing it needs root"
    step "installing debootstrap (apt-get)"
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null ||
        fail "could not install debootstrap"
fi

export CCQ_IMAGE="${CCQ_IMAGE:-ccq:latest}"
project="ccqtest$$"
run_timeout="${CCQ_TEST_TIMEOUT:-1800}"
# A free host port for the published status port, so parallel runs never clash.
CCQ_STATUS_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export CCQ_STATUS_PORT CCQ_STATUS_BIND=127.0.0.1
# A fresh cluster token for this test's cluster.
CCQ_TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
export CCQ_TOKEN
addr="127.0.0.1:$CCQ_STATUS_PORT"
compose() { "${compose_cmd[@]}" -f deploy/docker-compose.yml -p "$project" "$@"; }

teardown() {
    local rc=$?
    if [[ $rc != 0 ]]; then
        step "failed; the containers' last log lines:"
        compose logs --no-color --tail=40 2>&1 | sed 's/^/    /' || true
    fi
    step "tearing down project $project"
    compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

step "docker: $(docker version --format 'client {{.Client.Version}}, engine {{.Server.Version}}'); compose: ${compose_cmd[*]}"
step "building the base image offline and $CCQ_IMAGE (deploy/build-image.sh)"
t=$SECONDS
deploy/build-image.sh
step "images built in $((SECONDS - t)) s"
status_bin="$repo/deploy/dist/coordinator" # the very binary inside the image

# `coordinator status --json` (one JSON line), or nothing when the coordinator does not
# answer (exit code 2).
status_json() { "$status_bin" status --addr "$addr" --json 2>/dev/null || true; }
# Evaluates a Python expression over the status `s`; prints its value.
status_eval() {
    local json
    json="$(status_json)"
    [[ -n "$json" ]] || { echo "unreachable"; return; }
    python3 -c 'import json, sys; s = json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$json" "$1"
}
# Polls until the Python expression over the status is True, or fails after $2 seconds.
wait_status() {
    local expr="$1" limit="$2" what="$3" deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        [[ "$(status_eval "$expr")" == "True" ]] && return 0
        sleep 1
    done
    fail "timed out after ${limit}s waiting for: $what (last status: $(status_json))"
}
summary() {
    status_eval '"phase %s, %d evaluations, workers %s" % (s["phase"], s["evaluations"], ", ".join("%s@%s" % (w["name"][:12], w["shard"]) for w in s["workers"]))'
}
container_state() { docker inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$1"; }
wait_exited() {
    local id="$1" limit="$2" deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        [[ "$(container_state "$id")" == exited* ]] && return 0
        sleep 1
    done
    fail "container ${id:0:12} still running after ${limit}s"
}

step "starting coordinator + 3 workers (project $project, status on $addr)"
compose up -d --scale worker=3
mapfile -t workers < <(compose ps -q worker)
coordinator="$(compose ps -q coordinator)"
((${#workers[@]} == 3)) || fail "expected 3 worker containers, found ${#workers[@]}"
step "worker containers: $(for w in "${workers[@]}"; do printf '%s ' "${w:0:12}"; done)"

step "waiting for the coordinator to serve and all 3 workers to register (coordinator status --addr $addr)"
wait_status 's["phase"] == "training" and len(s["workers"]) == 3 and s["evaluations"] > 0' 600 \
    "3 workers registered and the search running"
step "status: $(summary)"
shards="$(status_eval 'sorted(w["shard"] for w in s["workers"])')"
[[ "$shards" == "[0, 1, 2]" ]] || fail "the 3 workers should hold shards 0, 1, 2; they hold $shards"
step "each worker picked its own shard: $shards"
"$status_bin" status --addr "$addr" | sed 's/^/    /'

victim="${workers[1]}"
step "killing worker ${victim:0:12} (SIGKILL) mid-run"
docker kill "$victim" >/dev/null
wait_status 'len(s["workers"]) == 2' 60 "the coordinator to drop the killed worker"
step "coordinator dropped it: $(summary)"
evals_before="$(status_eval 's["evaluations"]')"
step "starting worker ${victim:0:12} again"
docker start "$victim" >/dev/null
wait_status "len(s['workers']) == 3 and sorted(w['shard'] for w in s['workers']) == [0, 1, 2] and s['evaluations'] > $evals_before" 120 \
    "the restarted worker to register again on the shard it left, and the search to go on"
step "restarted worker is back: $(summary)"

graceful="${workers[2]}"
step "stopping worker ${graceful:0:12} with docker stop (SIGTERM, 10 s grace)"
t=$SECONDS
docker stop --time 10 "$graceful" >/dev/null
state="$(container_state "$graceful")"
# 137 would mean docker had to SIGKILL it after the grace period. (0 today; 143 would be
# as graceful, should the worker come to report a stop before the run's end as failure.)
[[ "$state" == "exited 0" || "$state" == "exited 143" ]] ||
    fail "a worker stopped by SIGTERM should exit by itself (0 or 143), got '$state'"
(( SECONDS - t < 10 )) || fail "the worker took $((SECONDS - t)) s to stop: it did not handle SIGTERM"
step "it exited by itself ($state) after $((SECONDS - t)) s"
# The coordinator has no "leaving" message yet: it forgets a stopped worker after three
# missed heartbeats. Restarting before that would let the new registration pick another
# shard while the old one still counts as live, leaving this shard without a worker
# (see deploy/README.md, "Known limitations").
wait_status 'len(s["workers"]) == 2' 60 "the coordinator to drop the stopped worker"
step "coordinator dropped it; starting it again"
docker start "$graceful" >/dev/null
wait_status 'len(s["workers"]) == 3 and sorted(w["shard"] for w in s["workers"]) == [0, 1, 2]' 120 \
    "the stopped worker to register again, on the shard it left"
step "status: $(summary)"

step "waiting for the run to finish (up to ${run_timeout}s)"
deadline=$((SECONDS + run_timeout))
last_report=$SECONDS
while [[ "$(container_state "$coordinator")" != exited* ]]; do
    ((SECONDS < deadline)) || fail "the run did not finish within ${run_timeout}s"
    if ((SECONDS - last_report >= 30)); then
        step "status: $(summary)"
        last_report=$SECONDS
    fi
    sleep 2
done
state="$(container_state "$coordinator")"
[[ "$state" == "exited 0" ]] || fail "the coordinator ended with '$state'"
step "coordinator exited 0; its last lines:"
docker logs --tail 3 "$coordinator" 2>&1 | sed 's/^/    /'
for w in "${workers[@]}"; do
    wait_exited "$w" 60
    state="$(container_state "$w")"
    [[ "$state" == "exited 0" ]] || fail "worker ${w:0:12} ended with '$state'"
done
step "all 3 workers exited 0 (told the run is done)"

step "reading the outputs from volume ${project}_out"
outdir="$(mktemp -d)"
docker run --rm -v "${project}_out:/out:ro" "$CCQ_IMAGE" cat /out/mnist-quickstart/report.json \
    >"$outdir/report.json" || fail "no report.json in the output volume"
docker run --rm -v "${project}_out:/out:ro" "$CCQ_IMAGE" cat /out/mnist-quickstart/model.ccq \
    >"$outdir/model.ccq" || fail "no model.ccq in the output volume"
python3 - "$outdir/report.json" <<'PY' || fail "report.json does not describe a finished run"
import json, sys
r = json.load(open(sys.argv[1]))
a = r["accuracy"]
print(f"    report: {r['precision']} float {a['float']:.2f} %  ptq {a['ptq']:.2f} %  "
      f"final {a['final']:.2f} %  ({r['evaluations']} evaluations, stop: {r['stop_reason']}, "
      f"workers seen {r['workers_seen']})")
checks = {
    # Finished by itself, not interrupted: the quickstart's search can also end before its
    # budget, when every variable has frozen (it does since confidence ties are random).
    "the search finished by itself (budget spent or every variable frozen)":
        r["stop_reason"].startswith("evaluation budget") or r["stop_reason"] == "every variable is frozen",
    "final accuracy beats chance (10 classes)": 10.0 < a["final"] <= 100.0,
    # 3 workers, plus a new registration for each restarted container.
    "the restarted workers registered again": r["workers_seen"] >= 5,
    "3 shards": r["config"]["cluster"]["shards"] == 3,
}
bad = [k for k, ok in checks.items() if not ok]
for k in checks:
    print(f"    {'ok  ' if k not in bad else 'FAIL'} {k}")
sys.exit(1 if bad else 0)
PY
step "re-evaluating the model from the volume on the host (coordinator eval)"
final="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accuracy"]["final"])' "$outdir/report.json")"
eval_json="$("$status_bin" eval --model "$outdir/model.ccq" --data mnist:examples/data/mnist-10k \
    --split test --json 2>/dev/null)" || fail "coordinator eval could not read model.ccq"
python3 - "$eval_json" "$final" <<'PY' || fail "model.ccq does not reproduce report.json's final accuracy"
import json, sys
e, final = json.loads(sys.argv[1]), float(sys.argv[2])
print(f"    eval: {e['precision']} top-1 {e['top1']:.2f} % on {e['images']} test images; report says {final:.2f} %")
sys.exit(0 if abs(e["top1"] - final) < 1e-6 else 1)
PY
rm -rf "$outdir"
step "PASS: compose cluster trained MNIST with 3 workers, lost and regained workers, final accuracy $final %"
echo "test-compose: 1 passed, 0 failed"
