"""Operator scale: N FineTuneJobs created at once on a real control plane.

Starts a private loopback control plane (`tests/cluster/kubecluster.py`) with an audit log
of the operator's own user, adds fake 8-GPU kwok nodes for every job, runs `kubetune
operator` as a subprocess under its own ServiceAccount (exactly `kubetune.operator.
permissions`), creates N one-GPU FineTuneJobs from a thread pool, and measures:

- seconds from the create call returning (client clock) to the Job, the pods Running and
  the status reaching Staging (all pods running; without a trainer no job gets to Running),
  each as seen by this script's own watches (HTTP streams parsed as they arrive);
- the operator's peak RSS (VmHWM of its process);
- API requests the operator made per job: audit events of its user, while the jobs start
  and then in a steady window of resync passes.

The baseline in the same run is the Job controller: Job created -> its pod created, as
seen by the same watches. Targets at N=500: p99 create -> Job < 2 s, peak RSS < 250 MB.

    .venv/bin/python bench/operator_scale.py --jobs 100 [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))

import clusterbuild  # noqa: E402
import gpunodes  # noqa: E402
import kubecluster  # noqa: E402
import yaml  # noqa: E402
from kubernetes import client  # noqa: E402

import scale_floor  # noqa: E402
from kubetune.operator.permissions import CLUSTER_RULES, LEASE_RULES  # noqa: E402
from kubetune.operator.settings import OperatorSettings  # noqa: E402

PLAIN_APISERVER_ARGS = kubecluster.apiserver_args
NAMESPACE = "kubetune-bench"
ACCOUNT = "kubetune-operator"
OPERATOR_USER = f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}"
GPUS_PER_NODE = 8
TARGET_P99_JOB_SECONDS = 2.0
TARGET_RSS_MB = 250.0
RBAC = "rbac.authorization.k8s.io"


def audit_policy() -> dict[str, Any]:
    """Every completed request of the operator's user, and the FineTuneJob creates."""
    return {"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [{"level": "Metadata", "users": [OPERATOR_USER]},
                      {"level": "Metadata", "verbs": ["create"],  # when each job arrived, to split latencies
                       "resources": [{"group": "kubetune.io", "resources": ["finetunejobs"]}]},
                      {"level": "None"}]}


def start_cluster(work: Path) -> kubecluster.ControlPlane:
    """A private control plane whose API server also writes `work/audit.log`."""
    policy = work / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump(audit_policy()))
    plain = PLAIN_APISERVER_ARGS

    def with_audit(ports: dict[str, int], pki: Any) -> list[str]:
        return [*plain(ports, pki), f"--audit-policy-file={policy}", f"--audit-log-path={work / 'audit.log'}",
                "--audit-log-format=json"]

    kubecluster.apiserver_args = with_audit
    plane = kubecluster.ControlPlane(work / "cluster")
    plane.start(tie_to_parent=True)
    return plane


def add_gpu_nodes(plane: kubecluster.ControlPlane, count: int) -> None:
    specs = tuple(gpunodes.NodeSpec(f"kwok-bench-{i:03d}", gpus=GPUS_PER_NODE) for i in range(count))
    kubectl = plane.kubectl_command()
    subprocess.run([*kubectl, "apply", "-f", "-"], check=True, capture_output=True, text=True,
                   input=gpunodes.nodes_yaml(clusterbuild.kubernetes_version(), specs))
    subprocess.run([*kubectl, "wait", "--for=condition=Ready", "node", "-l", gpunodes.NODE_LABEL_SELECTOR,
                    "--timeout=120s"], check=True, capture_output=True)


