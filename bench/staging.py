"""Staging benchmark: kubetune's S3 staging against s5cmd and a sequential boto3 loop.

All tools download the same objects from one S3 server on 127.0.0.1 into fresh local folders:
`--server moto` (moto's, run in its own process, so no Python client shares the server's
interpreter lock) or `--server seaweedfs` (SeaweedFS's S3 gateway, a production server, built
from `tests/cluster/seaweedfs/go.mod` by `make cluster-build`). Run it once per server.
Two data sets: many small objects (files/s) and a few large ones (MiB/s). Each tool runs
`--repeats` times, in a rotating order, after one untimed warm-up pass; the median counts.
Every run is checked for the full count and byte total before its time is kept.

A "server ceiling" line per set tells how far any client could go against this server: the
cheapest client we can write (URLs presigned beforehand, a few keep-alive connections,
bodies read and dropped, nothing written or checked), as a multiple of the sequential loop.

A third set, the large objects uploaded in 8 MiB parts as boto3 and the AWS CLI do by default,
measures what checking every byte costs: ours against ours with the checks off (size only,
which is what multipart objects got before their ETag was checked), same run, ratio.

    .venv/bin/python bench/staging.py [--server moto|seaweedfs] [--small-count 1000] [--large-mib 256]
                                      [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kubetune.api.spec import StorageSpec
from kubetune_demo.loopback_s3 import LoopbackS3Process
from kubetune_trainer.storage.schemes import stage
from kubetune_trainer.storage.staging import MARKER_DIR

KiB, MiB = 1024, 1024 * 1024
BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-bench", "AWS_SECRET_ACCESS_KEY": "kubetune-bench-secret",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
OURS, S5CMD, SEQUENTIAL = "kubetune", "s5cmd (defaults)", "sequential boto3"
SIZE_ONLY = "kubetune, size check only"
PART = 8 * MiB  # boto3's and the AWS CLI's default part size and multipart threshold


@dataclass(frozen=True)
class DataSet:
    """`count` objects of `size` bytes under `prefix/` in the bench bucket."""

    name: str
    prefix: str
    count: int
    size: int

    @property
    def total(self) -> int:
        return self.count * self.size


Tool = Callable[[str, DataSet, Path], None]


def run_ours(endpoint: str, data: DataSet, dest: Path) -> None:
    """The trainer's own path: `stage()` with the job's default storage settings."""
    stage(f"s3://{BUCKET}/{data.prefix}/", dest, StorageSpec(endpoint=endpoint, addressing_style="path"))


def run_size_only(endpoint: str, data: DataSet, dest: Path) -> None:
    """`run_ours` with no byte checked (no HEAD either): the baseline for the checks' cost."""
    from kubetune_trainer.storage import s3_ranges
    from kubetune_trainer.storage.transfer_checks import SizeOnly

    choose = s3_ranges._choose_check
    s3_ranges._choose_check = lambda *args, **kwargs: (SizeOnly(), "")
    try:
        run_ours(endpoint, data, dest)
    finally:
        s3_ranges._choose_check = choose


def s5cmd_tool(*global_flags: str, cp_flags: tuple[str, ...] = ()) -> Tool:
    binary = shutil.which("s5cmd", path=str(Path(sys.executable).parent)) or "s5cmd"

    def run(endpoint: str, data: DataSet, dest: Path) -> None:
        command = [binary, "--endpoint-url", endpoint, *global_flags, "cp", *cp_flags,
                   f"s3://{BUCKET}/{data.prefix}/*", f"{dest}/"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **CREDENTIALS})

    return run


def run_sequential(endpoint: str, data: DataSet, dest: Path) -> None:
    """What a plain script does: list, then get_object and stream each body to a file, one by one."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{data.prefix}/"):
        for item in page.get("Contents", []):
            target = dest / item["Key"][len(data.prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"]
            with target.open("wb") as handle:
                shutil.copyfileobj(body, handle, 1 * MiB)


def best_case_seconds(endpoint: str, data: DataSet, connections: int) -> float:
    """Seconds the cheapest client takes to GET every object: URLs presigned before the clock
    starts, `connections` keep-alive connections, each body read into one buffer and dropped."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                                     Prefix=f"{data.prefix}/")
            for item in page.get("Contents", [])]
    paths = [urlsplit(client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key}))
             for key in keys]
    server = urlsplit(endpoint)

    def get_all(share: list) -> int:
        connection, buffer, received = http.client.HTTPConnection(server.hostname, server.port), bytearray(MiB), 0
        try:
            for path in share:
                connection.request("GET", f"{path.path}?{path.query}")
                answer = connection.getresponse()
                while count := answer.readinto(buffer):
                    received += count
                if answer.status != 200:
                    raise SystemExit(f"best-case client: GET {path.path} answered {answer.status}")
        finally:
            connection.close()
        return received

    streams = min(connections, len(paths))
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        received = sum(pool.map(get_all, [paths[i::streams] for i in range(streams)]))
    elapsed = time.perf_counter() - started
    if received != data.total:
        raise SystemExit(f"best-case client received {received} bytes, expected {data.total}")
    return elapsed


