"""Qwen3-MoE: the genuine expert-parallel fixture bit for bit, the expert rules element by element,
dense layers inside a MoE model, config.json, and transposed expert copies in arbitrary bands."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ms2hf.commands.convert import ConvertOptions, convert, write_hf_checkpoint
from ms2hf.errors import ModelError
from ms2hf.io.config_files import ConfigValue
from ms2hf.io.dtypes import NUMPY_DTYPES
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.safetensors_reader import SafetensorsHeader
from ms2hf.io.safetensors_writer import save_file
from ms2hf.io.sources.legacy import plan_source
from ms2hf.io.sources.plan import Block, SourceParam, SourcePlan
from ms2hf.pipeline.engine.assemble import fill_rows, row_bands
from ms2hf.transforms import casts, qwen3_moe
from ms2hf.transforms.mappings import Context, WeightLayout
from ms2hf.transforms.pieces import OutputTensor
from ms2hf.transforms.registry import hf_model
from tests.conftest import (
    DATA,
    MOE_FIXTURES,
    assert_matches_ground_truth,
    examples,
    load_hf_dir,
    load_tensors,
)

FIXTURE = DATA / MOE_FIXTURES[0]
DTYPE_NAME = {v: k for k, v in NUMPY_DTYPES.items()}


# --- the genuine fixture ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "source"])
def test_fixture_matches_ground_truth(dtype: str, tmp_path: Path) -> None:
    report = convert(
        FIXTURE, tmp_path / "hf", ConvertOptions(dtype=dtype, progress=False, workers=2)
    )
    assert report.model_type == "qwen3_moe"
    assert_matches_ground_truth(tmp_path / "hf", FIXTURE, dtype)


@pytest.mark.parametrize("band_rows", [1, 3, 7])
def test_fixture_tensors_in_bands_of_any_height(band_rows: int) -> None:
    """What the executor does under a budget smaller than one tensor: every band of rows,
    including bands that cut an expert's transposed window and the expert-parallel blocks."""
    source = plan_source(FIXTURE / "checkpoint", FIXTURE / "strategy")
    model = hf_model({n: p.shape for n, p in source.params.items()}, {}, "F32")
    truth = load_tensors(FIXTURE / "ground_truth" / "hf_model.safetensors")
    assert sorted(t.name for t in model.outputs) == sorted(truth)
    with MappedFiles() as files:
        for tensor in model.outputs:
            want = truth[tensor.name].reshape(tensor.rows, tensor.row_elements)
            got = np.full_like(want, np.nan)
            for r0, r1 in row_bands(
                tensor.rows, tensor.row_elements, band_rows * tensor.row_elements
            ):
                fill_rows(got[r0:r1], tensor, r0, source.params[tensor.source], files)
            assert got.tobytes() == want.tobytes(), tensor.name


def test_fixture_experts_are_split_by_expert_parallelism() -> None:
    """The fixture's experts sit on two ranks per stage (EP 2, own [2, 2] device matrix), while
    attention is tensor-parallel on a [2, 1, 2] one; both go through the same slice plan."""
    source = plan_source(FIXTURE / "checkpoint", FIXTURE / "strategy")
    w1 = source.params["decoder.layers.2.mlp.experts.weight1"]
    assert w1.shape == (8 * 64, 2 * 32)
    assert [(b.rank, b.offsets) for b in w1.blocks] == [(4, (0, 0)), (5, (256, 0))]
    assert {b.rank for b in w1.replicas} == {6, 7}
    fi_accu = source.params["decoder.layers.2.mlp.router.fi_accu"]  # flat-form layout
    assert fi_accu.shape == (8,) and len(fi_accu.blocks) == 1


def _train_yaml(path: Path, model_config: Mapping[str, object]) -> Path:
    path.write_text(yaml.safe_dump({"model": {"model_config": dict(model_config)}}))
    return path


def test_config_json_matches_fixture_config_with_the_training_yaml(tmp_path: Path) -> None:
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    train = _train_yaml(tmp_path / "train.yaml", manifest["model_config"])
    convert(FIXTURE, tmp_path / "hf", ConvertOptions(dtype="fp32", config=train, progress=False))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    truth = json.loads((FIXTURE / "ground_truth" / "config.json").read_text())
    assert {k: config[k] for k in truth} == truth


