#!/usr/bin/env python3
"""Checks the wiring of deploy/k8s that schema validation cannot see.

Schema validation (kubernetes-validate) proves each object is well-formed; it cannot tell
that the Service selects the coordinator, that the workers dial that Service, that the
Indexed Job's index becomes the worker's shard out of as many shards as the run config
has, or that every Secret, ConfigMap and volume claim named exists. This script does.

    python3 deploy/k8s_wiring.py [--bin-dir DIR] [--self-test]

--bin-dir: a directory holding the `coordinator` and `worker` binaries; the arguments the
manifests pass are then parsed by the real command lines (with --help appended, so nothing
runs). --self-test: break the manifests in memory in known ways and require each break to
be caught, so the checks themselves are shown to fail when they should.
"""

from __future__ import annotations

import argparse
import copy
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
K8S = DEPLOY / "k8s"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# Fields in which a deployment's run config may differ from the quickstart it runs.
DEPLOYMENT_FIELDS = {("out",), ("model", "onnx"), ("data", "source"), ("cluster",)}


@dataclass
class Manifests:
    """Every object of the kustomization, by kind and name, plus what they refer to."""

    namespace: str
    resources: list[str]
    objects: dict[tuple[str, str], dict]
    dockerfile: str
    quickstart: dict
    compose_config: dict

    def get(self, kind: str, name: str) -> dict | None:
        return self.objects.get((kind, name))

    def of_kind(self, kind: str) -> list[dict]:
        return [o for (k, _), o in self.objects.items() if k == kind]


def load() -> Manifests:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = {}
    for res in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / res).read_text()):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return Manifests(
        namespace=kustomization.get("namespace", ""),
        resources=kustomization["resources"],
        objects=objects,
        dockerfile=(DEPLOY / "Dockerfile").read_text(),
        quickstart=tomllib.loads((REPO / "examples/mnist-quickstart.toml").read_text()),
        compose_config=tomllib.loads((DEPLOY / "config/mnist-quickstart.toml").read_text()),
    )


@dataclass
class Report:
    """Failures of one check; a check passes when it adds none."""

    failures: list[str] = field(default_factory=list)

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return ok


# ---------------------------------------------------------------- helpers over objects


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"].get("labels", {})


def container(obj: dict, name: str) -> dict:
    for c in pod_spec(obj)["containers"]:
        if c["name"] == name:
            return c
    raise KeyError(f"{obj['kind']}/{obj['metadata']['name']} has no container {name}")


def coordinator(m: Manifests) -> dict:
    return container(m.get("Job", "ccq-coordinator"), "coordinator")


def worker(m: Manifests) -> dict:
    return container(m.get("Job", "ccq-workers"), "worker")


def flag(c: dict, name: str) -> str | None:
    """The value of `--name=VALUE` or `--name VALUE` among a container's args."""
    args = c.get("args", [])
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def env(c: dict, name: str) -> dict | None:
    return next((e for e in c.get("env", []) if e["name"] == name), None)


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def run_config(m: Manifests, r: Report) -> dict | None:
    """The TOML the coordinator reads: the ConfigMap key its --config path lands on."""
    c = coordinator(m)
    path = flag(c, "config")
    if not r.expect(path is not None, "the coordinator has no --config argument"):
        return None
    mount = next(
        (v for v in c.get("volumeMounts", []) if path.startswith(v["mountPath"].rstrip("/") + "/")),
        None,
    )
    if not r.expect(mount is not None, f"--config {path} is under no volume mount of the coordinator"):
        return None
    volume = next(v for v in pod_spec(m.get("Job", "ccq-coordinator"))["volumes"] if v["name"] == mount["name"])
    cm_name = volume.get("configMap", {}).get("name")
    cm = m.get("ConfigMap", cm_name) if cm_name else None
    if not r.expect(cm is not None, f"--config {path} is not on a ConfigMap volume naming an existing ConfigMap"):
        return None
    key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    if not r.expect(key in cm.get("data", {}), f"ConfigMap {cm_name} has no key '{key}' for --config {path}"):
        return None
    try:
        return tomllib.loads(cm["data"][key])
    except tomllib.TOMLDecodeError as e:
        r.expect(False, f"ConfigMap {cm_name} key {key} is not valid TOML: {e}")
        return None


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


# ---------------------------------------------------------------- the checks


