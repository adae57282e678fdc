"""The Checkpoint 2.0 oracle against the four genuine fixtures in ``tests/data-ckpt2``.

Each fixture's parameters, put back together by :mod:`tests.oracle.ckpt2` from ``metadata.json``
and the ``-model-`` files, and pushed through the Hugging Face mapping, equal the fixture's ground
truth bit for bit. The fixtures are the same runs as the legacy ones in ``tests/data`` and their
ground truths are byte-identical files (checked below). The oracle's strict checks are exercised
on tampered copies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CKPT2_TWINS, DATA_CKPT2, assert_same_tensors
from tests.conftest import DATA as LEGACY
from tests.oracle.ckpt2 import (
    Ckpt2Error,
    parse_storage_key,
    reassemble,
    select_iteration,
)
from tests.oracle.files import read_tensors
from tests.oracle.qwen3 import to_hf


@pytest.mark.parametrize("name", sorted(CKPT2_TWINS))
def test_reassembled_model_matches_ground_truth(name: str) -> None:
    fixture = DATA_CKPT2 / name
    folder = select_iteration(fixture / "checkpoint")
    assert folder.name == "iteration_00001000"
    truth = read_tensors(fixture / "ground_truth" / "hf_model.safetensors")
    assert_same_tensors(to_hf(reassemble(folder)), truth)


@pytest.mark.parametrize("name", sorted(CKPT2_TWINS))
def test_ground_truth_is_the_legacy_runs(name: str) -> None:
    """Same run, same weights: the ground-truth files equal the legacy fixture's byte for byte."""
    for f in ("hf_model.safetensors", "config.json"):
        a = (DATA_CKPT2 / name / "ground_truth" / f).read_bytes()
        assert a == (LEGACY / CKPT2_TWINS[name] / "ground_truth" / f).read_bytes(), f


@pytest.mark.parametrize("name", sorted(CKPT2_TWINS))
def test_model_files_alone_suffice(name: str, tmp_path: Path) -> None:
    """Users often copy only the -model- files: the optimizer files are never needed."""
    src = select_iteration(DATA_CKPT2 / name / "checkpoint")
    dst = tmp_path / "iteration_00001000"
    dst.mkdir()
    for p in src.iterdir():
        if "-opt-" not in p.name:
            shutil.copy(p, dst / p.name)
    got = reassemble(dst)
    want = reassemble(src)
    assert sorted(got) == sorted(want)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_normal_and_deduplicated_saves_agree() -> None:
    """The same run saved both ways describes and holds the same tensors (optimizer states too)."""
    a = reassemble(select_iteration(DATA_CKPT2 / "tiny_fp32_dp2tp2pp2_opt" / "checkpoint"), "all")
    b = reassemble(
        select_iteration(DATA_CKPT2 / "tiny_fp32_dp2tp2pp2_opt_dedup" / "checkpoint"), "all"
    )
    assert sorted(a) == sorted(b) and len(a) == 105
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_moe_fi_accu_is_described_and_stored() -> None:
    folder = select_iteration(DATA_CKPT2 / "moe_fp32_dp2tp2pp2_ep2_dedup" / "checkpoint")
    mc = reassemble(folder)
    fi = [k for k in mc if k.endswith("router.fi_accu")]
    assert len(fi) == 4 and all(mc[k].shape == (8,) and mc[k].dtype == np.float32 for k in fi)
    meta = json.loads((folder / "metadata.json").read_text())
    assert not any(
        k.startswith(("adam_m.", "adam_v.")) and "fi_accu" in k for k in meta["state_dict_metadata"]
    )


def test_tied_fixture_has_no_head_and_one_embedding() -> None:
    folder = select_iteration(DATA_CKPT2 / "tiny_tied_fp32_tp2pp2_dedup" / "checkpoint")
    meta = json.loads((folder / "metadata.json").read_text())
    sdm = meta["state_dict_metadata"]
    assert "output_layer.weight" not in sdm
    assert sdm["embedding.word_embeddings.weight"]["layout"]["rank_list"] == [0, 1]


