"""Writing a generated training output: rank files, strategy files and the expected tensors.

Values: every Hugging Face tensor is drawn from its own seeded stream (seed and name), so the
expected model is the same for one seed whatever the parallel layout; or the caller gives them
all (a model made by another library, for a round trip through a real client; training
statistics such as ``fi_accu``, of which no Hugging Face tensor is made, are still drawn). Each
MindSpore parameter is then built by scattering those tensors into it through the converter's
own declarative rules (``fill_rows`` inverted): the QKV and gate/up layouts are written once, in
``ms2hf.transforms``, and the genuine fixtures check them against MindSpore independently.

Memory: one full parameter and the Hugging Face tensors drawn for it are held at a time; slices
and Adam states are written in bands, so a 0.6B-parameter fp32 run stays near 1-2 GB.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ms2hf.errors import Ms2hfError
from ms2hf.generator.config import GeneratorConfig
from ms2hf.generator.fuse import fuse
from ms2hf.generator.layouts import PlacedParam, place, savers
from ms2hf.generator.network import ModelSpec, model_spec
from ms2hf.generator.strategy_file import encode_stage
from ms2hf.io.config_files import ConfigValue
from ms2hf.io.dtypes import to_numpy
from ms2hf.io.hf_output import HF_METADATA
from ms2hf.io.safetensors_writer import ShardWriter, TensorEntry, layout_shard
from ms2hf.transforms.pieces import OutputTensor, Piece
from ms2hf.transforms.registry import hf_model

BAND_BYTES = 64 << 20
EXPECTED = Path("expected") / "hf_model.safetensors"
EXPECTED_CONFIG = Path("expected") / "config.json"
TRAIN_YAML = Path("train.yaml")
ADAM_STATE = "F32"

Weights = Mapping[str, np.ndarray]
"""Hugging Face tensors by name, given instead of drawn."""


@dataclass(frozen=True)
class Generated:
    """Where a generated training output is; ``root`` is what ``convert`` takes."""

    root: Path
    config: GeneratorConfig
    rank_files: tuple[Path, ...]

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    @property
    def strategy_dir(self) -> Path:
        return self.root / "strategy"

    @property
    def expected(self) -> Path:
        """The Hugging Face tensors a correct conversion gives, in the parameters' dtype."""
        return self.root / EXPECTED

    @property
    def hf_config(self) -> Path:
        return self.root / EXPECTED_CONFIG

    @property
    def train_yaml(self) -> Path:
        """``model.model_config`` with the sizes and layout flags: for ``--config``."""
        return self.root / TRAIN_YAML


def _scalars(step: int) -> dict[str, tuple[str, np.ndarray]]:
    """The training loop's counters as MindSpore Transformers saves them in every rank file."""
    table = {
        "epoch_num": ("I64", (), step),
        "loss_scale": ("I64", (), 1),
        "step_num": ("I64", (), step),
        "learning_rate": ("F32", (), 1e-6),
        "scale_sense": ("F32", (), 1.0),
        "global_step": ("I32", (1,), step),
    }
    return {
        name: (tag, np.full(shape, value, to_numpy(tag)))
        for name, (tag, shape, value) in table.items()
    }


def _adam_state(prefix: str) -> Callable[[np.ndarray], np.ndarray]:
    """Stand-in Adam moments of a slice: fp32, cheap to make, and unlike any weight value."""

    def moment(weights: np.ndarray) -> np.ndarray:
        m: np.ndarray = weights.astype(np.float32) * np.float32(1e-2)
        return m if prefix == "adam_m." else m * m

    return moment


