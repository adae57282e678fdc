"""``merge``: a training output -> the unified folder MindSpore's ``unified_safetensors`` writes.

Each model parameter is written whole, in its training dtype, into ``part{i}.safetensors``;
training scalars go to ``hyper_param.safetensors``; optimizer states are never read. A merged
parameter is an identity ``OutputTensor`` over the same source plan ``convert`` uses, so the
same executor streams it under the same memory budget, and de-duplicated saves are placed by the
same rule (where the old merge fills o_proj and down_proj from the wrong rank). A LoRA
fine-tune's ``lora_A``/``lora_B`` are parameters like any other (placed right on de-duplicated
saves too, where MindSpore's merge also gets the row-parallel ``lora_A`` wrong), and the run's
``adapter_config.json``, the one record of its alpha, is copied beside the parts for ``reverse``.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ms2hf.errors import ModelError
from ms2hf.io.config_files import RUN_ADAPTER_CONFIG, read_train_config
from ms2hf.io.hf_output import copy_file, index_document
from ms2hf.io.sources import found, plan_training_output
from ms2hf.io.sources.plan import SourceParam, SourcePlan
from ms2hf.io.unified_format import (
    HYPER_PARAM,
    METADATA,
    PARAM_NAME_MAP,
    part_name,
    unified_dir,
)
from ms2hf.pipeline.engine.budget import format_size
from ms2hf.pipeline.engine.memory import paused_gc
from ms2hf.pipeline.engine.output_dir import RUN_RECORD, UNIFIED_FOLDER
from ms2hf.pipeline.lora import run_adapter_config
from ms2hf.pipeline.plan import PlannedFile, PlannedTensor
from ms2hf.pipeline.run import RunOptions, SmallFile, as_path, check_positive, run_plan
from ms2hf.transforms import pieces
from ms2hf.transforms.lora import is_lora_name
from ms2hf.transforms.registry import hf_model

log = logging.getLogger("ms2hf")

PART_SIZE = 3 * 2**30
"""MindSpore splits a unified checkpoint into ceil(total / 3 GiB) parts."""


@dataclass(frozen=True)
class MergeOptions(RunOptions):
    """What to merge (and, from ``RunOptions``, how to run)."""

    step: str | None = None
    part_size: int = PART_SIZE
    exclude_prefix: str | None = None
    """Parameters whose names start with this are left out (``--filter_out_param_prefix``)."""
    has_redundancy: bool | None = None
    """The user's claim about the save (``--has_redundancy``); checked against the files."""
    config: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "part_size")
        as_path(self, "config")


@dataclass
class MergeReport:
    output_dir: Path
    parts: list[str]
    parameters: int
    scalars: int
    excluded: list[str]
    bytes_written: int
    bytes_read: int
    seconds: float

    def summary(self) -> str:
        return (
            f"wrote {self.parameters} parameters ({format_size(self.bytes_written)}) in "
            f"{len(self.parts)} part(s) and {self.scalars} training scalars to {self.output_dir} "
            f"in {self.seconds:.1f} s; read {format_size(self.bytes_read)}"
        )


