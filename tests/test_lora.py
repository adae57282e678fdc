"""Converting the genuine LoRA fine-tunes (tests/data-lora): the merged model is the ground truth
bit for bit (fp32, and its round-to-nearest-even in bf16), the PEFT adapter is the ground truth
byte for byte, the base model is the plain conversion; alpha comes from the flag, the yaml or the
run's adapter_config.json, and every bad input of docs/lora.md#5 stops the run with one line
naming the parameter (or the source of alpha) and exit status 2."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import ms2hf
from ms2hf.commands.inspect import inspect
from ms2hf.commands.inspect_text import inspect_text
from ms2hf.commands.merge import MergeOptions, merge
from ms2hf.commands.reverse import reverse
from ms2hf.io.safetensors_writer import ShardWriter
from ms2hf.io.sources.legacy import plan_source
from tests.conftest import (
    DATA,
    DATA_LORA,
    LORA_FIXTURES,
    assert_same_tensors,
    fails,
    folder_bytes,
    load_hf_dir,
    load_tensors,
)
from tests.conftest import run_cli as run
from tests.edit_checkpoint import copy_fixture, edit_tensors, rank_file
from tests.oracle import lora as oracle

TINY = DATA_LORA / LORA_FIXTURES[0]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(params=LORA_FIXTURES)
def fixture(request: pytest.FixtureRequest) -> Path:
    return DATA_LORA / request.param


def truth(fixture: Path, name: str) -> dict[str, np.ndarray]:
    return load_tensors(fixture / "ground_truth" / name)


# --- the ground truth -----------------------------------------------------------------------


def test_merged_model_is_the_ground_truth_in_fp32_and_bf16(fixture: Path, tmp_path: Path) -> None:
    """No --lora: the fine-tuned model. bf16 is the round-to-nearest-even of the float32 merge,
    with no difference at all (0 ulp), since the merge rounds once to float32 and then casts."""
    want = truth(fixture, "hf_merged.safetensors")
    for dtype in ("fp32", "bf16"):
        report = ms2hf.convert(fixture, tmp_path / dtype, dtype=dtype, progress=False)
        assert report.lora is not None and report.lora.mode == "merged"
        expected = (
            want if dtype == "fp32" else {k: v.astype(ml_dtypes.bfloat16) for k, v in want.items()}
        )
        assert_same_tensors(load_hf_dir(tmp_path / dtype), expected)


def test_adapter_is_the_ground_truth_byte_for_byte(fixture: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    ms2hf.convert(fixture, out, lora="adapter", dtype="source", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ADAPTER_FILES  # no run record left either
    for name in ADAPTER_FILES:
        assert (out / name).read_bytes() == (
            fixture / "ground_truth" / "adapter" / name
        ).read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    manifest = json.loads((fixture / "manifest.json").read_text())["lora"]
    assert (config["r"], config["lora_alpha"]) == (manifest["r"], manifest["lora_alpha"])
    assert config["target_modules"] == manifest["hf_target_modules"]


def test_base_model_is_the_plain_conversion(fixture: Path, tmp_path: Path) -> None:
    ms2hf.convert(fixture, tmp_path, lora="base", dtype="source", progress=False)
    assert_same_tensors(load_hf_dir(tmp_path), truth(fixture, "hf_base.safetensors"))


def test_dtype_applies_to_the_adapter(tmp_path: Path) -> None:
    ms2hf.convert(TINY, tmp_path, lora="adapter", progress=False)  # default --dtype bf16
    want = truth(TINY, "adapter/adapter_model.safetensors")
    assert_same_tensors(
        load_tensors(tmp_path / "adapter_model.safetensors"),
        {k: v.astype(ml_dtypes.bfloat16) for k, v in want.items()},
    )


def test_a_lora_run_says_what_it_writes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run(capsys, "convert", TINY, tmp_path / "hf")
    assert code == 0
    assert (
        "LoRA fine-tune: r 8, alpha 16 (from adapter_config.json: lora_alpha), scale 2, on 16 "
        "modules (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj); writing the "
        "fine-tuned model, LoRA merged" in err
    )
    code, err = run(capsys, "convert", TINY, tmp_path / "base", "--lora", "base")
    assert code == 0 and "writing the base model, without the fine-tuning" in err


def test_base_model_name_and_the_python_api(tmp_path: Path) -> None:
    ms2hf.convert(TINY, tmp_path, lora="adapter", base_model="Qwen/Qwen3-0.6B", progress=False)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen3-0.6B"
    with pytest.raises(ms2hf.Ms2hfError, match="option lora='peft': expected one of merged"):
        ms2hf.convert(TINY, tmp_path / "x", lora="peft", progress=False)


def lora_blocks(fixture: Path) -> dict[tuple[Path, int], int]:
    """``(file, offset) -> bytes`` of every saved block of every LoRA weight."""
    source = plan_source(fixture / "checkpoint", fixture / "strategy")
    return {
        (b.path, b.start): int(np.prod(b.shape)) * 4
        for name, p in source.params.items()
        if ".lora_" in name
        for b in p.blocks
    }


def test_writing_the_adapter_reads_only_lora_bytes(fixture: Path, tmp_path: Path) -> None:
    report = ms2hf.convert(
        fixture, tmp_path, lora="adapter", record_reads=True, progress=False, workers=1
    )
    blocks = lora_blocks(fixture)
    assert report.read_ranges
    for path, start, end in report.read_ranges:
        assert blocks.get((path, start)) == end - start, (path, start)
    assert report.bytes_read == sum(blocks.values())  # and each block once


# --- where alpha comes from -------------------------------------------------------------------


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """The tiny LoRA run without its adapter_config.json: alpha known from nowhere."""
    return copy_fixture(TINY, tmp_path / "run")


def yaml_with(path: Path, **pet: object) -> Path:
    pet_config = {"pet_type": "lora", **pet}
    path.write_text(json.dumps({"model": {"model_config": {"pet_config": pet_config}}}))
    return path


def merged_layer0_q(out: Path) -> np.ndarray:
    return load_hf_dir(out)["model.layers.0.self_attn.q_proj.weight"]


def test_alpha_from_each_source_alone(
    bare: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    want = truth(TINY, "hf_merged.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    yaml = yaml_with(tmp_path / "train.yaml", lora_alpha=16, lora_rank=8)
    for extra, origin in (
        (["--lora-alpha", "16"], "--lora-alpha"),
        (["--config", yaml], "train.yaml: model.model_config.pet_config.lora_alpha"),
    ):
        out = tmp_path / origin[:6]
        code, err = run(capsys, "convert", bare, out, "--dtype", "fp32", *extra)
        assert code == 0 and f"(from {origin})" in err
        assert merged_layer0_q(out).tobytes() == want.tobytes()
    shutil.copy(TINY / "adapter_config.json", bare)
    code, err = run(capsys, "convert", bare, tmp_path / "file", "--dtype", "fp32")
    assert code == 0 and "(from adapter_config.json: lora_alpha)" in err


def test_no_alpha_names_the_three_ways(bare: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, "convert", bare, bare.parent / "hf")
    assert "lora_alpha is unknown" in line and "r = 8" in line
    assert "--lora-alpha" in line and "pet_config.lora_alpha" in line
    assert "adapter_config.json next to checkpoint/" in line
    assert not (bare.parent / "hf").exists()
    # The base model needs no alpha.
    assert run(capsys, "convert", bare, bare.parent / "base", "--lora", "base", "-q")[0] == 0


@pytest.mark.parametrize("alpha", ["0", "-16", "nan", "inf"])
def test_alpha_not_a_positive_number(
    alpha: str, bare: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, "convert", bare, bare.parent / "hf", "--lora-alpha", alpha)
    assert f"--lora-alpha = {float(alpha)!r}" in line and "lora_alpha must be" in line


def test_disagreeing_alphas_are_named_both(
    bare: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(TINY / "adapter_config.json", bare)
    line = fails(capsys, "convert", bare, tmp_path / "hf", "--lora-alpha", "32")
    assert "--lora-alpha = 32.0 and adapter_config.json: lora_alpha = 16 disagree" in line
    yaml = yaml_with(tmp_path / "train.yaml", lora_alpha=8)
    line = fails(capsys, "convert", bare, tmp_path / "hf", "--config", yaml)
    assert "pet_config.lora_alpha = 8 and adapter_config.json: lora_alpha = 16 disagree" in line


def test_the_run_file_holds_alpha_truncated_to_an_integer(
    bare: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mindformers writes int(lora_alpha): 16.5 in the yaml agrees with 16 in the file, and the
    yaml's exact value is the one used; an alpha below 1 is written as 0, which alone is refused."""
    shutil.copy(TINY / "adapter_config.json", bare)
    yaml = yaml_with(tmp_path / "train.yaml", lora_alpha=16.5)
    out = tmp_path / "hf"
    code, err = run(capsys, "convert", bare, out, "--config", yaml, "--dtype", "fp32")
    assert code == 0 and "alpha 16.5 (from train.yaml" in err
    mcore = truth(TINY, "mcore_full.safetensors")
    want = oracle.merged_model(mcore, 16.5)["model.layers.0.self_attn.q_proj.weight"]
    assert merged_layer0_q(out).tobytes() == want.tobytes()
    doc = json.loads((bare / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**doc, "lora_alpha": 0}))
    line = fails(capsys, "convert", bare, tmp_path / "zero")
    assert "adapter_config.json: lora_alpha = 0" in line and "below 1 it is 0" in line
    code, _ = run(capsys, "convert", bare, tmp_path / "half", "--lora-alpha", "0.5", "-q")
    assert code == 0


