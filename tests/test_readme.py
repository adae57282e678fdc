"""Every command of the README runs as written on a fresh clone (issue 12, item 9): its shell
blocks (but installing, activating and the test run itself) and its Python block, in order, from
the repository's folder, with ``/tmp/ms2hf`` moved into the test's own folder."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ms2hf.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SETUP = ("pip install", "python3 -m venv", "bin/activate", "pytest")
"""Lines a user runs once to set up, not commands of the tool (they need the network)."""


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def shell_lines() -> list[str]:
    return [
        line
        for block in blocks("bash")
        for line in block.replace("\\\n", " ").splitlines()
        if line.strip() and not any(s in line for s in SETUP)
    ]


def test_the_readme_has_commands_using_the_fixtures() -> None:
    script = "\n".join(shell_lines())
    assert script.count("ms2hf ") >= 12 and "tests/data/" in script
    assert not re.search(r"\b(output|hf_model|train_qwen3\.yaml)/", script)  # no placeholders


def test_every_readme_command_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ms2hf`` lines run in this process (the same argv, without an interpreter's start-up
    each); the other lines (mkdir, cp, echo) in a shell."""
    scratch = tmp_path / "ms2hf"
    monkeypatch.chdir(ROOT)
    for line in shell_lines():
        line = line.replace("/tmp/ms2hf", str(scratch))
        if line.startswith("ms2hf "):
            assert main(shlex.split(line, comments=True)[1:]) == 0, capsys.readouterr().err[-3000:]
        else:
            subprocess.run(["bash", "-ec", line], check=True)
    assert "Traceback" not in capsys.readouterr().err
    for folder in ("hf", "hf3", "mymodel", "settled", "moe", "hf_model"):
        assert (scratch / folder / "model.safetensors.index.json").is_file(), folder
    (python,) = blocks("python")
    proc = subprocess.run(
        [sys.executable, "-c", python.replace("/tmp/ms2hf", str(scratch))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 47 tensors" in proc.stdout


def test_memcap_is_found_beside_the_repository_or_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m benchmarks.run`` finds ``memcap`` by itself: ``../shared/tools/memcap`` from
    the repository, else the PATH; without it the memory runs are skipped with a note."""
    from benchmarks import measure

    assert ROOT.parent / "shared" / "tools" / "memcap" == measure.MEMCAP_BESIDE
    monkeypatch.setattr(measure, "MEMCAP_BESIDE", tmp_path / "nowhere" / "memcap")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert measure.find_memcap() == tmp_path / "nowhere" / "memcap"  # named when missing
    (tmp_path / "memcap").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "memcap").chmod(0o755)
    assert measure.find_memcap() == tmp_path / "memcap"


@pytest.mark.parametrize("command", ["convert", "inspect", "verify", "merge", "reverse", "demo"])
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as status:
        main([command, "--help"])
    assert status.value.code == 0 and f"usage: ms2hf {command}" in capsys.readouterr().out


def test_the_readme_test_command_is_what_ci_runs() -> None:
    """The README's second set-up command is ``.ci/run``'s, verbatim: what a reader runs is
    what CI runs."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.startswith("python3 -m venv .venv && ") and "pytest" in ci
    assert ci in README