def test_config_json_without_yaml_says_what_it_defaulted(tmp_path: Path) -> None:
    report = convert(FIXTURE, tmp_path / "hf", ConvertOptions(progress=False))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    truth = json.loads((FIXTURE / "ground_truth" / "config.json").read_text())
    from_weights = [
        "num_experts",
        "moe_intermediate_size",
        "decoder_sparse_step",
        "mlp_only_layers",
    ]
    for key in ["architectures", "model_type", "hidden_size", "num_hidden_layers", *from_weights]:
        assert config[key] == truth[key], key
    assert all(report.config_origins[k] == "weights" for k in from_weights)
    # No layer is dense, so the weights cannot tell intermediate_size; top-k is not in them.
    for key in ["intermediate_size", "num_experts_per_tok", "norm_topk_prob"]:
        assert report.config_origins[key] == "qwen3_moe default", key
    assert config["num_experts_per_tok"] == 8 and config["norm_topk_prob"] is True


# --- the expert rules on small arrays --------------------------------------------------------


def _write_blocks(
    path: Path, arrays: Mapping[str, np.ndarray], parts: Mapping[str, tuple[int, int]]
) -> dict[str, SourceParam]:
    """Save each array cut into a rows x cols grid of blocks (as expert or tensor parallelism
    leaves it) into one file, and describe the blocks as the source plan does."""
    pieces: dict[str, np.ndarray] = {}
    where: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, a in arrays.items():
        rp, cp = parts.get(name, (1, 1)) if a.ndim == 2 else (1, 1)
        assert a.shape[0] % rp == 0 and (a.ndim == 1 or a.shape[1] % cp == 0), (name, a.shape)
        rows, cols = a.shape[0] // rp, (a.shape[1] // cp if a.ndim == 2 else 0)
        for r in range(rp):
            for c in range(cp):
                key = f"{name}@{r},{c}"
                pieces[key] = (
                    a[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] if a.ndim == 2 else a
                )
                where.setdefault(name, []).append((key, (r * rows, c * cols)[: a.ndim]))
    save_file(pieces, path, {"format": "ms"}, {k: DTYPE_NAME[v.dtype] for k, v in pieces.items()})
    infos = SafetensorsHeader(path).tensors
    return {
        name: SourceParam(
            name,
            arrays[name].shape,
            DTYPE_NAME[arrays[name].dtype],
            tuple(Block(path, 0, k, infos[k].start, off, infos[k].shape) for k, off in where[name]),
        )
        for name in arrays
    }


def _assemble(
    tensor: OutputTensor, param: SourceParam, out_dtype: np.dtype, band_rows: int
) -> np.ndarray:
    out = np.zeros((tensor.rows, tensor.row_elements), out_dtype)
    with MappedFiles() as files:
        for r0, r1 in row_bands(tensor.rows, 1, band_rows):
            fill_rows(out[r0:r1], tensor, r0, param, files)
    return out.reshape(tensor.shape)


def _expert_outputs(e: int, experts: int, hidden: int, ffn: int) -> list[OutputTensor]:
    """Expert ``e``'s gate, up and down, cut by Qwen3-MoE's own table rows from tensors named
    ``w1`` and ``w2``."""
    w1_row, _ = qwen3_moe.TABLE.row("decoder.layers.0.mlp.experts.weight1") or (None, "")
    w2_row, _ = qwen3_moe.TABLE.row("decoder.layers.0.mlp.experts.weight2") or (None, "")
    assert w1_row is not None and w2_row is not None
    dims = SimpleNamespace(num_experts=experts, hidden_size=hidden, moe_intermediate_size=ffn)
    ctx = Context({}, dims, WeightLayout())
    made = [*w1_row.outputs("w1", "0", ctx), *w2_row.outputs("w2", "0", ctx)]
    return [t for t in made if f".experts.{e}." in t.name]


def test_expert_rules_element_by_element(tmp_path: Path) -> None:
    experts, hidden, ffn = 3, 4, 2
    w1 = np.arange(experts * hidden * 2 * ffn, dtype=np.float32).reshape(experts * hidden, 2 * ffn)
    w2 = -np.arange(experts * ffn * hidden, dtype=np.float32).reshape(experts * ffn, hidden)
    params = _write_blocks(tmp_path / "w.safetensors", {"w1": w1, "w2": w2}, {})
    for e in range(experts):
        gate, up, down = (
            _assemble(t, params[t.source], np.dtype(np.float32), band_rows=1)
            for t in _expert_outputs(e, experts, hidden, ffn)
        )
        assert gate.shape == up.shape == (ffn, hidden) and down.shape == (hidden, ffn)
        for j in range(ffn):
            for h in range(hidden):
                assert gate[j, h] == w1[e * hidden + h, j]
                assert up[j, h] == w1[e * hidden + h, ffn + j]
                assert down[h, j] == w2[e * ffn + j, h]