def test_storage_key_is_a_python_literal() -> None:
    assert parse_storage_key("('a.b', (12,))") == ("a.b", 12)
    assert parse_storage_key('("it\'s", (0,))') == ("it's", 0)
    for bad in [
        "('a', 3)",
        "('a', (1, 2))",
        "['a', (1,)]",
        "('a', (True,))",
        "__import__('os')",
        "('a', (1,)",
    ]:
        with pytest.raises(Ckpt2Error):
            parse_storage_key(bad)


# --------------------------------------------------------------------------- iteration choice


def _tree(tmp_path: Path, iterations: list[int], tracker: str | None) -> Path:
    root = tmp_path / "checkpoint"
    for i in iterations:
        (root / f"iteration_{i:08d}").mkdir(parents=True)
    root.mkdir(exist_ok=True)
    if tracker is not None:
        (root / "latest_checkpointed_iteration.txt").write_text(tracker)
    return root


def test_iteration_choice(tmp_path: Path) -> None:
    root = _tree(tmp_path / "a", [500, 1000], "1000")
    assert select_iteration(root).name == "iteration_00001000"
    assert select_iteration(root, 500).name == "iteration_00000500"
    with pytest.raises(Ckpt2Error, match="newer than the tracker"):
        select_iteration(_tree(tmp_path / "b", [500, 1000], "500"))
    assert (
        select_iteration(_tree(tmp_path / "c", [500, 1000], "500"), 1000).name
        == "iteration_00001000"
    )
    with pytest.raises(Ckpt2Error, match=r"no latest_checkpointed_iteration\.txt"):
        select_iteration(_tree(tmp_path / "d", [1000], None))
    with pytest.raises(Ckpt2Error, match="is missing"):
        select_iteration(_tree(tmp_path / "e", [500], "1000"))
    with pytest.raises(Ckpt2Error, match="does not hold an iteration number"):
        select_iteration(_tree(tmp_path / "f", [500], "latest"))


# --------------------------------------------------------------------------- bad metadata


