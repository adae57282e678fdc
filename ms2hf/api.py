"""The Python API: ``ms2hf.convert`` and ``ms2hf.inspect`` with keyword options.

Scripts and notebooks want one call with readable options (``dtype="bf16"``,
``max_shard_size="5GB"``), not a options object to assemble; these wrap the pipeline functions
the command line uses, so a script and the CLI behave the same and return the same reports.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ms2hf.commands import convert as _convert
from ms2hf.commands import inspect as _inspect
from ms2hf.commands.convert import ConvertOptions, ConvertReport
from ms2hf.commands.inspect import InspectReport
from ms2hf.errors import Ms2hfError
from ms2hf.pipeline.engine.budget import parse_size
from ms2hf.pipeline.given import settings

SIZE_OPTIONS = ("max_shard_size", "memory_budget")


def make_options(base: ConvertOptions | None = None, **overrides: Any) -> ConvertOptions:
    """``base`` (or the defaults) with ``overrides`` applied: sizes may be text (``"5GB"``,
    ``"512MiB"``), paths may be strings, ``given`` plain values (``{"max_position_embeddings":
    40960}``, as ``--set`` gives them)."""
    known = {f.name for f in dataclasses.fields(ConvertOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise Ms2hfError(
            f"unknown option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
        )
    for name in SIZE_OPTIONS:
        if isinstance(overrides.get(name), str):
            try:
                overrides[name] = parse_size(overrides[name])
            except ValueError as e:
                raise Ms2hfError(f"{name}: {e}") from e
    if isinstance(overrides.get("given"), Mapping):
        overrides["given"] = settings(overrides["given"], "given")
    if base is not None and not isinstance(base, ConvertOptions):
        raise Ms2hfError(f"options: expected a ms2hf.ConvertOptions, got {type(base).__name__}")
    return dataclasses.replace(base or ConvertOptions(), **overrides)


def convert(
    training_output: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    strategy_dir: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> ConvertReport:
    """Convert a training output into a Hugging Face folder: the folder holding ``checkpoint/``
    (legacy rank folders with ``strategy/`` beside, or Checkpoint 2.0 iterations), the
    ``checkpoint/`` folder itself, or one ``iteration_XXXXXXXX/`` folder.

    Keyword options are ``ConvertOptions`` fields: ``dtype``, ``max_shard_size``, ``step``,
    ``config``, ``reference_config``, ``tokenizer_dir``, ``given``, ``routing_scale``,
    ``memory_budget``, ``workers``, ``overwrite``, ``progress``, ``strict``; on a LoRA fine-tune
    ``lora`` (``merged``, ``adapter`` or ``base``), ``lora_alpha`` and ``base_model``. Raises
    ``Ms2hfError`` on any problem with the input, the options or the output folder.
    """
    return _convert.convert(
        training_output,
        out_dir,
        make_options(options, **overrides),
        checkpoint_dir=checkpoint_dir,
        strategy_dir=strategy_dir,
    )


def inspect(
    path: str | os.PathLike[str], options: ConvertOptions | None = None, **overrides: Any
) -> InspectReport:
    """Describe a training output, unified folder or Hugging Face folder from headers alone.

    Options as for ``convert`` (``dtype``, ``max_shard_size``, ``step``, ``config``,
    ``reference_config``, ``tokenizer_dir``) shape the "what convert would write" part.
    """
    return _inspect.inspect(path, make_options(options, **overrides))
