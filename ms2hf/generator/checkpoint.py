"""Writing a generated training output in either save format, and the expected tensors.

Values: every Hugging Face tensor is drawn from its own seeded stream (seed and name), so the
expected model is the same for one seed whatever the parallel layout or save format; or the
caller gives them all (a model made by another library, or a genuine fixture's). Training
statistics such as ``fi_accu``, of which no Hugging Face tensor is made, are drawn unless given.
Each MindSpore parameter is then fused from its Hugging Face tensors by the generator's own code
(``ms2hf.generator.fuse``), and its pieces are copied into the files the save format says
(``ms2hf.generator.files``): the legacy rank files here, Checkpoint 2.0 in
``ms2hf.generator.ckpt2``.

Memory: one full parameter and the Hugging Face tensors drawn for it are held at a time; slices
and Adam states are written in bands, so a 0.6B-parameter fp32 run stays near 1-2 GB.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ms2hf.errors import Ms2hfError
from ms2hf.generator import ckpt2
from ms2hf.generator.config import CKPT2, GeneratorConfig
from ms2hf.generator.files import ADAM_STATE, FileSpec, Slot, training_scalars
from ms2hf.generator.fuse import fuse
from ms2hf.generator.layouts import PlacedParam, place, savers
from ms2hf.generator.lora import run_adapter_config
from ms2hf.generator.network import ModelSpec, model_spec
from ms2hf.generator.strategy_file import encode_stage
from ms2hf.io.config_files import RUN_ADAPTER_CONFIG, ConfigValue
from ms2hf.io.dtypes import to_numpy
from ms2hf.io.hf_output import HF_METADATA
from ms2hf.io.safetensors_writer import ShardLayout, ShardWriter, TensorEntry, layout_shard
from ms2hf.transforms import lora
from ms2hf.transforms.lora import LORA_KEY, base_weight, is_lora_name
from ms2hf.transforms.pieces import OutputTensor, Piece
from ms2hf.transforms.registry import hf_model

BAND_BYTES = 64 << 20
EXPECTED = Path("expected") / "hf_model.safetensors"
EXPECTED_LORA = Path("expected") / "lora.safetensors"
EXPECTED_CONFIG = Path("expected") / "config.json"
TRAIN_YAML = Path("train.yaml")

Weights = Mapping[str, np.ndarray]
"""Hugging Face tensors by name, given instead of drawn."""
Statistics = Mapping[str, np.ndarray]
"""Training statistics (``fi_accu``) by MindSpore name, given instead of drawn."""


@dataclass(frozen=True)
class Generated:
    """Where a generated training output is; ``root`` is what ``convert`` takes."""

    root: Path
    config: GeneratorConfig
    rank_files: tuple[Path, ...]
    """Every safetensors file of the save (legacy: one per rank; Checkpoint 2.0: the model and
    optimizer files)."""

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    @property
    def iteration_dir(self) -> Path:
        """Checkpoint 2.0: the folder of the saved iteration."""
        return self.checkpoint_dir / ckpt2.iteration_name(self.config.step)

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
        """``model.model_config`` with the sizes and layout flags (and a LoRA run's
        ``pet_config``): for ``--config``."""
        return self.root / TRAIN_YAML

    @property
    def expected_lora(self) -> Path:
        """A LoRA fine-tune's LoRA tensors per Hugging Face module (``<module>.lora_A.weight``,
        ``<module>.lora_B.weight``), in the parameters' dtype: a PEFT adapter's tensors without
        its ``base_model.model.`` prefix."""
        return self.root / EXPECTED_LORA

    @property
    def run_adapter_config(self) -> Path:
        """A LoRA run's own ``adapter_config.json`` (mindformers' file) beside ``checkpoint/``."""
        return self.root / RUN_ADAPTER_CONFIG


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
            what = "share one lora_A" if is_lora_name(agree[0]) else "are one tied tensor"
            problems.append(f"{' and '.join(map(repr, agree))} {what} but differ")
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
    expected: Mapping[str, ShardWriter],
    weights: Weights | None,
    statistics: Statistics,
) -> np.ndarray:
    """A full parameter, fused (``ms2hf.generator.fuse``) from the Hugging Face tensors drawn or
    given for it, which are written to their ``expected`` file as they go; a training statistic,
    of which no Hugging Face tensor is made, is given whole or drawn."""
    dtype = to_numpy(_param_dtype(p, config))
    if p.spec.training_only:
        given = statistics.get(p.spec.name)
        if given is not None:
            if tuple(np.shape(given)) != p.spec.shape:
                raise Ms2hfError(
                    f"given statistic {p.spec.name!r} has shape {list(np.shape(given))}, "
                    f"expected {list(p.spec.shape)}"
                )
            return np.ascontiguousarray(given, dtype)
        return _random(config.seed, p.spec.name, p.spec.shape, dtype)
    values: dict[str, np.ndarray] = {}
    for same in _same_tensor(made_of):
        value = _values(config, same, dtype, weights)
        for t in same:
            values[t.name] = value
            if t.name in expected:
                _write_rows(expected[t.name], t.name, value)
    half = LORA_KEY.match(p.spec.name)
    found = config.family.table.row(base_weight(p.spec.name))
    if found is None:
        raise Ms2hfError(f"parameter {p.spec.name!r} has no row in the {config.family.name} table")
    row, layer = found
    if half is not None and half.group("half") == "A":
        (full,) = {id(v): v for v in values.values()}.values()  # one A, shared by the module
    else:  # a weight, or a lora_B: its Hugging Face modules' rows fused as the weight's are
        bases = {base_weight(n): v for n, v in values.items()}
        full = fuse(row, layer, bases, config.dims, config.weight_layout)
    if full.shape != p.spec.shape:
        raise Ms2hfError(
            f"parameter {p.spec.name!r}: fused from its Hugging Face tensors it has shape "
            f"{list(full.shape)}, the network says {list(p.spec.shape)}"
        )
    return np.ascontiguousarray(full, dtype)


def _hf_outputs(model: ModelSpec, config: GeneratorConfig) -> tuple[OutputTensor, ...]:
    """The Hugging Face tensors, as the converter's rules name them: the model's, then a LoRA
    fine-tune's per Hugging Face module (``<module>.lora_A.weight``, ``<module>.lora_B.weight``;
    the modules of one fused parameter share its ``lora_A``, one tensor under several names)."""
    given = {name: ConfigValue(value, "generator") for name, value in model.model_config.items()}
    shapes = {p.name: p.shape for p in model.params}
    hf = hf_model(shapes, given, config.source_dtype)
    if hf.lora is None:
        return hf.outputs
    adapter = lora.adapter(hf.outputs, hf.lora, shapes)
    return hf.outputs + tuple(
        dataclasses.replace(t, name=t.name.removeprefix(lora.PEFT_PREFIX)) for t in adapter
    )


def _legacy_files(
    root: Path, stages: Sequence[Sequence[PlacedParam]], config: GeneratorConfig
) -> tuple[list[FileSpec], dict[str, list[Slot]]]:
    """A rank file per rank: the training scalars, then every slice (and its Adam states) of its
    stage that it saves; de-duplicated saves give each key to one rank of its group."""
    per_stage = config.devices_per_stage
    metadata = {"format": "ms", "remove_redundancy": str(config.remove_redundancy)}
    scalars = training_scalars(config.step)
    files: list[FileSpec] = []
    slots: dict[str, list[Slot]] = {}
    for s, params in enumerate(stages):
        saved = savers(params, config.remove_redundancy)
        for local in range(per_stage):
            rank = s * per_stage + local
            name = f"{config.prefix}_rank_{rank}-{config.file_suffix}.safetensors"
            entries = [TensorEntry(n, tag, value.shape) for n, (tag, value) in scalars.items()]
            for p in params:
                for state in p.saved_prefixes:
                    if local in saved[state + p.spec.name]:
                        dtype = ADAM_STATE if state else _param_dtype(p, config)
                        entries.append(TensorEntry(state + p.spec.name, dtype, p.slice_shape))
                        slot = Slot(len(files), state, p.region(local))
                        slots.setdefault(p.spec.name, []).append(slot)
            path = root / "checkpoint" / f"rank_{rank}" / name
            constants = {n: value for n, (_, value) in scalars.items()}
            files.append(FileSpec(path, tuple(entries), metadata, constants))
    return files, slots


def _write_sparse(path: Path, layout: ShardLayout) -> None:
    """The header, then holes to the file's full size: what planning reads, in no disk space."""
    writer = ShardWriter(path, layout)
    try:
        os.truncate(writer.temporary, layout.size)
        os.replace(writer.temporary, path)
    finally:
        writer.abort()