@settings(max_examples=examples(40), deadline=None)
@given(
    experts=st.integers(1, 4),
    hidden=st.sampled_from([2, 4, 6]),
    ffn=st.integers(1, 5),
    row_parts=st.sampled_from([1, 2]),
    col_parts=st.sampled_from([1, 2]),
    band_rows=st.integers(1, 7),
    src=st.sampled_from(["F32", "BF16"]),
    dst=st.sampled_from(["F32", "BF16"]),
    seed=st.integers(0, 2**16),
)
def test_transposed_expert_windows_across_blocks_and_bands(
    experts: int,
    hidden: int,
    ffn: int,
    row_parts: int,
    col_parts: int,
    band_rows: int,
    src: str,
    dst: str,
    seed: int,
) -> None:
    """Any split of the grouped tensors into blocks (experts across ranks, columns across
    ranks) and any band height give ``w[rows, cols].T`` cast to the output dtype."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((experts * hidden, 2 * ffn)).astype(NUMPY_DTYPES[src])
    w2 = rng.standard_normal((experts * ffn, hidden)).astype(NUMPY_DTYPES[src])
    with tempfile.TemporaryDirectory() as tmp:
        params = _write_blocks(
            Path(tmp) / "w.safetensors",
            {"w1": w1, "w2": w2},
            {
                "w1": (row_parts, col_parts),
                "w2": (row_parts if experts * ffn % row_parts == 0 else 1, col_parts),
            },
        )
        for e in range(experts):
            got = [
                _assemble(t, params[t.source], NUMPY_DTYPES[dst], band_rows)
                for t in _expert_outputs(e, experts, hidden, ffn)
            ]
            want = [
                w1[e * hidden : (e + 1) * hidden, :ffn].T,
                w1[e * hidden : (e + 1) * hidden, ffn:].T,
                w2[e * ffn : (e + 1) * ffn].T,
            ]
            for g, w in zip(got, want):
                assert g.tobytes() == w.astype(NUMPY_DTYPES[dst]).tobytes()


@pytest.mark.parametrize(
    ("src", "dst"), [("F32", "F32"), ("F32", "BF16"), ("BF16", "BF16"), ("BF16", "F32")]
)
def test_transposed_copies_in_strips(src: str, dst: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Strips of 8 source rows over 21 rows of a strided window: the last strip is short."""
    monkeypatch.setattr(casts, "TRANSPOSE_STRIP_BYTES", 1)
    grouped = np.random.default_rng(5).standard_normal((21, 10)).astype(NUMPY_DTYPES[src])
    window = grouped[:, 2:7]
    out = np.zeros((5, 21), NUMPY_DTYPES[dst])
    casts.cast_transposed_into(out, window)
    assert out.tobytes() == window.T.astype(NUMPY_DTYPES[dst]).tobytes()


# --- a MoE model with dense layers, through the whole executor ------------------------------


def _moe_arrays(
    rng: np.random.Generator,
    dense: tuple[int, ...],
    layers: int = 4,
    hidden: int = 16,
    experts: int = 4,
    moe_ffn: int = 6,
    ffn: int = 24,
) -> dict[str, np.ndarray]:
    """A tiny Qwen3-MoE under MindSpore Transformers names (2 heads / 1 group of 8)."""

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    heads, groups, head_dim, vocab = 2, 1, 8, 32
    out = {
        "embedding.word_embeddings.weight": w(vocab, hidden),
        "decoder.final_layernorm.weight": w(hidden),
        "output_layer.weight": w(vocab, hidden),
    }
    for i in range(layers):
        p = f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = w(hidden)
        out[p + "pre_mlp_layernorm.weight"] = w(hidden)
        out[p + "self_attention.linear_qkv.weight"] = w((heads + 2 * groups) * head_dim, hidden)
        out[p + "self_attention.q_layernorm.weight"] = w(head_dim)
        out[p + "self_attention.k_layernorm.weight"] = w(head_dim)
        out[p + "self_attention.linear_proj.weight"] = w(hidden, heads * head_dim)
        if i in dense:
            out[p + "mlp.linear_fc1.weight"] = w(2 * ffn, hidden)
            out[p + "mlp.linear_fc2.weight"] = w(hidden, ffn)
        else:
            out[p + "mlp.router.weight"] = w(experts, hidden)
            out[p + "mlp.router.fi_accu"] = w(experts)
            out[p + "mlp.experts.weight1"] = w(experts * hidden, 2 * moe_ffn)
            out[p + "mlp.experts.weight2"] = w(experts * moe_ffn, hidden)
    return out