def _tampered(tmp_path: Path, edit) -> Path:
    src = select_iteration(DATA_CKPT2 / "tiny_tied_fp32_tp2pp2_dedup" / "checkpoint")
    dst = tmp_path / "iteration_00001000"
    shutil.copytree(src, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    edit(meta, dst)
    (dst / "metadata.json").write_text(json.dumps(meta, separators=(",", ":")))
    return dst


QKV = "decoder.layers.0.self_attention.linear_qkv.weight"
KEY0 = f"('{QKV}', (0,))"


def _set_file(meta: dict, dst: Path, name: str) -> None:
    meta["storage_data"][KEY0][0]["file_name"] = name


BAD = {
    "path separator": (
        lambda m, d: _set_file(
            m, d, "../iteration_00001000/qwen3-model-0000000-0000004.safetensors"
        ),
        "not a plain file name",
    ),
    "absolute path": (lambda m, d: _set_file(m, d, "/etc/passwd"), "not a plain file name"),
    "dot-dot": (lambda m, d: _set_file(m, d, ".."), "not a plain file name"),
    "missing file": (
        lambda m, d: _set_file(m, d, "qwen3-model-0000009-0000009.safetensors"),
        "is missing",
    ),
    "slice id out of range": (
        lambda m, d: m["state_dict_metadata"][QKV]["chunk"][1]["global_offset"].__setitem__(0, 2),
        "out of range",
    ),
    "slice listed twice": (
        lambda m, d: m["state_dict_metadata"][QKV]["chunk"][1]["global_offset"].__setitem__(0, 0),
        "listed twice",
    ),
    "chunk missing": (lambda m, d: m["state_dict_metadata"][QKV]["chunk"].pop(), "do not tile"),
    "indivisible grid": (
        lambda m, d: m["state_dict_metadata"][QKV].__setitem__("axis_fragmentations", [3, 1]),
        "not divisible",
    ),
    "grid longer than shape": (
        lambda m, d: m["state_dict_metadata"][QKV].__setitem__("axis_fragmentations", [2, 1, 2]),
        "does not fit",
    ),
    "local_shape wrong": (
        lambda m, d: m["state_dict_metadata"][QKV]["chunk"][0].__setitem__(
            "local_shape", [64, 128]
        ),
        "local_shape",
    ),
    "global_shape wrong": (
        lambda m, d: (
            m["state_dict_metadata"][QKV].__setitem__("global_shape", [128, 128])
            or [
                c.__setitem__("local_shape", [64, 128])
                for c in m["state_dict_metadata"][QKV]["chunk"]
            ]
        ),
        "whole-tensor copies of the parameter differ",
    ),
    "stored shape neither slice nor whole": (
        lambda m, d: (
            m["state_dict_metadata"][QKV].update(global_shape=[256, 64], axis_fragmentations=[2, 1])
            or [
                c.__setitem__("local_shape", [128, 64])
                for c in m["state_dict_metadata"][QKV]["chunk"]
            ]
        ),
        "holds shape",
    ),
    "interleaved layout": (
        lambda m, d: m["state_dict_metadata"][QKV]["layout"].__setitem__(
            "interleaved_parallel", True
        ),
        "interleaved",
    ),
    "dtype wrong": (
        lambda m, d: m["state_dict_metadata"][QKV]["properties"].__setitem__("dtype", "BFloat16"),
        "metadata says BFloat16",
    ),
    "no storage record": (lambda m, d: m["storage_data"].pop(KEY0), "has no storage record"),
    "record for unknown parameter": (
        lambda m, d: m["storage_data"].__setitem__("('nope', (0,))", [{}]),
        "no such parameter",
    ),
    "key not a literal": (
        lambda m, d: m["storage_data"].__setitem__(m["storage_data"].pop(KEY0) and "x(", []),
        "not a Python literal",
    ),
    "tensor absent from file": (
        lambda m, d: _set_file(m, d, "qwen3-model-0000002-0000004.safetensors"),
        "holds no tensor",
    ),
    "replicas differ": (
        lambda m, d: m["storage_data"][KEY0].append(
            {
                "file_name": "qwen3-model-0000001-0000004.safetensors",
                "storage_rank": 1,
                "rank_group": [0, 1],
            }
        ),
        "replicas differ",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_metadata_is_refused(case: str, tmp_path: Path) -> None:
    edit, message = BAD[case]
    folder = _tampered(tmp_path, edit)
    with pytest.raises(Ckpt2Error, match=message):
        reassemble(folder)


def test_whole_tensor_files_are_read_as_their_slices(tmp_path: Path) -> None:
    """A normal save without pipeline parallelism gathers whole tensors into every file while
    metadata.json still describes slices; the slice's region of the whole tensor is taken."""
    src = select_iteration(DATA_CKPT2 / "tiny_tied_fp32_tp2pp2_dedup" / "checkpoint")
    want = reassemble(src)
    dst = tmp_path / "iteration_00001000"
    shutil.copytree(src, dst)
    from safetensors.numpy import save_file

    for p in dst.glob("*-model-*.safetensors"):
        names = read_tensors(p)
        save_file({k: np.ascontiguousarray(want[k]) for k in names}, p, metadata={"format": "ms"})
    got = reassemble(dst)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_one_card_folder_has_no_metadata(tmp_path: Path) -> None:
    with pytest.raises(Ckpt2Error, match=r"no metadata\.json"):
        reassemble(tmp_path)


def test_trailing_unit_fragmentation_is_accepted(tmp_path: Path) -> None:
    """A 1-D layout written with an extra empty tensor-map entry gives a trailing 1 in
    axis_fragmentations; the slice ids and offsets are unchanged."""
    norm = "decoder.layers.0.input_layernorm.weight"

    def edit(meta: dict, _dst: Path) -> None:
        entry = meta["state_dict_metadata"][norm]
        entry["axis_fragmentations"] = entry["axis_fragmentations"] + [1]
        entry["layout"]["tensor_map"] = entry["layout"]["tensor_map"] + [[]]

    src = select_iteration(DATA_CKPT2 / "tiny_tied_fp32_tp2pp2_dedup" / "checkpoint")
    got = reassemble(_tampered(tmp_path, edit))
    assert got[norm].tobytes() == reassemble(src)[norm].tobytes()
