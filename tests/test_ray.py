"""``convert --ray``: a two-node Ray cluster on this machine (tests/ray_cluster.py), in fresh
network and pid namespaces so that all it listens on is loopback and nothing it starts outlives
the test. A worker host killed mid-run and a driver killed midway both end in the bytes of a
local run (docs/hf-output.md#parts-and-hosts).

Needs Ray (``pip install -e '.[ray]'``) and ``unshare`` with the right to make namespaces (root);
without them the test is skipped, except under CI, where that is a failure."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.ray_overhead import NAMESPACES, die_with_parent, unavailable
from ms2hf.cli import main
from tests.conftest import DATA, every_file
from tests.edit_checkpoint import nan_copy

HERE = Path(__file__).resolve().parent
SOURCE = DATA / "tiny_fp32"
OPTIONS = ["--max-shard-size", "100KB", "--workers", "1", "--memory-budget", "64MiB"]
"""Twelve shards; tasks of one thread and 64 MiB, which the test cluster's hosts can hold."""


def test_a_killed_worker_host_and_a_killed_driver_give_the_local_bytes(tmp_path: Path) -> None:
    reason = unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the Ray test cannot run in CI: {reason}")
        pytest.skip(reason)
    local = tmp_path / "local"
    assert main(["convert", str(SOURCE), str(local), "-q", *OPTIONS]) == 0
    work = tmp_path / "work"
    work.mkdir()
    poisoned = nan_copy(tmp_path / "poisoned")
    helper = [sys.executable, str(HERE / "ray_cluster.py"), str(SOURCE), str(poisoned)]
    helper += [str(work), *OPTIONS]
    done = subprocess.run(
        [*NAMESPACES, *helper],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=die_with_parent,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-5000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    expected = every_file(local)
    for run in ("killed", "resumed"):
        assert result[run]["rc"] == 0, result[run]["stderr"][-3000:]
        report = json.loads(result[run]["stdout"])  # Ray printed nothing into the JSON report
        assert report["files"] == sorted(n for n in expected if n.endswith(".safetensors"))
        assert every_file(work / run) == expected, run
    refused = result["too_big"]
    assert (
        refused["rc"] == 2
        and "no host of the cluster can run a task of 1.0 GiB" in (refused["stderr"])
    )
    assert not any((work / "too-big").iterdir())
    strict = result["strict"]
    assert strict["rc"] == 2, strict["stderr"][-3000:]
    assert "ms2hf convert: error: " in strict["stderr"] and ": on host " in strict["stderr"]
    assert "model.layers.2.mlp.down_proj.weight" in strict["stderr"]
    assert "--strict refuses non-finite weights" in strict["stderr"]
    # The files the killed driver had recorded were trusted and kept by the rerun.
    kept = result["kept"]
    assert kept
    for name, (inode, mtime) in kept.items():
        st = (work / "resumed" / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (inode, mtime), name


def test_an_address_nobody_answers_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    assert main(["convert", str(SOURCE), str(out), "-q", "--ray", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    if importlib.util.find_spec("ray") is None:
        assert "pip install 'ms2hf[ray]'" in err
    else:
        assert "--ray 127.0.0.1:1: cannot reach the Ray cluster at 127.0.0.1:1" in err
    assert not any(out.iterdir())
