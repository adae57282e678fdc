"""``convert``: a MindSpore Transformers training output -> a Hugging Face checkpoint, in one pass.

Plan first, from headers and strategies alone (source blocks, Hugging Face tensors, shards);
then stream: every output band is copied and cast from memory-mapped rank files into a reused
buffer and written at its place, under the memory budget. Nothing but the model's slices is read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ms2hf.errors import FormatError, ModelError
from ms2hf.io.config_files import ConfigValue, Given
from ms2hf.io.hf_output import HF_INDEX, HF_METADATA, copy_file, index_document, write_json
from ms2hf.io.sources import found, plan_training_output
from ms2hf.io.sources.plan import SourcePlan
from ms2hf.io.tokenizer_files import find_tokenizer_files, same_file, usability_notes
from ms2hf.io.unified_format import PARAM_NAME_MAP
from ms2hf.pipeline.engine.budget import format_size
from ms2hf.pipeline.engine.memory import paused_gc
from ms2hf.pipeline.engine.output_dir import ADAPTER_FOLDER, HF_FOLDER
from ms2hf.pipeline.given import given_values, origin_lines
from ms2hf.pipeline.lora import (
    ALPHA_FLAG,
    LORA_MODES,
    LoraPlan,
    LoraRequest,
    lora_given,
    run_adapter_config,
)
from ms2hf.pipeline.plan import HfPlan, plan_hf_checkpoint
from ms2hf.pipeline.run import (
    RunOptions,
    SmallFile,
    as_path,
    check_positive,
    jsonable,
    option_error,
    run_plan,
)
from ms2hf.pipeline.shards import SHARD_LAYOUTS
from ms2hf.transforms.casts import TARGETS
from ms2hf.transforms.hf_config import config_json
from ms2hf.transforms.lora import adapter_config
from ms2hf.transforms.registry import ROUTING_POLICIES

log = logging.getLogger("ms2hf")


@dataclass(frozen=True)
class ConvertOptions(RunOptions):
    """What to write (and, from ``RunOptions``, how to run)."""

    dtype: str = "bf16"
    """``bf16``, ``fp16``, ``fp32``, or ``source`` (each tensor's stored dtype)."""
    max_shard_size: int = 5_000_000_000
    shard_layout: str = "size"
    """``size`` (huggingface_hub's packing) or ``per-layer`` (the old reverse tool's files)."""
    step: str | None = None
    config: Path | None = None
    """A training yaml: layout flags, sizes to check, config values the weights cannot tell."""
    reference_config: Path | None = None
    """A Hugging Face config.json: config values the weights cannot tell; its sizes are checked."""
    tokenizer_dir: Path | None = None
    """A folder whose tokenizer and generation files are copied into the output."""
    given: Mapping[str, ConfigValue] = field(default_factory=dict)
    """Values from flags, under config.json names (origin: the flag): checked against the shapes."""
    routing_scale: str | None = None
    """``fold`` or ``ignore``: what to do with a routing scale the Hugging Face model cannot
    state (``docs/qwen3-moe.md#routing``); None stops the run when there is one."""
    lora: str | None = None
    """On a LoRA fine-tune: ``merged`` (the fine-tuned model; the default), ``adapter`` (a PEFT
    adapter) or ``base`` (the model without the fine-tuning)."""
    lora_alpha: float | None = None
    """LoRA's alpha, when neither the yaml nor the run's adapter_config.json gives it (or to
    confirm them: every value given must agree)."""
    base_model: str | None = None
    """A PEFT adapter's ``base_model_name_or_path`` (a hub id or folder of the base model)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.dtype, str) or self.dtype not in TARGETS:
            raise option_error("dtype", self.dtype, f"one of {', '.join(TARGETS)}")
        if not isinstance(self.shard_layout, str) or self.shard_layout not in SHARD_LAYOUTS:
            raise option_error("shard_layout", self.shard_layout, f"one of {SHARD_LAYOUTS}")
        check_positive(self, "max_shard_size")
        if self.routing_scale not in (None, *ROUTING_POLICIES):
            raise option_error("routing_scale", self.routing_scale, "'fold', 'ignore' or None")
        if self.step is not None and not isinstance(self.step, str):
            raise option_error("step", self.step, "a step such as '1000_1', or None")
        as_path(self, "config", "reference_config", "tokenizer_dir")
        if not isinstance(self.given, Mapping) or not all(
            isinstance(k, str) and isinstance(v, ConfigValue) for k, v in self.given.items()
        ):
            raise option_error("given", self.given, "a mapping of config.json names to values")
        if self.lora not in (None, *LORA_MODES):
            raise option_error("lora", self.lora, f"one of {', '.join(LORA_MODES)}, or None")
        alpha = self.lora_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
            raise option_error("lora_alpha", alpha, "a number, or None")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise option_error("base_model", self.base_model, "a model name or path, or None")


@dataclass
class ConvertReport:
    """What a conversion did: returned by ``ms2hf.convert``, printed by ``convert --json``."""

    output_dir: Path
    model_type: str
    files: list[str]
    tensors: int
    bytes_written: int
    bytes_read: int
    seconds: float
    config_origins: dict[str, str]
    tokenizer_files: list[str] = field(default_factory=list)
    """Tokenizer and generation files copied in."""
    tokenizer_kept: list[str] = field(default_factory=list)
    """Tokenizer files ``--tokenizer-dir`` named that were already in place (the output folder)."""
    notes: list[str] = field(default_factory=list)
    """What the folder still lacks to be used as a model repository."""
    peak_rss_bytes: int = 0
    """The process's largest resident size, page cache of the mapped inputs included."""
    peak_anonymous_bytes: int = 0
    """The largest anonymous resident size sampled while writing: what the run itself held."""
    read_ranges: list[tuple[Path, int, int]] = field(default_factory=list)
    """Distinct ``(file, start, end)`` ranges read, when ``record_reads`` was on."""
    lora: LoraPlan | None = None
    """On a LoRA fine-tune: what was written (mode), r, alpha and where it came from, targets."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"wrote {self.tensors} tensors ({format_size(self.bytes_written)}) in "
            f"{len(self.files)} file(s) to {self.output_dir} in {self.seconds:.1f} s "
            f"({self.gb_per_s:.2f} GB/s); read {format_size(self.bytes_read)} of model weights; "
            f"peak memory {format_size(self.peak_anonymous_bytes)} anonymous"
        ]
        if self.tokenizer_files:
            lines.append(f"copied {', '.join(self.tokenizer_files)}")
        if self.tokenizer_kept:
            lines.append(f"kept in place: {', '.join(self.tokenizer_kept)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**jsonable(self), "gb_per_s": self.gb_per_s}


def gather_given(options: ConvertOptions) -> Given:
    """Reference config and yaml values, then flags on top (a flag names itself in messages)."""
    return given_values(options.reference_config, options.config, options.given)


def run_folder(
    training_output: str | os.PathLike[str] | None,
    checkpoint_dir: str | os.PathLike[str] | None,
) -> Path | None:
    """Where to look for a LoRA run's ``adapter_config.json`` (``run_adapter_config``): the
    folder given, else the checkpoint folder."""
    where = training_output if training_output is not None else checkpoint_dir
    return Path(where) if where is not None else None


def lora_request(options: ConvertOptions, run_dir: Path | None) -> LoraRequest:
    """The LoRA output ``options`` ask for, with what ``--lora-alpha``, the yaml and the run's
    ``adapter_config.json`` (looked for in ``run_dir``, the run's output folder) say about it."""
    given = lora_given(options.lora_alpha, options.config, run_adapter_config(run_dir))
    return LoraRequest(options.lora, given, options.base_model)


def plan_for(
    source: SourcePlan, options: ConvertOptions, given: Given, lora: LoraRequest | None = None
) -> HfPlan:
    """The Hugging Face checkpoint (or PEFT adapter) ``options`` ask for."""
    return plan_hf_checkpoint(
        source,
        given,
        options.dtype,
        options.max_shard_size,
        options.shard_layout,
        options.routing_scale,
        lora,
    )


def _adapter_config(lora: LoraPlan) -> dict[str, Any]:
    """A PEFT adapter's config (written last, in place of an index), said in the log."""
    assert lora.alpha is not None
    doc = adapter_config(lora.rank, lora.alpha.value, lora.targets, lora.dropout, lora.base_model)
    log.info("adapter_config.json: %s", ", ".join(f"{k}={v!r}" for k, v in doc.items()))
    named = [t for t in lora.targets if "." in t]
    if named:
        log.warning(
            "warning: target_modules names %s in full: other modules of those names have no "
            "LoRA. On a Qwen3-MoE, PEFT 0.21 with transformers 5 turns every gate_proj, up_proj "
            "and down_proj target into the fused experts and cannot load this adapter; the "
            "merged model (the default) has no such limit (docs/lora.md#4)",
            ", ".join(named),
        )
    return doc


def write_hf_checkpoint(
    source: SourcePlan,
    out_dir: Path,
    options: ConvertOptions,
    given: Given,
    lora: LoraRequest | None = None,
) -> ConvertReport:
    """The shared back half of ``convert`` and ``reverse``: model rules, shards, index, config
    (or, on a LoRA fine-tune with ``--lora adapter``, the adapter and its config). Tokenizer
    files already in ``out_dir`` (``--tokenizer-dir`` naming it) stay where they are."""
    plan = plan_for(source, options, given, lora)
    model = plan.model
    tokenizer = find_tokenizer_files(options.tokenizer_dir) if options.tokenizer_dir else []
    copies = [path for path in tokenizer if not same_file(path, out_dir / path.name)]
    if plan.lora is not None:
        log.info("%s", plan.lora.describe())
    elif options.lora is not None or options.lora_alpha is not None:
        asked = f"--lora {options.lora}" if options.lora else f"{ALPHA_FLAG} {options.lora_alpha}"
        log.info("note: %s: the checkpoint has no LoRA weights; writing the model as it is", asked)
    log.info("%s: %d tensors", model.model_type, len(plan.weight_map))
    for note in model.notes:
        log.info("note: %s", note)
    then = [SmallFile(path.name, partial(copy_file, path)) for path in copies]
    if plan.adapter:
        assert plan.lora is not None
        index: dict[str, Any] = _adapter_config(plan.lora)
        kind = ADAPTER_FOLDER
    else:
        log.info("config.json values, by where they came from:")
        for line in origin_lines(model.config):
            log.info("%s", line)
        config = config_json(model.config)
        then.append(SmallFile("config.json", lambda path: write_json(path, config)))
        index = index_document(plan.weight_map, plan.nbytes, plan.parameters)
        kind = HF_FOLDER
    inputs = [p for p in (options.config, options.reference_config, *tokenizer) if p is not None]
    stats = run_plan(
        source,
        out_dir,
        plan.files,
        source.params,
        HF_METADATA,
        then,
        index,
        options,
        "convert",
        kind=kind,
        inputs=inputs,
    )
    notes = [] if plan.adapter or options.part else usability_notes(out_dir)
    for note in notes:
        log.info("note: %s", note)
    return ConvertReport(
        output_dir=out_dir,
        model_type=model.model_type,
        files=stats.files,
        tensors=stats.tensors,
        bytes_written=stats.bytes_written,
        bytes_read=stats.bytes_read,
        seconds=stats.seconds,
        config_origins={k: v.origin for k, v in model.config.items()},
        tokenizer_files=[path.name for path in copies],
        tokenizer_kept=[path.name for path in tokenizer if path not in copies],
        notes=notes,
        peak_rss_bytes=stats.peak_rss_bytes,
        peak_anonymous_bytes=stats.peak_anonymous_bytes,
        read_ranges=stats.read_ranges,
        lora=plan.lora,
    )


def _not_another_kind(root: Path) -> None:
    """A folder that is already a Hugging Face checkpoint, or a merged one, is named as such
    rather than reported as a training output without ``checkpoint/``."""
    if (root / "checkpoint").exists():
        return
    if (root / HF_INDEX).is_file() or (
        (root / "config.json").is_file() and any(root.glob("*.safetensors"))
    ):
        raise FormatError(
            f"{root}: is a Hugging Face checkpoint (config.json and *.safetensors), already "
            "converted; convert reads a training output (the folder holding checkpoint/). "
            f"`ms2hf verify {root}` checks it, `ms2hf inspect {root}` describes it"
        )
    if (root / PARAM_NAME_MAP).is_file():
        raise FormatError(
            f"{root}: is a unified (merged) MindSpore checkpoint ({PARAM_NAME_MAP}); convert it "
            f"with `ms2hf reverse --input_path {root} --output_path HF_DIR`"
        )


@paused_gc()
def convert(
    training_output: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    strategy_dir: str | os.PathLike[str] | None = None,
) -> ConvertReport:
    """Convert ``training_output`` (the folder holding ``checkpoint/``, ``checkpoint/`` itself, or
    one Checkpoint 2.0 ``iteration_XXXXXXXX/`` folder) into ``out_dir``."""
    options = options or ConvertOptions()
    started = time.perf_counter()
    if training_output is not None and checkpoint_dir is None and Path(training_output).is_dir():
        _not_another_kind(Path(training_output))
    given = gather_given(options)
    source = plan_training_output(
        training_output, options.step, checkpoint_dir=checkpoint_dir, strategy_dir=strategy_dir
    )
    log.info("%s", found(source))
    lora = lora_request(options, run_folder(training_output, checkpoint_dir))
    log.info(
        "step %s: %d ranks, %d stage(s), %d parameters (%s of weights; %s of optimizer state "
        "not read)",
        source.step,
        source.ranks,
        source.num_stages,
        len(source.params),
        format_size(source.param_bytes),
        format_size(source.optimizer_bytes),
    )
    try:
        report = write_hf_checkpoint(source, Path(out_dir), options, given, lora)
    except ModelError as e:
        raise ModelError(f"{source.root}, step {source.step}: {e}") from e
    report.seconds = time.perf_counter() - started
    return report
