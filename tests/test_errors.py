"""Every bad input of issue 5 through the command line: exit status 2, one short paragraph naming
the file (and parameter, rank or flag) and what was expected, no traceback unless -v."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ms2hf.cli import main
from ms2hf.io.safetensors_reader import SafetensorsHeader
from ms2hf.io.sources.strategy_proto import ParallelStrategyMap
from tests.conftest import fails, folder_bytes
from tests.conftest import run_cli as run
from tests.edit_checkpoint import (
    NAN_PARAM,
    copy_fixture,
    edit_header,
    edit_tensors,
    join,
    nan_copy,
    rank_file,
    split,
)


def convert_fails(capsys: pytest.CaptureFixture[str], root: Path, *extra: object) -> str:
    """Run ``convert`` on ``root``, require the error contract, and return the message."""
    out = root.parent / "hf"
    line = fails(capsys, "convert", root, out, *extra)  # one paragraph, one line
    assert line.startswith("ms2hf convert: error: ") and len(line) < 500
    assert not out.exists() or not list(out.glob("*.safetensors"))
    return line


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return copy_fixture("tiny_fp32", tmp_path / "train")


# --- rank files ------------------------------------------------------------------------------


def test_truncated_rank_file(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rank_file(tiny, 1)
    os.truncate(path, path.stat().st_size - 100)
    msg = convert_fails(capsys, tiny)
    assert str(path) in msg and "truncated" in msg


def test_header_length_past_end_of_file(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rank_file(tiny, 2)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write((size * 2).to_bytes(8, "little"))
    msg = convert_fails(capsys, tiny)
    assert str(path) in msg and "runs past the end of the file" in msg


@pytest.mark.parametrize(
    ("header", "expected"),
    [(b'{"a": [1, 2', "not valid JSON"), (b"[1, 2, 3]", "not an object")],
)
def test_header_not_json_or_not_an_object(
    tiny: Path, capsys: pytest.CaptureFixture[str], header: bytes, expected: str
) -> None:
    path = rank_file(tiny, 0)
    join(path, header, b"")
    msg = convert_fails(capsys, tiny)
    assert str(path) in msg and expected in msg


def _shift(name: str, by: int) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + by, end + by]

    return edit


@pytest.mark.parametrize(
    ("by", "expected"), [(-4, "overlaps the previous tensor"), (4, "leaves a gap")]
)
def test_offsets_overlapping_or_leaving_gaps(
    tiny: Path, capsys: pytest.CaptureFixture[str], by: int, expected: str
) -> None:
    path = rank_file(tiny, 3)
    edit_header(path, _shift("decoder.final_layernorm.weight", by))
    msg = convert_fails(capsys, tiny)
    assert str(path) in msg and "decoder.final_layernorm.weight" in msg and expected in msg


def test_offsets_out_of_range(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The last tensor made one element longer: consistent in itself, past the end of the file."""
    path = rank_file(tiny, 3)

    def grow_last(header: dict[str, Any]) -> None:
        entries = [v for k, v in header.items() if k != "__metadata__"]
        last = max(entries, key=lambda e: e["data_offsets"])
        begin, end = last["data_offsets"]
        assert last["dtype"] == "I32" and last["shape"] == [1]  # global_step
        last.update(shape=[2], data_offsets=[begin, end + 4])

    edit_header(path, grow_last)
    msg = convert_fails(capsys, tiny)
    assert str(path) in msg and "truncated: the header describes" in msg


