"""``--part I/N``: N jobs write their shares of one run into one folder at the same time; the same
command without ``--part`` checks what they wrote, writes what is missing and finishes, to the
bytes of a run on one host (docs/hf-output.md#parts-and-hosts)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ms2hf.cli import main
from ms2hf.commands.merge import MergeOptions, merge
from ms2hf.io.hf_output import HF_INDEX
from ms2hf.pipeline.parts import split
from ms2hf.pipeline.plan import PlannedFile
from tests.conftest import DATA, every_file, examples

SOURCE = DATA / "moe_fp32_dp2tp2pp2_ep2"
SHARDS = ["--max-shard-size", "60KB"]
"""About a dozen shards of a few dozen tensors each."""


def identities(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "hf"
    assert main(["convert", str(SOURCE), str(out), "-q", *SHARDS]) == 0
    assert len(list(out.glob("*.safetensors"))) >= 8
    return every_file(out)


def _part(out: Path, part: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "ms2hf.cli", "convert", str(SOURCE), str(out), "-q", *SHARDS]
    return subprocess.Popen([*argv, "--part", part], stderr=subprocess.PIPE)


def test_parts_run_at_once_then_the_finishing_run_gives_the_local_bytes(
    tmp_path: Path, local: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    jobs = [_part(out, f"{i}/3") for i in (1, 2, 3)]
    errors = [job.communicate()[1].decode() for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], errors
    written = identities(out)
    assert sorted(written) == sorted(n for n in local if n.endswith(".safetensors"))
    assert not (out / HF_INDEX).exists() and not (out / "config.json").exists()
    assert main(["verify", str(out)]) == 1
    assert "parts of a run not finished yet" in capsys.readouterr().out
    assert main(["convert", str(SOURCE), str(out), "-q", *SHARDS]) == 0
    assert every_file(out) == local
    assert identities(out) == written  # the parts' files were checked and kept, not rewritten


def test_the_finishing_run_writes_what_parts_did_not_and_replaces_a_damaged_file(
    tmp_path: Path, local: dict[str, bytes]
) -> None:
    out = tmp_path / "hf"
    for part in ("1/4", "3/4"):
        assert main(["convert", str(SOURCE), str(out), "-q", *SHARDS, "--part", part]) == 0
    damaged = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert main(["convert", str(SOURCE), str(out), "-q", *SHARDS]) == 0
    assert every_file(out) == local


def test_each_file_is_in_one_part_and_every_part_writes_only_its_own(
    tmp_path: Path, local: dict[str, bytes]
) -> None:
    out = tmp_path / "hf"
    seen: dict[str, str] = {}
    for i in (1, 2, 3):
        before = set(identities(out)) if out.exists() else set()
        assert main(["convert", str(SOURCE), str(out), "-q", *SHARDS, "--part", f"{i}/3"]) == 0
        new = set(identities(out)) - before
        assert new, f"part {i}/3 wrote nothing"
        for name in new:
            seen[name] = f"{i}/3"
    assert sorted(seen) == sorted(n for n in local if n.endswith(".safetensors"))
    parts = [seen[n] for n in sorted(seen)]
    assert parts == sorted(parts)  # consecutive files per part


def test_parts_share_the_folder_lock_and_a_whole_run_does_not(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # as a running part holds it
        assert main(["convert", str(SOURCE), str(out), "-q", *SHARDS, "--part", "1/2"]) == 0
        assert main(["convert", str(SOURCE), str(out), "-q", *SHARDS]) == 2
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a run without --part holds it
        assert main(["convert", str(SOURCE), str(out), "-q", *SHARDS, "--part", "2/2"]) == 2
    finally:
        os.close(fd)


@pytest.mark.parametrize("text", ["0/3", "4/3", "2", "a/b", "1/0"])
def test_a_bad_part_is_refused(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(SOURCE), str(tmp_path / "hf"), "--part", text])
    assert exit_.value.code == 2
    assert "--part" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_part_and_ray_are_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["convert", str(SOURCE), str(tmp_path / "hf"), "--part", "1/2", "--ray", "auto"])
    assert "not allowed with argument" in capsys.readouterr().err


@settings(max_examples=examples(200), deadline=None)
@given(sizes=st.lists(st.integers(1, 10**6), min_size=1, max_size=40), count=st.integers(1, 12))
def test_the_split_is_consecutive_and_even_within_one_file(sizes: list[int], count: int) -> None:
    parts = _split(sizes, count)
    assert parts == sorted(parts) and all(1 <= p <= count for p in parts)
    total = sum(sizes)
    for part in range(1, count + 1):
        share = sum(s for s, p in zip(sizes, parts) if p == part)
        assert abs(share - total / count) <= max(sizes), (part, share, total / count)


def _split(sizes: list[int], count: int) -> list[int]:
    """``split`` on files of these sizes (a file's size is what ``split`` reads of it)."""

    class Sized(PlannedFile):
        @property
        def nbytes(self) -> int:
            return sizes[int(self.name)]

    return split([Sized(str(i), ()) for i in range(len(sizes))], count)


def test_merge_in_parts_gives_the_unified_folder_of_one_run(tmp_path: Path) -> None:
    """Parts are the run's, whatever it writes: a unified folder, whose record stays complete."""
    checkpoint, strategy = SOURCE / "checkpoint", SOURCE / "strategy"
    whole = merge(checkpoint, strategy, tmp_path / "whole", MergeOptions(part_size=100_000))
    for part in ("1/3", "3/3", "2/3"):
        options = MergeOptions(part_size=100_000, part=part)  # type: ignore[arg-type]
        merge(checkpoint, strategy, tmp_path / "parts", options)
    done = merge(checkpoint, strategy, tmp_path / "parts", MergeOptions(part_size=100_000))
    assert len(whole.parts) >= 3
    assert every_file(done.output_dir) == every_file(whole.output_dir)