def grant_operator(admin: client.ApiClient) -> None:
    """The namespace, the operator's ServiceAccount and exactly its RBAC."""
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": ACCOUNT}})
    subjects = [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}]
    rbac.create_cluster_role({"metadata": {"name": "kubetune-bench"}, "rules": list(CLUSTER_RULES)})
    rbac.create_cluster_role_binding({"metadata": {"name": "kubetune-bench"}, "subjects": subjects,
                                      "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": "kubetune-bench"}})
    rbac.create_namespaced_role(NAMESPACE, {"metadata": {"name": "kubetune-lease"}, "rules": list(LEASE_RULES)})
    rbac.create_namespaced_role_binding(NAMESPACE, {"metadata": {"name": "kubetune-lease"}, "subjects": subjects,
                                                    "roleRef": {"apiGroup": RBAC, "kind": "Role",
                                                                "name": "kubetune-lease"}})
    wait_until(lambda: core.list_namespaced_service_account(NAMESPACE, field_selector="metadata.name=default").items,
               60, "the namespace's default ServiceAccount")


def operator_kubeconfig(plane: kubecluster.ControlPlane, path: Path) -> Path:
    """A kubeconfig holding a token of the operator's ServiceAccount."""
    with plane.service_account_client(NAMESPACE, ACCOUNT) as api:
        token = api.configuration.api_key["authorization"]
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "bench",
              "clusters": [{"name": "bench", "cluster": {"server": plane.server,
                                                         "certificate-authority": str(plane.pki.ca_cert)}}],
              "users": [{"name": "operator", "user": {"token": token}}],
              "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "operator"}}]}
    path.write_text(yaml.safe_dump(config))
    return path


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return value


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Operator:
    """The `kubetune operator` process and a sampler of its memory."""

    process: subprocess.Popen
    port: int
    rss_samples: list[float] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The operator's own process: under a wrapper (a profiler), the wrapper's child."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        while children.exists() and (found := children.read_text().split()):
            pid = int(found[0])
            children = Path(f"/proc/{pid}/task/{pid}/children")
        return pid

    def status_kb(self, key: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
        return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU time the operator has used so far."""
        return cpu_seconds(self.pid)

    def sample(self, stop: threading.Event) -> None:
        while not stop.wait(0.5) and self.process.poll() is None:
            self.rss_samples.append(self.status_kb("VmRSS") / 1024)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> int:
        os.kill(self.pid, signal.SIGTERM)  # a wrapper (profiler) ends with the operator and writes its output
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_operator(kubeconfig: Path, resync_seconds: float, log: Path, wrapper: list[str]) -> Operator:
    """`wrapper` prefixes the command (a profiler: `py-spy record -o FILE --`)."""
    port = free_port()
    env = dict(os.environ, POD_NAMESPACE=NAMESPACE, POD_NAME="bench-operator",
               KUBETUNE_RESYNC_SECONDS=str(resync_seconds))
    command = [sys.executable, "-m", "kubetune.cli", "operator", "-n", NAMESPACE, "--kubeconfig", str(kubeconfig),
               "--http-port", str(port), "--log-level", "warning", "--trainer-image", "registry.invalid/kt:bench"]
    process = subprocess.Popen([*wrapper, *command], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    operator = Operator(process, port)
    wait_until(lambda: operator.ready() or process.poll() is not None, 120, "the operator to lead")
    if process.poll() is not None:
        raise RuntimeError(f"the operator exited with {process.returncode}; see {log}")
    return operator


class Watcher:
    """First times (this clock) each job's objects reached a state, from raw watch streams."""

    def __init__(self, plane: kubecluster.ControlPlane) -> None:
        self.plane = plane
        self.lock = threading.Lock()
        self.seen: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.threads: list[threading.Thread] = []

    def mark(self, name: str, what: str, when: float) -> None:
        with self.lock:
            self.seen[name].setdefault(what, when)

    def start(self) -> None:
        paths = {"finetunejob": f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/finetunejobs",
                 "job": f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs",
                 "pod": f"/api/v1/namespaces/{NAMESPACE}/pods"}
        for kind, path in paths.items():
            thread = threading.Thread(target=self._watch, args=(kind, path), daemon=True, name=f"watch-{kind}")
            thread.start()
            self.threads.append(thread)

    def _watch(self, kind: str, path: str) -> None:
        """Follow `path` for good: reconnect (from the last resourceVersion) when a stream ends or fails."""
        context = ssl.create_default_context(cafile=str(self.plane.pki.ca_cert))
        context.load_cert_chain(str(self.plane.pki.admin_cert), str(self.plane.pki.admin_key))
        version = ""
        while True:
            url = f"{self.plane.server}{path}?watch=1&timeoutSeconds=3600&resourceVersion={version}"
            try:
                with urllib.request.urlopen(url, context=context, timeout=3600) as stream:
                    for line in stream:
                        when = time.time()
                        event = json.loads(line)
                        if event["type"] == "ERROR":  # e.g. 410 Gone: start again from now
                            version = ""
                            break
                        version = event["object"]["metadata"].get("resourceVersion", version)
                        self._record(kind, event["object"], when)
            except (OSError, ValueError, KeyError):
                time.sleep(0.5)

    def _record(self, kind: str, obj: dict[str, Any], when: float) -> None:
        if kind == "finetunejob":
            name = obj["metadata"]["name"]
            self.mark(name, "finetunejob", when)
            if (obj.get("status") or {}).get("phase") in ("Staging", "Running"):
                self.mark(name, "staging", when)
            return
        name = (obj["metadata"].get("labels") or {}).get("kubetune.io/job-name")
        if name is None:
            return
        if kind == "job":
            self.mark(name, "job", when)
        else:
            self.mark(name, "pod", when)
            if (obj.get("status") or {}).get("phase") == "Running":
                self.mark(name, "running", when)

    def count(self, what: str, names: list[str]) -> int:
        with self.lock:
            return sum(1 for n in names if what in self.seen.get(n, {}))


def finetunejob(name: str) -> dict[str, Any]:
    """A valid one-GPU job: eight fit on each bench node."""
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"model": {"uri": "s3://models/sd15/"}, "method": {"type": "lora"},
                     "data": {"uri": "s3://datasets/corgis/"}, "output": {"uri": f"s3://outputs/{name}/"},
                     "training": {"maxSteps": 100},
                     "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "1", "memory": "1Gi"}}}


def create_all(admin_config: client.Configuration, names: list[str], threads: int) -> dict[str, float]:
    """Create every job from a thread pool; the client time each create returned."""
    admin_config.connection_pool_maxsize = threads
    api = client.CustomObjectsApi(client.ApiClient(admin_config))

    def create(name: str) -> tuple[str, float]:
        api.create_namespaced_custom_object("kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", finetunejob(name))
        return name, time.time()

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(create, names))


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def latencies(watcher: Watcher, start: dict[str, float], what: str, origin: str | None = None) -> list[float]:
    """`what` minus the start time (client create, or another watched state) for each job that got there."""
    out = []
    for name, t0 in start.items():
        seen = watcher.seen.get(name, {})
        base = seen.get(origin) if origin else t0
        if what in seen and base is not None:
            out.append(seen[what] - base)
    return out


