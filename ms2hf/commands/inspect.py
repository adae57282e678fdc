"""``inspect``: what a checkpoint folder holds and what ``convert`` would make of it.

Before an hour-long conversion people want to know which step, how many ranks and stages, how
each parameter is split and saved, what the model is and what the output will be. All of it
comes from the same plans a conversion makes, from headers and strategy files alone, so inspect
reads no tensor byte and its answer is exactly what a run would do.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ms2hf.commands.convert import ConvertOptions, gather_given, lora_request, plan_for
from ms2hf.errors import FormatError, ModelError
from ms2hf.io.config_files import RUN_ADAPTER_CONFIG, ConfigValue, read_json_object
from ms2hf.io.dtypes import nbytes
from ms2hf.io.hf_output import HF_INDEX, HF_SHARD
from ms2hf.io.safetensors_reader import SafetensorsHeader
from ms2hf.io.sources import is_training_output, plan_training_output
from ms2hf.io.sources.legacy import find_rank_dirs, incomplete_steps
from ms2hf.io.sources.plan import LEGACY, Block, SourceParam, SourcePlan
from ms2hf.io.sources.unified import plan_unified
from ms2hf.io.tokenizer_files import find_tokenizer_files
from ms2hf.io.unified_format import PARAM_NAME_MAP
from ms2hf.pipeline.engine.memory import paused_gc
from ms2hf.pipeline.lora import LoraPlan
from ms2hf.pipeline.run import jsonable
from ms2hf.transforms.lora import base_weight
from ms2hf.transforms.mappings import GroupedExperts, natural_key
from ms2hf.transforms.registry import HfModel

TRAINING = "training output"
UNIFIED = "unified checkpoint"
HUGGING_FACE = "Hugging Face checkpoint"
HF_CONFIG = "config.json"


@dataclass(frozen=True)
class SliceReport:
    """One block of a parameter as the files hold it: where it goes, who held it in training,
    and every file it is in (the first is the copy a conversion reads)."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    holders: tuple[int, ...]
    """Global ranks that held it in training."""
    files: tuple[str, ...]
    """Relative to the inspected folder."""


@dataclass(frozen=True)
class ParamReport:
    """One parameter: its full shape and how the source files hold it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    stage: int
    split: tuple[int, ...]
    """Blocks along each dim by the tensor map (tensor or expert parallelism); 1 = whole."""
    optimizer_chunks: int
    """Further blocks of dim 0 by optimizer sharding (parallel optimizer); 1 = off."""
    replicas: int
    """Ranks whose slice each block is (data-parallel copies)."""
    saved_copies: int
    """Copies of each block present in the files: ``replicas`` if saved redundantly, else 1."""
    experts_per_block: int | None = None
    """For a grouped expert weight (experts stacked along dim 0), the whole experts in each
    block: a split of its dim 0 is expert parallelism. None for any other parameter."""
    slices: tuple[SliceReport, ...] = ()
    """Every block, in grid order (a Checkpoint 2.0 parameter its files hold whole: one)."""


@dataclass(frozen=True)
class TensorReport:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FileReport:
    path: str
    """Relative to the inspected folder."""
    bytes: int
    tensors: int
    """Model-parameter tensors in the file (optimizer states and scalars not counted)."""
    rank: int | None = None
    stage: int | None = None


@dataclass(frozen=True)
class ByteCounts:
    weights: int
    """Every model parameter once."""
    weights_saved: int
    """Model parameters as saved, replicas included."""
    optimizer: int
    """Optimizer states (Adam moments); never read by a conversion."""
    scalars: int
    files: int
    """Everything on disk: the sum of the files' sizes."""


@dataclass(frozen=True)
class ModelReport:
    model_type: str | None
    config: dict[str, ConfigValue]
    """config.json as a run would write it (or as found), every value with its origin."""
    skipped: tuple[str, ...] = ()
    """Source parameters deliberately left out of the Hugging Face model: statistics of training,
    not weights (MoE ``fi_accu``)."""
    error: str | None = None
    """Why the parameters were not recognised as a supported model, when they were not."""


@dataclass(frozen=True)
class OutputFileReport:
    name: str
    tensors: int
    bytes: int


