"""LoRA fine-tunes the genuine fixtures do not show, made by the generator (whose LoRA runs are
checked against the genuine ones in tests/test_generator.py): de-duplicated and optimizer-sharded
saves, bf16, other fused layouts, ranks and alphas (a scale that is no power of two, an alpha the
run's own file truncates), Qwen3-MoE with a dense layer, attention-only targets on a tied model,
a de-duplicated Checkpoint 2.0 save.
Each is judged in Hugging Face space by the oracle (tests/oracle/lora.py): the merged model is
``merge_weight`` of the generator's base tensors and LoRA tensors, the adapter is those LoRA
tensors, the base model the base tensors; and from the rank files themselves, reassembled by the
oracle (tests/oracle/legacy.py, sharing no layout math with ms2hf) and merged by its rules."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ms2hf
from ms2hf.generator import Generated, GeneratorConfig, LoraConfig, MoeConfig, generate
from ms2hf.generator.network import model_spec
from tests.conftest import load_hf_dir, load_tensors
from tests.oracle import ckpt2, legacy
from tests.oracle import lora as oracle
from tests.oracle.convert import mismatches

SMALL = GeneratorConfig(layers=2, hidden=32, heads=4, groups=2, head_dim=8, ffn=24, vocab=64)
CASES = {
    "dedup-opt-shard": replace(
        SMALL, tp=2, dp=2, pp=2, opt_shard=-1, remove_redundancy=True, lora=LoraConfig(4, 32)
    ),
    "bf16": replace(SMALL, dtype="bf16", tp=2, lora=LoraConfig(rank=16, alpha=8)),
    "layouts-odd-scale": replace(
        SMALL, contiguous_qkv=True, interleaved_fc1=False, tp=2, pp=2, lora=LoraConfig(6, 7)
    ),
    "truncated-alpha": replace(SMALL, tp=2, lora=LoraConfig(rank=8, alpha=24.5)),
    "moe-dense-layer": replace(
        SMALL,
        tp=2,
        dp=2,
        pp=2,
        remove_redundancy=True,
        moe=MoeConfig(experts=4, moe_ffn=16, ep=2, mlp_only_layers=(0,)),
        lora=LoraConfig(),
    ),
    "ckpt2-dedup": replace(
        SMALL,
        tp=2,
        dp=2,
        pp=2,
        opt_shard=-1,
        remove_redundancy=True,
        save_format="ckpt2",
        lora=LoraConfig(rank=4, alpha=8),
    ),
    "attention-only-tied": replace(
        SMALL, tied=True, tp=2, pp=2, lora=LoraConfig(target_modules=".*linear_qkv|.*linear_proj")
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Generated:
    return generate(CASES[request.param], tmp_path_factory.mktemp(request.param))


def hf_lora(generated: Generated) -> dict[str, np.ndarray]:
    return load_tensors(generated.expected_lora)


def expected_merged(generated: Generated) -> dict[str, np.ndarray]:
    lora = generated.config.lora
    assert lora is not None
    pairs = hf_lora(generated)
    scale = oracle.lora_scale(lora.alpha, lora.rank)
    out = {}
    for name, w in load_tensors(generated.expected).items():
        module = name.removesuffix(".weight")
        if module + ".lora_A.weight" in pairs:
            a, b = pairs[module + ".lora_A.weight"], pairs[module + ".lora_B.weight"]
            out[name] = oracle.merge_weight(w, b, a, scale)
        else:
            out[name] = w.astype(np.float32)
    return out


def convert(generated: Generated, out: Path, **options: object) -> None:
    ms2hf.convert(generated.root, out, config=generated.train_yaml, progress=False, **options)


def test_merged_model(run: Generated, tmp_path: Path) -> None:
    want = expected_merged(run)
    assert any(
        not np.array_equal(want[n], w.astype(np.float32))
        for n, w in load_tensors(run.expected).items()
    )
    convert(run, tmp_path / "fp32", dtype="fp32")
    convert(run, tmp_path / "bf16", dtype="bf16")
    for dtype, cast in (("fp32", np.float32), ("bf16", ml_dtypes.bfloat16)):
        got = load_hf_dir(tmp_path / dtype)
        assert sorted(got) == sorted(want)
        for name, w in want.items():
            assert got[name].tobytes() == w.astype(cast).tobytes(), (dtype, name)


def test_adapter(run: Generated, tmp_path: Path) -> None:
    convert(run, tmp_path, lora="adapter", dtype="source")
    pairs = hf_lora(run)
    got = load_tensors(tmp_path / "adapter_model.safetensors")
    assert sorted(got) == sorted(oracle.PEFT_PREFIX + name for name in pairs)
    for name, t in pairs.items():
        assert got[oracle.PEFT_PREFIX + name].tobytes() == t.tobytes(), name
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    lora = run.config.lora
    assert lora is not None
    assert config["target_modules"] == target_modules(run)
    assert (config["r"], config["lora_alpha"]) == (lora.rank, lora.alpha)


def target_modules(generated: Generated) -> list[str]:
    """PEFT matches each listed name against the end of every module name: a module kind is
    listed by its short name when every module of that kind has LoRA, else module by module."""
    with_lora = {name.rsplit(".", 2)[0] for name in hf_lora(generated)}
    modules = [name.removesuffix(".weight") for name in load_tensors(generated.expected)]
    out: list[str] = []
    for kind in oracle.HF_TARGET_ORDER:
        of_kind = [m for m in modules if m.endswith("." + kind)]
        have = [m for m in of_kind if m in with_lora]
        out += [kind] if have and have == of_kind else have
    return out


def test_a_moe_dense_layer_is_named_in_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its experts have gate_proj, up_proj and down_proj without LoRA: PEFT would wrap them."""
    generated = generate(CASES["moe-dense-layer"], tmp_path / "run")
    convert(generated, tmp_path / "adapter", lora="adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "target_modules names model.layers.0.mlp.gate_proj" in caplog.text
    assert (
        config["target_modules"]
        == target_modules(generated)
        == [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.0.mlp.down_proj",
        ]
    )


def test_base_model(run: Generated, tmp_path: Path) -> None:
    convert(run, tmp_path, lora="base", dtype="source")
    got, want = load_hf_dir(tmp_path), load_tensors(run.expected)
    assert sorted(got) == sorted(want)
    assert all(got[n].tobytes() == w.tobytes() for n, w in want.items())


def test_which_modules_have_lora() -> None:
    """mindformers' rule on names: a MoE model's dense layer has MLP LoRA, its MoE layers
    attention only; a regex that names attention only leaves the MLP without."""
    kinds = {
        case: [p.name for p in model_spec(CASES[case]).params if "lora_A" in p.name]
        for case in ("moe-dense-layer", "attention-only-tied")
    }
    assert "decoder.layers.0.mlp.linear_fc1.lora_A.weight" in kinds["moe-dense-layer"]
    assert not [n for n in kinds["moe-dense-layer"] if n.startswith("decoder.layers.1.mlp")]
    assert not [n for n in kinds["attention-only-tied"] if ".mlp." in n]


def test_the_run_file_alone_gives_the_truncated_alpha(tmp_path: Path) -> None:
    """Without the yaml, a fractional alpha is known only as the run's file writes it:
    int(24.5) = 24 (docs/lora.md#2); the yaml gives the exact value (test_merged_model)."""
    generated = generate(CASES["truncated-alpha"], tmp_path / "run")
    assert json.loads(generated.run_adapter_config.read_text())["lora_alpha"] == 24
    report = ms2hf.convert(generated.root, tmp_path / "hf", progress=False, lora="adapter")
    assert report.lora is not None and report.lora.alpha is not None
    assert report.lora.alpha.value == 24


def test_the_oracle_reading_the_rank_files_agrees(run: Generated, tmp_path: Path) -> None:
    """The LoRA weights' blocks placed by the oracle's own reading of the strategy files (the
    row-parallel lora_A split by columns, lora_B replicated, de-duplicated saves...), then the
    oracle's merge and adapter: ms2hf writes the same bytes."""
    lora = run.config.lora
    assert lora is not None
    if run.config.save_format == "ckpt2":
        mcore = ckpt2.reassemble(ckpt2.select_iteration(run.checkpoint_dir))
    else:
        mcore = legacy.reassemble(run.root)
    layouts = {
        "contiguous_qkv": run.config.contiguous_qkv,
        "interleaved_fc1": run.config.interleaved_fc1,
    }
    convert(run, tmp_path / "merged", dtype="fp32")
    merged = oracle.merged_model(mcore, lora.alpha, **layouts)
    assert mismatches(load_hf_dir(tmp_path / "merged"), merged) == []
    convert(run, tmp_path / "adapter", lora="adapter", dtype="source")
    tensors, _ = oracle.adapter(mcore, lora.alpha, **layouts)
    assert (
        mismatches(load_tensors(tmp_path / "adapter" / "adapter_model.safetensors"), tensors) == []
    )