def assign_parts(sizes: Mapping[str, int], part_size: int) -> list[list[str]]:
    """MindSpore's split, made deterministic: ceil(total / part_size) parts (no more than there
    are tensors), largest tensor first into the lightest part, ties broken by name and index."""
    count = max(1, min(len(sizes), -(-sum(sizes.values()) // part_size)))
    parts: list[list[str]] = [[] for _ in range(count)]
    loads = [(0, i) for i in range(count)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, i = heapq.heappop(loads)
        parts[i].append(name)
        heapq.heappush(loads, (load + sizes[name], i))
    return [sorted(p) for p in parts]


def redundancy_disagreement(source: SourcePlan, has_redundancy: bool | None) -> str | None:
    """A message when ``--has_redundancy`` contradicts the files' own ``remove_redundancy``."""
    if has_redundancy is None or not all("remove_redundancy" in f.metadata for f in source.files):
        return None
    if has_redundancy != source.remove_redundancy:
        return None
    saved = "de-duplicated" if source.remove_redundancy else "saved with redundancy"
    return (
        f"--has_redundancy {has_redundancy} disagrees with the rank files, which say "
        f"remove_redundancy={source.remove_redundancy} ({saved}); the files are followed: every "
        "block is placed from the rank that holds it and full coverage is checked"
    )


def _identity(params: Mapping[str, SourceParam]) -> tuple[PlannedTensor, ...]:
    return tuple(
        PlannedTensor(pieces.copy(name, name, p.shape), p.dtype)
        for name, p in sorted(params.items())
    )


def _check_config(source: SourcePlan, config: Path) -> None:
    """With a training yaml, prove the weights are the model it describes before merging."""
    shapes = {name: p.shape for name, p in source.params.items()}
    # The merged weights stay as trained and no config.json is written: the family and the
    # sizes are checked; a routing scale and the config values are reverse's business.
    hf_model(shapes, read_train_config(config), "F32", "ignore", config_checks=False)
    log.info(
        "checked %s against the weights; the merged parameters keep the trained fused layout, so "
        "pass the same --config to reverse",
        config,
    )


def _kept(source: SourcePlan, prefix: str | None) -> tuple[dict[str, SourceParam], list[str]]:
    """The parameters to merge, and the names ``--filter_out_param_prefix`` leaves out."""
    excluded = sorted(n for n in source.params if prefix and n.startswith(prefix))
    if prefix and not excluded:
        log.info(
            "note: --filter_out_param_prefix %r matches no model parameter; optimizer states are "
            "never written by ms2hf merge",
            prefix,
        )
    params = {n: p for n, p in source.params.items() if n not in excluded}
    if not params:
        raise ModelError(
            "no model parameter to merge"
            + (f" after --filter_out_param_prefix {prefix!r}" if excluded else "")
        )
    return params, excluded


def plan_unified_files(
    params: Mapping[str, SourceParam], scalars: Mapping[str, SourceParam], part_size: int
) -> tuple[list[PlannedFile], dict[str, str]]:
    """The part files and ``hyper_param.safetensors``, and the weight map of the parts."""
    groups = assign_parts({n: p.nbytes for n, p in params.items()}, part_size)
    files = [
        PlannedFile(part_name(i), _identity({n: params[n] for n in names}))
        for i, names in enumerate(groups)
    ]
    if scalars:
        files.append(PlannedFile(HYPER_PARAM, _identity(scalars)))
    weight_map = {name: part_name(i) for i, names in enumerate(groups) for name in names}
    return files, dict(sorted(weight_map.items()))


@paused_gc()
def merge(
    checkpoint_dir: str | os.PathLike[str],
    strategy_path: str | os.PathLike[str] | None,
    output_dir: str | os.PathLike[str],
    options: MergeOptions | None = None,
) -> MergeReport:
    """Merge one step of a training output into ``{output_dir}/{step}_ckpt_convert/unified_safe``.
    ``checkpoint_dir`` is anything ``convert`` takes (the training output, its ``checkpoint/``,
    a Checkpoint 2.0 iteration folder); a legacy save's strategy is ``strategy_path``, or the
    ``strategy/`` folder beside ``checkpoint/``."""
    options = options or MergeOptions()
    started = time.perf_counter()
    source = plan_training_output(checkpoint_dir, options.step, strategy_dir=strategy_path)
    log.info("%s", found(source))
    warning = redundancy_disagreement(source, options.has_redundancy)
    if warning:
        log.warning("warning: %s", warning)
    if options.config is not None:
        _check_config(source, options.config)
    params, excluded = _kept(source, options.exclude_prefix)
    files, weight_map = plan_unified_files(params, source.scalars, options.part_size)
    parts = [f.name for f in files if f.name != HYPER_PARAM]
    param_bytes = sum(p.nbytes for p in params.values())
    document = index_document(weight_map, param_bytes)  # the same form as an HF index

    out = unified_dir(Path(output_dir), source.step)
    log.info(
        "step %s: %d parameters (%s) into %d part(s), %d training scalars; %s of optimizer state "
        "not read",
        source.step,
        len(params),
        format_size(param_bytes),
        len(parts),
        len(source.scalars),
        format_size(source.optimizer_bytes),
    )
    if not source.scalars and source.counters:
        log.info(
            "note: no %s: this save keeps its counters in common.json, not in tensors",
            HYPER_PARAM,
        )
    params_read = {**params, **source.scalars}
    inputs = [options.config] if options.config else []
    then: list[SmallFile] = []
    run_config = run_adapter_config(Path(checkpoint_dir))
    if run_config is not None and any(is_lora_name(name) for name in params):
        # A LoRA fine-tune's alpha is in this file only: reverse finds it beside the parts.
        then.append(SmallFile(RUN_ADAPTER_CONFIG, partial(copy_file, run_config)))
        inputs.append(run_config)
    stats = run_plan(
        source,
        out,
        files,
        params_read,
        METADATA,
        then,
        document,
        options,
        "merge",
        UNIFIED_FOLDER,
        inputs,
    )
    written = {f.name for f in files} | {s.name for s in then} | {PARAM_NAME_MAP, RUN_RECORD}
    others = sorted(p.name for p in out.iterdir() if p.name not in written)
    if others:
        log.info("left untouched in %s: %s", out, ", ".join(others))
    return MergeReport(
        output_dir=out,
        parts=parts,
        parameters=len(params),
        scalars=len(source.scalars),
        excluded=excluded,
        bytes_written=sum(f.nbytes for f in files),
        bytes_read=stats.bytes_read,
        seconds=time.perf_counter() - started,
    )