def _write_files(
    root: Path,
    files: Sequence[FileSpec],
    slots: Mapping[str, Sequence[Slot]],
    placed: Sequence[PlacedParam],
    config: GeneratorConfig,
    outputs: Sequence[OutputTensor],
    given: tuple[Weights | None, Statistics],
    with_expected: bool,
) -> None:
    """Every file of the save and (``with_expected``) the expected Hugging Face file, one
    parameter at a time; on any error no file is left under its final name."""
    for f in files:
        f.path.parent.mkdir(parents=True, exist_ok=True)
    writers: list[ShardWriter] = []
    try:
        for f in files:
            writers.append(ShardWriter(f.path, layout_shard(f.entries, f.metadata)))
            for name, value in f.constants.items():
                _write_rows(writers[-1], name, value)
        expected: dict[str, ShardWriter] = {}
        if with_expected:
            for path, tensors in _expected_files(outputs).items():
                entries = [TensorEntry(t.name, config.source_dtype, t.shape) for t in tensors]
                writers.append(ShardWriter(root / path, layout_shard(entries, HF_METADATA)))
                expected.update(dict.fromkeys((t.name for t in tensors), writers[-1]))
        by_source: dict[str, list[OutputTensor]] = {}
        for t in outputs:
            by_source.setdefault(t.source, []).append(t)
        for p in placed:
            made_of = by_source.get(p.spec.name, [])
            full = _build_param(p, made_of, config, expected, *given)
            for slot in slots.get(p.spec.name, ()):
                transform = _adam_state(slot.state) if slot.state else None
                _write_rows(
                    writers[slot.file], slot.state + p.spec.name, full[slot.region], transform
                )
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def _expected_files(outputs: Sequence[OutputTensor]) -> dict[Path, list[OutputTensor]]:
    """The model's tensors in ``EXPECTED``, a LoRA fine-tune's LoRA tensors in ``EXPECTED_LORA``."""
    files: dict[Path, list[OutputTensor]] = {EXPECTED: []}
    for t in outputs:
        files.setdefault(EXPECTED_LORA if is_lora_name(t.name) else EXPECTED, []).append(t)
    return files