def audit_counts(log: Path, since: float, until: float) -> collections.Counter[str]:
    """Operator requests received in [since, until), by verb and resource."""
    counts: collections.Counter[str] = collections.Counter()
    if not log.exists():
        return counts
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event.get("user", {}).get("username") != OPERATOR_USER:
            continue
        received = datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
        if since <= received < until:
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            counts[f"{event['verb']} {resource}"] += 1
    return counts


def audit_split(log: Path, names: list[str]) -> dict[str, list[float]]:
    """Where create -> Job goes, on the API server's own clock: from a FineTuneJob's create to
    the operator's first request for it (the operator's reaction), and its Job create call."""
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}
    job_call: dict[str, float] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        event = json.loads(line)
        ref, verb = event.get("objectRef") or {}, event["verb"]
        if verb != "create" or ref.get("resource") not in ("finetunejobs", "configmaps", "services", "jobs"):
            continue
        received, done = (datetime.fromisoformat(event[k].replace("Z", "+00:00")).timestamp()
                          for k in ("requestReceivedTimestamp", "stageTimestamp"))
        name = str(ref.get("name") or "").removesuffix("-config")
        if ref["resource"] == "finetunejobs":
            arrived[name] = received
        else:
            first[name] = min(first.get(name, received), received)
            if ref["resource"] == "jobs":
                job_call[name] = done - received
    wanted = [n for n in names if n in arrived and n in first]
    return {"reaction": [first[n] - arrived[n] for n in wanted],
            "job_create_call": [job_call[n] for n in wanted if n in job_call]}