@dataclass(frozen=True)
class OutputReport:
    """What ``convert`` (or ``reverse``) would write with the given options."""

    dtype: str
    files: tuple[OutputFileReport, ...]
    tensors: int
    bytes: int
    parameters: int
    also: tuple[str, ...]


@dataclass(frozen=True)
class InspectReport:
    """What a checkpoint holds and what ``convert`` would make of it: returned by
    ``ms2hf.inspect``, printed by ``inspect`` (``--json``: ``to_dict()``)."""

    path: Path
    kind: str
    source_format: str | None
    """For a training output: ``legacy`` or ``Checkpoint 2.0``."""
    step: str | None
    steps_present: tuple[str, ...]
    step_reason: str | None
    """Why ``step`` was read: ``--step``, the tracker's, ..."""
    ranks: int
    stages: int
    remove_redundancy: bool | None
    files: tuple[FileReport, ...]
    params: tuple[ParamReport, ...]
    dtypes: dict[str, int]
    """Bytes of model weights by dtype."""
    bytes: ByteCounts
    scalars: tuple[TensorReport, ...]
    model: ModelReport
    output: OutputReport | None
    incomplete_steps: dict[str, list[int]] = field(default_factory=dict)
    """Steps some rank folders lack (newest first), with the ranks lacking them."""
    counters: dict[str, Any] = field(default_factory=dict)
    """Run counters kept beside the tensors (Checkpoint 2.0's ``common.json``)."""
    lora: LoraPlan | None = None
    """A LoRA fine-tune's rank, targets, alpha (with where it came from) and what convert would
    make of it."""
    output_error: str | None = None
    """Why convert would stop before writing (alpha unknown, ``--lora adapter`` without LoRA...),
    when the model itself is fine."""

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = jsonable(self)
        return doc


def detect_kind(path: Path) -> str:
    if is_training_output(path):
        return TRAINING
    if path.is_dir() and (path / PARAM_NAME_MAP).is_file():
        return UNIFIED
    if path.is_dir() and ((path / HF_CONFIG).is_file() or (path / HF_INDEX).is_file()):
        return HUGGING_FACE
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not files[0].is_file() or files[0].suffix != ".safetensors":
        raise FormatError(
            f"{path}: not a training output (checkpoint/ with rank_N or iteration_XXXXXXXX "
            "folders), a unified checkpoint "
            f"({PARAM_NAME_MAP} and part files) or a Hugging Face folder (config.json and "
            "*.safetensors)"
        )
    return HUGGING_FACE if SafetensorsHeader(files[0]).metadata.get("format") == "pt" else UNIFIED


