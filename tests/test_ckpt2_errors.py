"""Every bad Checkpoint 2.0 input of ``docs/checkpoint2.md#10-what-a-reader-checks`` through the
command line: exit status 2, one line naming the file, the parameter and what was expected, and
no output file left looking finished."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA_CKPT2, fails

FIXTURE = DATA_CKPT2 / "tiny_tied_fp32_tp2pp2_dedup"
ITERATION = "iteration_00001000"
QKV = "decoder.layers.0.self_attention.linear_qkv.weight"
KEY0 = f"('{QKV}', (0,))"
FILE0 = "qwen3-model-0000000-0000004.safetensors"

Meta = dict[str, Any]


@pytest.fixture
def save(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    shutil.copytree(FIXTURE / "checkpoint", root / "checkpoint")
    return root


def folder(root: Path) -> Path:
    return root / "checkpoint" / ITERATION


def convert_fails(capsys: pytest.CaptureFixture[str], root: Path, *names: str) -> str:
    """``convert`` refuses ``root`` with one line naming each of ``names``; nothing written."""
    out = root.parent / "hf"
    line = fails(capsys, "convert", root, out)
    assert line.startswith("ms2hf convert: error: ") and len(line) < 600, line
    assert not out.exists() or not list(out.glob("*.safetensors"))
    for name in names:
        assert name in line, (name, line)
    return line


def edit_metadata(root: Path, edit: Callable[[Meta], object]) -> Path:
    path = folder(root) / "metadata.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, separators=(",", ":")))
    return path


def entry(meta: Meta, name: str = QKV) -> Meta:
    result: Meta = meta["state_dict_metadata"][name]
    return result


def record(meta: Meta, key: str = KEY0) -> Meta:
    result: Meta = meta["storage_data"][key][0]
    return result


METADATA_CASES: dict[str, tuple[Callable[[Meta], object], str]] = {
    "storage key not a literal": (
        lambda m: m["storage_data"].update({"x(": m["storage_data"].pop(KEY0)}),
        "storage_data key 'x(' is not of the form ('<name>', (<slice id>,))",
    ),
    "storage key of the wrong shape": (
        lambda m: m["storage_data"].update({f"('{QKV}', 0)": m["storage_data"].pop(KEY0)}),
        "is not of the form",
    ),
    "storage key for no parameter": (
        lambda m: m["storage_data"].update({"('nope', (0,))": [record(m)]}),
        "storage_data ('nope', (0,)): no such parameter in state_dict_metadata",
    ),
    "file_name with a path": (
        lambda m: record(m).update(file_name=f"../{ITERATION}/{FILE0}"),
        "is not a plain file name in the iteration folder",
    ),
    "file_name absolute": (
        lambda m: record(m).update(file_name="/etc/passwd"),
        "file_name '/etc/passwd' is not a plain file name",
    ),
    "file_name dot-dot": (lambda m: record(m).update(file_name=".."), "not a plain file name"),
    "file_name neither model nor optimizer": (
        lambda m: record(m).update(file_name="weights.safetensors"),
        "is neither a model file",
    ),
    "record naming a missing file": (
        lambda m: record(m).update(file_name="qwen3-model-0000009-0000009.safetensors"),
        f"parameter '{QKV}' slice 0: file qwen3-model-0000009-0000009.safetensors is missing",
    ),
    "file without the tensor": (
        lambda m: record(m).update(file_name="qwen3-model-0000003-0000004.safetensors"),
        f"qwen3-model-0000003-0000004.safetensors: holds no tensor '{QKV}'",
    ),
    "dtype disagrees": (
        lambda m: entry(m)["properties"].update(dtype="BFloat16"),
        f"parameter '{QKV}' slice 0 is stored as F32, metadata.json says BFloat16",
    ),
    "dtype unknown": (
        lambda m: entry(m)["properties"].update(dtype="Float99"),
        "properties.dtype 'Float99' is not one of Float32",
    ),
    "shape disagrees": (
        lambda m: (
            entry(m).update(global_shape=[256, 64])
            or [c.update(local_shape=[128, 64]) for c in entry(m)["chunk"]]
        ),
        "has shape [128, 128], expected the slice [128, 64] or the whole [256, 64]",
    ),
    "chunks overlap": (
        lambda m: entry(m)["chunk"][1].update(global_offset=[0]),
        f"parameter '{QKV}': slice id 0 listed twice",
    ),
    "chunks leave a gap": (
        lambda m: entry(m)["chunk"].pop(),
        f"parameter '{QKV}': chunks do not tile [256, 128]: slice id(s) [1] missing",
    ),
    "slice id out of range": (
        lambda m: entry(m)["chunk"][1].update(global_offset=[2]),
        "slice id 2 out of range 0..1",
    ),
    "local_shape wrong": (
        lambda m: entry(m)["chunk"][0].update(local_shape=[64, 128]),
        "chunk 0 local_shape [64, 128] != [128, 128]",
    ),
    "axis_fragmentations do not divide": (
        lambda m: entry(m).update(axis_fragmentations=[3, 1]),
        "dim 0 of global_shape [256, 128] is not divisible by 3",
    ),
    "axis_fragmentations do not fit": (
        lambda m: entry(m).update(axis_fragmentations=[2, 1, 2]),
        "axis_fragmentations [2, 1, 2] does not fit global_shape [256, 128]",
    ),
    "a parameter with no storage record": (
        lambda m: [m["storage_data"].pop(f"('{QKV}', ({i},))") for i in (0, 1)],
        f"parameter '{QKV}': slice 0 has no storage record",
    ),
    "a slice with no storage record": (
        lambda m: m["storage_data"].pop(f"('{QKV}', (1,))"),
        f"parameter '{QKV}': slice 1 has no storage record",
    ),
    "interleaved layout": (
        lambda m: entry(m)["layout"].update(interleaved_parallel=True),
        "interleaved_parallel layouts are not supported",
    ),
    "stored in model and optimizer files": (
        lambda m: record(m).update(file_name="qwen3-opt-0000000-0000004.safetensors"),
        f"parameter '{QKV}': stored in both model and optimizer files",
    ),
    "a weight stored only in optimizer files": (
        lambda m: [
            record(m, f"('{QKV}', ({i},))").update(
                file_name="qwen3-opt-0000000-0000004.safetensors"
            )
            for i in (0, 1)
        ],
        f"parameter '{QKV}': stored only in optimizer files",
    ),
    "no top-level keys": (lambda m: m.pop("storage_data"), "expected a JSON object with"),
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_bad_metadata(case: str, save: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit, expected = METADATA_CASES[case]
    path = edit_metadata(save, edit)
    msg = convert_fails(capsys, save, expected)
    assert str(path) in msg or str(folder(save)) in msg


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "not json at all", "not valid JSON"),
        (lambda text: text[:1] + '"storage_data":{},' + text[1:], "names 'storage_data' twice"),
    ],
    ids=["truncated", "not JSON", "duplicate key"],
)
def test_metadata_unreadable(
    damage: Callable[[str], str], expected: str, save: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = folder(save) / "metadata.json"
    path.write_text(damage(path.read_text()))
    convert_fails(capsys, save, str(path), expected)


def test_metadata_missing(save: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder(save) / "metadata.json").unlink()
    convert_fails(capsys, save, str(folder(save)), "has no metadata.json", "one-card save")


def test_a_truncated_model_file(save: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = folder(save) / FILE0
    os.truncate(path, path.stat().st_size - 100)
    convert_fails(capsys, save, str(path), "truncated")


def test_slices_and_whole_tensors_mixed(save: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One file holding the whole parameter where another holds a slice of it."""
    from ms2hf.io.safetensors_writer import save_file
    from tests.conftest import load_tensors
    from tests.oracle.ckpt2 import reassemble

    whole = reassemble(folder(save))[QKV]
    path = folder(save) / FILE0
    tensors = dict(load_tensors(path))
    tensors[QKV] = whole
    save_file(tensors, path, {"format": "ms"}, dict.fromkeys(tensors, "F32"))
    convert_fails(capsys, save, str(folder(save)), FILE0, QKV, "one parameter is stored one way")


def test_a_tracker_naming_a_missing_iteration(
    save: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (save / "checkpoint" / "latest_checkpointed_iteration.txt").write_text("2000")
    convert_fails(capsys, save, "names iteration 2000, but iteration_00002000 is missing")
