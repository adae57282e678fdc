"""The Checkpoint 2.0 save recipe (``tests/oracle/ckpt2_save.py``, ``docs/checkpoint2.md``).

1. From each genuine fixture's own tensors and parallel settings, the recipe writes the fixture
   again byte for byte: every file name, ``metadata.json``, ``common.json``, the tracker, and every
   ``-model-``/``-opt-`` file. This pins down what a generator must write.
2. For layouts no fixture covers, what the recipe writes is read back by the reader oracle to the
   same tensors (a generator and a reader that agree with these two agree with each other).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tests.oracle.ckpt2 import reassemble, select_iteration
from tests.oracle.ckpt2_save import Parallel, save
from tests.oracle.files import read_tensors

DATA = Path(__file__).parent / "data-ckpt2"
NAMES = [
    "tiny_fp32_dp2tp2pp2_opt",
    "tiny_fp32_dp2tp2pp2_opt_dedup",
    "tiny_tied_fp32_tp2pp2_dedup",
    "moe_fp32_dp2tp2pp2_ep2_dedup",
]


@pytest.mark.parametrize("name", NAMES)
def test_recipe_rewrites_the_fixture_byte_for_byte(name: str, tmp_path: Path) -> None:
    fixture = DATA / name
    manifest = json.loads((fixture / "manifest.json").read_text())
    src = select_iteration(fixture / "checkpoint")
    par = Parallel(
        tp=manifest["tp"],
        dp=manifest["dp"],
        pp=manifest["pp"],
        ep=manifest["ep"],
        opt_shard=manifest["auto_parallel_context"]["enable_parallel_optimizer"],
        dedup=manifest["remove_redundancy"],
        prefix=manifest["prefix"],
    )
    scalars = None
    if not par.dedup:
        first_opt = read_tensors(next(src.glob("*-opt-0000000-*.safetensors")))
        scalars = {
            "learning_rate": first_opt["learning_rate"],
            "global_step": first_opt["global_step"],
        }
    layers = json.loads((fixture / "ground_truth" / "config.json").read_text())["num_hidden_layers"]
    common = json.loads((src / "common.json").read_text())
    out = save(tmp_path / "checkpoint", 1000, reassemble(src, "all"), par, layers, common, scalars)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    tracker = "latest_checkpointed_iteration.txt"
    assert (out.parent / tracker).read_bytes() == (src.parent / tracker).read_bytes() == b"1000"


# ----------------------------------------------------------------------------- other layouts


def tiny_tensors(
    moe: bool, dtype, layers: int = 4, seed: int = 0, tied: bool = False
) -> dict[str, np.ndarray]:
    """A tiny Qwen3 (or Qwen3-MoE) with Adam states, random values."""
    rng = np.random.default_rng(seed)
    H, V, nh, ng, d, F, E, Fm = 32, 64, 4, 2, 8, 48, 8, 16
    shapes = {"embedding.word_embeddings.weight": [V, H], "decoder.final_layernorm.weight": [H]}
    if not tied:
        shapes["output_layer.weight"] = [V, H]
    for i in range(layers):
        p = f"decoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": [H],
            p + "pre_mlp_layernorm.weight": [H],
            p + "self_attention.linear_qkv.weight": [(nh + 2 * ng) * d, H],
            p + "self_attention.q_layernorm.weight": [d],
            p + "self_attention.k_layernorm.weight": [d],
            p + "self_attention.linear_proj.weight": [H, nh * d],
        }
        if moe:
            shapes |= {
                p + "mlp.router.weight": [E, H],
                p + "mlp.experts.weight1": [E * H, 2 * Fm],
                p + "mlp.experts.weight2": [E * Fm, H],
            }
        else:
            shapes |= {p + "mlp.linear_fc1.weight": [2 * F, H], p + "mlp.linear_fc2.weight": [H, F]}
    out = {}
    for name, shape in shapes.items():
        out[name] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
        out["adam_m." + name] = rng.standard_normal(shape).astype(np.float32)
        out["adam_v." + name] = rng.standard_normal(shape).astype(np.float32)
    if moe:
        for i in range(layers):
            out[f"decoder.layers.{i}.mlp.router.fi_accu"] = rng.standard_normal([E]).astype(
                np.float32
            )
    return out


LAYOUTS = {
    "tp4 bf16 normal, no prefix": (Parallel(tp=4, prefix=None), False, ml_dtypes.bfloat16),
    "dp2 tp2 normal: two records per slice": (Parallel(tp=2, dp=2), False, np.float32),
    "dp2 tp2 dedup": (Parallel(tp=2, dp=2, dedup=True), False, np.float32),
    "dp8 tp2 opt shard dedup: slice ids past 9": (
        Parallel(tp=2, dp=8, opt_shard=True, dedup=True),
        False,
        np.float32,
    ),
    "dp4 pp4 opt shard normal bf16": (
        Parallel(dp=4, pp=4, opt_shard=True),
        False,
        ml_dtypes.bfloat16,
    ),
    "moe dp2 tp2 ep2 normal": (Parallel(tp=2, dp=2, ep=2), True, np.float32),
    "moe dp4 ep4 pp2 dedup bf16": (
        Parallel(dp=4, ep=4, pp=2, dedup=True, prefix="qwen3_moe"),
        True,
        ml_dtypes.bfloat16,
    ),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_recipe_output_reads_back(case: str, tmp_path: Path) -> None:
    par, moe, dtype = LAYOUTS[case]
    tensors = tiny_tensors(moe, dtype)
    common = {
        "epoch_num": 1,
        "step_num": 8,
        "global_step": 8,
        "loss_scale": None,
        "global_batch_size": 4,
        "consumed_samples": None,
        "ckpt_status": 0,
    }
    folder = save(tmp_path / "checkpoint", 8, tensors, par, 4, common)
    assert select_iteration(tmp_path / "checkpoint") == folder
    got = reassemble(folder, "all")
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), k
    meta = json.loads((folder / "metadata.json").read_text())
    records = [len(v) for v in meta["storage_data"].values()]
    if par.dedup:
        assert set(records) == {1}
    elif par.dp > 1 and not par.opt_shard:
        assert max(records) == par.per_stage  # every holder of a replicated slice (a norm) has one
    model_files = {
        r["file_name"]
        for v in meta["storage_data"].values()
        for r in v
        if "-model-" in r["file_name"]
    }
    assert model_files == {p.name for p in folder.glob("*-model-*.safetensors")}
