"""The generator writes Checkpoint 2.0 as mindformers does: given each genuine fixture's own
tensors it writes the fixture again byte for byte (``metadata.json``, ``common.json``, the
tracker, every ``-model-`` file; the ``-opt-`` files' Adam states are stand-ins, so their
headers are compared), and what it writes for other layouts follows ``docs/checkpoint2.md``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ms2hf.errors import Ms2hfError
from ms2hf.generator import GeneratorConfig, MoeConfig, generate
from ms2hf.io.safetensors_reader import SafetensorsHeader
from tests.conftest import CKPT2_TWINS, DATA, DATA_CKPT2, load_tensors
from tests.oracle.ckpt2 import reassemble, select_iteration
from tests.test_generator import config_of

FIXTURES = sorted(CKPT2_TWINS)
TRACKER = "latest_checkpointed_iteration.txt"


def test_the_twins_are_the_manifests() -> None:
    for name, twin in CKPT2_TWINS.items():
        manifest = json.loads((DATA_CKPT2 / name / "manifest.json").read_text())
        assert manifest["source"].split("/")[-1] == twin


def ckpt2_config(name: str) -> GeneratorConfig:
    """The fixture's run: its legacy twin's settings, saved as Checkpoint 2.0."""
    manifest = json.loads((DATA_CKPT2 / name / "manifest.json").read_text())
    return replace(
        config_of(DATA / CKPT2_TWINS[name]),
        save_format="ckpt2",
        remove_redundancy=manifest["remove_redundancy"],
    )


def header_entries(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """Names, dtypes and shapes in file order."""
    return [(t.name, t.dtype, t.shape) for t in SafetensorsHeader(path).tensors.values()]


@pytest.mark.parametrize("name", FIXTURES)
def test_rewrites_the_genuine_fixture_byte_for_byte(name: str, tmp_path: Path) -> None:
    fixture = DATA_CKPT2 / name
    src = select_iteration(fixture / "checkpoint")
    weights = load_tensors(fixture / "ground_truth" / "hf_model.safetensors")
    statistics = {k: v for k, v in reassemble(src).items() if k.endswith(".router.fi_accu")}
    generated = generate(ckpt2_config(name), tmp_path, weights, statistics=statistics)
    out = generated.iteration_dir
    assert out.name == src.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert sorted(generated.rank_files) == sorted(out.glob("*.safetensors"))
    for path in sorted(src.iterdir()):
        if "-opt-" in path.name:
            assert header_entries(out / path.name) == header_entries(path), path.name
        else:
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert (out.parent / TRACKER).read_bytes() == (src.parent / TRACKER).read_bytes() == b"1000"


def test_a_normal_save_without_pipeline_stages_holds_whole_tensors(tmp_path: Path) -> None:
    """MindSpore's integrated save gathers split parameters when there is no pipeline
    parallelism; the metadata still describes the slices."""
    config = GeneratorConfig(layers=2, tp=2, dp=2, opt_shard=-1, save_format="ckpt2")
    generated = generate(config, tmp_path)
    meta = json.loads((generated.iteration_dir / "metadata.json").read_text())
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert meta["state_dict_metadata"][qkv]["axis_fragmentations"] == [4, 1]
    assert meta["state_dict_metadata"][qkv]["chunk"][0]["local_shape"] == [64, 128]
    files = sorted(generated.iteration_dir.glob("*.safetensors"))
    assert len(files) == 8
    for path in files:
        key = qkv if "-model-" in path.name else f"adam_m.{qkv}"
        assert SafetensorsHeader(path).tensors[key].shape == (256, 128), path.name


def test_one_card_writes_no_metadata(tmp_path: Path) -> None:
    generated = generate(GeneratorConfig(layers=2, save_format="ckpt2"), tmp_path)
    names = sorted(p.name for p in generated.iteration_dir.iterdir())
    assert names == [
        "common.json",
        "qwen3-model-0000000-0000001.safetensors",
        "qwen3-opt-0000000-0000001.safetensors",
    ]


def test_optimizer_shards_smaller_than_the_group_are_refused(tmp_path: Path) -> None:
    """How mindformers folds them into the layout is not known (doc section 13)."""
    with pytest.raises(Ms2hfError, match="smaller than its replica group"):
        generate(GeneratorConfig(dp=4, opt_shard=2, save_format="ckpt2"), tmp_path)


def test_no_prefix_and_moe_statistics(tmp_path: Path) -> None:
    """Without a prefix files are ``model-...``; ``fi_accu`` is described and stored in the model
    files with a flat layout and no Adam states."""
    moe = MoeConfig(experts=4, moe_ffn=8, ep=2)
    config = GeneratorConfig(
        layers=2, tp=2, dp=2, pp=2, moe=moe, prefix="", remove_redundancy=True, save_format="ckpt2"
    )
    folder = generate(config, tmp_path).iteration_dir
    assert (folder / "model-0000000-0000008.safetensors").is_file()
    meta = json.loads((folder / "metadata.json").read_text())["state_dict_metadata"]
    fi = meta["decoder.layers.0.mlp.router.fi_accu"]
    assert fi["layout"]["device_matrix"] == [4] and fi["layout"]["tensor_map"] == [-1]
    assert not [k for k in meta if k.startswith("adam_") and "fi_accu" in k]
