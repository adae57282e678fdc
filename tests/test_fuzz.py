"""Fuzzing the reader and the planner with corrupt headers and strategy files: whatever the
bytes, only ``Ms2hfError`` comes out (never another exception), quickly (never a hang).

Each test runs a bounded number of examples; the inputs are small, so the suite stays within a
few seconds per test.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ms2hf.commands.convert import ConvertOptions, convert
from ms2hf.errors import Ms2hfError
from ms2hf.io.safetensors_reader import SafetensorsHeader
from ms2hf.io.safetensors_writer import TensorEntry, layout_shard
from ms2hf.io.sources.legacy import plan_source
from ms2hf.io.sources.strategy_proto import ParallelStrategyMap
from ms2hf.transforms.registry import hf_model
from tests.conftest import DATA, examples, load_hf_dir, load_tensors
from tests.edit_checkpoint import split

FIXTURE = DATA / "tiny_fp32"
RANKS = 4
FUZZ = settings(
    max_examples=examples(80),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
SECONDS_PER_EXAMPLE = 5.0


def only_our_errors(action: Callable[[], object]) -> None:
    """``action`` succeeds or raises ``Ms2hfError``; anything else fails the test (pytest shows
    it), and so does taking long enough to suggest a hang."""
    started = time.monotonic()
    try:
        action()
    except Ms2hfError:
        pass
    assert time.monotonic() - started < SECONDS_PER_EXAMPLE


# --- byte-level damage -----------------------------------------------------------------------

Edit = tuple[str, int, bytes]
edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]),
        st.integers(0, 2**16),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=4,
)


def damage(data: bytes, changes: list[Edit], region: int) -> bytes:
    """Apply byte edits at positions within the first ``region`` bytes (where headers are)."""
    out = bytearray(data)
    for kind, at, payload in changes:
        at %= max(1, min(region, len(out)))
        if kind == "flip" and out:
            out[at] ^= payload[0] or 1
        elif kind == "insert":
            out[at:at] = payload
        elif kind == "delete":
            del out[at : at + len(payload)]
        elif kind == "truncate":
            del out[at:]
        else:
            out[at : at + len(payload)] = payload
    return bytes(out)


def small_safetensors() -> bytes:
    entries = [
        TensorEntry("a.weight", "F32", (3, 4)),
        TensorEntry("b.norm", "BF16", (5,)),
        TensorEntry("global_step", "I32", (1,)),
        TensorEntry("loss_scale", "F32", ()),
    ]
    layout = layout_shard(entries, {"format": "ms", "remove_redundancy": "False"})
    return layout.header + bytes(layout.size - len(layout.header))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(changes=edits)
def test_damaged_safetensors_bytes(scratch: Path, changes: list[Edit]) -> None:
    base = small_safetensors()
    path = scratch / "damaged.safetensors"
    path.write_bytes(damage(base, changes, int.from_bytes(base[:8], "little") + 8))
    only_our_errors(lambda: SafetensorsHeader(path))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
dims = st.integers(-2, 2**66) | st.booleans() | st.floats() | st.text(max_size=2)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "BF16", "I64", "BOOL", "F99", ""]) | json_values,
        "shape": st.lists(dims, max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-1, 300) | dims, max_size=3) | json_values,
    },
)
headers = st.dictionaries(
    st.sampled_from(["__metadata__", "x", "y", "global_step"]) | st.text(max_size=5),
    entries | json_values,
    max_size=4,
)


@FUZZ
@given(header=headers | json_values, data=st.binary(max_size=300))
def test_random_safetensors_headers(scratch: Path, header: Any, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path = scratch / "random.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    only_our_errors(lambda: SafetensorsHeader(path))


# --- through the planner: one rank file or one strategy file damaged --------------------------


TRUTH = load_tensors(FIXTURE / "ground_truth" / "hf_model.safetensors")


def plan(root: Path, strategy: Path) -> None:
    """Plan and convert a damaged checkpoint: either ms2hf refuses it, or what it writes is the
    ground truth. Damage that planning accepts must not become a different model silently."""
    source = plan_source(root / "checkpoint", strategy)
    hf_model({name: p.shape for name, p in source.params.items()}, {}, "BF16")
    with tempfile.TemporaryDirectory() as out:
        options = ConvertOptions(dtype="source", progress=False, workers=1)
        convert(None, out, options, checkpoint_dir=root / "checkpoint", strategy_dir=strategy)
        got = load_hf_dir(Path(out))
    assert sorted(got) == sorted(TRUTH)
    for name, want in TRUTH.items():
        assert got[name].dtype == want.dtype and got[name].tobytes() == want.tobytes(), name


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture with rank 0's file a real copy (to be damaged) and the rest linked."""
    root = tmp_path_factory.mktemp("train")
    for rank in range(RANKS):
        src = next((FIXTURE / "checkpoint" / f"rank_{rank}").glob("*.safetensors"))
        (root / "checkpoint" / f"rank_{rank}").mkdir(parents=True)
        (root / "checkpoint" / f"rank_{rank}" / src.name).symlink_to(src)
    shutil.copytree(FIXTURE / "strategy", root / "strategy")
    return root