def test_unknown_dtype(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rank_file(tiny, 0)
    edit_header(path, lambda h: h["embedding.word_embeddings.weight"].update(dtype="F99"))
    msg = convert_fails(capsys, tiny)
    assert str(path) in msg and "'embedding.word_embeddings.weight'" in msg
    assert "unknown dtype 'F99'" in msg and "expected one of" in msg


def test_shape_times_item_size_not_the_span(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rank_file(tiny, 0)
    edit_header(path, lambda h: h["embedding.word_embeddings.weight"].update(shape=[255, 128]))
    msg = convert_fails(capsys, tiny)
    assert str(path) in msg and "embedding.word_embeddings.weight" in msg
    assert "needs 130560 bytes but data_offsets" in msg


def test_duplicate_tensor_names(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rank_file(tiny, 1)
    header, data = split(path)
    entry = json.dumps(header["global_step"])
    text = json.dumps(header)
    join(path, text[:-1].encode() + f', "global_step": {entry}}}'.encode(), data)
    msg = convert_fails(capsys, tiny)
    assert str(path) in msg and "'global_step' twice" in msg


def test_slice_shapes_differ_between_ranks(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rank_file(tiny, 1)
    name = "decoder.layers.0.mlp.linear_fc2.weight"
    edit_header(path, lambda h: h[name].update(shape=[96, 128]))
    msg = convert_fails(capsys, tiny)
    assert f"{name!r}" in msg and "rank 1" in msg and "rank 0" in msg and str(path) in msg
    assert "[96, 128]" in msg and "[128, 96]" in msg


# --- rank folders and steps ------------------------------------------------------------------


def test_missing_rank_folder(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tiny / "checkpoint" / "rank_2")
    msg = convert_fails(capsys, tiny)
    assert str(tiny / "checkpoint") in msg and "rank_2 are missing" in msg


def test_no_file_for_the_requested_step(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = convert_fails(capsys, tiny, "--step", "2000_1")
    assert "rank_0" in msg and "no file for step 2000_1" in msg and "1000_1" in msg


def test_a_rank_folder_without_the_step(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rank_file(tiny, 3)
    path.rename(path.with_name("qwen3_rank_3-900_1.safetensors"))
    msg = convert_fails(capsys, tiny, "--step", "1000_1")
    assert str(tiny / "checkpoint" / "rank_3") in msg and "no file for step 1000_1" in msg


def test_two_files_match_a_step(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = rank_file(tiny, 1)
    shutil.copy(path, path.with_name("other_rank_1-1000_1.safetensors"))
    msg = convert_fails(capsys, tiny)
    assert str(path.parent) in msg and "2 files match step 1000_1" in msg


# --- strategy files --------------------------------------------------------------------------


def test_strategy_folder_missing(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tiny / "strategy")
    msg = convert_fails(capsys, tiny)
    assert str(tiny / "strategy") in msg and "does not exist" in msg


def test_strategy_folder_empty(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in (tiny / "strategy").iterdir():
        path.unlink()
    msg = convert_fails(capsys, tiny)
    assert str(tiny / "strategy") in msg and "no .ckpt or .json strategy files" in msg


@pytest.mark.parametrize("content", [b"\x00\x01garbage", b"\x0a\xff\xff\xff", b"hello world"])
def test_strategy_file_neither_protobuf_nor_json(
    tiny: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tiny / "strategy" / "ckpt_strategy_rank_1.ckpt"
    path.write_bytes(content)
    msg = convert_fails(capsys, tiny)
    assert str(path) in msg
    assert "neither a protobuf strategy file nor" in msg or "holds no parameter layouts" in msg


def test_pipeline_stages_not_numbered_from_zero(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for rank in (2, 3):
        path = tiny / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt"
        msg = ParallelStrategyMap()
        msg.ParseFromString(path.read_bytes())
        for item in msg.parallel_strategy_item:
            item.parallel_strategys.stage = 2
        path.write_bytes(msg.SerializeToString())
    msg = convert_fails(capsys, tiny)
    assert str(tiny / "strategy") in msg and "stages found are [0, 2]; expected 0..1" in msg


# --- coverage, replicas, model ---------------------------------------------------------------


def test_block_held_by_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_fixture("tiny_bf16_dedup", tmp_path / "train")
    name = "decoder.layers.0.self_attention.linear_proj.weight"
    holder = next(r for r in range(4) if name in split(rank_file(root, r))[0])
    edit_tensors(rank_file(root, holder), lambda t: t.pop(name))
    msg = convert_fails(capsys, root)
    assert f"parameter {name!r}" in msg and "is in no rank file" in msg
    assert f"ranks [{holder}] should hold it, but {rank_file(root, holder)} does not" in msg


def _flip_in(path: Path, name: str, element: int = 3) -> None:
    def edit(tensors: dict[str, np.ndarray]) -> None:
        tensors[name].reshape(-1)[element] += 1

    edit_tensors(path, edit)


def test_replicas_that_disagree(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "decoder.layers.1.input_layernorm.weight"  # replicated on both tensor-parallel ranks
    _flip_in(rank_file(tiny, 1), name)
    assert main(["convert", str(tiny), str(tiny.parent / "unchecked"), "-q"]) == 0
    msg = convert_fails(capsys, tiny, "--check-replicas")
    assert f"parameter {name!r}" in msg and "rank 1" in msg and "rank 0" in msg
    assert str(rank_file(tiny, 1)) in msg and str(rank_file(tiny, 0)) in msg


def test_flags_that_disagree_with_the_shapes(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    yaml = tiny / "train.yaml"
    yaml.write_text("model:\n  model_config:\n    num_layers: 3\n    hidden_size: 128\n")
    msg = convert_fails(capsys, tiny, "--config", yaml)
    assert "train.yaml: model.model_config.num_layers = 3 disagrees" in msg
    assert "num_hidden_layers = 4" in msg


def test_unexpected_keys_for_the_model(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bias = "decoder.layers.0.self_attention.linear_qkv.bias"
    for rank in (0, 1):
        edit_tensors(rank_file(tiny, rank), lambda t: t.update({bias: np.zeros(128, np.float32)}))
    msg = convert_fails(capsys, tiny)
    assert str(tiny / "checkpoint") in msg and "unexpected parameters" in msg and bias in msg


def test_nan_is_a_warning_and_strict_makes_it_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny, name = nan_copy(tmp_path / "train"), NAN_PARAM
    code, err = run(capsys, "convert", tiny, tiny.parent / "warned", "-q", "--dtype", "fp16")
    assert code == 0
    assert "warning: tensor 'model.layers.2.mlp.down_proj.weight'" in err and name in err
    # Already in the source, not made by the fp16 cast: said so, once, and no bf16 advice.
    assert err.count("NaN or inf already in the training checkpoint") == 1
    assert "--dtype bf16" not in err
    msg = convert_fails(capsys, tiny, "--strict")
    assert "model.layers.2.mlp.down_proj.weight" in msg and "--strict" in msg
    out = tiny.parent / "hf"
    assert not (out / "model.safetensors.index.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".ms2hf-partial")]


def test_nan_in_a_parameter_of_several_tensors_names_only_the_tensor_holding_it(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fused QKV weight gives three tensors, made together from it (staged once): only the
    query tensor whose first row holds the NaN is named."""
    name = "decoder.layers.0.self_attention.linear_qkv.weight"

    def poison(tensors: dict[str, np.ndarray]) -> None:
        tensors[name][0, 3] = np.nan

    edit_tensors(rank_file(tiny, 0), poison)
    code, err = run(capsys, "convert", tiny, tiny.parent / "warned", "-q")
    assert code == 0
    assert "warning: tensor 'model.layers.0.self_attn.q_proj.weight'" in err and name in err
    assert "k_proj" not in err and "v_proj" not in err and err.count("warning:") == 1


def test_fp16_overflow_is_found_after_the_cast(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def enlarge(tensors: dict[str, np.ndarray]) -> None:
        tensors["decoder.final_layernorm.weight"][0] = 1e6  # finite in fp32, inf in fp16

    for rank in (2, 3):
        edit_tensors(rank_file(tiny, rank), enlarge)
    code, err = run(capsys, "convert", tiny, tiny.parent / "bf16", "-q")
    assert code == 0 and "NaN or inf" not in err
    code, err = run(capsys, "convert", tiny, tiny.parent / "fp16", "-q", "--dtype", "fp16")
    assert code == 0 and "'model.norm.weight'" in err
    assert "finite values beyond F16's range (largest F16 value: 65504)" in err
    assert "--dtype bf16 keeps the training dtype's range" in err
    assert "already in the training checkpoint" not in err
    msg = convert_fails(capsys, tiny, "--dtype", "fp16", "--strict")
    assert "became inf in the cast to F16" in msg and "--dtype bf16" in msg


# --- paths -----------------------------------------------------------------------------------


def test_non_existent_input_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = convert_fails(capsys, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg


def test_output_folder_under_a_regular_file(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What it proves: an output path whose parent is a file cannot be created, whoever runs it
    (root included), and the error names it."""
    blocker = tiny.parent / "a_file"
    blocker.write_text("")
    code, err = run(capsys, "convert", tiny, blocker / "hf", "-q")
    assert code == 2 and "Traceback" not in err
    assert f"{blocker / 'hf'}: cannot create the output folder" in err


def test_output_path_is_a_file(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tiny.parent / "hf"
    target.write_text("mine")
    code, err = run(capsys, "convert", tiny, target, "-q")
    assert code == 2 and f"{target}: exists and is not a folder" in err
    assert target.read_text() == "mine"


def test_verbose_adds_the_traceback(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tiny / "strategy")
    code, err = run(capsys, "convert", tiny, tiny.parent / "hf", "-v")
    assert code == 2 and "Traceback" in err and "does not exist" in err


# --- output disk full, read-only output (subprocesses) ---------------------------------------

CLI = [sys.executable, "-m", "ms2hf.cli"]


def _no_partial_or_index(listing: list[str]) -> None:
    assert not [n for n in listing if n.endswith(".ms2hf-partial")]
    assert "model.safetensors.index.json" not in listing and "config.json" not in listing


def test_output_disk_full_by_file_size_limit(tiny: Path) -> None:
    """A file size limit makes writes fail as a full disk does (EFBIG instead of ENOSPC): the
    error names the shard, nothing final-named is half written, and a rerun without the limit
    finishes the job."""
    out = tiny.parent / "hf"
    limit = 150_000

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = [*CLI, "convert", str(tiny), str(out), "-q", "--max-shard-size", "200KB"]
    proc = subprocess.run(
        argv, preexec_fn=limited, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert re.search(
        rf"{out}/model-\d{{5}}-of-\d{{5}}\.safetensors: write failed: File too large", line
    )
    assert re.search(r"\d+ of \d+ file\(s\) finished and kept in .*; run the same command", line)
    _no_partial_or_index([p.name for p in out.iterdir()])
    for shard in out.glob("*.safetensors"):
        SafetensorsHeader(shard)  # complete, or it would not have its final name
    assert main(["convert", str(tiny), str(out), "-q", "--max-shard-size", "200KB"]) == 0
    assert (
        main(["convert", str(tiny), str(tiny.parent / "clean"), "-q", "--max-shard-size", "200KB"])
        == 0
    )
    assert folder_bytes(out) == folder_bytes(tiny.parent / "clean")


def _private_mount(
    options: str, target: Path, command: list[str]
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with a tmpfs mounted on ``target`` in a private mount namespace (gone
    when it exits; nothing leaks into the host), then list the folder from inside."""
    script = (
        'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; shift 2; "$@"; rc=$?; ls -a "$MNT"; exit $rc'
    )
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            options,
            str(target),
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "MNT": str(target)},
    )


def _can_mount(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    (tmp_path / "probe").mkdir()
    return _private_mount("size=64k", tmp_path / "probe", ["true"]).returncode == 0


def test_output_disk_full_on_a_small_tmpfs(tiny: Path) -> None:
    """A real ENOSPC, where mounting is allowed."""
    if not _can_mount(tiny.parent):
        pytest.skip("cannot mount a tmpfs here (needs unshare and mount rights)")
    out = tiny.parent / "hf"
    out.mkdir()
    proc = _private_mount(
        "size=300k", out, [*CLI, "convert", str(tiny), str(out), "-q", "--max-shard-size", "200KB"]
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    # The shard being written, or the run record updated after one: either way, named.
    assert re.search(rf"{out}/[^ ]+: (write failed|cannot write): No space left on device", line)
    assert "run the same command again to resume" in line
    _no_partial_or_index(proc.stdout.split())


def test_unwritable_output_folder(tiny: Path) -> None:
    """Permission bits do not stop root, so as root the folder is a read-only tmpfs (which stops
    everyone); as another user it is a folder without write permission."""
    out = tiny.parent / "hf"
    out.mkdir()
    argv = [*CLI, "convert", str(tiny), str(out), "-q"]
    if os.geteuid() != 0:
        out.chmod(0o555)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    elif _can_mount(tiny.parent):
        proc = _private_mount("ro", out, argv)
    else:
        pytest.skip("running as root without mount rights: no way to make a folder unwritable")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"ms2hf convert: error: {out}: output folder is not writable"