def _random(seed: int, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Uniform in [-0.5, 0.5), from a stream of the tensor's own."""
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
    values = rng.random(shape, dtype=np.float32)
    values -= np.float32(0.5)
    return values if dtype == np.float32 else values.astype(dtype)


def _same_tensor(outputs: Iterable[OutputTensor]) -> list[list[OutputTensor]]:
    """Tensors cut the same way from the same parameter (a tied head) are one tensor under
    several names: drawn or given once."""
    groups: dict[tuple[str, tuple[Piece, ...]], list[OutputTensor]] = {}
    for t in outputs:
        groups.setdefault((t.source, t.pieces), []).append(t)
    return list(groups.values())


def _check_weights(outputs: Sequence[OutputTensor], weights: Weights) -> None:
    """Given weights must be exactly the model's tensors: one missing, misspelt or mis-shaped
    would otherwise leave a drawn value or a wrong one in a model the caller means to compare.
    One name of a tied tensor is enough; where several are given they must agree."""
    shapes = {t.name: t.shape for t in outputs}
    shaped = {n for n in weights if n in shapes and tuple(np.shape(weights[n])) == shapes[n]}
    problems = [f"{n!r} is not a tensor of this model" for n in sorted(set(weights) - set(shapes))]
    problems += [
        f"{n!r} has shape {list(np.shape(weights[n]))}, expected {list(shapes[n])}"
        for n in sorted(set(weights) & set(shapes) - shaped)
    ]
    for group in _same_tensor(outputs):
        names = [t.name for t in group]
        given = [n for n in names if n in weights]
        if not given:
            problems.append(f"{' / '.join(map(repr, names))} is missing")
        agree = [n for n in given if n in shaped]
        if any(not np.array_equal(weights[agree[0]], weights[n]) for n in agree[1:]):
            problems.append(f"{' and '.join(map(repr, agree))} are one tied tensor but differ")
    if problems:
        raise Ms2hfError("given weights: " + "; ".join(problems))


def _values(
    config: GeneratorConfig, same: Sequence[OutputTensor], dtype: np.dtype, weights: Weights | None
) -> np.ndarray:
    """One tensor's values in its parameter's dtype, cast as a drawn one is."""
    if weights is None:
        return _random(config.seed, same[0].name, same[0].shape, dtype)
    given = next(weights[t.name] for t in same if t.name in weights)
    return np.asarray(given).astype(dtype)


def _write_rows(
    writer: ShardWriter,
    name: str,
    array: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> None:
    """Write a (possibly strided) array in bands of rows, so no slice is copied whole."""
    if array.ndim == 0:
        array = array.reshape(1)
    per_band = max(1, BAND_BYTES // max(1, array[:1].nbytes))
    offset = 0
    for r0 in range(0, len(array), per_band):
        band = np.ascontiguousarray(array[r0 : r0 + per_band])
        if transform is not None:
            band = transform(band)
        data = band.reshape(-1).view(np.uint8)
        writer.write(name, offset, data)
        offset += data.nbytes


def _param_dtype(p: PlacedParam, config: GeneratorConfig) -> str:
    return p.spec.dtype or config.source_dtype


def _build_param(
    p: PlacedParam,
    made_of: Sequence[OutputTensor],
    config: GeneratorConfig,
    expected: ShardWriter | None,
    weights: Weights | None,
) -> np.ndarray:
    """A full parameter, fused (``ms2hf.generator.fuse``) from the Hugging Face tensors drawn or
    given for it, which are written to ``expected`` as they go; a training statistic, of which
    no Hugging Face tensor is made, is drawn whole."""
    dtype = to_numpy(_param_dtype(p, config))
    if p.spec.training_only:
        return _random(config.seed, p.spec.name, p.spec.shape, dtype)
    values: dict[str, np.ndarray] = {}
    for same in _same_tensor(made_of):
        value = _values(config, same, dtype, weights)
        for t in same:
            values[t.name] = value
            if expected is not None:
                _write_rows(expected, t.name, value)
    found = config.family.table.row(p.spec.name)
    if found is None:
        raise Ms2hfError(f"parameter {p.spec.name!r} has no row in the {config.family.name} table")
    row, layer = found
    full = fuse(row, layer, values, config.dims, config.weight_layout)
    if full.shape != p.spec.shape:
        raise Ms2hfError(
            f"parameter {p.spec.name!r}: fused from its Hugging Face tensors it has shape "
            f"{list(full.shape)}, the network says {list(p.spec.shape)}"
        )
    return np.ascontiguousarray(full, dtype)


def _rank_entries(
    params: Sequence[PlacedParam],
    saved: dict[str, frozenset[int]],
    local: int,
    config: GeneratorConfig,
    scalars: dict[str, tuple[str, np.ndarray]],
) -> list[TensorEntry]:
    entries = [TensorEntry(name, tag, value.shape) for name, (tag, value) in scalars.items()]
    for p in params:
        for prefix in p.saved_prefixes:
            if local in saved[prefix + p.spec.name]:
                dtype = ADAM_STATE if prefix else _param_dtype(p, config)
                entries.append(TensorEntry(prefix + p.spec.name, dtype, p.slice_shape))
    return entries


def _write_slices(
    p: PlacedParam,
    full: np.ndarray,
    writers: Sequence[ShardWriter],
    saved: dict[str, frozenset[int]],
) -> None:
    """One parameter's slices and Adam states, into the rank files of its stage that save them."""
    for local, writer in enumerate(writers):
        region = full[p.region(local)]
        for prefix in p.saved_prefixes:
            if local in saved[prefix + p.spec.name]:
                transform = _adam_state(prefix) if prefix else None
                _write_rows(writer, prefix + p.spec.name, region, transform)


def _hf_outputs(model: ModelSpec, config: GeneratorConfig) -> tuple[OutputTensor, ...]:
    """The Hugging Face tensors, as the converter's rules cut them from the parameters."""
    given = {name: ConfigValue(value, "generator") for name, value in model.model_config.items()}
    shapes = {p.name: p.shape for p in model.params}
    return hf_model(shapes, given, config.source_dtype).outputs


def _write_tensors(
    root: Path,
    stages: Sequence[Sequence[PlacedParam]],
    rank_files: Sequence[Path],
    config: GeneratorConfig,
    outputs: Sequence[OutputTensor],
    weights: Weights | None,
    with_expected: bool,
) -> None:
    """Every rank file and (``with_expected``) the expected Hugging Face file, one parameter at
    a time; on any error no file is left under its final name."""
    placed = [p for params in stages for p in params]
    saved = [savers(params, config.remove_redundancy) for params in stages]
    per_stage = config.devices_per_stage
    metadata = {"format": "ms", "remove_redundancy": str(config.remove_redundancy)}
    scalars = _scalars(config.step)
    writers: list[ShardWriter] = []
    try:
        for rank, path in enumerate(rank_files):
            stage, local = divmod(rank, per_stage)
            path.parent.mkdir(parents=True, exist_ok=True)
            entries = _rank_entries(stages[stage], saved[stage], local, config, scalars)
            writers.append(ShardWriter(path, layout_shard(entries, metadata)))
            for name, (_, value) in scalars.items():
                _write_rows(writers[-1], name, value)
        expected = None
        if with_expected:
            hf_entries = [TensorEntry(t.name, config.source_dtype, t.shape) for t in outputs]
            expected = ShardWriter(root / EXPECTED, layout_shard(hf_entries, HF_METADATA))
            writers.append(expected)
        for p in placed:
            made_of = [t for t in outputs if t.source == p.spec.name]
            full = _build_param(p, made_of, config, expected, weights)
            first = p.spec.stage * per_stage
            _write_slices(p, full, writers[first : first + per_stage], saved[p.spec.stage])
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def _write_small_files(
    root: Path, model: ModelSpec, config: GeneratorConfig, rank_files: Sequence[Path]
) -> None:
    for path in rank_files:
        meta = {"last_epoch": config.step, "last_step": 1, "last_ckpt_file": path.name}
        (path.parent / "meta.json").write_text(json.dumps(meta))
    (root / EXPECTED_CONFIG).write_text(json.dumps(model.hf_config, indent=1) + "\n")
    train = {
        "parallel_config": {
            "data_parallel": config.dp,
            "model_parallel": config.tp,
            "pipeline_stage": config.pp,
            **({"expert_parallel": config.moe.ep} if config.moe else {}),
        },
        "parallel": {
            "enable_parallel_optimizer": bool(config.opt_shard),
            "parallel_optimizer_config": {"optimizer_weight_shard_size": config.opt_shard or -1},
        },
        "model": {"model_config": model.model_config},
    }
    (root / TRAIN_YAML).write_text(yaml.safe_dump(train, sort_keys=False))


def generate(
    config: GeneratorConfig,
    out_dir: str | os.PathLike[str],
    weights: Weights | None = None,
    *,
    expected: bool = True,
) -> Generated:
    """Write a MindSpore Transformers training output for ``config`` into ``out_dir``
    (``checkpoint/``, ``strategy/``), with ``expected/`` and ``train.yaml`` beside them.
    ``weights`` (Hugging Face names) replace the seeded draws; every tensor of the model must be
    given, in its shape, and nothing else (checked before any file is written); each is cast to
    its parameter's dtype. Without ``expected`` the expected Hugging Face tensors are not
    written (a benchmark needs only the training output; the rank files are the same bytes).
    Files of an earlier run with the same names are replaced; nothing else is touched."""
    root = Path(out_dir)
    model = model_spec(config)
    outputs = _hf_outputs(model, config)
    if weights is not None:
        _check_weights(outputs, weights)
    placed = [place(p, config.opt_shard) for p in model.params]
    stages = [[p for p in placed if p.spec.stage == s] for s in range(config.pp)]
    per_stage = config.devices_per_stage
    (root / "strategy").mkdir(parents=True, exist_ok=True)
    for s, params in enumerate(stages):
        encoded = encode_stage(model.network, s, params)
        for rank in range(s * per_stage, (s + 1) * per_stage):
            (root / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt").write_bytes(encoded)
    (root / EXPECTED).parent.mkdir(parents=True, exist_ok=True)
    rank_files = [
        root
        / "checkpoint"
        / f"rank_{r}"
        / f"{config.prefix}_rank_{r}-{config.file_suffix}.safetensors"
        for r in range(config.world)
    ]
    _write_tensors(root, stages, rank_files, config, outputs, weights, expected)
    _write_small_files(root, model, config, rank_files)
    return Generated(root, config, tuple(rank_files))
