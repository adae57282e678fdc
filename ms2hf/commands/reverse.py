"""``reverse``: a unified (merged) checkpoint -> the Hugging Face checkpoint ``convert`` writes.

Only the front half differs from ``convert``: the source plan comes from whole tensors in a
unified folder instead of rank slices. The model, its sizes and the output are the same code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ms2hf.commands.convert import ConvertOptions, ConvertReport, gather_given, write_hf_checkpoint
from ms2hf.errors import ModelError
from ms2hf.io.sources.unified import plan_unified
from ms2hf.transforms.families import detect_model_type

MODEL_NAMES = {"qwen3": "qwen3", "qwen3-moe": "qwen3_moe", "qwen3_moe": "qwen3_moe"}
"""``--model`` spellings of the old tools -> the model type ms2hf detects."""

EXPERT_SIZES = ("num_experts", "moe_intermediate_size")


def check_model_flag(model: str, detected: str, where: Path) -> None:
    wanted = MODEL_NAMES.get(model.lower())
    if wanted is None:
        raise ModelError(
            f"--model {model!r} is not supported; ms2hf converts {', '.join(sorted(MODEL_NAMES))}"
        )
    if wanted != detected:
        raise ModelError(
            f"--model {model!r} disagrees with {where}, whose parameters are {detected}"
        )


def _check_expert_flags(flags: Mapping[str, tuple[Any, str]], detected: str, where: Path) -> None:
    """Expert sizes given as flags for a model without experts are a claim the weights
    contradict. (A yaml may carry unused MoE keys; only flags are checked here.)"""
    if detected.endswith("_moe"):
        return
    for name in EXPERT_SIZES:
        if name in flags:
            value, flag = flags[name]
            raise ModelError(
                f"{flag} = {value!r} disagrees with {where}: it is a dense {detected} model, "
                "with no decoder.layers.<i>.mlp.experts tensors"
            )


def reverse(
    input_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    model: str | None = None,
) -> ConvertReport:
    """Convert a unified folder (or one safetensors file) into a Hugging Face checkpoint."""
    options = options or ConvertOptions()
    started = time.perf_counter()
    source_path = Path(input_path)
    given = gather_given(options)
    source = plan_unified(source_path)
    detected = detect_model_type({name: p.shape for name, p in source.params.items()})
    if model is not None:
        check_model_flag(model, detected, source_path)
    _check_expert_flags(options.given, detected, source_path)
    report = write_hf_checkpoint(source, Path(out_dir), options, given)
    report.seconds = time.perf_counter() - started
    return report