@paused_gc()
def inspect(path: str | os.PathLike[str], options: ConvertOptions | None = None) -> InspectReport:
    """Describe the checkpoint at ``path``; ``options`` as ``convert`` would get them."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: does not exist")
    options = options or ConvertOptions()
    kind = detect_kind(path)
    if kind == HUGGING_FACE:
        return inspect_hf(path)
    run_dir = path if path.is_dir() else path.parent
    if kind != TRAINING:
        return inspect_source(path, kind, plan_unified(path), options, run_dir)
    source = plan_training_output(path, options.step)
    report = inspect_source(path, kind, source, options, run_dir)
    if source.source_format == LEGACY and source.root is not None:
        report = replace(report, incomplete_steps=incomplete_steps(find_rank_dirs(source.root)))
    return report


def _grouped_experts(model: HfModel | None) -> frozenset[str]:
    """The parameters that stack whole experts along dim 0 (split there: expert parallelism)."""
    if model is None:
        return frozenset()
    rows = model.family.table
    return frozenset(
        t.source
        for t in model.outputs
        if isinstance((rows.row(t.source) or (None,))[0], GroupedExperts)
    )


def _experts_per_block(
    name: str, split: tuple[int, ...], experts: int | None, grouped: frozenset[str]
) -> int | None:
    if experts is None or name not in grouped or experts % split[0]:
        return None
    return experts // split[0]


def _relative(root: Path, path: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _slices(p: SourceParam, root: Path) -> tuple[SliceReport, ...]:
    copies: dict[tuple[int, ...], list[Block]] = {}
    for b in (*p.blocks, *p.replicas):
        copies.setdefault(b.offsets, []).append(b)
    return tuple(
        SliceReport(
            b.offsets,
            b.shape,
            p.holders[i] if p.holders else tuple(sorted({c.rank for c in copies[b.offsets]})),
            tuple(_relative(root, c.path) for c in copies[b.offsets]),
        )
        for i, b in enumerate(p.blocks)
    )


def _param_report(
    p: SourceParam,
    source: SourcePlan,
    root: Path,
    stage_of: Mapping[int, int],
    ranks_per_stage: int,
    experts: int | None,
    grouped: frozenset[str],
) -> ParamReport:
    grid = source.grids.get(p.name)
    optimizer_chunks = grid.opt_chunks if grid else 1
    split = grid.model_parts if grid else (1,) * len(p.shape)
    blocks = math.prod(grid.parts) if grid else len(p.blocks)
    stage = p.holders[0][0] // ranks_per_stage if p.holders else stage_of[p.blocks[0].rank]
    return ParamReport(
        name=p.name,
        shape=p.shape,
        dtype=p.dtype,
        nbytes=p.nbytes,
        stage=stage,
        split=split,
        optimizer_chunks=optimizer_chunks,
        replicas=max(1, ranks_per_stage // blocks),
        saved_copies=(len(p.blocks) + len(p.replicas)) // len(p.blocks),
        experts_per_block=_experts_per_block(p.name, split, experts, grouped),
        slices=_slices(p, root),
    )


def _saved_bytes(p: SourceParam) -> int:
    return sum(nbytes(p.dtype, b.shape) for b in (*p.blocks, *p.replicas))


def _file_reports(root: Path, source: SourcePlan) -> tuple[FileReport, ...]:
    counts: dict[Path, int] = {}
    for p in source.params.values():
        for b in {*p.blocks, *p.replicas}:
            counts[b.path] = counts.get(b.path, 0) + 1
    return tuple(
        FileReport(
            path=_relative(root, f.path),
            bytes=f.path.stat().st_size,
            tensors=counts.get(f.path, 0),
            rank=f.rank,
            stage=f.stage,
        )
        for f in source.files
    )


def inspect_source(
    path: Path,
    kind: str,
    source: SourcePlan,
    options: ConvertOptions,
    run_dir: Path | None = None,
) -> InspectReport:
    """The report for anything described by a source plan: a training output or unified folder
    (``run_dir``: where a LoRA run's ``adapter_config.json`` would be)."""
    training = kind == TRAINING
    stage_of = {f.rank: f.stage for f in source.files}
    ranks_per_stage = source.ranks // source.num_stages if training else 1
    planned = _model_and_output(source, options, run_dir)
    hf, model, output, order = planned.hf, planned.model, planned.output, planned.order
    experts = model.config.get("num_experts")
    num_experts = experts.value if experts else None
    grouped = _grouped_experts(hf)
    params = tuple(
        _param_report(
            source.params[name], source, path, stage_of, ranks_per_stage, num_experts, grouped
        )
        for name in sorted(source.params, key=order)
    )
    files = _file_reports(path, source)
    choice = source.choice if training else None
    return InspectReport(
        path=path,
        kind=kind,
        source_format=source.source_format if training else None,
        step=source.step if training else None,
        steps_present=choice.present if choice else (),
        step_reason=choice.reason if choice else None,
        ranks=source.ranks if training else 0,
        stages=source.num_stages,
        remove_redundancy=source.remove_redundancy if training else None,
        files=files,
        params=params,
        dtypes=_bytes_by_dtype(params),
        bytes=ByteCounts(
            weights=source.param_bytes,
            weights_saved=sum(_saved_bytes(p) for p in source.params.values()),
            optimizer=source.optimizer_bytes,
            scalars=source.scalar_bytes,
            files=sum(f.bytes for f in files),
        ),
        scalars=tuple(TensorReport(n, s.dtype, s.shape) for n, s in sorted(source.scalars.items())),
        model=model,
        output=output,
        counters=dict(source.counters),
        lora=planned.lora,
        output_error=planned.output_error,
    )


def _bytes_by_dtype(params: tuple[ParamReport, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in params:
        out[p.dtype] = out.get(p.dtype, 0) + p.nbytes
    return out


@dataclass(frozen=True)
class _Planned:
    hf: HfModel | None
    model: ModelReport
    output: OutputReport | None
    order: Callable[[str], Any]
    lora: LoraPlan | None = None
    output_error: str | None = None


def _model_and_output(
    source: SourcePlan, options: ConvertOptions, run_dir: Path | None
) -> _Planned:
    """The model the parameters form, the files a run would write, and the order to list the
    parameters in (the model's); a checkpoint that is no supported model is still described,
    with the reason, and so is a model convert would not write as asked (its base model)."""
    given = gather_given(options)
    request = lora_request(options, run_dir)
    stopped = None
    try:
        plan = plan_for(source, options, given, request)
    except ModelError as e:
        try:
            plan = plan_for(source, options, given, dataclasses.replace(request, mode="base"))
        except ModelError:
            return _Planned(None, ModelReport(None, {}, error=str(e)), None, natural_key)
        stopped = str(e)
    model = plan.model
    first_use: dict[str, int] = {}
    for i, t in enumerate(model.outputs):
        first_use.setdefault(t.source, i)
    report = ModelReport(model.model_type, dict(model.config), skipped=tuple(sorted(model.skipped)))
    output = OutputReport(
        dtype=options.dtype,
        files=tuple(OutputFileReport(f.name, len(f.tensors), f.nbytes) for f in plan.files),
        tensors=len(plan.weight_map),
        bytes=plan.nbytes,
        parameters=plan.parameters,
        also=(
            *_tokenizer_names(options),
            *((RUN_ADAPTER_CONFIG,) if plan.adapter else (HF_CONFIG, HF_INDEX)),
        ),
    )
    lora = plan.lora
    if stopped is not None and lora is not None:
        lora = dataclasses.replace(lora, mode=request.mode or "merged")
    return _Planned(
        model,
        report,
        None if stopped else output,
        lambda name: (
            first_use.get(base_weight(name), len(first_use)),  # LoRA after its weight
            name != base_weight(name),
            natural_key(name),
        ),
        lora,
        stopped,
    )


def _tokenizer_names(options: ConvertOptions) -> list[str]:
    if options.tokenizer_dir is None:
        return []
    return [p.name for p in find_tokenizer_files(options.tokenizer_dir)]


def _hf_files(path: Path) -> list[Path]:
    index = path / HF_INDEX
    if index.is_file():
        weight_map = read_json_object(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise FormatError(f"{index}: no 'weight_map' of tensor names to file names")
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(p for p in path.glob("*.safetensors") if HF_SHARD.match(p.name))
    return files or sorted(path.glob("*.safetensors"))


def _hf_config(path: Path) -> dict[str, ConfigValue]:
    config_path = path / HF_CONFIG
    if not config_path.is_file():
        return {}
    doc = read_json_object(config_path, "a Hugging Face config.json")
    return {k: ConfigValue(v, HF_CONFIG) for k, v in sorted(doc.items())}


def inspect_hf(path: Path) -> InspectReport:
    """A Hugging Face folder: its shards' tensors and its config.json."""
    headers = [SafetensorsHeader(p) for p in _hf_files(path)]
    params = tuple(
        ParamReport(
            t.name,
            t.shape,
            t.dtype,
            t.nbytes,
            stage=0,
            split=(1,) * len(t.shape),
            optimizer_chunks=1,
            replicas=1,
            saved_copies=1,
        )
        for h in headers
        for t in sorted(h.tensors.values(), key=lambda t: natural_key(t.name))
    )
    files = tuple(FileReport(h.path.name, h.path.stat().st_size, len(h.tensors)) for h in headers)
    config = _hf_config(path)
    model_type = config.get("model_type")
    weights = sum(p.nbytes for p in params)
    return InspectReport(
        path=path,
        kind=HUGGING_FACE,
        source_format=None,
        step=None,
        steps_present=(),
        step_reason=None,
        ranks=0,
        stages=1,
        remove_redundancy=None,
        files=files,
        params=params,
        dtypes=_bytes_by_dtype(params),
        bytes=ByteCounts(weights, weights, 0, 0, sum(f.bytes for f in files)),
        scalars=(),
        model=ModelReport(
            str(model_type.value) if model_type else None,
            config,
            error=None if config else f"{path / HF_CONFIG}: missing",
        ),
        output=None,
    )
