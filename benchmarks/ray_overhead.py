"""Section ``ray`` of ``python -m benchmarks.run``: what ``convert --ray`` costs beside a local run.

One machine, one Ray node of its CPUs (``ray.cluster_utils.Cluster``), started and stopped by
this section in a process of its own (``python -m benchmarks.ray_overhead FILE``) inside a fresh
network namespace, as the tests do (Ray turns a loopback address into the host's, so a node on
loopback is reachable only where loopback is the only interface); every measured command, the
local ones too, runs in that namespace (``nsenter``). Workload W: ``convert`` and ``convert
--ray ADDRESS`` in the same rounds, warm, each a fresh subprocess, then their outputs compared
byte for byte. W converts into one 1.5 GB shard, so the Ray run is one task with the same two
worker threads as the local run: the difference is what Ray adds (importing it, connecting,
placing the task, starting a worker that imports ms2hf, returning the digest). A run into
smaller shards (``--max-shard-size 400MB``: four tasks, one at a time, each asking for both
CPUs) is measured beside it. A Ray run's CPU seconds are the driver's alone: the writing is done
by the node's worker processes.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks import jobs
from benchmarks.bench import Bench, Case, Step

MIB = 2**20
TASK_BUDGET = "1GiB"
SMALL_SHARDS = ("--max-shard-size", "400MB")


def _ray_environment(root: Path) -> dict[str, str]:
    """No usage reports, nothing under the real home, sockets under a short path."""
    home = root / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    return {
        "HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": str(root),
    }


NAMESPACES = [
    *("unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--"),
    *("sh", "-c", 'ip link set lo up && exec "$@"', "sh"),
]
"""Only ``lo``, up; the helper is pid 1 of its namespace, so when it ends, or ``unshare`` is
killed (``--kill-child``), everything Ray started there ends too. tests/test_ray.py uses it too."""


def unavailable() -> str | None:
    """Why a Ray node in ``NAMESPACES`` cannot run here, or None if it can."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install -e '.[ray]')"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is missing"
    probe = subprocess.run([*NAMESPACES, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"cannot make network namespaces here: {probe.stderr.strip()[:200]}"
    return None


def die_with_parent() -> None:
    """A child's ``preexec_fn``: it is killed when the process that started it ends."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextmanager
def ray_node(env: dict[str, str], log: Callable[[str], None]) -> Iterator[tuple[str, list[str]]]:
    """A one-node Ray cluster of this machine's CPUs, in a network namespace of its own, for the
    section's duration: its address, and the prefix that runs a command in that namespace.
    Started by a child process (this module's ``main``) that shuts it down when its stdin
    closes; everything in the namespace ends with it."""
    root = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # AF_UNIX paths: 107 bytes
    ray_env = {**env, **_ray_environment(root)}
    address_file = root / "address"
    started = time.perf_counter()
    node = subprocess.Popen(
        [*NAMESPACES, *jobs.python("-m", "benchmarks.ray_overhead", str(address_file))],
        env=ray_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    try:
        while not address_file.exists():
            if node.poll() is not None:
                assert node.stderr is not None
                raise RuntimeError(f"the Ray node did not start:\n{node.stderr.read().decode()}")
            time.sleep(0.1)
        address = address_file.read_text().strip()
        log(f"ray: one node at {address}, started in {time.perf_counter() - started:.1f} s")
        yield address, ["nsenter", "-t", str(node.pid), "-n", "--"]
    finally:
        assert node.stdin is not None
        node.stdin.close()
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        shutil.rmtree(root, ignore_errors=True)


OUTPUTS = ("local", "ray", "local-4", "ray-4")


def ray_cases(bench: Bench, root: Path, address: str, inside: list[str]) -> list[Case]:
    local, remote, local4, remote4 = (bench.out / name for name in OUTPUTS)
    on_ray = ("--ray", address, "--memory-budget", TASK_BUDGET)
    small = SMALL_SHARDS

    def case(name: str, out: Path, *extra: str) -> Case:
        return Case("W", name, (Step([*inside, *jobs.convert(root, out, *extra)]),), (out,))

    return [
        case("convert", local),
        case("convert --ray", remote, *on_ray),
        case("convert, 4 shards", local4, *small),
        case("convert --ray, 4 shards (4 tasks)", remote4, *small, *on_ray),
    ]


def measure_ray(
    bench: Bench, root: Path, shape: jobs.Shape, identical: Callable[[Path, Path], bool]
) -> dict[str, bool]:
    """Local and Ray conversions of W in the same rounds, warm; outputs compared. Skipped, with a
    note, where Ray or network namespaces are not available."""
    reason = unavailable()
    if reason:
        bench.log(f"note: section ray skipped: {reason}")
        return {}
    saved = dict(bench.env)
    with ray_node(saved, bench.log) as (address, inside):
        bench.env = {**saved, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        try:
            cases = ray_cases(bench, root, address, inside)
            bench.rounds(cases, shape.reads, ["warm"], keep=True)
        finally:
            bench.env = saved
    local, remote, local4, remote4 = (bench.out / name for name in OUTPUTS)
    checks = {
        "W: convert --ray identical to convert": identical(local, remote),
        "W: 4 shards, --ray identical to local": identical(local4, remote4),
    }
    bench.release(*bench.kept)
    return checks


def main(argv: list[str]) -> int:
    """The Ray node of ``ray_node``: started, its address written to ``argv[0]``, stopped when
    stdin closes."""
    from ray.cluster_utils import Cluster

    cpus = len(os.sched_getaffinity(0))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": "127.0.0.1",
            "num_cpus": cpus,
            "memory": 4 * 2**30,
            "object_store_memory": 80 * MIB,
            "include_dashboard": False,
        },
    )
    try:
        Path(argv[0]).write_text(cluster.address)
        sys.stdin.read()
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