def _expected_mlp(arrays: Mapping[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """``docs/qwen3.md`` and ``docs/qwen3-moe.md``, written out with numpy slicing."""
    out = {}
    for i in range(layers):
        p, q = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
        if p + "linear_fc1.weight" in arrays:
            fc1 = arrays[p + "linear_fc1.weight"]
            out[q + "gate_proj.weight"], out[q + "up_proj.weight"] = fc1[0::2], fc1[1::2]
            out[q + "down_proj.weight"] = arrays[p + "linear_fc2.weight"]
            continue
        out[q + "gate.weight"] = arrays[p + "router.weight"]
        w1, w2 = arrays[p + "experts.weight1"], arrays[p + "experts.weight2"]
        experts, hidden = arrays[p + "router.weight"].shape
        ffn = w2.shape[0] // experts
        for e in range(experts):
            rows = slice(e * hidden, (e + 1) * hidden)
            out[f"{q}experts.{e}.gate_proj.weight"] = w1[rows, :ffn].T
            out[f"{q}experts.{e}.up_proj.weight"] = w1[rows, ffn:].T
            out[f"{q}experts.{e}.down_proj.weight"] = w2[e * ffn : (e + 1) * ffn].T
    return out


def _source_plan(path: Path, arrays: Mapping[str, np.ndarray]) -> SourcePlan:
    ep2 = {n: (2, 1) for n in arrays if ".mlp.experts." in n}  # expert parallel 2
    tp2 = {n: (2, 1) for n in arrays if n.endswith("linear_qkv.weight")}
    params = _write_blocks(path, arrays, {**ep2, **tp2})
    return SourcePlan("1_1", (), params, {}, False, 1)


@pytest.mark.parametrize(
    ("dense", "sparse_step", "mlp_only"),
    [((), 1, []), ((0, 2), 2, []), ((1,), 1, [1]), ((0, 1, 3), 3, [])],
    ids=["all-moe", "step-2", "mlp-only-1", "step-3"],
)
def test_moe_model_with_dense_layers(
    dense: tuple[int, ...], sparse_step: int, mlp_only: list[int], tmp_path: Path
) -> None:
    arrays = _moe_arrays(np.random.default_rng(7), dense)
    source = _source_plan(tmp_path / "src.safetensors", arrays)
    out = tmp_path / "hf"
    report = write_hf_checkpoint(source, out, ConvertOptions(dtype="fp32", progress=False), {})
    got = load_hf_dir(out)
    want = _expected_mlp(arrays, 4)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"]
    others = [f"self_attn.{a}" for a in attention]
    others += ["input_layernorm", "post_attention_layernorm"]
    rest = [f"model.layers.{i}.{o}.weight" for i in range(4) for o in others]
    rest += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert sorted(got) == sorted([*want, *rest])
    for name, w in want.items():
        assert got[name].tobytes() == np.ascontiguousarray(w).tobytes(), name
    config = json.loads((out / "config.json").read_text())
    assert report.model_type == config["model_type"] == "qwen3_moe"
    assert (config["decoder_sparse_step"], config["mlp_only_layers"]) == (sparse_step, mlp_only)
    assert qwen3_moe.dense_layers(sparse_step, tuple(mlp_only), 4) == frozenset(dense)
    assert (config["num_experts"], config["moe_intermediate_size"]) == (4, 6)
    assert config["intermediate_size"] == (24 if dense else 6144)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_experts_larger_than_the_band_are_written_in_several_bands(
    dtype: str, tmp_path: Path
) -> None:
    """A 1 MiB budget with one worker gives 1 MiB bands; each expert tensor here is 1.25 MiB
    (bf16) or 2.5 MiB (fp32), so it is written in several bands, and the bands cut across the
    blocks the grouped tensors are split into (2 by experts, 4 or 2 by columns)."""
    rng = np.random.default_rng(3)
    arrays = _moe_arrays(rng, dense=(), layers=1, hidden=1024, experts=2, moe_ffn=640)
    params = _write_blocks(
        tmp_path / "src.safetensors",
        arrays,
        {
            "decoder.layers.0.mlp.experts.weight1": (2, 4),
            "decoder.layers.0.mlp.experts.weight2": (2, 2),
        },
    )
    source = SourcePlan("1_1", (), params, {}, False, 1)
    options = ConvertOptions(dtype=dtype, memory_budget=2**20, workers=1, progress=False)
    write_hf_checkpoint(source, tmp_path / "hf", options, {})
    got = load_hf_dir(tmp_path / "hf")
    out_dtype = np.float32 if dtype == "fp32" else ml_dtypes.bfloat16
    for name, w in _expected_mlp(arrays, 1).items():
        assert got[name].tobytes() == w.astype(out_dtype).tobytes(), name


# --- what the checkpoint contradicts ---------------------------------------------------------


def _shapes(dense: tuple[int, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {n: a.shape for n, a in _moe_arrays(np.random.default_rng(0), dense).items()}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"moe_intermediate_size": (12, "train.yaml: moe_ffn_hidden_size")},
            "mlp.experts.weight2 rows",
        ),
        ({"num_experts": (8, "--num_routed_experts")}, "mlp.router.weight rows"),
        ({"num_experts_per_tok": (5, "train.yaml: moe_router_topk")}, "must be 1..4"),
        ({"mlp_only_layers": ([1], "train.yaml: mlp_only_layers")}, "make layers [1] dense"),
        (
            {"decoder_sparse_step": (2, "train.yaml: decoder_sparse_step")},
            "make layers [0, 2] dense",
        ),
        ({"mlp_only_layers": ("all", "train.yaml: mlp_only_layers")}, "a list of layer numbers"),
    ],
)
def test_given_values_the_weights_contradict(values: dict, message: str) -> None:
    with pytest.raises(ModelError) as e:
        hf_model(_shapes(), {k: ConfigValue(*v) for k, v in values.items()}, "F32")
    assert message in str(e.value)
    assert next(iter(values.values()))[1] in str(e.value)


