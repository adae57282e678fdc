"""The checkpoint generator writes what MindSpore writes: checked against the genuine fixtures'
structure (rank files, keys, shapes, dtypes, metadata, strategy bytes), dense and MoE, and its
own promises."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ms2hf.commands.convert import ConvertOptions, convert
from ms2hf.commands.demo import mismatches
from ms2hf.errors import Ms2hfError
from ms2hf.generator import Generated, GeneratorConfig, LoraConfig, MoeConfig, generate
from ms2hf.io.config_files import read_train_config
from ms2hf.io.safetensors_reader import SafetensorsHeader
from ms2hf.io.sources.strategy import load_strategy
from tests.conftest import (
    DATA,
    DATA_LORA,
    DENSE_FIXTURES,
    LORA_FIXTURES,
    MOE_FIXTURES,
    load_tensors,
)
from tests.oracle import legacy
from tests.oracle import lora as lora_oracle
from tests.oracle.convert import hf_tensors
from tests.oracle.convert import mismatches as oracle_mismatches
from tests.oracle.files import read_tensors

FIXTURES = DENSE_FIXTURES + MOE_FIXTURES + LORA_FIXTURES


def fixture_path(name: str) -> Path:
    return (DATA_LORA if name in LORA_FIXTURES else DATA) / name


def truth_weights(fixture: Path) -> dict[str, np.ndarray]:
    """A fixture's Hugging Face tensors: the model's; for a LoRA fine-tune the base model's and
    its LoRA per Hugging Face module (the genuine adapter's tensors, PEFT's prefix dropped)."""
    truth = fixture / "ground_truth"
    if (truth / "hf_model.safetensors").is_file():
        return load_tensors(truth / "hf_model.safetensors")
    adapter = load_tensors(truth / "adapter" / "adapter_model.safetensors")
    return {
        **load_tensors(truth / "hf_base.safetensors"),
        **{name.removeprefix("base_model.model."): t for name, t in adapter.items()},
    }


def config_of(fixture: Path) -> GeneratorConfig:
    """The generator settings of a fixture, from its manifest alone."""
    m = json.loads((fixture / "manifest.json").read_text())
    model, parallel = m["model_config"], m["auto_parallel_context"]
    moe = None
    if "num_experts" in model:
        moe = MoeConfig(
            experts=model["num_experts"],
            moe_ffn=model["moe_intermediate_size"],
            top_k=model["num_experts_per_tok"],
            ep=m["ep"],
            mlp_only_layers=tuple(model.get("mlp_only_layers", ())),
            decoder_sparse_step=model["decoder_sparse_step"],
        )
    lora = None
    if "lora" in m:
        pet = m["lora"]["pet_config"]
        lora = LoraConfig(
            rank=pet["lora_rank"],
            alpha=pet["lora_alpha"],
            dropout=pet["lora_dropout"],
            target_modules=pet["target_modules"],
        )
    return GeneratorConfig(
        layers=model["num_hidden_layers"],
        hidden=model["hidden_size"],
        heads=model["num_attention_heads"],
        groups=model["num_key_value_heads"],
        head_dim=model["head_dim"],
        ffn=model["intermediate_size"],
        vocab=model["vocab_size"],
        tied=m["tie_word_embeddings"],
        dtype=m["dtype"],
        tp=m["tp"],
        dp=m["dp"],
        pp=m["pp"],
        opt_shard=parallel["optimizer_weight_shard_size"]
        if parallel["enable_parallel_optimizer"]
        else 0,
        remove_redundancy=m["remove_redundancy"],
        prefix=m["prefix"],
        step=int(m["file_suffix"].split("_")[0]),
        moe=moe,
        lora=lora,
    )


def oracle_reading(generated: Generated) -> dict[str, np.ndarray]:
    """The Hugging Face tensors the oracle reads from the rank files; for a LoRA fine-tune, the
    base model's and the LoRA per Hugging Face module (its adapter's, PEFT's prefix dropped)."""
    lora = generated.config.lora
    if lora is None:
        return hf_tensors(generated.root)
    mcore = legacy.reassemble(generated.root)
    tensors, _ = lora_oracle.adapter(mcore, lora.alpha)
    prefix = lora_oracle.PEFT_PREFIX
    return {
        **lora_oracle.base_model(mcore),
        **{name.removeprefix(prefix): t for name, t in tensors.items()},
    }


