"""Never lose data: atomic files, the index last, resuming a killed run to the same bytes, and
never touching a folder (or file) that ms2hf did not make unless told to."""

# The run record exists only while a run is unfinished; a finished folder carries its shards'
# digests in the index (docs/hf-output.md#a-publishable-folder).

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ms2hf.cli import main
from ms2hf.pipeline.engine.output_dir import RUN_RECORD, read_finished
from tests.conftest import DATA, DATA_CKPT2, every_file, folder_bytes

SOURCE = DATA / "tiny_fp32"
ONE_TENSOR_PER_FILE = ["--max-shard-size", "1", "--memory-budget", "2MiB"]
"""47 shards, each committed (and fsynced) on its own: a run long enough to be killed midway."""


def convert(out: Path, *extra: str) -> int:
    return main(["convert", str(SOURCE), str(out), "-q", *extra])


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """An uninterrupted run with one worker: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("clean") / "hf"
    assert convert(out, *ONE_TENSOR_PER_FILE, "--workers", "1") == 0
    return every_file(out)


def _kill_after(out: Path, finished: int, source: Path = SOURCE) -> int:
    """Start ``ms2hf convert`` and SIGKILL it once ``finished`` shards have their final names;
    the process's return code (-SIGKILL when it was still running)."""
    argv = [
        sys.executable,
        "-m",
        "ms2hf.cli",
        "convert",
        str(source),
        str(out),
        "-q",
        *ONE_TENSOR_PER_FILE,
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / RUN_RECORD).exists() and len(shards(out)) >= finished:
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def _looks_right_after_a_kill(out: Path, clean: dict[str, bytes]) -> None:
    """Whatever has a final name is exactly what the clean run wrote; the index, written last,
    exists only if everything else does."""
    visible = {n: b for n, b in every_file(out).items() if not n.startswith(".")}
    for name, data in visible.items():
        assert data == clean[name], f"{name} has its final name but is not the finished file"
    if "model.safetensors.index.json" in visible:
        assert visible == {n: b for n, b in clean.items() if not n.startswith(".")}


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_killed_at_random_moments_then_rerun_gives_the_clean_bytes(
    tmp_path: Path, clean: dict[str, bytes]
) -> None:
    out = tmp_path / "hf"
    total = sum(1 for name in clean if name.endswith(".safetensors"))
    moments = sorted(random.Random(20240611).sample(range(total - 6), 3))
    kept: dict[str, tuple[int, int]] = {}
    killed_midway = 0
    for moment in moments:
        code = _kill_after(out, moment)
        killed_midway += code == -signal.SIGKILL
        _looks_right_after_a_kill(out, clean)
        if read_finished(out) is not None:
            break  # this run finished before the kill: nothing left to resume
        record = json.loads((out / RUN_RECORD).read_text())
        for name in record["finished"]:
            kept.setdefault(name, _identity(out / name))
    assert killed_midway >= 2, "the runs finished before they could be killed"
    assert kept, "no shard was finished before the kills"
    if read_finished(out) is None:
        assert convert(out, *ONE_TENSOR_PER_FILE) == 0
    assert every_file(out) == clean
    # Shards recorded as finished were verified and reused, not rewritten.
    assert {name: _identity(out / name) for name in kept} == kept