def rank0(root: Path) -> Path:
    return next((root / "checkpoint" / "rank_0").glob("*.safetensors"))


header_edits = st.lists(
    st.tuples(
        st.sampled_from(["dtype", "shape", "data_offsets", "drop", "copy"]),
        st.integers(0, 10**6),
        st.sampled_from(["F32", "BF16", "F16", "I32"]) | st.lists(st.integers(0, 300), max_size=3),
    ),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(changes=header_edits)
def test_rank_file_headers_changed_in_structure(
    training: Path, changes: list[tuple[str, int, Any]]
) -> None:
    """Shapes, dtypes and offsets changed consistently enough that the reader may accept them,
    so that the planner and the model rules see strange but well-formed slices."""
    original = next((FIXTURE / "checkpoint" / "rank_0").glob("*.safetensors"))
    header, data = split(original)
    names = sorted(k for k in header if k != "__metadata__")
    for kind, pick, value in changes:
        name = names[pick % len(names)]
        if kind == "drop":
            header.pop(name, None)
        elif kind == "copy":
            header[name + ".bias"] = dict(
                header.get(name, {"dtype": "F32", "shape": [], "data_offsets": [0, 4]})
            )
        elif name in header:
            header[name][kind] = value if kind != "data_offsets" else sorted(value)[:2]
    path = rank0(training)
    path.unlink()
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    only_our_errors(lambda: plan(training, training / "strategy"))


@pytest.fixture(scope="module")
def strategies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("strategy")
    shutil.copytree(FIXTURE / "strategy", folder, dirs_exist_ok=True)
    return folder


def _write_strategy(folder: Path, contents: list[bytes], suffix: str) -> None:
    for path in folder.iterdir():
        path.unlink()
    for rank in range(RANKS):
        (folder / f"ckpt_strategy_rank_{rank}{suffix}").write_bytes(contents[rank % len(contents)])


@FUZZ
@given(changes=edits, which=st.integers(0, RANKS - 1))
def test_damaged_protobuf_strategy_bytes(strategies: Path, changes: list[Edit], which: int) -> None:
    real = [
        (FIXTURE / "strategy" / f"ckpt_strategy_rank_{r}.ckpt").read_bytes() for r in range(RANKS)
    ]
    real[which] = damage(real[which], changes, len(real[which]))
    _write_strategy(strategies, real, ".ckpt")
    only_our_errors(lambda: plan(FIXTURE, strategies))


REAL_NAMES = sorted(
    k
    for k in split(next((FIXTURE / "checkpoint" / "rank_0").glob("*.safetensors")))[0]
    if not k.startswith(("adam", "__"))
)
small = st.integers(-2, 5) | st.sampled_from([2**31 - 1, -(2**31)])
layouts = st.fixed_dictionaries(
    {
        "name": st.sampled_from(REAL_NAMES) | st.text(max_size=8),
        "dev_matrix": st.lists(
            st.lists(st.integers(0, 5) | st.just(2**32 - 1), max_size=4), max_size=2
        ),
        "tensor_map": st.lists(st.lists(small, max_size=3), max_size=3),
        "split": st.lists(st.lists(st.integers(-1, 4), max_size=2), max_size=1),
        "step": small,
        "size": small,
    }
)


def _message(stage: int, items: list[dict[str, Any]]) -> bytes:
    msg = ParallelStrategyMap(current_stage=1)
    msg.parallel_strategy_item.add(node_name="net").parallel_strategys.stage = stage
    for item in items:
        lay = msg.parallel_layout_item.add(param_name=item["name"]).parallel_layouts
        for d in item["dev_matrix"]:
            lay.dev_matrix.add(dim=d)
        for t in item["tensor_map"]:
            lay.tensor_map.add(dim=t)
        for s in item["split"]:
            lay.param_split_shape.add(dim=s)
        lay.opt_weight_shard_step = item["step"]
        lay.opt_weight_shard_size = item["size"]
    return msg.SerializeToString()


@FUZZ
@given(
    files=st.lists(
        st.tuples(st.integers(0, 2), st.lists(layouts, min_size=1, max_size=5)),
        min_size=1,
        max_size=4,
    )
)
def test_random_protobuf_strategies(
    strategies: Path, files: list[tuple[int, list[dict[str, Any]]]]
) -> None:
    _write_strategy(strategies, [_message(stage, items) for stage, items in files], ".ckpt")
    only_our_errors(lambda: plan(FIXTURE, strategies))


json_layouts = st.fixed_dictionaries(
    {},
    optional={
        "dev_matrix": st.lists(st.integers(-1, 4), max_size=3) | json_values,
        "tensor_map": st.lists(
            st.integers(-2, 3) | st.lists(st.integers(-2, 3), max_size=2), max_size=3
        )
        | json_values,
        "tensor_shape": st.lists(st.integers(0, 600), max_size=3) | json_values,
        "opt_weight_shard_step": small | json_values,
        "opt_weight_shard_size": small | json_values,
        "param_split_shape": st.lists(st.integers(0, 3), max_size=2) | json_values,
    },
)
json_strategies = st.fixed_dictionaries(
    {},
    optional={
        "current_stage": json_values,
        "parallel_strategy_item": st.dictionaries(
            st.text(max_size=3),
            st.fixed_dictionaries({}, optional={"stage": st.integers(-1, 3) | json_values}),
            max_size=2,
        )
        | json_values,
        "parallel_layout_item": st.dictionaries(
            st.sampled_from(REAL_NAMES) | st.text(max_size=6).map(lambda s: "0-" + s),
            json_layouts | json_values,
            max_size=5,
        )
        | json_values,
    },
)


@FUZZ
@given(docs=st.lists(json_strategies | json_values, min_size=1, max_size=4))
def test_random_json_strategies(strategies: Path, docs: list[Any]) -> None:
    _write_strategy(strategies, [json.dumps(d).encode() for d in docs], ".json")
    only_our_errors(lambda: plan(FIXTURE, strategies))


def test_deeply_nested_json_is_a_format_error(scratch: Path) -> None:
    """What random generation rarely reaches: nesting deep enough to exhaust the parser."""
    raw = b"[" * 100_000 + b"]" * 100_000
    path = scratch / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(Ms2hfError, match="not valid JSON"):
        SafetensorsHeader(path)
    strategy = scratch / "deep_strategy"
    strategy.mkdir()
    (strategy / "ckpt_strategy_rank_0.json").write_bytes(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    with pytest.raises(Ms2hfError, match="valid JSON"):
        plan(FIXTURE, strategy)


def test_the_fuzzed_inputs_start_from_valid_ones(scratch: Path) -> None:
    """The damage is what makes inputs fail: the undamaged bases are accepted."""
    path = scratch / "base.safetensors"
    path.write_bytes(small_safetensors())
    assert set(SafetensorsHeader(path).tensors) == {
        "a.weight",
        "b.norm",
        "global_step",
        "loss_scale",
    }
    plan(FIXTURE, FIXTURE / "strategy")
    assert len(REAL_NAMES) > 10
