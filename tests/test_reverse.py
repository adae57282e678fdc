"""``reverse``: a unified folder in any form the old tools read gives exactly what ``convert``
gives from the training output."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ms2hf.commands.convert import ConvertOptions, convert
from ms2hf.commands.merge import MergeOptions, merge
from ms2hf.commands.reverse import reverse
from ms2hf.errors import FormatError, ModelError
from ms2hf.io.safetensors_writer import save_file
from tests.conftest import (
    DATA,
    DENSE_FIXTURES,
    MOE_FIXTURES,
    folder_bytes,
    load_hf_dir,
    load_tensors,
)


@pytest.mark.parametrize("name", DENSE_FIXTURES + MOE_FIXTURES)
@pytest.mark.parametrize("dtype", ["bf16", "source"])
def test_merge_then_reverse_is_byte_identical_to_convert(
    name: str, dtype: str, unified_of: Callable[[Path], Path], tmp_path: Path
) -> None:
    fixture = DATA / name
    options = ConvertOptions(dtype=dtype, max_shard_size=300_000, progress=False)
    convert(fixture, tmp_path / "convert", options)
    reverse(unified_of(fixture), tmp_path / "reverse", options)
    converted = folder_bytes(tmp_path / "convert")
    assert len(converted) > 3  # several shards, index, config
    assert folder_bytes(tmp_path / "reverse") == converted


@pytest.fixture(scope="module")
def reference(
    unified_of: Callable[[Path], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, np.ndarray]]:
    """tiny_fp32 merged into several parts, and what convert makes of it."""
    root = tmp_path_factory.mktemp("reference")
    convert(DATA / "tiny_fp32", root / "hf", ConvertOptions(progress=False))
    return unified_of(DATA / "tiny_fp32"), load_hf_dir(root / "hf")


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].tobytes() == array.tobytes(), name


def copy_unified(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_reads_the_flat_param_name_map(reference: tuple[Path, dict], tmp_path: Path) -> None:
    unified = copy_unified(reference[0], tmp_path / "u")
    doc = json.loads((unified / "param_name_map.json").read_text())
    (unified / "param_name_map.json").write_text(json.dumps(doc["weight_map"]))
    reverse(unified, tmp_path / "hf", ConvertOptions(progress=False))
    assert_same_tensors(load_hf_dir(tmp_path / "hf"), reference[1])


def test_reads_a_folder_without_map_ignoring_optimizer_states(
    reference: tuple[Path, dict], tmp_path: Path
) -> None:
    unified = copy_unified(reference[0], tmp_path / "u")
    (unified / "param_name_map.json").unlink()
    # the old merge keeps adam_ states unless told to filter them
    state = np.ones((4, 4), np.float32)
    save_file(
        {"adam_m.output_layer.weight": state},
        unified / "extra.safetensors",
        {},
        {"adam_m.output_layer.weight": "F32"},
    )
    reverse(unified, tmp_path / "hf", ConvertOptions(progress=False))
    assert_same_tensors(load_hf_dir(tmp_path / "hf"), reference[1])


def test_reads_a_single_file(tmp_path: Path) -> None:
    fixture = DATA / "tiny_tied_fp32_tp2pp2"
    options = MergeOptions(part_size=2**40, progress=False)
    unified = merge(fixture / "checkpoint", fixture / "strategy", tmp_path, options).output_dir
    reverse(
        unified / "part0.safetensors",
        tmp_path / "hf",
        ConvertOptions(progress=False, dtype="source"),
    )
    truth = load_tensors(DATA / "tiny_tied_fp32_tp2pp2" / "ground_truth" / "hf_model.safetensors")
    assert_same_tensors(load_hf_dir(tmp_path / "hf"), truth)


def test_per_layer_layout_reproduces_the_old_file_names(
    reference: tuple[Path, dict], tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    reverse(reference[0], out, ConvertOptions(progress=False, shard_layout="per-layer"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    for name, file in index["weight_map"].items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        layer = int(m.group(1)) if m else 3  # embedding, norm and head go with the last layer
        assert file == files[layer], name
    assert_same_tensors(load_hf_dir(out), reference[1])


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("tiny_fp32", "qwen3"),
        (MOE_FIXTURES[0], "qwen3-moe"),
        (MOE_FIXTURES[0], "qwen3_moe"),
        (MOE_FIXTURES[0], "Qwen3-MoE"),
    ],
)
def test_model_flag_that_agrees(
    name: str, model: str, unified_of: Callable[[Path], Path], tmp_path: Path
) -> None:
    options = ConvertOptions(progress=False)
    report = reverse(unified_of(DATA / name), tmp_path / "hf", options, model=model)
    assert report.model_type == model.lower().replace("-", "_")


@pytest.mark.parametrize(
    ("name", "model", "message"),
    [
        ("tiny_fp32", "qwen3-moe", "--model 'qwen3-moe' disagrees with .*qwen3$"),
        (MOE_FIXTURES[0], "qwen3", "--model 'qwen3' disagrees with .*qwen3_moe$"),
        ("tiny_fp32", "llama", "--model 'llama' is not supported"),
    ],
)
def test_model_flag_that_disagrees(
    name: str, model: str, message: str, unified_of: Callable[[Path], Path], tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match=message):
        reverse(
            unified_of(DATA / name), tmp_path / "hf", ConvertOptions(progress=False), model=model
        )
    assert not (tmp_path / "hf").exists()


def _edit_map(unified: Path, edit: object) -> None:
    path = unified / "param_name_map.json"
    doc = json.loads(path.read_text())
    edit(doc["weight_map"])  # type: ignore[operator]
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m.update({"decoder.layers.0.input_layernorm.weight": "part99.safetensors"}),
            "names part99.safetensors, missing from",
        ),
        (
            lambda m: m.update({"decoder.layers.9.input_layernorm.weight": "part0.safetensors"}),
            "maps 'decoder.layers.9.input_layernorm.weight' to part0.safetensors, which has no",
        ),
        (
            lambda m: m.pop("decoder.final_layernorm.weight"),
            "that param_name_map.json does not list",
        ),
    ],
)
def test_a_map_that_disagrees_with_the_parts_is_an_error(
    reference: tuple[Path, dict], edit: object, message: str, tmp_path: Path
) -> None:
    unified = copy_unified(reference[0], tmp_path / "u")
    _edit_map(unified, edit)
    with pytest.raises(FormatError, match=message):
        reverse(unified, tmp_path / "hf", ConvertOptions(progress=False))


def test_a_map_naming_the_wrong_part_is_an_error(
    reference: tuple[Path, dict], tmp_path: Path
) -> None:
    unified = copy_unified(reference[0], tmp_path / "u")
    doc = json.loads((unified / "param_name_map.json").read_text())
    name, part = next(iter(doc["weight_map"].items()))
    other = next(p for p in sorted(set(doc["weight_map"].values())) if p != part)
    _edit_map(unified, lambda m: m.update({name: other}))
    with pytest.raises(
        FormatError, match=f"maps '{re.escape(name)}' to {other}, but it is in {part}"
    ):
        reverse(unified, tmp_path / "hf", ConvertOptions(progress=False))


def test_a_tensor_in_two_files_is_an_error(reference: tuple[Path, dict], tmp_path: Path) -> None:
    unified = copy_unified(reference[0], tmp_path / "u")
    (unified / "param_name_map.json").unlink()
    name = "decoder.final_layernorm.weight"
    save_file({name: np.ones(128, np.float32)}, unified / "dup.safetensors", {}, {name: "F32"})
    with pytest.raises(FormatError, match=f"tensor '{re.escape(name)}' is also in"):
        reverse(unified, tmp_path / "hf", ConvertOptions(progress=False))


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"neither param_name_map\.json nor any"):
        reverse(tmp_path, tmp_path / "hf", ConvertOptions(progress=False))