def test_a_killed_checkpoint2_conversion_resumes_to_the_clean_bytes(tmp_path: Path) -> None:
    source = DATA_CKPT2 / "tiny_fp32_dp2tp2pp2_opt_dedup"
    clean_out, out = tmp_path / "clean", tmp_path / "hf"
    argv = [str(source), "-q", *ONE_TENSOR_PER_FILE]
    assert main(["convert", argv[0], str(clean_out), *argv[1:], "--workers", "1"]) == 0
    clean = every_file(clean_out)
    code = _kill_after(out, 20, source)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    _looks_right_after_a_kill(out, clean)
    kept = {
        name: _identity(out / name)
        for name in json.loads((out / RUN_RECORD).read_text())["finished"]
    }
    assert kept
    assert main(["convert", argv[0], str(out), *argv[1:]]) == 0
    assert every_file(out) == clean
    assert {name: _identity(out / name) for name in kept} == kept


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_a_damaged_finished_folder_is_found_by_verify_and_rewritten_with_overwrite(
    tmp_path: Path, clean: dict[str, bytes], damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    assert convert(out, *ONE_TENSOR_PER_FILE) == 0
    victim = shards(out)[3]
    if damage == "flip a byte":
        data = bytearray(victim.read_bytes())
        data[-5] ^= 0x40
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(victim, victim.stat().st_size - 1)
    else:
        victim.unlink()
    assert main(["verify", str(out)]) == 1
    assert victim.name in capsys.readouterr().out
    assert convert(out, *ONE_TENSOR_PER_FILE) == 2  # a finished folder: not without --overwrite
    assert "holds a finished ms2hf conversion" in capsys.readouterr().err
    assert convert(out, *ONE_TENSOR_PER_FILE, "--overwrite") == 0
    assert every_file(out) == clean


def test_leftover_partial_files_are_removed(tmp_path: Path, clean: dict[str, bytes]) -> None:
    out = tmp_path / "hf"
    assert convert(out, *ONE_TENSOR_PER_FILE) == 0
    for name in (
        ".model-00002-of-00047.safetensors.ms2hf-partial",
        f".{RUN_RECORD}.ms2hf-partial",
        ".model.safetensors.index.json.ms2hf-partial",
        ".model-00003-of-00009.safetensors.ms2hf-partial",  # of another layout
    ):
        (out / name).write_bytes(b"left by a killed run")
    assert convert(out, *ONE_TENSOR_PER_FILE, "--overwrite") == 0
    assert every_file(out) == clean


def test_same_bytes_for_any_worker_count_and_budget(
    tmp_path: Path, clean: dict[str, bytes]
) -> None:
    for workers, budget in (("2", "2MiB"), ("3", "64MiB")):
        out = tmp_path / f"w{workers}"
        assert (
            convert(out, "--max-shard-size", "1", "--memory-budget", budget, "--workers", workers)
            == 0
        )
        assert every_file(out) == clean


def test_a_folder_not_made_by_ms2hf_is_refused_and_overwrite_keeps_user_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text('{"mine": true}')
    assert convert(out) == 2
    err = capsys.readouterr().err
    assert f"{out}: folder is not empty (config.json, notes.txt) and was not made by ms2hf" in err
    assert "--overwrite" in err
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert convert(out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"


def test_a_different_run_is_refused_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, reference = tmp_path / "hf", tmp_path / "reference"
    assert convert(out, "--max-shard-size", "200KB") == 0
    (out / "notes.txt").write_text("mine")  # a user file in an ms2hf folder
    before = every_file(out)
    assert convert(out, "--max-shard-size", "300KB") == 2
    assert "holds a finished ms2hf conversion" in capsys.readouterr().err
    assert every_file(out) == before
    assert convert(out, "--max-shard-size", "300KB", "--overwrite") == 0
    assert convert(reference, "--max-shard-size", "300KB") == 0
    # The earlier run's seven shards are gone (ms2hf named them); the user's file stays.
    assert folder_bytes(out) == {**folder_bytes(reference), "notes.txt": b"mine"}


def test_an_unreadable_run_record_is_not_trusted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean: dict[str, bytes]
) -> None:
    out = tmp_path / "hf"
    assert convert(out, *ONE_TENSOR_PER_FILE) == 0
    (out / RUN_RECORD).write_text("{not json")
    assert convert(out, *ONE_TENSOR_PER_FILE) == 2
    assert "run record .ms2hf-run.json is unreadable" in capsys.readouterr().err
    assert convert(out, *ONE_TENSOR_PER_FILE, "--overwrite") == 0
    assert every_file(out) == clean


def test_two_runs_never_share_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf"
    assert convert(out) == 0
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running ms2hf holds it
        assert convert(out, "--overwrite") == 2
        assert f"{out}: another ms2hf run is writing into this folder" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert convert(out, "--overwrite") == 0