@pytest.mark.parametrize(
    "sparsity",
    [
        {"decoder_sparse_step": 1, "mlp_only_layers": [0, 2]},
        {"decoder_sparse_step": 2, "mlp_only_layers": None},
        {"decoder_sparse_step": 2, "mlp_only_layers": [0]},
        {"mlp_only_layers": [0, 2]},
    ],
)
def test_equivalent_sparsity_settings_are_accepted(sparsity: dict) -> None:
    """Layers 0 and 2 dense: step 2 says it, and so does step 1 with mlp_only_layers [0, 2]
    (a null list is an empty one, as in transformers)."""
    values = {k: ConfigValue(v, f"train.yaml: {k}") for k, v in sparsity.items()}
    values["intermediate_size"] = ConfigValue(24, "train.yaml: ffn_hidden_size")
    model = hf_model(_shapes(dense=(0, 2)), values, "F32")
    assert model.config["decoder_sparse_step"].value == 2
    assert model.config["mlp_only_layers"].value == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"decoder.layers.1.mlp.shared_experts.linear_fc1.weight": (8, 16)},
            "unexpected parameters",
        ),
        (
            {"decoder.layers.1.mlp.experts.weight2": None},
            "layer 1 lacks decoder.layers.1.mlp.experts.weight2",
        ),
        (
            {
                "decoder.layers.1.mlp.experts.weight1": (4 * 16, 10),
                "decoder.layers.1.mlp.experts.weight2": (20, 16),
            },
            "layer 1 has 4 experts of ffn size 5, layer 0 has 4 of 6",
        ),
        (
            {"decoder.layers.1.mlp.experts.weight1": (4 * 15, 12)},
            "must be [64, 2 * moe_intermediate_size]",
        ),
        ({"decoder.layers.1.mlp.linear_fc1.weight": (48, 16)}, "has both a dense MLP and experts"),
    ],
)
def test_malformed_moe_layers_are_reported(change: dict, message: str) -> None:
    shapes = _shapes()
    for name, shape in change.items():
        if shape is None:
            del shapes[name]
        else:
            shapes[name] = shape
    with pytest.raises(ModelError) as e:
        hf_model(shapes, {}, "F32")
    assert message in str(e.value)