def summary(values: list[float]) -> dict[str, float]:
    return {"count": len(values), "p50": quantile(values, 0.5), "p99": quantile(values, 0.99),
            "max": max(values, default=math.nan)}


def measure(args: argparse.Namespace, plane: kubecluster.ControlPlane, work: Path) -> dict[str, Any]:
    admin_config = plane.admin_client().configuration
    admin = client.ApiClient(admin_config)
    grant_operator(admin)
    add_gpu_nodes(plane, math.ceil(args.jobs / GPUS_PER_NODE))
    watcher = Watcher(plane)
    watcher.start()
    operator = start_operator(operator_kubeconfig(plane, work / "operator.kubeconfig"), args.resync_seconds,
                              work / "operator.log", args.operator_wrapper.split())
    stop_sampling = threading.Event()
    threading.Thread(target=operator.sample, args=(stop_sampling,), daemon=True).start()
    try:
        create_all(admin_config, ["warmup"], 1)  # the operator's watches are up once this has its Job
        wait_until(lambda: "staging" in watcher.seen.get("warmup", {}), 120, "the warm-up job")
        idle_rss = operator.status_kb("VmRSS") / 1024
        names = [f"ftj-{i:04d}" for i in range(args.jobs)]
        pids = {**plane.processes.pids(), "operator": operator.pid, "this benchmark": os.getpid()}
        began, cpu_before, everyone_before = time.time(), operator.cpu_seconds(), process_cpu(pids)
        created = create_all(admin_config, names, args.threads)
        create_seconds = time.time() - began
        wait_until(lambda: watcher.count("job", names) == len(names), args.timeout, "every Job", interval=0.1)
        jobs_seconds, everyone_at_jobs = time.time() - began, process_cpu(pids)
        wait_until(lambda: watcher.count("staging", names) == len(names), args.timeout,
                   f"{len(names)} jobs to be Staging", interval=0.5)
        started, cpu_start = time.time(), operator.cpu_seconds() - cpu_before
        everyone = {name: cpu - everyone_before[name] for name, cpu in process_cpu(pids).items()}
        time.sleep(args.steady_seconds)
        steady_end = time.time()
        peak_rss = operator.status_kb("VmHWM") / 1024
        cpu_steady = operator.cpu_seconds() - cpu_before - cpu_start
    finally:
        stop_sampling.set()
        exit_code = operator.stop()
    audit = work / "audit.log"
    startup, steady = audit_counts(audit, began, started), audit_counts(audit, started, steady_end)
    job = latencies(watcher, created, "job")
    split = audit_split(audit, names)
    return {
        "jobs": args.jobs, "threads": args.threads, "resync_seconds": args.resync_seconds,
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "create_seconds": create_seconds,
        "create_to_job": summary(job),
        "create_to_pods_running": summary(latencies(watcher, created, "running")),
        "create_to_staging": summary(latencies(watcher, created, "staging")),
        "watched_ftj_to_job": summary(latencies(watcher, created, "job", origin="finetunejob")),
        "baseline_job_to_pod": summary(latencies(watcher, created, "pod", origin="job")),
        "audit_ftj_create_to_operator_request": summary(split["reaction"]),
        "audit_job_create_call": summary(split["job_create_call"]),
        "operator_cpu_seconds": {"start": cpu_start, "steady": cpu_steady},
        "cpu_seconds_while_starting": dict(sorted(everyone.items(), key=lambda kv: -kv[1])),
        "seconds_to_every_job": jobs_seconds,
        "cpu_seconds_to_every_job": dict(sorted(((name, cpu - everyone_before[name])
                                                 for name, cpu in everyone_at_jobs.items()), key=lambda kv: -kv[1])),
        "rss_mb": {"idle": idle_rss, "peak": peak_rss, "sampled_max": max(operator.rss_samples, default=0.0)},
        "requests": {"start_total": sum(startup.values()), "start_per_job": sum(startup.values()) / args.jobs,
                     "start_by_verb": dict(startup.most_common()),
                     "steady_seconds": steady_end - started, "steady_total": sum(steady.values()),
                     "steady_per_job_per_resync": sum(steady.values()) / args.jobs
                     / max(1.0, (steady_end - started) / args.resync_seconds),
                     "steady_by_verb": dict(steady.most_common())},
        "operator_exit_code": exit_code,
        "targets": {"p99_create_to_job_below_2s": quantile(job, 0.99) < TARGET_P99_JOB_SECONDS,
                    "peak_rss_below_250mb": peak_rss < TARGET_RSS_MB},
    }