@pytest.mark.parametrize(
    ("yaml_pet", "run_file", "expected"),
    [
        ({"lora_alpha": 16, "lora_rank": 16}, None, "pet_config.lora_rank = 16 disagrees"),
        (None, {"r": 4}, "adapter_config.json: r = 4 disagrees"),
        ({"pet_type": "ptuning2", "lora_alpha": 16}, None, "pet_type = 'ptuning2', not lora"),
        (None, {"use_rslora": True}, "use_rslora is true"),
        (None, {"peft_type": "ADALORA"}, "peft_type is 'ADALORA'"),
    ],
)
def test_run_settings_that_contradict_the_checkpoint(
    yaml_pet: dict[str, object] | None,
    run_file: dict[str, object] | None,
    expected: str,
    bare: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra: list[object] = []
    if yaml_pet is not None:
        extra = ["--config", yaml_with(tmp_path / "train.yaml", **yaml_pet)]
    if run_file is not None:
        doc = json.loads((TINY / "adapter_config.json").read_text())
        (bare / "adapter_config.json").write_text(json.dumps({**doc, **run_file}))
    line = fails(capsys, "convert", bare, tmp_path / "hf", *extra)
    assert expected in line
    if run_file is not None and "r" in run_file:
        assert "decoder.layers.0.mlp.linear_fc1.lora_A.weight rows gives r = 8" in line


# --- what is refused (docs/lora.md#5) --------------------------------------------------------


def model_params(fixture: Path) -> dict[str, np.ndarray]:
    mcore = truth(fixture, "mcore_full.safetensors")
    return {k: v for k, v in mcore.items() if not k.startswith(("adam_", "accu_grads."))}


Edit = Callable[[dict[str, np.ndarray]], None]
QKV0 = "decoder.layers.0.self_attention.linear_qkv."
PROJ1 = "decoder.layers.1.self_attention.linear_proj."


def _pop(name: str) -> Edit:
    return lambda m: _drop(m, name)


def _set(name: str, value: Callable[[dict[str, np.ndarray]], np.ndarray]) -> Edit:
    return lambda m: m.update({name: value(m)})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_pop(QKV0 + "lora_B.weight"), f"{QKV0}lora_A.weight' has no partner {QKV0}lora_B"),
        (_pop(PROJ1 + "lora_A.weight"), f"{PROJ1}lora_B.weight' has no partner {PROJ1}lora_A"),
        (
            _set(QKV0 + "lora_A.weight", lambda m: m[QKV0 + "lora_A.weight"][:4]),
            f"ranks disagree: {QKV0}lora_A.weight has 4 rows and {QKV0}lora_B.weight has 8",
        ),
        (
            lambda m: m.update(
                {
                    PROJ1 + "lora_A.weight": m[PROJ1 + "lora_A.weight"][:4],
                    PROJ1 + "lora_B.weight": m[PROJ1 + "lora_B.weight"][:, :4],
                }
            ),
            "LoRA ranks differ between modules",
        ),
        (
            _set(QKV0 + "lora_B.weight", lambda m: m[QKV0 + "lora_B.weight"][:-2]),
            f"{QKV0}lora_B.weight [254, 8] @ {QKV0}lora_A.weight [8, 128] does not fit",
        ),
        (
            _set("embedding.word_embeddings.lora_A.weight", lambda m: np.zeros((8, 128), "f4")),
            "LoRA on embedding.word_embeddings, a module the conversion rules do not map",
        ),
        (
            _set("output_layer.lora_B.weight", lambda m: np.zeros((512, 8), "f4")),
            "LoRA on output_layer, a module the conversion rules do not map",
        ),
        (
            _set(QKV0 + "lora_B.bias", lambda m: np.zeros(256, "f4")),
            f"'{QKV0}lora_B.bias' is not a LoRA weight ms2hf converts",
        ),
        (
            _set(QKV0 + "lora_a", lambda m: np.zeros((8, 128), "f4")),
            f"'{QKV0}lora_a' is not a LoRA weight ms2hf converts",
        ),
    ],
)
def test_bad_lora_weights_are_refused(
    edit: Edit, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through ``reverse`` on one file of whole parameters: the LoRA rules are the source
    format's business no more than the model's (``convert`` below shows the same for rank
    files)."""
    params = model_params(TINY)
    edit(params)
    path = tmp_path / "unified.safetensors"
    save_file(params, path)
    line = fails(capsys, "reverse", "--input_path", path, "--output_path", tmp_path / "hf")
    assert message in line


def test_lora_on_moe_experts_or_router_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for module in ("mlp.router", "mlp.experts.weight1", "mlp.experts"):
        params = model_params(DATA_LORA / LORA_FIXTURES[1])
        params[f"decoder.layers.2.{module}.lora_A.weight"] = np.zeros((8, 64), "f4")
        path = tmp_path / "unified.safetensors"
        save_file(params, path)
        line = fails(capsys, "reverse", "--input_path", path, "--output_path", tmp_path / "hf")
        assert f"LoRA on decoder.layers.2.{module}, a module the conversion rules" in line


def _drop(tensors: dict[str, np.ndarray], name: str) -> None:
    del tensors[name]


def test_a_missing_half_in_the_rank_files_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = copy_fixture(TINY, tmp_path / "run")
    shutil.copy(TINY / "adapter_config.json", run_dir)
    name = "decoder.layers.3.mlp.linear_fc2.lora_B.weight"
    for rank in (2, 3):
        edit_tensors(rank_file(run_dir, rank), lambda t: _drop(t, name))
    line = fails(capsys, "convert", run_dir, tmp_path / "hf")
    assert line.startswith(f"ms2hf convert: error: {run_dir / 'checkpoint'}, step 1000_1: ")
    assert "decoder.layers.3.mlp.linear_fc2.lora_A.weight' has no partner" in line


def test_an_adapter_from_a_run_without_lora_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, "convert", DATA / "tiny_fp32", tmp_path / "hf", "--lora", "adapter")
    assert "--lora adapter: the checkpoint has no LoRA weights" in line
    assert not (tmp_path / "hf").exists()
    code, err = run(capsys, "convert", DATA / "tiny_fp32", tmp_path / "m", "--lora", "merged")
    assert code == 0 and "note: --lora merged: the checkpoint has no LoRA weights" in err


# --- every path out of a LoRA run -------------------------------------------------------------


def test_merge_keeps_lora_and_reverse_converts_as_convert_does(
    fixture: Path, tmp_path: Path
) -> None:
    unified = merge(
        fixture / "checkpoint", fixture / "strategy", tmp_path / "u", MergeOptions(progress=False)
    ).output_dir
    parts = load_hf_dir(unified)
    mcore = model_params(fixture)
    assert sorted(k for k in parts if ".lora_" in k) == sorted(k for k in mcore if ".lora_" in k)
    for name in parts:
        if name in mcore:
            assert parts[name].tobytes() == mcore[name].tobytes(), name
    assert (unified / "adapter_config.json").read_bytes() == (
        fixture / "adapter_config.json"
    ).read_bytes()
    for mode in ("merged", "adapter"):
        ms2hf.convert(fixture, tmp_path / f"c-{mode}", lora=mode, progress=False)
        options = ms2hf.ConvertOptions(lora=mode, progress=False)
        reverse(unified, tmp_path / f"r-{mode}", options)
        assert folder_bytes(tmp_path / f"r-{mode}") == folder_bytes(tmp_path / f"c-{mode}")


def test_verify_against_the_training_output(
    fixture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for mode in ("merged", "adapter", "base"):
        ms2hf.convert(fixture, tmp_path / mode, lora=mode, progress=False)
    ok = [
        run(capsys, "verify", tmp_path / "merged", "--against", fixture),
        run(capsys, "verify", tmp_path / "adapter", "--against", fixture),
        run(capsys, "verify", tmp_path / "base", "--against", fixture, "--lora", "base"),
    ]
    assert [code for code, _ in ok] == [0, 0, 0]
    code = main_verify(capsys, tmp_path / "base", "--against", fixture)
    assert code[0] == 1 and "q_proj.weight differs from the source" in code[1]
    adapter = tmp_path / "adapter"
    doc = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**doc, "lora_alpha": 32}))
    code, out = main_verify(capsys, adapter, "--against", fixture)
    assert code == 1
    assert "adapter_config.json: lora_alpha is 32, the training output gives 16" in out
    (adapter / "adapter_config.json").write_text(json.dumps({**doc, "r": 4}))
    code, out = main_verify(capsys, adapter)
    assert code == 1 and "lora_A.weight has shape [8, " in out and "with r = 4" in out


def main_verify(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    from ms2hf.cli import main

    code = main(["verify", *map(str, argv)])
    return code, capsys.readouterr().out


def test_inspect_shows_rank_targets_and_alpha_with_its_origin(bare: Path) -> None:
    report = inspect(TINY)
    assert report.lora is not None
    assert (report.lora.rank, report.lora.modules, report.lora.mode) == (8, 16, "merged")
    assert report.lora.targets == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert report.lora.alpha is not None
    assert (report.lora.alpha.value, report.lora.alpha.origin) == (
        16,
        "adapter_config.json: lora_alpha",
    )
    assert report.output is not None and report.output.tensors == 47
    text = inspect_text(report)
    assert (
        "LoRA fine-tune: r 8, alpha 16 (from adapter_config.json: lora_alpha), scale 2, on 16"
        in text
    )
    adapter = inspect(TINY, ms2hf.ConvertOptions(lora="adapter"))
    assert adapter.output is not None and [f.name for f in adapter.output.files] == [
        "adapter_model.safetensors"
    ]
    assert adapter.output.also == ("adapter_config.json",)
    without = inspect(bare)
    assert without.lora is not None and without.lora.alpha is None and without.output is None
    assert "convert would stop: lora_alpha is unknown" in inspect_text(without)


def test_an_interrupted_merge_resumes_to_the_same_bytes(
    tmp_path: Path, bare: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The plan's fingerprint holds the scale: the same command keeps the merged shards an
    interrupted run finished (sizes and digests checked) and ends byte-identical; another alpha
    is another run."""
    caplog.set_level(logging.INFO, logger="ms2hf")
    one_per_file = {"max_shard_size": 1, "memory_budget": 1 << 20, "progress": False}
    clean = tmp_path / "clean"
    ms2hf.convert(TINY, clean, workers=1, **one_per_file)
    out = tmp_path / "out"
    commit, commits = ShardWriter.commit, [0]

    def interrupted(writer: ShardWriter) -> str:
        commits[0] += 1
        if commits[0] > 10:
            raise KeyboardInterrupt
        return commit(writer)

    monkeypatch.setattr(ShardWriter, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ms2hf.convert(TINY, out, workers=1, **one_per_file)
    monkeypatch.undo()
    assert len(list(out.glob("model-*.safetensors"))) == 10
    ms2hf.convert(TINY, out, workers=2, **one_per_file)
    assert "resuming: 10 of 47 file(s) already complete" in caplog.text
    assert folder_bytes(out) == folder_bytes(clean)
    ms2hf.convert(bare, tmp_path / "alpha", lora_alpha=16, progress=False)
    with pytest.raises(ms2hf.Ms2hfError, match="finished ms2hf conversion"):
        ms2hf.convert(bare, tmp_path / "alpha", lora_alpha=32, progress=False)


def test_an_adapter_and_a_model_never_share_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Loaders and uploads would take both weight sets: each refuses the other, touching
    nothing."""
    adapter, model = tmp_path / "adapter", tmp_path / "model"
    ms2hf.convert(TINY, adapter, lora="adapter", progress=False)
    ms2hf.convert(TINY, model, progress=False)
    before = folder_bytes(adapter), folder_bytes(model)
    line = fails(capsys, "convert", TINY, adapter, "--overwrite")
    assert "holds another weight set (adapter_model.safetensors)" in line
    line = fails(capsys, "convert", TINY, model, "--lora", "adapter", "--overwrite")
    assert "holds another weight set (model.safetensors, model.safetensors.index.json)" in line
    assert (folder_bytes(adapter), folder_bytes(model)) == before