def expected_tensors(generated: Generated) -> dict[str, np.ndarray]:
    extra = generated.expected_lora
    return {**read_tensors(generated.expected), **(read_tensors(extra) if extra.is_file() else {})}


def rank_file(checkpoint: Path, rank: int) -> Path:
    (path,) = (checkpoint / f"rank_{rank}").glob("*.safetensors")
    return path


@pytest.mark.parametrize("name", FIXTURES)
def test_rank_files_match_the_fixture_structure(name: str, tmp_path: Path) -> None:
    fixture = fixture_path(name)
    generated = generate(config_of(fixture), tmp_path)
    ranks = sorted(p.name for p in (fixture / "checkpoint").iterdir())
    assert sorted(p.name for p in generated.checkpoint_dir.iterdir()) == ranks
    for rank in range(len(ranks)):
        want = SafetensorsHeader(rank_file(fixture / "checkpoint", rank))
        got = SafetensorsHeader(rank_file(generated.checkpoint_dir, rank))
        assert got.path.name == want.path.name
        assert got.metadata == want.metadata
        # Same keys in the same file order (de-duplicated saves: the same rank saves each key).
        assert [(t.name, t.dtype, t.shape) for t in got.tensors.values()] == [
            (t.name, t.dtype, t.shape) for t in want.tensors.values()
        ], f"rank {rank}"
    # The values in them are where SPEC says, by the independent oracle.
    assert oracle_mismatches(oracle_reading(generated), expected_tensors(generated)) == []