def measure_floor(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The same burst on a fresh control plane, answered by `scale_floor.FloorReactor` instead."""
    plane = start_cluster(work)
    try:
        admin_config = plane.admin_client().configuration
        client.CoreV1Api(client.ApiClient(admin_config)).create_namespace({"metadata": {"name": NAMESPACE}})
        add_gpu_nodes(plane, math.ceil(args.jobs / GPUS_PER_NODE))
        watcher = Watcher(plane)
        watcher.start()
        settings = OperatorSettings(default_image="registry.invalid/kt:bench")
        reactor = scale_floor.FloorReactor(
            plane.server, NAMESPACE, scale_floor.children_template(finetunejob("template"), settings),
            (str(plane.pki.admin_cert), str(plane.pki.admin_key)), str(plane.pki.ca_cert))
        reactor.start()
        create_all(admin_config, ["warmup"], 1)
        wait_until(lambda: "job" in watcher.seen.get("warmup", {}), 120, "the floor's warm-up job")
        names = [f"ftj-{i:04d}" for i in range(args.jobs)]
        pids = {**plane.processes.pids(), "this benchmark (with the reactor)": os.getpid()}
        began, before = time.time(), process_cpu(pids)
        created = create_all(admin_config, names, args.threads)
        create_seconds = time.time() - began
        wait_until(lambda: watcher.count("job", names) == len(names), args.timeout, "the floor's Jobs", interval=0.1)
        seconds, after = time.time() - began, process_cpu(pids)
        reactor.stop()
    finally:
        plane.stop()
    return {"create_seconds": create_seconds, "create_to_job": summary(latencies(watcher, created, "job")),
            "seconds_to_every_job": seconds, "errors": reactor.errors[:5],
            "cpu_seconds_to_every_job": dict(sorted(((n, after[n] - before[n]) for n in pids), key=lambda kv: -kv[1]))}


def print_table(result: dict[str, Any]) -> None:
    load = ", ".join(f"{x:.2f}" for x in result["load_average"])
    print(f"\nkubetune operator scale: {result['jobs']} FineTuneJobs created in {result['create_seconds']:.1f}s "
          f"from {result['threads']} threads; resync {result['resync_seconds']:g}s; "
          f"{result['cpus']} CPUs, load {load}")
    print(f"{'seconds':<40}{'count':>7}{'p50':>9}{'p99':>9}{'max':>9}")
    rows = (("create returned -> Job (watch)", "create_to_job"),
            ("create returned -> pod Running", "create_to_pods_running"),
            ("create returned -> status Staging", "create_to_staging"),
            ("FTJ watched -> Job watched", "watched_ftj_to_job"),
            ("audit: FTJ create -> operator's 1st", "audit_ftj_create_to_operator_request"),
            ("audit: the Job create call", "audit_job_create_call"),
            ("baseline: Job -> its pod (Job ctrl)", "baseline_job_to_pod"))
    for label, key in rows:
        s = result[key]
        print(f"{label:<40}{s['count']:>7}{s['p50']:>9.3f}{s['p99']:>9.3f}{s['max']:>9.3f}")
    base = result["baseline_job_to_pod"]["p99"]
    print(f"p99 create->Job / p99 Job controller: {result['create_to_job']['p99'] / base:.2f}x")
    rss, req = result["rss_mb"], result["requests"]
    cpu = result["operator_cpu_seconds"]
    print(f"operator RSS MB: idle {rss['idle']:.0f}, peak (VmHWM) {rss['peak']:.0f}; CPU seconds: "
          f"{cpu['start']:.1f} while starting, {cpu['steady']:.1f} in the steady window")
    print(f"CPU seconds until every Job exists ({result['seconds_to_every_job']:.1f}s): " + ", ".join(
        f"{name} {cpu:.1f}" for name, cpu in result["cpu_seconds_to_every_job"].items()))
    print("CPU seconds while starting (creates to all Staging): " + ", ".join(
        f"{name} {cpu:.1f}" for name, cpu in result["cpu_seconds_while_starting"].items()))
    print(f"operator API requests while starting: {req['start_total']} ({req['start_per_job']:.2f}/job) "
          f"{req['start_by_verb']}")
    print(f"steady state, {req['steady_seconds']:.0f}s: {req['steady_total']} "
          f"({req['steady_per_job_per_resync']:.2f}/job/resync) {req['steady_by_verb']}")
    if floor := result.get("floor"):
        job, ours = floor["create_to_job"], result["create_to_job"]
        print(f"\nfloor (fresh control plane; a reactor that only creates the 3 children): {result['jobs']} created in "
              f"{floor['create_seconds']:.1f}s; create returned -> Job p50 {job['p50']:.3f} p99 {job['p99']:.3f} "
              f"max {job['max']:.3f}; every Job after {floor['seconds_to_every_job']:.1f}s")
        print("floor CPU seconds until every Job exists: " + ", ".join(
            f"{name} {cpu:.1f}" for name, cpu in floor["cpu_seconds_to_every_job"].items()))
        print(f"operator p99 create->Job / floor p99: {ours['p99'] / job['p99']:.2f}x"
              + (f"; floor errors: {floor['errors']}" if floor["errors"] else ""))
    for name, ok in result["targets"].items():
        print(f"target {name}: {'PASS' if ok else 'MISS'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="FineTuneJobs to create at once (default 500)")
    parser.add_argument("--threads", type=int, default=32, help="client threads creating them (default 32)")
    parser.add_argument("--resync-seconds", type=float, default=10.0, help="the operator's resync period")
    parser.add_argument("--steady-seconds", type=float, default=20.0,
                        help="how long to count requests once every job is Staging (default 20)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this long (default 600)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON ('-': stdout)")
    parser.add_argument("--operator-wrapper", default="", metavar="CMD",
                        help="prefix for the operator's command, e.g. 'py-spy record -r 50 -o prof.svg --'")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the floor: the same burst answered by a reactor that only creates children")
    parser.add_argument("--keep", metavar="DIR", help="keep the logs (audit, operator) in DIR")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="kubetune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    plane = start_cluster(work)
    try:
        try:
            result = measure(args, plane, work)
        finally:
            plane.stop()
        if args.floor:
            (work / "floor").mkdir(exist_ok=True)
            result["floor"] = measure_floor(args, work / "floor")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    if args.json:
        text = json.dumps(result, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
