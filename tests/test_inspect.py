"""``inspect``: what it says about the genuine fixtures agrees with how they were made (their
manifests), with the files themselves, and with what ``convert`` then writes; and it reads no
tensor byte to say it."""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ms2hf import cli
from ms2hf.commands.convert import ConvertOptions, convert
from ms2hf.commands.inspect import HUGGING_FACE, TRAINING, UNIFIED, inspect
from ms2hf.commands.inspect_text import inspect_text
from ms2hf.errors import FormatError
from ms2hf.generator import GeneratorConfig, MoeConfig, generate
from ms2hf.io.safetensors_reader import SafetensorsHeader
from tests.conftest import CKPT2_TWINS, DATA, DATA_CKPT2, DENSE_FIXTURES, MOE_FIXTURES

ALL_FIXTURES = DENSE_FIXTURES + MOE_FIXTURES
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.")


def manifest(fixture: str) -> dict:
    return json.loads((DATA / fixture / "manifest.json").read_text())


def rank_files(fixture: str) -> list[Path]:
    return sorted((DATA / fixture / "checkpoint").glob("rank_*/*.safetensors"))


def scrambled_copy(src: Path, dest: Path, pattern: bytes) -> Path:
    """``src`` copied to ``dest``, the data of every rank or iteration file in ``checkpoint/``
    overwritten (headers kept): ``pattern`` over and over, the remainder 0x7f."""
    shutil.copytree(src, dest)
    for path in dest.glob("checkpoint/*/*.safetensors"):
        start = min(t.start for t in SafetensorsHeader(path).tensors.values())
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(start)
            n = size - start
            f.write(pattern * (n // len(pattern)) + b"\x7f" * (n % len(pattern)))
    return dest


@pytest.fixture
def no_safetensors_mmap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mapping a ``.safetensors`` file fails the test (metadata.json may be mapped: it holds no
    tensor byte)."""
    real_mmap = mmap.mmap

    def guarded(fileno: int, *args: object, **kwargs: object) -> mmap.mmap:
        path = os.readlink(f"/proc/self/fd/{fileno}")
        if path.endswith(".safetensors"):
            raise AssertionError(f"inspect mapped {path}")
        return real_mmap(fileno, *args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", guarded)


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_layout_agrees_with_how_the_fixture_was_made(fixture: str) -> None:
    m = manifest(fixture)
    report = inspect(DATA / fixture)
    assert report.kind == TRAINING
    assert (report.ranks, report.stages) == (m["world"], m["pp"])
    assert report.step == m["file_suffix"]
    assert report.remove_redundancy == m["remove_redundancy"]
    assert {p.name for p in report.params} == set(m["layout_of_param"])
    per_stage = m["world"] // m["pp"]
    for p in report.params:
        layout = m["layout_of_param"][p.name]
        assert p.stage == m["stage_of_param"][p.name], p.name
        blocks = math.prod(p.shape) // math.prod(layout["slice_shape"])
        assert math.prod(p.split) * p.optimizer_chunks == blocks, p.name
        assert (p.optimizer_chunks > 1) == (layout["opt_decision"] == "sharded"), p.name
        assert p.replicas * blocks == per_stage, p.name
        assert p.saved_copies == (1 if m["remove_redundancy"] else p.replicas), p.name


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_byte_counts_agree_with_the_files(fixture: str) -> None:
    weights_saved = optimizer = scalars = 0
    dtypes: set[str] = set()
    for path in rank_files(fixture):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                piece = f.get_slice(name)
                n = (
                    math.prod(piece.get_shape())
                    * {"F32": 4, "BF16": 2, "I32": 4, "I64": 8}[piece.get_dtype()]
                )
                if name.startswith(OPTIMIZER_PREFIXES):
                    optimizer += n
                elif piece.get_shape() in ([], [1]) and "." not in name:
                    scalars += n
                else:
                    weights_saved += n
                    dtypes.add(piece.get_dtype())
    report = inspect(DATA / fixture)
    assert report.bytes.weights_saved == weights_saved
    assert report.bytes.optimizer == optimizer
    assert report.bytes.scalars == scalars
    assert report.bytes.files == sum(p.stat().st_size for p in rank_files(fixture))
    assert report.bytes.weights == sum(p.nbytes for p in report.params)
    assert set(report.dtypes) == dtypes
    assert sum(report.dtypes.values()) == report.bytes.weights


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_output_plan_is_what_convert_writes(fixture: str, tmp_path: Path) -> None:
    options = ConvertOptions(dtype="fp32", max_shard_size=400_000, progress=False)
    planned = inspect(DATA / fixture, options)
    convert(DATA / fixture, tmp_path, options)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert planned.output is not None
    assert [f.name for f in planned.output.files] == sorted(set(index["weight_map"].values()))
    assert planned.output.tensors == len(index["weight_map"])
    assert planned.output.bytes == index["metadata"]["total_size"]
    assert planned.output.parameters == index["metadata"]["total_parameters"]
    for f in planned.output.files:
        assert f.tensors == len(SafetensorsHeader(tmp_path / f.name).tensors), f.name
    written = json.loads((tmp_path / "config.json").read_text())
    config = planned.to_dict()["model"]["config"]
    assert {k: v["value"] for k, v in config.items()} == written


def test_moe_names_its_skipped_parameters() -> None:
    report = inspect(DATA / "moe_fp32_dp2tp2pp2_ep2")
    assert report.model.model_type == "qwen3_moe"
    assert report.model.skipped == tuple(f"decoder.layers.{i}.mlp.router.fi_accu" for i in range(4))
    assert inspect(DATA / "tiny_fp32").model.skipped == ()


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_moe_shows_expert_parallelism_the_router_and_why_fi_accu_is_skipped(
    ep: int, tmp_path: Path
) -> None:
    """Experts split whole over the expert-parallel ranks, named as such; the router whole."""
    moe = MoeConfig(experts=8, ep=ep)
    path = generate(GeneratorConfig(layers=2, tp=2, dp=2, moe=moe), tmp_path).root
    report = inspect(path)
    params = {p.name: p for p in report.params}
    for name in ("decoder.layers.0.mlp.experts.weight1", "decoder.layers.1.mlp.experts.weight2"):
        assert (params[name].split, params[name].experts_per_block) == ((ep, 1), 8 // ep), name
        assert params[name].replicas == 4 // ep, name
    router = params["decoder.layers.0.mlp.router.weight"]
    assert (router.shape, router.split, router.replicas) == ((8, 128), (1, 1), 4)
    assert {p.name for p in report.params if p.experts_per_block} == {
        f"decoder.layers.{i}.mlp.experts.weight{w}" for i in range(2) for w in (1, 2)
    }
    text = inspect_text(report).splitlines()
    experts = [line for line in text if "mlp.experts.weight" in line]
    assert len(experts) == 2
    assert all((f"ep/{ep} ({8 // ep} experts each)" in line) == (ep > 1) for line in experts)
    assert any(line.split()[0] == "decoder.layers.*.mlp.router.weight" for line in text)
    skipped = text.index(next(line for line in text if line.startswith("skipped")))
    assert "statistics of training, not weights" in text[skipped]
    assert "decoder.layers.*.mlp.router.fi_accu (x2)" in " ".join(text[skipped : skipped + 2])


def test_reads_no_tensor_bytes(tmp_path: Path, no_safetensors_mmap: None) -> None:
    """Scrambling every tensor's data changes nothing, and mapping a file is an error."""
    src = DATA / "tiny_fp32_dp2tp2pp2_opt"
    copy = scrambled_copy(src, tmp_path / "run", bytes(range(256)))
    got = inspect(copy).to_dict()
    want = inspect(src).to_dict()
    assert {k: v for k, v in got.items() if k != "path"} == {
        k: v for k, v in want.items() if k != "path"
    }


def test_unified_and_hugging_face_folders(tmp_path: Path) -> None:
    fixture = DATA / "tiny_tied_fp32_tp2pp2"
    assert (
        cli.main(
            [
                "merge",
                "--checkpoint-dir",
                str(fixture / "checkpoint"),
                "--strategy-dir",
                str(fixture / "strategy"),
                "--output_dir",
                str(tmp_path / "merged"),
                "-q",
            ]
        )
        == 0
    )
    unified_dir = next((tmp_path / "merged").glob("*/unified_safe"))
    unified = inspect(unified_dir)
    training = inspect(fixture)
    assert unified.kind == UNIFIED
    assert {p.name: (p.shape, p.dtype) for p in unified.params} == {
        p.name: (p.shape, p.dtype) for p in training.params
    }
    assert all(p.split == (1,) * len(p.shape) and p.replicas == 1 for p in unified.params)
    assert unified.output == training.output

    convert(fixture, tmp_path / "hf", ConvertOptions(progress=False))
    hf = inspect(tmp_path / "hf")
    assert hf.kind == HUGGING_FACE and hf.output is None
    assert hf.model.model_type == "qwen3"
    assert hf.model.config["tie_word_embeddings"].value is True
    assert training.output is not None
    assert len(hf.params) == training.output.tensors
    assert hf.bytes.weights == training.output.bytes
    assert hf.dtypes == {"BF16": training.output.bytes}


def test_cli_json_is_the_report_and_text_folds_layers(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "tiny_fp32_dp2tp2pp2_opt"
    assert cli.main(["inspect", str(path), "--json", "--dtype", "fp32"]) == 0
    assert (
        json.loads(capsys.readouterr().out) == inspect(path, ConvertOptions(dtype="fp32")).to_dict()
    )
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    lines = {
        line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  decoder")
    }
    fc1 = lines["decoder.layers.*.mlp.linear_fc1.weight"]
    assert fc1[1:] == ["(x4)", "384x128", "F32", "0-1", "dim0/2", "opt/2", "1", "1"]
    assert "step 1000_1: 8 ranks, 2 pipeline stage(s) of 4" in text
    assert "convert would write (bf16): 47 tensors" in text


def test_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError, match="not a training output"):
        inspect(tmp_path)
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_unrecognised_model_is_still_described(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "weights.safetensors"
    save_file(
        {"encoder.proj.weight": np.zeros((4, 3), np.float32)}, path, metadata={"format": "ms"}
    )
    report = inspect(path)
    assert report.kind == UNIFIED and report.output is None
    assert [(p.name, p.shape, p.dtype) for p in report.params] == [
        ("encoder.proj.weight", (4, 3), "F32")
    ]
    assert report.model.model_type is None
    assert "embedding.word_embeddings.weight" in (report.model.error or "")
    assert cli.main(["inspect", str(path)]) == 0
    assert "model: not recognised: " in capsys.readouterr().out


@pytest.mark.parametrize(
    "fixture",
    [f"data/{name}" for name in ALL_FIXTURES] + [f"data-ckpt2/{name}" for name in CKPT2_TWINS],
)
def test_readme_shows_the_current_output(fixture: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = DATA.parent.parent
    monkeypatch.chdir(root)
    text = inspect_text(inspect(Path("tests") / fixture))
    readme = (root / "README.md").read_text()
    assert f"ms2hf inspect tests/{fixture}" in readme
    assert f"```\n{text}\n```" in readme or f"ms2hf inspect tests/{fixture}\n{text}\n```" in readme


@pytest.mark.parametrize("name", sorted(CKPT2_TWINS))
def test_checkpoint2_agrees_with_its_legacy_twin(name: str) -> None:
    """The same run saved both ways: the same parameters, stages, grids, model and output; each
    block held by the same ranks (rank_group here, the strategy's layout math there)."""
    ours, twin = inspect(DATA_CKPT2 / name), inspect(DATA / CKPT2_TWINS[name])
    manifest = json.loads((DATA_CKPT2 / name / "manifest.json").read_text())
    iteration = DATA_CKPT2 / name / "checkpoint" / "iteration_00001000"
    assert (ours.kind, ours.source_format, twin.source_format) == (
        TRAINING,
        "Checkpoint 2.0",
        "legacy",
    )
    assert (ours.step, ours.steps_present, ours.step_reason) == ("1000", ("1000",), "the tracker's")
    assert (ours.ranks, ours.stages) == (twin.ranks, twin.stages) == (manifest["world"], 2)
    assert ours.counters == json.loads((iteration / "common.json").read_text())
    assert ours.model == twin.model and ours.output == twin.output
    assert ours.bytes.weights == twin.bytes.weights
    states = 0  # the Adam states in the optimizer files, which ms2hf never opens
    for path in iteration.glob("*-opt-*"):
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key.startswith(OPTIMIZER_PREFIXES):
                    states += math.prod(f.get_slice(key).get_shape()) * 4
    assert ours.bytes.optimizer == states
    assert [f.path for f in ours.files] == sorted(
        str(p.relative_to(DATA_CKPT2 / name)) for p in iteration.glob("*-model-*")
    )
    theirs = {p.name: p for p in twin.params}
    for p in ours.params:
        legacy = theirs.pop(p.name)
        assert (p.shape, p.dtype, p.stage, p.replicas) == (
            legacy.shape,
            legacy.dtype,
            legacy.stage,
            legacy.replicas,
        ), p.name
        assert (p.split, p.optimizer_chunks) == (legacy.split, legacy.optimizer_chunks), p.name
        assert {s.offsets: s.holders for s in p.slices} == {
            s.offsets: s.holders for s in legacy.slices
        }, p.name
        for s in p.slices:
            for f in s.files:
                assert SafetensorsHeader(DATA_CKPT2 / name / f).tensors[p.name].shape == s.shape
        assert p.saved_copies == (1 if manifest["remove_redundancy"] else p.replicas), p.name
    assert not theirs


def test_checkpoint2_inspect_reads_no_tensor_bytes(
    tmp_path: Path, no_safetensors_mmap: None
) -> None:
    src = DATA_CKPT2 / "moe_fp32_dp2tp2pp2_ep2_dedup"
    copy = scrambled_copy(src, tmp_path / "run", b"\x7f")
    got, want = inspect(copy).to_dict(), inspect(src).to_dict()
    assert {k: v for k, v in got.items() if k != "path"} == {
        k: v for k, v in want.items() if k != "path"
    }


def test_the_blocks_of_a_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA_CKPT2 / "tiny_fp32_dp2tp2pp2_opt"
    assert cli.main(["inspect", str(path), "--param", "*.layers.2.mlp.linear_fc1.weight"]) == 0
    text = capsys.readouterr().out.splitlines()
    at = text.index("decoder.layers.2.mlp.linear_fc1.weight: 384x128 F32, 4 block(s)")
    rows = [line.split() for line in text[at + 2 : at + 6]]
    # docs/checkpoint2.md's worked example: slice 2 (rows 192..288) is rank 5's
    assert [r[:3] for r in rows] == [
        ["0,0", "96x128", "4"],
        ["96,0", "96x128", "6"],
        ["192,0", "96x128", "5"],
        ["288,0", "96x128", "7"],
    ]
    assert rows[2][3].endswith("qwen3-model-0000005-0000008.safetensors")
    assert cli.main(["inspect", str(path), "--param", "nothing*"]) == 0
    assert "no parameter matches nothing*" in capsys.readouterr().out