@pytest.mark.parametrize("name", FIXTURES)
def test_every_saved_slice_is_the_fixture_bytes(name: str, tmp_path: Path) -> None:
    """Given the genuine fixture's own Hugging Face tensors, the generator writes every model
    slice of every rank file byte for byte as MindSpore did: the fused layouts (generator/fuse.py)
    and the placement of every slice are checked against MindSpore, not against ms2hf's rules.
    Adam states are stand-ins and ``fi_accu`` (no Hugging Face tensor) is drawn: not compared."""
    fixture = fixture_path(name)
    weights = truth_weights(fixture)
    generated = generate(config_of(fixture), tmp_path, weights=weights, expected=False)
    compared = 0
    for rank_dir in sorted((fixture / "checkpoint").iterdir()):
        rank = int(rank_dir.name.removeprefix("rank_"))
        want = load_tensors(rank_file(fixture / "checkpoint", rank))
        got = load_tensors(rank_file(generated.checkpoint_dir, rank))
        assert sorted(got) == sorted(want), f"rank {rank}"
        for key, value in want.items():
            if key.startswith(("adam_m.", "adam_v.")) or key.endswith("fi_accu"):
                continue
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, (rank, key)
            assert got[key].tobytes() == value.tobytes(), f"rank {rank}: {key}"
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("name", FIXTURES)
def test_strategy_files_match_the_fixture(name: str, tmp_path: Path) -> None:
    fixture = fixture_path(name)
    generated = generate(config_of(fixture), tmp_path)
    want, got = load_strategy(fixture / "strategy"), load_strategy(generated.strategy_dir)
    assert got.rank_stage == want.rank_stage
    assert got.layouts == want.layouts  # dev matrix, tensor map, optimizer step and size, stage
    for path in sorted((fixture / "strategy").iterdir()):
        # Node names, strategies, accu_grads/adam entries and field order too: byte for byte.
        assert (generated.strategy_dir / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("name", LORA_FIXTURES)
def test_a_lora_run_leaves_mindformers_own_adapter_config(name: str, tmp_path: Path) -> None:
    fixture = fixture_path(name)
    generated = generate(config_of(fixture), tmp_path, expected=False)
    assert (
        generated.run_adapter_config.read_bytes() == (fixture / "adapter_config.json").read_bytes()
    )


@pytest.mark.parametrize("name", FIXTURES)
def test_expected_config_is_the_fixture_config(name: str, tmp_path: Path) -> None:
    fixture = fixture_path(name)
    written = json.loads(generate(config_of(fixture), tmp_path).hf_config.read_text())
    truth = json.loads((fixture / "ground_truth" / "config.json").read_text())
    assert written == {k: truth[k] for k in written}


@pytest.mark.parametrize(
    "moe", [None, MoeConfig(experts=4, moe_ffn=8, ep=2, mlp_only_layers=(1,))], ids=["dense", "moe"]
)
def test_expected_tensors_do_not_depend_on_the_parallel_layout(
    moe: MoeConfig | None, tmp_path: Path
) -> None:
    model = GeneratorConfig(
        layers=2, hidden=32, heads=4, groups=2, head_dim=8, ffn=24, vocab=64, seed=7
    )
    one_device = replace(model, moe=None if moe is None else replace(moe, ep=1))
    single = generate(one_device, tmp_path / "single")
    split = generate(
        replace(model, tp=2, dp=2, pp=2, opt_shard=-1, remove_redundancy=True, moe=moe),
        tmp_path / "split",
    )
    assert split.expected.read_bytes() == single.expected.read_bytes()
    for run in (single, split):  # and the rank files hold them, by the independent oracle
        assert oracle_mismatches(hf_tensors(run.root), read_tensors(run.expected)) == []
    other_seed = generate(replace(one_device, seed=8), tmp_path / "other")
    assert other_seed.expected.read_bytes() != single.expected.read_bytes()


def test_generation_is_deterministic(tmp_path: Path) -> None:
    config = GeneratorConfig(
        layers=2, hidden=32, heads=2, groups=1, head_dim=8, ffn=16, vocab=32, tp=2, dtype="bf16"
    )
    first, second = generate(config, tmp_path / "a"), generate(config, tmp_path / "b")
    for a, b in zip(first.rank_files, second.rank_files):
        assert a.read_bytes() == b.read_bytes()


def test_training_output_alone_is_the_same_bytes_without_the_expected_file(
    tmp_path: Path,
) -> None:
    config = GeneratorConfig(
        layers=2,
        hidden=32,
        heads=2,
        groups=1,
        head_dim=8,
        ffn=16,
        vocab=32,
        tp=2,
        pp=2,
        moe=MoeConfig(experts=4, moe_ffn=8, ep=2),
    )
    full, alone = generate(config, tmp_path / "a"), generate(config, tmp_path / "b", expected=False)
    assert full.expected.is_file() and not alone.expected.exists()
    for a, b in zip(full.rank_files, alone.rank_files, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_router_statistic_is_fp32_outside_the_optimizer(tmp_path: Path) -> None:
    """``fi_accu``, as TopKRouter creates it: float32 in a bf16 run, no Adam states, never
    optimizer-sharded while the weights around it are, and not a Hugging Face tensor."""
    moe = MoeConfig(experts=4, moe_ffn=8, ep=2)
    generated = generate(GeneratorConfig(dtype="bf16", tp=2, dp=2, opt_shard=-1, moe=moe), tmp_path)
    name = "decoder.layers.0.mlp.router.fi_accu"
    for path in generated.rank_files:
        tensors = SafetensorsHeader(path).tensors
        assert (tensors[name].dtype, tensors[name].shape) == ("F32", (4,))
        assert tensors["decoder.layers.0.mlp.experts.weight1"].dtype == "BF16"
        assert not [k for k in tensors if k.startswith("adam_") and "fi_accu" in k]
    layouts = load_strategy(generated.strategy_dir).layouts[0]
    assert not layouts[name].optimizer_sharded
    assert layouts["decoder.layers.0.mlp.experts.weight1"].optimizer_sharded
    assert not [k for k in SafetensorsHeader(generated.expected).tensors if "fi_accu" in k]


def test_tied_model_has_no_output_layer_and_embedding_on_stage_zero_only(tmp_path: Path) -> None:
    generated = generate(GeneratorConfig(tied=True, tp=2, pp=2), tmp_path)
    keys = [set(SafetensorsHeader(p).tensors) for p in generated.rank_files]
    assert all("output_layer.weight" not in k for k in keys)
    assert ["embedding.word_embeddings.weight" in k for k in keys] == [True, True, False, False]
    expected = SafetensorsHeader(generated.expected).tensors
    assert "lm_head.weight" in expected
    out = tmp_path / "hf"
    convert(
        generated.root,
        out,
        ConvertOptions(dtype="source", progress=False, config=generated.train_yaml),
    )
    assert mismatches(out, generated.expected, "source") == []


GIVEN = GeneratorConfig(
    layers=2,
    hidden=32,
    heads=4,
    groups=2,
    head_dim=8,
    ffn=24,
    vocab=64,
    tied=True,
    dtype="bf16",
    tp=2,
    pp=2,
    moe=MoeConfig(experts=4, moe_ffn=8, ep=2, mlp_only_layers=(1,)),
)
"""Tied, bf16 (so given fp32 values are cast), MoE with a dense layer: every kind of tensor."""


def given_weights(drawn: Path) -> dict[str, np.ndarray]:
    """fp32 values of their own for every tensor a seeded run draws; the tied head left to the
    embedding."""
    rng = np.random.default_rng(5)
    return {
        name: rng.standard_normal(array.shape, np.float32)
        for name, array in load_tensors(drawn).items()
        if name != "lm_head.weight"
    }


def test_given_weights_are_the_model_written(tmp_path: Path) -> None:
    drawn = generate(GIVEN, tmp_path / "drawn")
    weights = given_weights(drawn.expected)
    made = generate(GIVEN, tmp_path / "given", weights)
    expected = load_tensors(made.expected)
    assert sorted(expected) == sorted(load_tensors(drawn.expected))
    for name, array in expected.items():
        want = weights[name if name != "lm_head.weight" else "model.embed_tokens.weight"]
        assert array.dtype == ml_dtypes.bfloat16, name
        assert array.tobytes() == want.astype(ml_dtypes.bfloat16).tobytes(), name
    # The rank files hold them: a conversion gives them back.
    out = tmp_path / "hf"
    convert(made.root, out, ConvertOptions(dtype="source", progress=False, config=made.train_yaml))
    assert mismatches(out, made.expected, "source") == []
    assert oracle_mismatches(hf_tensors(made.root), read_tensors(made.expected)) == []
    # The router's statistic is no Hugging Face tensor: still drawn from the seed.
    statistic = "decoder.layers.0.mlp.router.fi_accu"
    held = [(load_tensors(a), load_tensors(b)) for a, b in zip(drawn.rank_files, made.rank_files)]
    held = [(a[statistic], b[statistic]) for a, b in held if statistic in a]
    assert len(held) == 2  # the stage's two ranks
    assert all(a.tobytes() == b.tobytes() for a, b in held)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (
            lambda w: w.pop("model.layers.0.mlp.experts.3.up_proj.weight"),
            "'model.layers.0.mlp.experts.3.up_proj.weight' is missing",
        ),
        (
            lambda w: w.pop("model.embed_tokens.weight"),
            "'model.embed_tokens.weight' / 'lm_head.weight' is missing",
        ),
        (
            lambda w: w.update({"model.layers.1.mlp.down_proj.weight": np.zeros((24, 32))}),
            "'model.layers.1.mlp.down_proj.weight' has shape [24, 32], expected [32, 24]",
        ),
        (
            lambda w: w.update({"model.layers.1.mlp.gate_proj.wieght": np.zeros((24, 32))}),
            "'model.layers.1.mlp.gate_proj.wieght' is not a tensor of this model",
        ),
        (
            lambda w: w.update({"lm_head.weight": np.zeros((64, 32), np.float32)}),
            "'model.embed_tokens.weight' and 'lm_head.weight' are one tied tensor but differ",
        ),
    ],
    ids=["missing", "missing-tied", "mis-shaped", "unknown", "tied-disagree"],
)
def test_given_weights_are_refused_by_name_before_anything_is_written(
    edit: Callable[[dict[str, np.ndarray]], object], named: str, tmp_path: Path
) -> None:
    weights = given_weights(generate(GIVEN, tmp_path / "drawn").expected)
    edit(weights)
    with pytest.raises(Ms2hfError, match=re.escape(named)):
        generate(GIVEN, tmp_path / "given", weights)
    assert not (tmp_path / "given").exists()


