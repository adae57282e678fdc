"""``merge``: the unified folder holds exactly the model's parameters, bit for bit, in MindSpore's
layout (``docs/old-tools.md``), and never touches what it did not write."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from ms2hf.cli import main
from ms2hf.commands.merge import MergeOptions, assign_parts, merge
from ms2hf.errors import ModelError, OutputError
from ms2hf.io.safetensors_reader import SafetensorsHeader
from tests.conftest import DATA, DENSE_FIXTURES, MOE_FIXTURES, folder_bytes, load_tensors
from tests.edit_checkpoint import copy_fixture, edit_tensors, rank_file

ALL_FIXTURES = DENSE_FIXTURES + MOE_FIXTURES


def run_merge(fixture: Path, out: Path, **options: object) -> Path:
    options.setdefault("progress", False)
    report = merge(fixture / "checkpoint", fixture / "strategy", out, MergeOptions(**options))
    assert report.output_dir == out / "1000_1_ckpt_convert" / "unified_safe"
    return report.output_dir


def rank_files(fixture: Path) -> list[Path]:
    return sorted(
        (fixture / "checkpoint").glob("rank_*/*.safetensors"),
        key=lambda p: int(p.parent.name.split("_")[1]),
    )


def _interleave_rows(*parts: np.ndarray) -> np.ndarray:
    out = np.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), parts[0].dtype)
    for i, p in enumerate(parts):
        out[i :: len(parts)] = p
    return out


def fused_qkv(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, config: dict, contiguous: bool
) -> np.ndarray:
    """``linear_qkv`` as ``docs/qwen3.md`` lays it out: ``[q; k; v]``, or per query group."""
    if contiguous:
        return np.concatenate([q, k, v])
    d, ng = config["head_dim"], config["num_key_value_heads"]
    r = config["num_attention_heads"] // ng
    return np.concatenate(
        [
            np.concatenate(
                [q[g * r * d : (g + 1) * r * d], k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
            )
            for g in range(ng)
        ]
    )


def fused_fc1(gate: np.ndarray, up: np.ndarray, interleaved: bool) -> np.ndarray:
    """``linear_fc1`` as ``docs/qwen3.md`` lays it out: alternating rows, or ``[gate; up]``."""
    return _interleave_rows(gate, up) if interleaved else np.concatenate([gate, up])


def ms_params(
    hf: dict[str, np.ndarray],
    config: dict,
    contiguous_qkv: bool = False,
    interleaved_fc1: bool = True,
) -> dict[str, np.ndarray]:
    """The full MindSpore Transformers parameters, rebuilt from Hugging Face tensors by the
    inverse of ``docs/qwen3.md`` and ``docs/qwen3-moe.md``, written out here independently of
    ms2hf's rules."""
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not config["tie_word_embeddings"]:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        ms, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = (hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        out[ms + "self_attention.linear_qkv.weight"] = fused_qkv(q, k, v, config, contiguous_qkv)
        out[ms + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[ms + "self_attention.q_layernorm.weight"] = hf[p + "self_attn.q_norm.weight"]
        out[ms + "self_attention.k_layernorm.weight"] = hf[p + "self_attn.k_norm.weight"]
        out[ms + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[ms + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        if p + "mlp.gate.weight" in hf:
            e = [p + f"mlp.experts.{j}." for j in range(config["num_experts"])]
            out[ms + "mlp.router.weight"] = hf[p + "mlp.gate.weight"]
            out[ms + "mlp.experts.weight1"] = np.concatenate(
                [
                    np.concatenate([hf[x + "gate_proj.weight"].T, hf[x + "up_proj.weight"].T], 1)
                    for x in e
                ]
            )
            out[ms + "mlp.experts.weight2"] = np.concatenate(
                [hf[x + "down_proj.weight"].T for x in e]
            )
        else:
            out[ms + "mlp.linear_fc1.weight"] = fused_fc1(
                hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"], interleaved_fc1
            )
            out[ms + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


def training_params(fixture: Path) -> dict[str, np.ndarray]:
    """A genuine fixture's parameters: its ground truth through ``ms_params``; ``fi_accu`` (no
    Hugging Face counterpart, never split) from the lowest rank that saved it."""
    hf = load_tensors(fixture / "ground_truth" / "hf_model.safetensors")
    out = ms_params(hf, json.loads((fixture / "ground_truth" / "config.json").read_text()))
    manifest = json.loads((fixture / "manifest.json").read_text())
    for name in manifest["stage_of_param"]:
        if name.endswith(".fi_accu"):
            holder = next(f for f in rank_files(fixture) if name in SafetensorsHeader(f).tensors)
            out[name] = load_tensors(holder)[name]
    return out


def load_unified(folder: Path) -> dict[str, np.ndarray]:
    return {
        k: v for p in sorted(folder.glob("part*.safetensors")) for k, v in load_tensors(p).items()
    }


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_merged_parameters_are_exactly_the_model_bit_for_bit(name: str, tmp_path: Path) -> None:
    fixture = DATA / name
    out = run_merge(fixture, tmp_path, part_size=150_000)
    got = load_unified(out)
    want = training_params(fixture)
    manifest = json.loads((fixture / "manifest.json").read_text())
    assert sorted(got) == sorted(want) == sorted(manifest["stage_of_param"])
    for key, array in want.items():
        assert got[key].dtype == array.dtype, key
        assert got[key].shape == array.shape, key
        assert got[key].tobytes() == array.tobytes(), key


def test_unified_folder_is_what_mindspore_writes(tmp_path: Path) -> None:
    fixture = DATA / "tiny_bf16_dedup"
    out = run_merge(fixture, tmp_path, part_size=300_000)
    doc = json.loads((out / "param_name_map.json").read_text())
    parts = sorted(p.name for p in out.glob("part*.safetensors"))
    assert parts == [f"part{i}.safetensors" for i in range(len(parts))] and len(parts) > 1
    where = {k: p for p in parts for k in SafetensorsHeader(out / p).tensors}
    assert doc["weight_map"] == where
    merged = load_unified(out)
    assert doc["metadata"] == {"total_size": sum(a.nbytes for a in merged.values())}
    assert {a.dtype.name for a in merged.values()} == {"bfloat16"}
    for f in [*parts, "hyper_param.safetensors"]:
        assert SafetensorsHeader(out / f).metadata == {"format": "ms"}, f

    rank0 = load_tensors(rank_files(fixture)[0])
    scalars = {k: v for k, v in rank0.items() if k not in merged and not k.startswith("adam_")}
    hyper = load_tensors(out / "hyper_param.safetensors")
    assert sorted(hyper) == sorted(scalars) and "global_step" in hyper
    for key, value in scalars.items():
        assert hyper[key].dtype == value.dtype and hyper[key].tobytes() == value.tobytes(), key
    assert not [k for k in [*merged, *hyper] if k.startswith(("adam_", "accu_grads"))]


def test_merge_reads_only_weights_and_scalars(tmp_path: Path) -> None:
    fixture = DATA / "tiny_fp32_dp2tp2pp2_opt"
    report = merge(
        fixture / "checkpoint", fixture / "strategy", tmp_path, MergeOptions(progress=False)
    )
    files = [*report.parts, "hyper_param.safetensors"]
    data = sum(a.nbytes for f in files for a in load_tensors(report.output_dir / f).values())
    assert report.bytes_read == report.bytes_written == data


def test_part_assignment_is_deterministic_and_balanced() -> None:
    rng = random.Random(7)
    sizes = {f"t{i}": rng.randrange(1, 1000) for i in range(200)}
    parts = assign_parts(sizes, 10_000)
    shuffled = dict(rng.sample(list(sizes.items()), len(sizes)))
    assert assign_parts(shuffled, 10_000) == parts
    assert len(parts) == -(-sum(sizes.values()) // 10_000)
    assert sorted(n for p in parts for n in p) == sorted(sizes)
    loads = [sum(sizes[n] for n in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert len(assign_parts({"a": 5, "b": 5}, 1)) == 2  # never more parts than tensors
    assert assign_parts({"a": 5}, 10**9) == [["a"]]


def test_output_is_the_same_for_any_worker_count(tmp_path: Path) -> None:
    fixture = DATA / "tiny_fp32"
    one = run_merge(fixture, tmp_path / "one", part_size=200_000, workers=1)
    two = run_merge(fixture, tmp_path / "two", part_size=200_000, workers=2, memory_budget=2**21)
    assert folder_bytes(one) == folder_bytes(two)


def test_refuses_a_non_empty_target_and_overwrite_touches_only_its_files(tmp_path: Path) -> None:
    fixture = DATA / "tiny_fp32"
    target = tmp_path / "1000_1_ckpt_convert" / "unified_safe"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    (target / "part0.safetensors").write_bytes(b"stale")
    with pytest.raises(OutputError, match="not empty"):
        run_merge(fixture, tmp_path)
    assert (target / "part0.safetensors").read_bytes() == b"stale"
    run_merge(fixture, tmp_path, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    assert training_params(fixture).keys() == load_unified(target).keys()


@pytest.mark.parametrize(
    ("name", "claim", "warned"),
    [
        ("tiny_bf16_dedup", False, False),
        ("tiny_bf16_dedup", True, True),
        ("tiny_fp32", True, False),
        ("tiny_fp32", False, True),
        ("tiny_fp32", None, False),
    ],
)
def test_has_redundancy_disagreement_is_reported(
    name: str, claim: bool | None, warned: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fixture = DATA / name
    logger = logging.getLogger("ms2hf")  # the command line may have stopped it propagating
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ms2hf"):
            out = run_merge(fixture, tmp_path, has_redundancy=claim)
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) == warned
    if warned:
        assert f"--has_redundancy {claim}" in warnings[0] and "remove_redundancy" in warnings[0]
    got = load_unified(out)
    for key, array in training_params(fixture).items():
        assert got[key].tobytes() == array.tobytes(), key


def test_filter_out_param_prefix_leaves_parameters_out(tmp_path: Path) -> None:
    fixture = DATA / "tiny_fp32"
    out = run_merge(fixture, tmp_path, exclude_prefix="decoder.layers.3.")
    doc = json.loads((out / "param_name_map.json").read_text())
    want = {k for k in training_params(fixture) if not k.startswith("decoder.layers.3.")}
    assert set(doc["weight_map"]) == set(load_unified(out)) == want


def test_non_finite_weights_warn_or_fail_with_strict(tmp_path: Path) -> None:
    fixture = tmp_path / "run"
    shutil.copytree(DATA / "tiny_fp32", fixture)
    name = "decoder.final_layernorm.weight"
    holder = next(f for f in rank_files(fixture) if name in SafetensorsHeader(f).tensors)
    with open(holder, "r+b") as f:
        f.seek(SafetensorsHeader(holder).tensors[name].start)
        f.write(np.array([np.nan], np.float32).tobytes())
    with pytest.raises(ModelError, match=f"'{name}'.*NaN or inf.*--strict"):
        run_merge(fixture, tmp_path / "strict", strict=True)
    out = run_merge(fixture, tmp_path / "lenient")
    assert np.isnan(load_unified(out)[name][0])


def test_check_replicas_names_the_parameter_and_both_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_fixture("tiny_fp32", tmp_path / "train")
    argv = ["merge", "--checkpoint-dir", f"{root}/checkpoint", "--strategy-dir", f"{root}/strategy"]
    assert main([*argv, "-q", "--check-replicas", "--output_dir", f"{tmp_path}/intact"]) == 0
    name = "decoder.layers.1.input_layernorm.weight"  # replicated on both tensor-parallel ranks

    def damage(tensors: dict[str, np.ndarray]) -> None:
        tensors[name].reshape(-1)[3] += 1

    edit_tensors(rank_file(root, 1), damage)
    assert main([*argv, "-q", "--check-replicas", "--output_dir", f"{tmp_path}/checked"]) == 2
    err = capsys.readouterr().err
    assert f"parameter {name!r}" in err
    assert f"rank 1 ({rank_file(root, 1)})" in err and f"rank 0 ({rank_file(root, 0)})" in err
    assert not (tmp_path / "checked").exists()  # refused before anything is written
    # Only the copy read is merged, so without the flag the damage goes unnoticed.
    assert main([*argv, "-q", "--output_dir", f"{tmp_path}/unchecked"]) == 0