def check_resources_listed(m: Manifests, r: Report) -> None:
    """Every manifest in deploy/k8s is applied by the kustomization, and all share its namespace."""
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    r.expect(on_disk == set(m.resources), f"kustomization resources {sorted(m.resources)} != files {sorted(on_disk)}")
    r.expect(m.get("Namespace", m.namespace) is not None, f"no Namespace object for '{m.namespace}'")
    for (kind, name), o in m.objects.items():
        if kind != "Namespace":
            r.expect(o["metadata"].get("namespace") == m.namespace, f"{kind}/{name} is not in namespace {m.namespace}")


def check_service_selects_coordinator(m: Manifests, r: Report) -> None:
    """The Service selects the coordinator's pods and nothing else, on the port it listens on."""
    svc = m.get("Service", "ccq-coordinator")
    if not r.expect(svc is not None, "no Service ccq-coordinator"):
        return
    sel = svc["spec"].get("selector", {})
    r.expect(selects(sel, pod_labels(m.get("Job", "ccq-coordinator"))), f"Service selector {sel} misses the coordinator pods")
    for kind in ("Job", "Pod"):
        for o in m.of_kind(kind):
            if o["metadata"]["name"] == "ccq-coordinator":
                continue
            labels = pod_labels(o) if kind == "Job" else o["metadata"].get("labels", {})
            r.expect(not selects(sel, labels), f"Service selector {sel} also selects {kind}/{o['metadata']['name']}")
    c = coordinator(m)
    listen = flag(c, "listen")
    if not r.expect(listen is not None, "the coordinator has no --listen argument"):
        return
    r.expect(listen.startswith("0.0.0.0:") or listen.startswith("[::]:"), f"--listen {listen} is not reachable from other pods")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for p in svc["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        number = ports.get(target) if isinstance(target, str) else target
        r.expect(number == port_of(listen), f"Service port {p['port']} targets {target} (= {number}), the coordinator listens on {port_of(listen)}")
    cfg = run_config(m, r)
    if cfg is not None and "listen" in cfg.get("cluster", {}):
        r.expect(port_of(cfg["cluster"]["listen"]) == port_of(listen), "cluster.listen and --listen disagree on the port")


def check_workers_dial_service(m: Manifests, r: Report) -> None:
    """The workers' --coordinator is the Service's DNS name and port."""
    svc = m.get("Service", "ccq-coordinator")
    url = flag(worker(m), "coordinator") or (env(worker(m), "CCQ_COORDINATOR") or {}).get("value")
    if not r.expect(url is not None, "workers get no --coordinator / CCQ_COORDINATOR"):
        return
    u = urlparse(url)
    name, ns = svc["metadata"]["name"], m.namespace
    names = {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}
    r.expect(u.scheme == "http", f"worker --coordinator {url}: the coordinator serves plain HTTP/2 (http://)")
    r.expect(u.hostname in names, f"worker --coordinator {url}: host is not the Service's DNS name ({name})")
    r.expect(u.port in {p["port"] for p in svc["spec"]["ports"]}, f"worker --coordinator {url}: port is not a Service port")


def check_index_is_shard(m: Manifests, r: Report) -> None:
    """Indexed Job: pod k gets JOB_COMPLETION_INDEX=k and shard k mod CCQ_SHARDS (= shards);
    completions is a multiple of CCQ_SHARDS, so every shard has the same number of workers."""
    job = m.get("Job", "ccq-workers")
    spec = job["spec"]
    r.expect(spec.get("completionMode") == "Indexed", "the worker Job is not completionMode: Indexed")
    r.expect(spec.get("parallelism") == spec.get("completions"), f"parallelism {spec.get('parallelism')} != completions {spec.get('completions')}: some shards would wait for others to finish")
    w = worker(m)
    r.expect(flag(w, "shard") is None, "an explicit --shard overrides the completion index")
    idx = env(w, "JOB_COMPLETION_INDEX")
    if idx is not None:
        path = idx.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
        r.expect(
            path in (f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']", f"metadata.labels['{COMPLETION_INDEX_ANNOTATION}']"),
            f"JOB_COMPLETION_INDEX comes from '{path}', not the completion index",
        )
    shards_env = env(w, "CCQ_SHARDS")
    if not r.expect(shards_env is not None and "value" in shards_env, "workers have no literal CCQ_SHARDS"):
        return
    shards = int(shards_env["value"])
    completions = spec.get("completions")
    r.expect(
        isinstance(completions, int) and shards >= 1 and completions >= shards and completions % shards == 0,
        f"completions {completions} is not a multiple of CCQ_SHARDS {shards}: some shards would get more workers than others, or none",
    )
    cfg = run_config(m, r)
    if cfg is not None:
        r.expect(cfg.get("cluster", {}).get("shards") == shards, f"run config cluster.shards {cfg.get('cluster', {}).get('shards')} != CCQ_SHARDS {shards}: the coordinator refuses the workers' shards")


def check_references_exist(m: Manifests, r: Report) -> None:
    """Every Secret key, ConfigMap and claim named exists; the token reaches both sides."""
    for name in ("ccq-coordinator", "ccq-workers"):
        job = m.get("Job", name)
        for c in pod_spec(job)["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    s = m.get("Secret", ref["name"])
                    keys = set((s or {}).get("data", {})) | set((s or {}).get("stringData", {}))
                    r.expect(ref["key"] in keys, f"{name}: env {e['name']} wants Secret {ref['name']} key {ref['key']}, which does not exist")
            r.expect(
                (env(c, "CCQ_TOKEN") or {}).get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "ccq-cluster-token",
                f"{name}/{c['name']}: CCQ_TOKEN does not come from Secret ccq-cluster-token",
            )
        for v in pod_spec(job).get("volumes", []):
            if "configMap" in v:
                r.expect(m.get("ConfigMap", v["configMap"]["name"]) is not None, f"{name}: volume {v['name']} names missing ConfigMap {v['configMap']['name']}")
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                r.expect(m.get("PersistentVolumeClaim", claim) is not None, f"{name}: volume {v['name']} names missing claim {claim}")
    run_config(m, r)


def mount_of(obj: dict, c: dict, path: str) -> tuple[dict, dict] | None:
    """The (volumeMount, volume) of container `c` that holds `path`, deepest first."""
    best = None
    for vm in c.get("volumeMounts", []):
        root = vm["mountPath"].rstrip("/") + "/"
        if (path + "/").startswith(root) and (best is None or len(root) > len(best["mountPath"])):
            best = vm
    if best is None:
        return None
    return best, next(v for v in pod_spec(obj)["volumes"] if v["name"] == best["name"])


def check_data_reaches_pods(m: Manifests, r: Report) -> None:
    """The data path the coordinator tells workers exists in both, from the same claim; outputs are writable."""
    cfg = run_config(m, r)
    if cfg is None:
        return
    coord_job, work_job = m.get("Job", "ccq-coordinator"), m.get("Job", "ccq-workers")
    data_dir = cfg["data"]["source"].split(":", 1)[1]
    override = flag(worker(m), "data") or (env(worker(m), "CCQ_DATA") or {}).get("value")
    worker_dir = override.split(":", 1)[1] if override else data_dir
    claims = []
    for obj, c, path in ((coord_job, coordinator(m), data_dir), (work_job, worker(m), worker_dir)):
        found = mount_of(obj, c, path)
        if r.expect(found is not None, f"{obj['metadata']['name']}: data path {path} is on no volume"):
            vm, vol = found
            claims.append(vol.get("persistentVolumeClaim", {}).get("claimName"))
            r.expect(vm.get("readOnly") is True, f"{obj['metadata']['name']}: the training data should be mounted read-only")
    r.expect(len(set(claims)) == 1 and None not in claims, f"coordinator and workers read the data from different volumes: {claims}")
    model = mount_of(coord_job, coordinator(m), cfg["model"]["onnx"])
    r.expect(model is not None, f"the model {cfg['model']['onnx']} is on no volume of the coordinator")
    out = mount_of(coord_job, coordinator(m), cfg["out"])
    if r.expect(out is not None, f"out {cfg['out']} is on no volume of the coordinator"):
        vm, vol = out
        r.expect(not vm.get("readOnly", False), f"out {cfg['out']} is mounted read-only")
        r.expect("persistentVolumeClaim" in vol, f"out {cfg['out']} is not on a persistent volume")
    data_claim = m.get("PersistentVolumeClaim", claims[0]) if claims and claims[0] else None
    if data_claim is not None and work_job["spec"].get("parallelism", 1) > 1:
        modes = set(data_claim["spec"].get("accessModes", []))
        r.expect(bool(modes & {"ReadWriteMany", "ReadOnlyMany"}), f"claim {claims[0]} must be mountable on many nodes, has {sorted(modes)}")


def check_same_run_as_quickstart(m: Manifests, r: Report) -> None:
    """The ConfigMap's and the compose config run the quickstart: only paths and [cluster] differ."""

    def flatten(d: dict, prefix=()) -> dict:
        out = {}
        for k, v in d.items():
            key = prefix + (k,)
            if any(key[: len(f)] == f for f in DEPLOYMENT_FIELDS):
                continue
            if isinstance(v, dict):
                out.update(flatten(v, key))
            else:
                out[key] = v
        return out

    base = flatten(m.quickstart)
    cfg = run_config(m, r)
    for name, other in (("ConfigMap ccq-run-config", cfg), ("deploy/config/mnist-quickstart.toml", m.compose_config)):
        if other is None:
            continue
        diff = sorted(".".join(k) for k in set(base) | set(flatten(other)) if base.get(k) != flatten(other).get(k))
        r.expect(not diff, f"{name} differs from examples/mnist-quickstart.toml in {diff}")


def check_resources_and_user(m: Manifests, r: Report) -> None:
    """Threads match the cores asked for; requests fit the limits; pods run as the image's user."""

    def cores(q: str) -> float:
        return float(q[:-1]) / 1000 if q.endswith("m") else float(q)

    def mem(q: str) -> int:
        units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
        return int(float(q[:-2]) * units[q[-2:]]) if q[-2:] in units else int(q)

    user = re.search(r"^USER\s+(\d+):(\d+)", m.dockerfile, re.M)
    r.expect(user is not None, "deploy/Dockerfile has no numeric USER uid:gid")
    for obj in [o for o in m.of_kind("Job")] + m.of_kind("Pod"):
        spec = obj["spec"]["template"]["spec"] if obj["kind"] == "Job" else obj["spec"]
        sc = spec.get("securityContext", {})
        if user:
            r.expect(str(sc.get("runAsUser")) == user[1] and sc.get("runAsNonRoot") is True, f"{obj['metadata']['name']}: runAsUser {sc.get('runAsUser')} is not the image's user {user[1]}")
        for c in spec["containers"]:
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            ok = r.expect({"cpu", "memory"} <= set(req) and {"cpu", "memory"} <= set(lim), f"{obj['metadata']['name']}/{c['name']}: needs cpu and memory requests and limits")
            if ok:
                r.expect(cores(req["cpu"]) <= cores(lim["cpu"]) and mem(req["memory"]) <= mem(lim["memory"]), f"{obj['metadata']['name']}/{c['name']}: requests exceed limits")
    w = worker(m)
    threads = int(flag(w, "threads") or 1)
    cpu = cores(w["resources"]["requests"]["cpu"])
    r.expect(threads == cpu, f"workers run {threads} thread(s) but request {cpu} core(s)")
    for o in m.of_kind("PodDisruptionBudget"):
        sel = o["spec"]["selector"]["matchLabels"]
        r.expect(any(selects(sel, pod_labels(j)) for j in m.of_kind("Job")), f"PodDisruptionBudget {o['metadata']['name']} selects no pods")


def check_args_parse(m: Manifests, r: Report, bin_dir: Path) -> None:
    """The real binaries accept the arguments the manifests pass (parsed with --help appended)."""
    for obj in m.of_kind("Job"):
        for c in pod_spec(obj)["containers"]:
            exe = bin_dir / c["command"][0]
            if not r.expect(exe.exists(), f"{obj['metadata']['name']}: command {c['command'][0]} is not a ccq binary"):
                continue
            p = subprocess.run([str(exe), *c["command"][1:], *c.get("args", []), "--help"], capture_output=True, text=True)
            r.expect(p.returncode == 0, f"{obj['metadata']['name']}: `{c['command'][0]} {' '.join(c.get('args', []))}` is rejected: {p.stderr.strip()}")


CHECKS = [
    check_resources_listed,
    check_service_selects_coordinator,
    check_workers_dial_service,
    check_index_is_shard,
    check_references_exist,
    check_data_reaches_pods,
    check_same_run_as_quickstart,
    check_resources_and_user,
]


def run_checks(m: Manifests, bin_dir: Path | None, verbose: bool) -> dict[str, list[str]]:
    results = {}
    checks = [(c, lambda m, r, c=c: c(m, r)) for c in CHECKS]
    if bin_dir is not None:
        checks.append((check_args_parse, lambda m, r: check_args_parse(m, r, bin_dir)))
    for check, call in checks:
        r = Report()
        try:
            call(m, r)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            # A manifest missing what a check looks for is a wiring failure, not a crash.
            r.failures.append(f"malformed manifests: {type(e).__name__}: {e}")
        results[check.__name__] = r.failures
        if verbose:
            print(f"{'ok  ' if not r.failures else 'FAIL'} {check.__name__}: {(check.__doc__ or '').strip()}")
            for f in r.failures:
                print(f"       - {f}")
    return results


# ---------------------------------------------------------------- self-test

def _set_env(c: dict, name: str, value: str) -> None:
    env(c, name)["value"] = value


def _set_arg(c: dict, name: str, value: str) -> None:
    c["args"] = [f"--{name}={value}" if a.startswith(f"--{name}=") else a for a in c["args"]]


MUTATIONS = {
    # name: (what it breaks, the check that must catch it)
    "service selects workers": (
        lambda m: m.get("Service", "ccq-coordinator")["spec"]["selector"].update({"app.kubernetes.io/component": "worker"}),
        "check_service_selects_coordinator",
    ),
    "service targets the wrong port": (
        lambda m: m.get("Service", "ccq-coordinator")["spec"]["ports"][0].update({"targetPort": 8080}),
        "check_service_selects_coordinator",
    ),
    "workers dial another host": (
        lambda m: _set_arg(worker(m), "coordinator", "http://coordinator:50051"),
        "check_workers_dial_service",
    ),
    "workers dial another port": (
        lambda m: _set_arg(worker(m), "coordinator", "http://ccq-coordinator:50052"),
        "check_workers_dial_service",
    ),
    "completions not a multiple of CCQ_SHARDS": (lambda m: _set_env(worker(m), "CCQ_SHARDS", "3"), "check_index_is_shard"),
    "more shards than completions": (lambda m: _set_env(worker(m), "CCQ_SHARDS", "8"), "check_index_is_shard"),
    "parallelism != completions": (
        lambda m: m.get("Job", "ccq-workers")["spec"].update({"parallelism": 2}),
        "check_index_is_shard",
    ),
    "not an Indexed Job": (
        lambda m: m.get("Job", "ccq-workers")["spec"].update({"completionMode": "NonIndexed"}),
        "check_index_is_shard",
    ),
    "config shards != workers": (
        lambda m: m.get("ConfigMap", "ccq-run-config")["data"].update(
            {"run.toml": m.get("ConfigMap", "ccq-run-config")["data"]["run.toml"].replace("shards = 4", "shards = 5")}
        ),
        "check_index_is_shard",
    ),
    "Secret renamed": (
        lambda m: m.objects.update({("Secret", "other"): m.objects.pop(("Secret", "ccq-cluster-token"))}),
        "check_references_exist",
    ),
    "ConfigMap renamed": (
        lambda m: m.objects.update({("ConfigMap", "other"): m.objects.pop(("ConfigMap", "ccq-run-config"))}),
        "check_references_exist",
    ),
    "workers mount no data": (
        lambda m: worker(m).update({"volumeMounts": []}),
        "check_data_reaches_pods",
    ),
    "budget drifts from the quickstart": (
        lambda m: m.get("ConfigMap", "ccq-run-config")["data"].update(
            {"run.toml": m.get("ConfigMap", "ccq-run-config")["data"]["run.toml"].replace("\nevaluations = ", "\nevaluations = 1")}
        ),
        "check_same_run_as_quickstart",
    ),
    "threads != cores": (lambda m: _set_arg(worker(m), "threads", "4"), "check_resources_and_user"),
}


def self_test(m: Manifests, bin_dir: Path | None) -> list[str]:
    problems = []
    for name, (mutate, check) in MUTATIONS.items():
        broken = copy.deepcopy(m)
        mutate(broken)
        failures = run_checks(broken, bin_dir, verbose=False)
        caught = bool(failures[check])
        print(f"{'ok  ' if caught else 'FAIL'} self-test: '{name}' is caught by {check}")
        if not caught:
            problems.append(name)
    if bin_dir is not None:
        broken = copy.deepcopy(m)
        worker(broken)["args"].append("--no-such-flag")
        caught = bool(run_checks(broken, bin_dir, verbose=False)["check_args_parse"])
        print(f"{'ok  ' if caught else 'FAIL'} self-test: an unknown worker flag is caught by check_args_parse")
        if not caught:
            problems.append("unknown flag")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin-dir", type=Path, help="directory with the coordinator and worker binaries")
    ap.add_argument("--self-test", action="store_true", help="also require known breakages to be caught")
    a = ap.parse_args()
    m = load()
    if a.bin_dir is None:
        print("note: no --bin-dir, so the arguments are not parsed by the real binaries")
    results = run_checks(m, a.bin_dir, verbose=True)
    failed = [k for k, v in results.items() if v]
    passed = len(results) - len(failed)
    if a.self_test:
        missed = self_test(m, a.bin_dir)
        failed += missed
        passed += len(MUTATIONS) + (a.bin_dir is not None) - len(missed)
    print(f"k8s wiring: {passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
