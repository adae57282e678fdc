"""``reverse``: a unified (merged) checkpoint -> the Hugging Face checkpoint ``convert`` writes.

Only the front half differs from ``convert``: the source plan comes from whole tensors in a
unified folder instead of rank slices. The model, its sizes and the output are the same code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ms2hf.commands.convert import (
    ConvertOptions,
    ConvertReport,
    gather_given,
    lora_request,
    write_hf_checkpoint,
)
from ms2hf.errors import ModelError
from ms2hf.io.sources.unified import plan_unified
from ms2hf.transforms.family import ModelFamily
from ms2hf.transforms.registry import by_name, detect


def check_model_flag(model: str, detected: ModelFamily, where: Path) -> None:
    """``--model`` names the family the weights are (any spelling the registry knows)."""
    try:
        wanted = by_name(model)
    except ModelError as e:
        raise ModelError(f"--model {e}") from e
    if wanted is not detected:
        raise ModelError(
            f"--model {model!r} disagrees with {where}, whose parameters are {detected.model_type}"
        )


def reverse(
    input_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    model: str | None = None,
) -> ConvertReport:
    """Convert a unified folder (or one safetensors file) into a Hugging Face checkpoint. A LoRA
    fine-tune is converted as ``convert`` does; the run's ``adapter_config.json`` is looked for
    in the folder (``merge`` copies it there)."""
    options = options or ConvertOptions()
    started = time.perf_counter()
    source_path = Path(input_path)
    given = gather_given(options)
    lora = lora_request(options, source_path if source_path.is_dir() else source_path.parent)
    source = plan_unified(source_path)
    if model is not None:
        detected = detect({name: p.shape for name, p in source.params.items()})
        check_model_flag(model, detected, source_path)
    report = write_hf_checkpoint(source, Path(out_dir), options, given, lora)
    report.seconds = time.perf_counter() - started
    return report