def _write_small_files(root: Path, model: ModelSpec, config: GeneratorConfig) -> None:
    (root / EXPECTED_CONFIG).parent.mkdir(parents=True, exist_ok=True)
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
        **({"use_legacy_format": False} if config.save_format == CKPT2 else {}),
        "model": {"model_config": model.model_config},
    }
    (root / TRAIN_YAML).write_text(yaml.safe_dump(train, sort_keys=False))
    if config.lora is not None:
        (root / RUN_ADAPTER_CONFIG).write_text(run_adapter_config(config.lora))


def _write_strategies(
    root: Path, network: str, stages: Sequence[Sequence[PlacedParam]], per_stage: int
) -> None:
    (root / "strategy").mkdir(parents=True, exist_ok=True)
    for s, params in enumerate(stages):
        encoded = encode_stage(network, s, params)
        for rank in range(s * per_stage, (s + 1) * per_stage):
            (root / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt").write_bytes(encoded)


def generate(
    config: GeneratorConfig,
    out_dir: str | os.PathLike[str],
    weights: Weights | None = None,
    *,
    statistics: Statistics | None = None,
    expected: bool = True,
    data: bool = True,
) -> Generated:
    """Write a MindSpore Transformers training output for ``config`` into ``out_dir``
    (``checkpoint/`` in ``config.save_format``; ``strategy/`` for the legacy format), with
    ``expected/`` and ``train.yaml`` beside them. ``weights`` (Hugging Face names) replace the
    seeded draws; every tensor of the model must be given, in its shape, and nothing else
    (checked before any file is written); each is cast to its parameter's dtype.
    ``statistics`` (MindSpore names) give training statistics such as ``fi_accu``. Without
    ``expected`` the expected Hugging Face tensors are not written (a benchmark needs only the
    training output; the save is the same bytes). Without ``data`` the files hold their headers
    and holes (sparse files): a save of any size to plan from, in no disk space.
    Files of an earlier run with the same names are replaced; nothing else is touched."""
    root = Path(out_dir)
    model = model_spec(config)
    outputs = _hf_outputs(model, config)
    if weights is not None:
        _check_weights(outputs, weights)
    placed = [place(p, config.opt_shard) for p in model.params]
    stages = [[p for p in placed if p.spec.stage == s] for s in range(config.pp)]
    if config.save_format == CKPT2:
        save = ckpt2.plan_save(root / "checkpoint", stages, config)
        files, slots = list(save.files), save.slots
    else:
        _write_strategies(root, model.network, stages, config.devices_per_stage)
        files, slots = _legacy_files(root, stages, config)
    if data:
        (root / EXPECTED).parent.mkdir(parents=True, exist_ok=True)
        given = (weights, statistics or {})
        _write_files(root, files, slots, placed, config, outputs, given, expected)
    else:
        for f in files:
            f.path.parent.mkdir(parents=True, exist_ok=True)
            _write_sparse(f.path, layout_shard(f.entries, f.metadata))
    if config.save_format == CKPT2:
        save.finish()
    else:
        for f in files:
            meta = {"last_epoch": config.step, "last_step": 1, "last_ckpt_file": f.path.name}
            (f.path.parent / "meta.json").write_text(json.dumps(meta))
    _write_small_files(root, model, config)
    return Generated(root, config, tuple(f.path for f in files))