def server_ceiling(endpoint: str, data: DataSet, sequential_s: float, repeats: int, connections: int) -> dict:
    """The best-case client's median throughput, and how many times the sequential loop's it is."""
    seconds = statistics.median(best_case_seconds(endpoint, data, connections) for _ in range(repeats))
    print(f"  {data.name} best case: {seconds:.2f}s", file=sys.stderr, flush=True)
    return {"connections": connections, "median_s": round(seconds, 3),
            "files_per_s": round(data.count / seconds, 1), "mib_per_s": round(data.total / MiB / seconds, 1),
            "x_sequential": round(sequential_s / seconds, 2)}


def seed(endpoint: str, data: DataSet, scratch: Path, multipart: bool = False) -> None:
    """Upload distinct pseudo-random objects: single PUTs (each ETag the object's MD5), or files in
    8 MiB parts as boto3's `upload_file` cuts them by default (ETags `<md5>-<parts>`)."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=16))
    block = os.urandom(data.size)
    parts = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)

    def put(index: int) -> None:
        body = index.to_bytes(8, "big") + block[8:]
        key = f"{data.prefix}/{index // 100:02d}/object-{index:05d}.bin"
        if not multipart:
            client.put_object(Bucket=BUCKET, Key=key, Body=body)
            return
        upload = scratch / f"upload-{index}"
        upload.write_bytes(body)
        client.upload_file(str(upload), BUCKET, key, Config=parts)
        upload.unlink()

    with ThreadPoolExecutor(max_workers=8 if data.size < 8 * MiB else 2) as pool:
        list(pool.map(put, range(data.count)))


def check(dest: Path, data: DataSet, tool: str) -> None:
    """Refuse a run that did not bring every byte."""
    files = [p for p in dest.rglob("*") if p.is_file() and MARKER_DIR not in p.parts]
    total = sum(p.stat().st_size for p in files)
    if (len(files), total) != (data.count, data.total):
        raise SystemExit(f"{tool} left {len(files)} files / {total} bytes in {dest}, "
                         f"expected {data.count} / {data.total}")


def measure(endpoint: str, data: DataSet, tools: dict[str, Tool], repeats: int,
            scratch: Path) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in tools}
    names = list(tools)
    for round_ in range(repeats + 1):  # round 0 warms up every tool and is not kept
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            dest = Path(tempfile.mkdtemp(prefix="dest-", dir=scratch))
            started = time.perf_counter()
            tools[name](endpoint, data, dest)
            elapsed = time.perf_counter() - started
            check(dest, data, name)
            shutil.rmtree(dest)
            if round_:
                times[name].append(elapsed)
            print(f"  {data.name} {'warm-up' if not round_ else f'run {round_}'}: {name} {elapsed:.2f}s",
                  file=sys.stderr, flush=True)
    return times


def summarise(data: DataSet, times: dict[str, list[float]]) -> dict:
    tools = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        tools[name] = {"seconds": [round(s, 3) for s in seconds], "median_s": round(median, 3),
                       "files_per_s": round(data.count / median, 1), "mib_per_s": round(data.total / MiB / median, 1)}
    ours = times[OURS]
    ratios = {f"ours/{name}": round(statistics.median(seconds) / statistics.median(ours), 2)
              for name, seconds in times.items() if name != OURS}
    return {"objects": data.count, "object_bytes": data.size, "tools": tools, "ratios": ratios}


def print_check_cost(data: DataSet, result: dict) -> None:
    print(f"\n{data.name}: {data.count} x {data.size // MiB} MiB in {PART // MiB} MiB parts")
    print(f"  {'tool':<28}{'median s':>10}{'MiB/s':>10}")
    for name, row in result["tools"].items():
        print(f"  {name:<28}{row['median_s']:>10.2f}{row['mib_per_s']:>10.1f}")
    print(f"  every byte checked against the multipart ETag: {result['ratios'][f'ours/{SIZE_ONLY}']:.2f}x "
          "the throughput of the size check alone")


def print_table(data: DataSet, result: dict) -> None:
    size = f"{data.size // KiB} KiB" if data.size < MiB else f"{data.size // MiB} MiB"
    print(f"\n{data.name}: {data.count} x {size}")
    print(f"  {'tool':<28}{'median s':>10}{'files/s':>10}{'MiB/s':>10}")
    for name, row in result["tools"].items():
        print(f"  {name:<28}{row['median_s']:>10.2f}{row['files_per_s']:>10.1f}{row['mib_per_s']:>10.1f}")
    for name, ratio in result["ratios"].items():
        print(f"  {name}: {ratio:.2f}x")
    best = result["ceiling"]
    print(f"  server ceiling (best-case client, {best['connections']} keep-alive connections, presigned, bodies "
          f"dropped): {best['files_per_s']:.1f} files/s, {best['mib_per_s']:.1f} MiB/s = "
          f"{best['x_sequential']:.2f}x the sequential loop")


def s3_server(kind: str) -> LoopbackS3Process:
    """moto's server in a child process, or SeaweedFS's `weed mini` (built when missing)."""
    if kind == "moto":
        return LoopbackS3Process()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "cluster"))
    from s3_servers import SeaweedS3

    return SeaweedS3({k: CREDENTIALS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=("moto", "seaweedfs"), default="moto", help="the S3 server on loopback")
    parser.add_argument("--small-count", type=int, default=1000, help="objects in the small set")
    parser.add_argument("--small-kib", type=int, default=64, help="size of each small object")
    parser.add_argument("--large-count", type=int, default=2, help="objects in the large set")
    parser.add_argument("--large-mib", type=int, default=256, help="size of each large object")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tool (median reported)")
    parser.add_argument("--s5cmd-workers", type=int, default=32, help="--numworkers of the tuned s5cmd line")
    parser.add_argument("--ceiling-connections", type=int, default=8,
                        help="keep-alive connections of the best-case client behind the server ceiling line")
    parser.add_argument("--check-cost-only", action="store_true",
                        help="run only the multipart set: ours against ours with the byte checks off")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    os.environ.update(CREDENTIALS)
    sets = [] if args.check_cost_only else [DataSet("small", "small", args.small_count, args.small_kib * KiB),
                                            DataSet("large", "large", args.large_count, args.large_mib * MiB)]
    tools: dict[str, Tool] = {OURS: run_ours, S5CMD: s5cmd_tool(),
                              f"s5cmd --numworkers {args.s5cmd_workers}": s5cmd_tool("--numworkers",
                                                                                     str(args.s5cmd_workers)),
                              SEQUENTIAL: run_sequential}
    results: dict = {"server": args.server}
    multipart = DataSet("large-multipart", "multipart", args.large_count, args.large_mib * MiB)
    with s3_server(args.server) as server, tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch:
        server.create_bucket(BUCKET)
        for data in sets:
            seed(server.endpoint, data, Path(scratch))
            times = measure(server.endpoint, data, tools, args.repeats, Path(scratch))
            results[data.name] = summarise(data, times)
            results[data.name]["ceiling"] = server_ceiling(server.endpoint, data, statistics.median(times[SEQUENTIAL]),
                                                           args.repeats, args.ceiling_connections)
        seed(server.endpoint, multipart, Path(scratch), multipart=True)
        times = measure(server.endpoint, multipart, {OURS: run_ours, SIZE_ONLY: run_size_only}, args.repeats,
                        Path(scratch))
        results["check cost"] = summarise(multipart, times)
    if args.check_cost_only:
        print(json.dumps(results, indent=2) if args.json else "", end="\n" if args.json else "")
        if not args.json:
            print_check_cost(multipart, results["check cost"])
        return 0
    small, large = results["small"]["ratios"], results["large"]["ratios"]
    results["targets"] = {
        "small files/s >= s5cmd": small[f"ours/{S5CMD}"] >= 1.0,
        "large MiB/s >= s5cmd": large[f"ours/{S5CMD}"] >= 1.0,
        "small >= 5x sequential": small[f"ours/{SEQUENTIAL}"] >= 5.0,
        "large >= 5x sequential": large[f"ours/{SEQUENTIAL}"] >= 5.0,
    }
    results["5x sequential reachable on this server"] = {
        name: results[name]["ceiling"]["x_sequential"] >= 5.0 for name in ("small", "large")}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"server: {args.server}")
        for data in sets:
            print_table(data, results[data.name])
        print_check_cost(multipart, results["check cost"])
        print("\ntargets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in results["targets"].items()))
        print("5x sequential reachable at all (server ceiling >= 5x): " + ", ".join(
            f"{k}: {'yes' if v else 'NO'}" for k, v in results["5x sequential reachable on this server"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
