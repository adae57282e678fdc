"""The LoRA oracle (tests/oracle/lora.py) reproduces the genuine LoRA fixtures from their full
MCore tensors: the merged model bit for bit, the PEFT adapter byte for byte and its config value
for value; and it refuses what docs/lora.md says is refused. A few facts of the rank files that
docs/lora.md states (which dims of lora_A / lora_B are split, which keys have Adam states) are
checked here too, from the files alone."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import DATA_LORA, LORA_FIXTURES, assert_same_tensors
from tests.oracle import lora
from tests.oracle.files import read_dtypes, read_metadata, read_tensors

LORA_MODULE_KINDS = {
    "tiny_lora_fp32_tp2pp2": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],
    "moe_lora_fp32_dp2tp2pp2_ep2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

_cache: dict[Path, dict[str, np.ndarray]] = {}


def tensors(path: Path) -> dict[str, np.ndarray]:
    if path not in _cache:
        _cache[path] = read_tensors(path)
    return _cache[path]


@pytest.fixture(params=LORA_FIXTURES)
def fixture(request: pytest.FixtureRequest) -> Path:
    return DATA_LORA / request.param


def mcore_of(fixture: Path) -> dict[str, np.ndarray]:
    return tensors(fixture / "ground_truth" / "mcore_full.safetensors")


def run_settings(fixture: Path) -> lora.RunLoraSettings:
    return lora.read_run_adapter_config(fixture / "adapter_config.json")


# ---------------------------------------------------------------------------------------------
# The oracle against the ground truth
# ---------------------------------------------------------------------------------------------


def test_run_adapter_config_gives_alpha_and_rank(fixture: Path) -> None:
    run = run_settings(fixture)
    assert (run.r, run.lora_alpha, run.lora_dropout) == (8, 16, 0.1)
    assert lora.lora_rank(mcore_of(fixture)) == run.r
    manifest = json.loads((fixture / "manifest.json").read_text())
    assert manifest["lora"]["pet_config"]["lora_alpha"] == run.lora_alpha
    assert manifest["lora"]["pet_config"]["lora_rank"] == run.r


def test_base_model_is_the_plain_conversion(fixture: Path) -> None:
    want = tensors(fixture / "ground_truth" / "hf_base.safetensors")
    assert_same_tensors(lora.base_model(mcore_of(fixture)), want)


def test_merged_model_is_bit_exact(fixture: Path) -> None:
    want = tensors(fixture / "ground_truth" / "hf_merged.safetensors")
    got = lora.merged_model(mcore_of(fixture), run_settings(fixture).lora_alpha)
    assert_same_tensors(got, want)
    assert read_metadata(fixture / "ground_truth" / "hf_merged.safetensors") == {"format": "pt"}


def test_merge_changes_exactly_the_lora_modules(fixture: Path) -> None:
    base = tensors(fixture / "ground_truth" / "hf_base.safetensors")
    merged = tensors(fixture / "ground_truth" / "hf_merged.safetensors")
    kinds = LORA_MODULE_KINDS[fixture.name]
    for name in base:
        leaf = name.rsplit(".", 2)[-2]
        if leaf in kinds and ".experts." not in name:
            assert not np.array_equal(base[name], merged[name]), name
        else:
            assert base[name].tobytes() == merged[name].tobytes(), name


def test_adapter_tensors_are_byte_copies(fixture: Path) -> None:
    adapter_dir = fixture / "ground_truth" / "adapter"
    want = tensors(adapter_dir / "adapter_model.safetensors")
    got, _ = lora.adapter(mcore_of(fixture), run_settings(fixture).lora_alpha)
    assert_same_tensors(got, want)
    assert set(read_dtypes(adapter_dir / "adapter_model.safetensors").values()) == {"F32"}
    assert read_metadata(adapter_dir / "adapter_model.safetensors") == {"format": "pt"}


def test_adapter_config_values(fixture: Path) -> None:
    run = run_settings(fixture)
    _, got = lora.adapter(mcore_of(fixture), run.lora_alpha, run.lora_dropout)
    text = (fixture / "ground_truth" / "adapter" / "adapter_config.json").read_text()
    want = json.loads(text)
    assert got == want
    assert list(got) == list(want)
    assert got["target_modules"] == LORA_MODULE_KINDS[fixture.name]
    assert json.dumps(got, indent=2) == text  # the ground truth's own formatting


def test_lora_a_is_shared_by_fused_modules(fixture: Path) -> None:
    got, _ = lora.adapter(mcore_of(fixture), 16)
    for i in range(4):
        pre = f"base_model.model.model.layers.{i}."
        q = got[pre + "self_attn.q_proj.lora_A.weight"]
        for other in ("k_proj", "v_proj"):
            assert got[pre + f"self_attn.{other}.lora_A.weight"].tobytes() == q.tobytes()
        if pre + "mlp.gate_proj.lora_A.weight" in got:
            assert (
                got[pre + "mlp.up_proj.lora_A.weight"].tobytes()
                == got[pre + "mlp.gate_proj.lora_A.weight"].tobytes()
            )


def test_lora_b_rows_follow_the_base_row_rule(fixture: Path) -> None:
    """Merging the fused MCore tensor, then splitting rows, gives the same bits as the oracle's
    split-then-merge: B's rows go exactly where the base weight's rows go."""
    mcore = mcore_of(fixture)
    merged = lora.merged_model(mcore, 16)
    dims = lora.dims_of(mcore)
    for i in range(4):
        p = f"decoder.layers.{i}.self_attention.linear_qkv."
        fused = lora.merge_weight(
            mcore[p + "weight"], mcore[p + "lora_B.weight"], mcore[p + "lora_A.weight"], 2.0
        )
        for name, rows in zip(("q_proj", "k_proj", "v_proj"), lora.split_qkv(fused, dims)):
            assert rows.tobytes() == merged[f"model.layers.{i}.self_attn.{name}.weight"].tobytes()


# ---------------------------------------------------------------------------------------------
# The merge arithmetic
# ---------------------------------------------------------------------------------------------


def test_float64_orders_agree_on_the_fixtures_and_float32_does_not(fixture: Path) -> None:
    """s*(B@A), (s*B)@A and BLAS's own float64 sum give the oracle's bits on these fixtures
    (s = 2 is a power of two; no float64 result lies near a float32 rounding boundary); a
    float32 merge, as PEFT's merge_and_unload and mindformers' transform_ckpt_lora.py do it,
    does not."""
    mcore = mcore_of(fixture)
    s = 2.0
    f32_differs = 0
    for mod in lora.lora_modules(mcore):
        want = lora.merge_weight(mod.weight, mod.lora_b, mod.lora_a, s)
        w, b, a = (x.astype(np.float64) for x in (mod.weight, mod.lora_b, mod.lora_a))
        assert ((w + s * (b @ a)).astype(np.float32)).tobytes() == want.tobytes()
        assert ((w + (s * b) @ a).astype(np.float32)).tobytes() == want.tobytes()
        f32 = mod.weight + np.float32(s) * (mod.lora_b @ mod.lora_a)
        f32_differs += int((f32 != want).sum())
    assert f32_differs > 0


def test_merge_weight_rounds_once_from_float64() -> None:
    """W = 1 + 2^-23, B*A = 2^-24 - 1.1e-16 (exact in float64): the true sum lies just below the
    midpoint between W and its next float32, so it rounds to W. Rounding B*A to float32 first
    gives exactly 2^-24, a tie, which rounds to the even neighbour 1 + 2^-22."""
    w = np.array([[1 + 2.0**-23]], np.float32)
    b = np.array([[1 + 46 * 2.0**-20]], np.float32)
    a = np.array([[864025888]], np.uint32).view(np.float32)
    assert float(b[0, 0]) * float(a[0, 0]) - 2.0**-24 == pytest.approx(-1.147e-16, rel=1e-3)
    assert lora.merge_weight(w, b, a, 1.0)[0, 0] == w[0, 0]
    assert (w + b @ a)[0, 0] == np.float32(1 + 2.0**-22)


def test_merge_weight_takes_bf16_exactly() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (6, 5)).astype(ml_dtypes.bfloat16)
    a = rng.normal(0, 0.02, (3, 5)).astype(ml_dtypes.bfloat16)
    b = rng.normal(0, 0.02, (6, 3)).astype(ml_dtypes.bfloat16)
    got = lora.merge_weight(w, b, a, 8.0)
    want = (w.astype(np.float64) + 8.0 * (b.astype(np.float64) @ a.astype(np.float64))).astype(
        np.float32
    )
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


def test_scale_is_plain_alpha_over_r() -> None:
    assert lora.lora_scale(16, 8) == 2.0
    assert lora.lora_scale(32, 4) == 8.0
    assert lora.lora_scale(16, 6) == 16 / 6


# ---------------------------------------------------------------------------------------------
# What is refused
# ---------------------------------------------------------------------------------------------


def tiny_mcore() -> dict[str, np.ndarray]:
    return dict(mcore_of(DATA_LORA / "tiny_lora_fp32_tp2pp2"))


@pytest.mark.parametrize("alpha", [None, 0, -16, float("nan"), "16", True])
def test_alpha_missing_or_not_positive_is_refused(alpha: object) -> None:
    with pytest.raises(lora.LoraRejected, match="lora_alpha"):
        lora.merged_model(tiny_mcore(), alpha)  # type: ignore[arg-type]
    with pytest.raises(lora.LoraRejected, match="lora_alpha"):
        lora.adapter(tiny_mcore(), alpha)  # type: ignore[arg-type]


@pytest.mark.parametrize("drop", ["lora_A", "lora_B"])
def test_one_half_without_the_other_is_refused(drop: str) -> None:
    m = tiny_mcore()
    del m[f"decoder.layers.1.mlp.linear_fc2.{drop}.weight"]
    with pytest.raises(lora.LoraRejected, match="without"):
        lora.merged_model(m, 16)


def test_rank_mismatch_within_a_pair_is_refused() -> None:
    m = tiny_mcore()
    key = "decoder.layers.0.self_attention.linear_proj.lora_A.weight"
    m[key] = m[key][:4]
    with pytest.raises(lora.LoraRejected, match="rank"):
        lora.adapter(m, 16)


def test_ranks_differing_between_modules_are_refused() -> None:
    m = tiny_mcore()
    p = "decoder.layers.2.mlp.linear_fc2."
    m[p + "lora_A.weight"] = m[p + "lora_A.weight"][:4]
    m[p + "lora_B.weight"] = m[p + "lora_B.weight"][:, :4]
    with pytest.raises(lora.LoraRejected, match="ranks differ"):
        lora.merged_model(m, 16)


def test_lora_not_fitting_the_base_is_refused() -> None:
    m = tiny_mcore()
    p = "decoder.layers.0.mlp.linear_fc1."
    m[p + "lora_B.weight"] = m[p + "lora_B.weight"][:-2]
    with pytest.raises(lora.LoraRejected, match="does not fit"):
        lora.merged_model(m, 16)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("embedding.word_embeddings.lora_A.weight", (8, 128)),
        ("decoder.layers.0.mlp.router.lora_A.weight", (8, 128)),
        ("decoder.layers.0.mlp.experts.weight1.lora_A.weight", (8, 128)),
        ("decoder.layers.0.self_attention.linear_qkv.lora_B.bias", (256,)),
        ("decoder.layers.0.self_attention.linear_qkv.lora_a", (8, 128)),
    ],
)
def test_lora_on_unknown_modules_is_refused(name: str, shape: tuple[int, ...]) -> None:
    m = tiny_mcore()
    m[name] = np.zeros(shape, np.float32)
    with pytest.raises(lora.LoraRejected):
        lora.adapter(m, 16)


def test_optimizer_states_are_not_lora_weights() -> None:
    m = tiny_mcore()
    assert any(k.startswith("adam_m.") and "lora" in k for k in m)
    m["accu_grads.decoder.layers.0.mlp.linear_fc1.lora_A.weight"] = np.zeros((1, 1), np.float32)
    assert lora.lora_rank(m) == 8


def test_no_lora_means_no_adapter_and_a_plain_model() -> None:
    m = {k: v for k, v in tiny_mcore().items() if "lora" not in k}
    with pytest.raises(lora.LoraRejected, match="no LoRA"):
        lora.adapter(m, 16)
    assert_same_tensors(
        lora.merged_model(m, None),
        tensors(DATA_LORA / "tiny_lora_fp32_tp2pp2" / "ground_truth" / "hf_base.safetensors"),
    )


@pytest.mark.parametrize(
    "change",
    [
        {"lora_alpha": 0},
        {"lora_alpha": -1},
        {"r": 0},
        {"peft_type": "ADALORA"},
        {"use_rslora": True},
    ],
)
def test_run_adapter_config_refusals(tmp_path: Path, change: dict[str, object]) -> None:
    doc = json.loads((DATA_LORA / "tiny_lora_fp32_tp2pp2" / "adapter_config.json").read_text())
    doc.update(change)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(lora.LoraRejected):
        lora.read_run_adapter_config(path)


# ---------------------------------------------------------------------------------------------
# Facts of the rank files (docs/lora.md, "What a LoRA run saves"), from the files alone
# ---------------------------------------------------------------------------------------------

SPLITS = {  # which dim of each LoRA weight the TP axis splits (None: replicated)
    "self_attention.linear_qkv.lora_A.weight": None,
    "self_attention.linear_qkv.lora_B.weight": 0,
    "self_attention.linear_proj.lora_A.weight": 1,
    "self_attention.linear_proj.lora_B.weight": None,
    "mlp.linear_fc1.lora_A.weight": None,
    "mlp.linear_fc1.lora_B.weight": 0,
    "mlp.linear_fc2.lora_A.weight": 1,
    "mlp.linear_fc2.lora_B.weight": None,
}


def rank_files(fixture: Path) -> dict[int, dict[str, np.ndarray]]:
    out = {}
    for folder in sorted((fixture / "checkpoint").iterdir()):
        (path,) = folder.glob("*.safetensors")
        out[int(folder.name.split("_")[1])] = tensors(path)
    return out


def test_rank_files_hold_lora_slices_as_documented(fixture: Path) -> None:
    manifest = json.loads((fixture / "manifest.json").read_text())
    tp, world, pp = manifest["tp"], manifest["world"], manifest["pp"]
    per_stage = world // pp
    full = mcore_of(fixture)
    checked = 0
    for rank, held in rank_files(fixture).items():
        tp_index = (rank % per_stage) % tp  # dev matrix [dp, cp, tp]: tp is the fastest axis
        for name, t in held.items():
            if name.startswith(lora.SKIPPED_PREFIXES) or ".lora_" not in name:
                continue
            dim = SPLITS[name.split(".", 3)[3]]
            want = full[name]
            if dim is not None:
                size = want.shape[dim] // tp
                want = np.take(want, range(tp_index * size, (tp_index + 1) * size), axis=dim)
            assert t.dtype == want.dtype and t.tobytes() == want.tobytes(), (rank, name)
            checked += 1
    assert checked > 0


def test_adam_states_exist_for_lora_weights_only(fixture: Path) -> None:
    for held in rank_files(fixture).values():
        params = {k for k in held if k.startswith(("decoder.", "embedding.", "output_layer."))}
        lora_params = {k for k in params if ".lora_" in k}
        assert lora_params
        for state in ("adam_m.", "adam_v."):
            assert {k[len(state) :] for k in held if k.startswith(state)} == lora_params
        for name in lora_params:
            assert held["adam_m." + name].dtype == np.float32


def test_run_adapter_config_is_mindformers_own(fixture: Path) -> None:
    """What mindformers' writer leaves next to checkpoint/: PEFT-shaped, but with its regex as
    target_modules (PEFT cannot use it) and base_model_name_or_path the string "none"."""
    text = (fixture / "adapter_config.json").read_text()
    doc = json.loads(text)
    assert doc == {
        "base_model_name_or_path": "none",
        "bias": "none",
        "lora_alpha": 16,
        "lora_bias": False,
        "lora_dropout": 0.1,
        "peft_type": "LORA",
        "r": 8,
        "target_modules": [
            ".*word_embeddings",
            ".*linear_qkv",
            ".*linear_proj",
            ".*linear_fc1",
            ".*linear_fc2",
        ],
        "task_type": "CAUSAL_LM",
    }
    assert json.dumps(doc, indent=2, ensure_ascii=False) == text
