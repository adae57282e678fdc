"""The command line as people type it, and the API as scripts call it (issue 12, items 7 and 8):
options anywhere, -v/-q before the command, -v adds detail, a closed pipe ends quietly, worker
counts and memory budgets that cannot be met are cut or refused, and every bad option or input
given to the Python API is an ``Ms2hfError``."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ms2hf
from ms2hf.cli import SIGPIPE_STATUS, main
from ms2hf.pipeline.engine.budget import default_workers
from tests.conftest import DATA, assert_matches_ground_truth
from tests.conftest import run_cli as run

TINY = DATA / "tiny_fp32"
CLI = [sys.executable, "-m", "ms2hf.cli"]


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", TINY, "--dtype", "fp32", "{out}"],
        ["convert", "--dtype", "fp32", TINY, "{out}"],
        ["-q", "convert", TINY, "{out}", "--dtype=fp32"],
        ["convert", "--checkpoint-dir", TINY / "checkpoint", "{out}", "--dtype", "fp32",
         "--strategy-dir", TINY / "strategy"],
    ],
)  # fmt: skip
def test_options_anywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list) -> None:
    out = tmp_path / "hf"
    code, err = run(capsys, *(out if a == "{out}" else a for a in argv))
    assert code == 0, err
    assert_matches_ground_truth(out, TINY, "fp32")


def test_verbosity_before_the_command_and_v_adds_detail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, quiet = run(capsys, "-q", "convert", TINY, tmp_path / "q")
    assert code == 0 and quiet == ""
    code, normal = run(capsys, "convert", TINY, tmp_path / "n")
    code, verbose = run(capsys, "-v", "convert", TINY, tmp_path / "v")
    assert code == 0
    assert "model.safetensors: 47 tensors" in verbose and "model.safetensors: 47" not in normal
    assert len(verbose.splitlines()) > len(normal.splitlines())
    assert "source file(s)" in verbose


def test_a_reader_that_goes_away_ends_the_run_quietly() -> None:
    read, write = os.pipe()
    os.close(read)  # as `| head` does once it has its lines
    try:
        proc = subprocess.run(
            [*CLI, "inspect", str(TINY)], stdout=write, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(write)
    assert proc.returncode == SIGPIPE_STATUS
    assert proc.stderr == b""


def test_more_workers_than_cpus_are_capped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cpus = default_workers()
    code, err = run(capsys, "convert", TINY, tmp_path / "hf", "--workers", cpus + 7)
    assert code == 0
    assert f"note: --workers {cpus + 7}: this process may use {cpus} CPU(s); using {cpus}" in err
    assert f"{cpus} worker(s)" in err


def test_a_small_memory_budget_is_met_with_fewer_workers_or_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if default_workers() < 2:
        pytest.skip("one CPU: there is no second worker to cut")
    code, err = run(capsys, "convert", TINY, tmp_path / "hf", "--memory-budget", "1MiB")
    assert code == 0
    assert "--memory-budget 1.0 MiB holds 1 worker band buffer(s)" in err
    assert "budget 1.0 MiB, 1 worker(s)" in err
    code, err = run(capsys, "convert", TINY, tmp_path / "tiny", "--memory-budget", "64KiB")
    assert code == 2 and "is less than one worker's band buffer (1.0 MiB)" in err
    assert not (tmp_path / "tiny").exists() or not list((tmp_path / "tiny").iterdir())


@pytest.mark.parametrize("option", ["--max-shard-size", "--memory-budget"])
def test_zero_sizes_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    with pytest.raises(SystemExit) as exit_status:  # argparse's own usage error
        main(["convert", str(TINY), str(tmp_path / "hf"), option, "0"])
    err = capsys.readouterr().err
    assert exit_status.value.code == 2 and f"argument {option}: '0' is not a positive size" in err
    assert not (tmp_path / "hf").exists()


# --- the Python API: every error an Ms2hfError -----------------------------------------------

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from(["bf16", "fp16", "5GB", "0", "-1MB", "fold", "1000_1", "9_9", str(TINY)]),
)
OPTIONS = [f.name for f in dataclasses.fields(ms2hf.ConvertOptions) if f.name != "record_reads"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=st.dictionaries(st.sampled_from(OPTIONS), VALUES, max_size=3))
def test_inspect_with_any_options_raises_only_ms2hf_errors(options: dict[str, Any]) -> None:
    try:
        ms2hf.inspect(TINY, **options)
    except ms2hf.Ms2hfError as e:
        assert str(e)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "bf17"}, "option dtype='bf17': expected one of bf16, fp16, fp32, source"),
        ({"workers": 0}, "option workers=0: expected a positive whole number"),
        ({"workers": "2"}, "option workers='2'"),
        ({"max_shard_size": 0}, "option max_shard_size=0"),
        ({"memory_budget": "1KB"}, "--memory-budget 1000 B is less than one worker's band"),
        ({"config": 3}, "option config=3: expected a path"),
        ({"overwrite": "yes"}, "option overwrite='yes': expected True or False"),
        ({"routing_scale": "double"}, "option routing_scale='double'"),
        ({"given": {"rope_theta": -1}}, "given: rope_theta = -1: must be above zero"),
        ({"tokenizer_dir": "/nonexistent"}, "--tokenizer-dir /nonexistent: not a folder"),
        ({"step": 1000}, "option step=1000"),
    ],
)
def test_convert_with_a_bad_option_raises_an_ms2hf_error(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ms2hf.Ms2hfError) as caught:
        ms2hf.convert(TINY, tmp_path / "hf", progress=False, **options)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "where",
    ["missing", "a file", "empty folder", "checkpoint only", "hf folder", "unreadable yaml"],
)
def test_convert_with_a_bad_input_raises_an_ms2hf_error(tmp_path: Path, where: str) -> None:
    root, config = tmp_path / "in", None
    if where == "a file":
        root.write_text("not a folder")
    elif where in ("empty folder", "checkpoint only"):
        root.mkdir()
        if where == "checkpoint only":
            (root / "checkpoint").mkdir()
    elif where == "hf folder":
        ms2hf.convert(TINY, root, progress=False)
    elif where == "unreadable yaml":
        root = TINY
        config = tmp_path / "train.yaml"
        config.mkdir()  # a folder where a file is expected
    with pytest.raises(ms2hf.Ms2hfError):
        ms2hf.convert(root, tmp_path / "out", progress=False, config=config)


def test_convert_into_a_bad_place_raises_an_ms2hf_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "hf"):
        with pytest.raises(ms2hf.Ms2hfError):
            ms2hf.convert(TINY, out, progress=False)
    with pytest.raises(ms2hf.Ms2hfError, match=r"expected a ms2hf\.ConvertOptions"):
        ms2hf.convert(TINY, tmp_path / "x", {"dtype": "bf16"})  # type: ignore[arg-type]
    assert main(["convert", str(TINY), str(tmp_path / "ok"), "-q"]) == 0