def test_train_yaml_carries_the_sizes_and_layout_flags(tmp_path: Path) -> None:
    config = GeneratorConfig(contiguous_qkv=True, interleaved_fc1=False, heads=6, groups=3)
    given = read_train_config(generate(config, tmp_path).train_yaml)
    assert given["use_contiguous_weight_layout_attention"].value is True
    assert given["use_interleaved_weight_layout_mlp"].value is False
    assert given["num_attention_heads"].value == 6 and given["num_key_value_heads"].value == 3


def test_layout_flags_change_the_rank_files_but_not_the_expected_tensors(tmp_path: Path) -> None:
    default = generate(GeneratorConfig(), tmp_path / "default")
    flagged = generate(
        GeneratorConfig(contiguous_qkv=True, interleaved_fc1=False), tmp_path / "flagged"
    )
    assert flagged.expected.read_bytes() == default.expected.read_bytes()
    assert flagged.rank_files[0].read_bytes() != default.rank_files[0].read_bytes()
    # Without the yaml a converter assumes the default layout and gets q/k/v and gate/up wrong.
    out = tmp_path / "hf"
    convert(flagged.root, out, ConvertOptions(dtype="fp32", progress=False))
    wrong = mismatches(out, flagged.expected, "fp32")
    assert "model.layers.0.self_attn.q_proj.weight" in wrong
    assert "model.layers.0.mlp.gate_proj.weight" in wrong
    assert "model.layers.0.self_attn.o_proj.weight" not in wrong
    # The independent oracle reads the flagged layouts as SPEC section 4 describes them.
    expected = read_tensors(flagged.expected)
    flags = {"contiguous_qkv": True, "interleaved_fc1": False}
    assert oracle_mismatches(hf_tensors(flagged.root, **flags), expected) == []
    assert oracle_mismatches(hf_tensors(flagged.root), expected) == wrong


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"layers": 3, "pp": 2}, "layers = 3"),
        ({"heads": 3, "groups": 2}, "heads = 3"),
        ({"dtype": "fp16"}, "dtype = 'fp16'"),
        ({"opt_shard": -2}, "opt_shard = -2"),
        ({"vocab": 511, "tp": 2}, "'embedding.word_embeddings.weight' of shape [511, 128]"),
    ],
)
def test_impossible_settings_are_refused_by_name(
    settings: dict, named: str, tmp_path: Path
) -> None:
    with pytest.raises(Ms2hfError, match=re.escape(named)):
        generate(GeneratorConfig(**settings), tmp_path)


@pytest.mark.parametrize(
    ("parallel", "moe", "named"),
    [
        ({}, {"top_k": 9}, "MoeConfig.top_k = 9"),
        ({}, {"experts": 6, "ep": 4}, "MoeConfig.experts = 6 cannot be split"),
        ({"tp": 2}, {"ep": 4}, "MoeConfig.ep = 4 does not divide the 2 devices"),
        ({}, {"mlp_only_layers": (1, 4)}, "layers [4] do not exist"),
        ({}, {"decoder_sparse_step": 5}, "leave no layer with experts"),
        ({}, {"moe_ffn": 0}, "MoeConfig.moe_ffn = 0"),
    ],
)
def test_impossible_moe_settings_are_refused_by_name(parallel: dict, moe: dict, named: str) -> None:
    with pytest.raises(Ms2hfError, match=re.escape(named)):
        GeneratorConfig(**parallel, moe=MoeConfig(**moe))
