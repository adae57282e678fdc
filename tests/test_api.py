"""The Python API (``ms2hf.convert``, ``ms2hf.inspect``) and the reports it shares with --json."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ms2hf
from ms2hf import cli
from ms2hf.commands.convert import ConvertOptions
from ms2hf.commands.inspect import inspect as pipeline_inspect
from ms2hf.pipeline.engine.memory import MemorySampler, peak_rss_bytes
from tests.conftest import DATA

FIXTURE = DATA / "tiny_fp32_dp2tp2pp2_opt"


def test_convert_with_keyword_options(tmp_path: Path) -> None:
    report = ms2hf.convert(
        str(FIXTURE),
        str(tmp_path / "hf"),
        dtype="fp32",
        max_shard_size="1MB",
        progress=False,
        reference_config=str(FIXTURE / "ground_truth" / "config.json"),
    )
    assert isinstance(report, ms2hf.ConvertReport)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert report.files == sorted(set(index["weight_map"].values())) and len(report.files) == 3
    assert report.bytes_written == index["metadata"]["total_size"] == 2_496_000
    assert report.tensors == len(index["weight_map"])
    assert (
        json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 256
    )
    doc = report.to_dict()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["output_dir"] == str(tmp_path / "hf")
    assert doc["gb_per_s"] == pytest.approx(report.bytes_written / report.seconds / 1e9)
    assert 0 < doc["peak_anonymous_bytes"] <= doc["peak_rss_bytes"]
    assert doc["config_origins"]["max_position_embeddings"].startswith("reference config.json")


def test_options_object_and_overrides(tmp_path: Path) -> None:
    base = ConvertOptions(dtype="fp16", progress=False)
    report = ms2hf.convert(FIXTURE, tmp_path / "hf", base, dtype="bf16")
    assert base.dtype == "fp16"  # not modified
    assert report.bytes_written == 2_496_000 // 2
    with pytest.raises(ms2hf.Ms2hfError, match=r"unknown option.*dtyp\b"):
        ms2hf.convert(FIXTURE, tmp_path / "other", dtyp="bf16")
    with pytest.raises(ms2hf.Ms2hfError, match="max_shard_size: 'five' is not a size"):
        ms2hf.inspect(FIXTURE, max_shard_size="five")


def test_inspect_returns_the_pipeline_report() -> None:
    report = ms2hf.inspect(FIXTURE, dtype="fp32", max_shard_size="1MB")
    assert isinstance(report, ms2hf.InspectReport)
    same = pipeline_inspect(FIXTURE, ConvertOptions(dtype="fp32", max_shard_size=1_000_000))
    assert report == same
    assert report.output is not None and len(report.output.files) == 3


def test_cli_convert_json_prints_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    assert (
        cli.main(["convert", str(FIXTURE), str(out), "--json", "-q", "--max-shard-size", "1MB"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    expected_keys = set(ms2hf.convert(FIXTURE, tmp_path / "again", progress=False).to_dict())
    assert set(doc) == expected_keys
    assert doc["files"] == sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert doc["bytes_written"] == index["metadata"]["total_size"]
    assert doc["seconds"] > 0 and doc["gb_per_s"] > 0


def test_memory_sampler_sees_an_allocation() -> None:
    size = 256 << 20
    with MemorySampler() as memory:
        before = memory.peak_anonymous
        block = np.ones(size, np.uint8)  # touched, so resident
        time.sleep(0.1)
        del block
    assert memory.peak_anonymous - before >= size * 0.9
    assert peak_rss_bytes() >= memory.peak_anonymous


def test_public_names_resolve_and_unknown_names_fail() -> None:
    for name in ms2hf.__all__:
        assert getattr(ms2hf, name) is not None
    assert ms2hf.convert.__module__ == "ms2hf.api"
    assert issubclass(ms2hf.Ms2hfError, Exception)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        ms2hf.nonexistent  # noqa: B018


def test_convert_start_up_imports_only_what_convert_needs() -> None:
    """Start-up is part of every conversion's time: the command line must not import the other
    commands' modules, nor PyYAML when no yaml is given, nor Ray unless --ray is given."""
    code = (
        "import sys, ms2hf.cli; "
        "print(sorted(m for m in ('yaml', 'ray', 'ms2hf.pipeline.executors.ray', "
        "'ms2hf.api', 'ms2hf.commands.inspect', "
        "'ms2hf.commands.verify', 'ms2hf.commands.reverse', 'ms2hf.commands.inspect_text', "
        "'ms2hf.commands.demo', 'ms2hf.generator') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
