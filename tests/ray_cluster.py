"""A two-node Ray cluster on one machine, and ``ms2hf convert --ray auto`` run against it: the
program tests/test_ray.py starts inside fresh network and pid namespaces (so that everything Ray
listens on is loopback, and nothing it starts outlives the test).

    python tests/ray_cluster.py SRC POISONED WORK [CONVERT OPTIONS...]

0. A task no host can hold (``--memory-budget`` beyond every host's memory): refused at once.
1. A worker killed mid-run: node b's first shard task stops before renaming its file into place
   (tests/ray_inject); node a's first waits for that, so a task is provably running on b; then
   node b is killed without warning. Ray retries its task on node a. Output: WORK/killed.
2. A killed driver: every commit slowed down; the driver is SIGKILLed once two files are
   recorded, and the same command is run again. Output: WORK/resumed.
3. A task that fails on bad input: POISONED (SRC with a NaN) converted with --strict.

Prints one line ``RESULT {json}``: each driver's exit status, stdout and stderr, the files
recorded before the kill and their identities, and timings. The checks are the test's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2**20
NODE = {
    "node_ip_address": "127.0.0.1",
    "num_cpus": 1,
    "object_store_memory": 80 * MIB,
    "include_dashboard": False,
    "memory": 512 * MIB,
}
RECORD = ".ms2hf-run.json"


def _environment(root: Path) -> None:
    """What Ray reads before it starts anything: no usage reports, nothing under the real
    home, sockets under a short path (an AF_UNIX path has at most 107 bytes)."""
    home = root / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")  # no cloud metadata probe
    os.environ.update(
        HOME=str(home),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/",
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=str(root),
        # a killed node is declared dead in about 1.5 s instead of 15
        RAY_health_check_period_ms="500",
        RAY_health_check_timeout_ms="500",
        RAY_health_check_failure_threshold="3",
        RAY_health_check_initial_delay_ms="0",
    )


def _driver(src: str, out: Path, address: str, extra: list[str]) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "ms2hf.cli", "convert", src, str(out), "--ray", "auto"]
    return subprocess.Popen(
        [*argv, "-q", "--json", *extra],
        env={**os.environ, "RAY_ADDRESS": address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(ready: Callable[[], bool], driver: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 90
    while not ready():
        if driver.poll() is not None or time.monotonic() > deadline:
            _, err = driver.communicate()
            raise RuntimeError(f"{what} never happened (driver exit {driver.returncode}):\n{err}")
        time.sleep(0.02)


def _finish(driver: subprocess.Popen[str]) -> dict[str, object]:
    out, err = driver.communicate(timeout=180)
    return {"rc": driver.returncode, "stdout": out, "stderr": err}


def _recorded(out: Path) -> dict[str, str]:
    try:
        return dict(json.loads((out / RECORD).read_text())["finished"])
    except (OSError, ValueError, KeyError):
        return {}


def main(src: str, poisoned: str, work: Path, extra: list[str]) -> dict[str, object]:
    assert sorted(name for _, name in socket.if_nameindex()) == ["lo"], "not in a fresh netns"
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    marks = root / "marks"
    marks.mkdir()
    _environment(root)
    started = time.monotonic()
    timings: dict[str, float] = {}
    result: dict[str, object] = {"timings": timings}

    import ray
    from ray.cluster_utils import Cluster

    inject = {"PYTHONPATH": str(HERE / "ray_inject"), "MS2HF_TEST_DIR": str(marks)}
    cluster = None
    drivers: list[subprocess.Popen[str]] = []
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={**NODE, "env_vars": {**inject, "MS2HF_TEST_HOOK": "wait"}},
        )
        node_b = cluster.add_node(**NODE, env_vars={**inject, "MS2HF_TEST_HOOK": "hold"})
        cluster.wait_for_nodes()
        timings["cluster"] = time.monotonic() - started

        # 0. a task larger than any host: refused before anything is written
        drivers.append(
            driver := _driver(
                src, work / "too-big", cluster.address, [*extra, "--memory-budget", "1GiB"]
            )
        )
        result["too_big"] = _finish(driver)

        # 1. node b killed while its task is mid-run
        t = time.monotonic()
        drivers.append(driver := _driver(src, work / "killed", cluster.address, extra))
        _wait_for((marks / "held").exists, driver, "a task held on node b")
        cluster.remove_node(node_b, allow_graceful=False)
        result["killed"] = _finish(driver)
        timings["killed"] = time.monotonic() - t

        # 2. the driver killed midway, then run again
        t = time.monotonic()
        (marks / "slow").touch()
        out = work / "resumed"
        drivers.append(driver := _driver(src, out, cluster.address, extra))
        _wait_for(lambda: len(_recorded(out)) >= 2, driver, "two files recorded")
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        kept = _recorded(out)
        result["kept"] = {n: list(_identity(out / n)) for n in kept if (out / n).exists()}
        (marks / "slow").unlink()
        drivers.append(driver := _driver(src, out, cluster.address, extra))
        result["resumed"] = _finish(driver)
        timings["resumed"] = time.monotonic() - t

        # 3. a task refusing its input: said by the driver as a local run says it
        drivers.append(
            driver := _driver(poisoned, work / "strict", cluster.address, [*extra, "--strict"])
        )
        result["strict"] = _finish(driver)
    finally:
        for driver in drivers:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        timings["total"] = time.monotonic() - started
    return result


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


if __name__ == "__main__":
    doc = main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
    print("RESULT " + json.dumps(doc), flush=True)
