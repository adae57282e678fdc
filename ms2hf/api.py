"""The Python API: ``ms2hf.convert`` and ``ms2hf.inspect`` with keyword options.

Scripts and notebooks want one call with readable options (``dtype="bf16"``,
``max_shard_size="5GB"``), not an options object to assemble; these wrap the command functions
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
    """Convert a training output into a Hugging Face checkpoint folder, in one streaming pass.

    Args:
        training_output: the folder holding ``checkpoint/`` (legacy rank folders with
            ``strategy/`` beside them, or Checkpoint 2.0 iterations), the ``checkpoint/`` folder
            itself, or one ``iteration_XXXXXXXX/`` folder. None when ``checkpoint_dir`` (and, for
            the legacy format, ``strategy_dir``) name the folders instead.
        out_dir: the Hugging Face folder to write (created; an ms2hf folder left unfinished by a
            killed run is resumed).
        options: a ``ConvertOptions`` to start from; keyword ``overrides`` are applied on top.
        checkpoint_dir: the rank folders' (or iterations') parent, when not under
            ``training_output``.
        strategy_dir: the legacy strategy files (a folder or one merged file), when elsewhere.
        **overrides: ``ConvertOptions`` fields, e.g. ``dtype="bf16"``, ``max_shard_size="5GB"``
            (sizes as text or bytes), ``step``, ``config`` (training yaml), ``reference_config``,
            ``tokenizer_dir``, ``given`` (``{"max_position_embeddings": 40960}``, as ``--set``),
            ``routing_scale`` (``"fold"``/``"ignore"``), ``lora`` (``"merged"``, ``"adapter"``,
            ``"base"``), ``lora_alpha``, ``base_model``, ``memory_budget``, ``workers``,
            ``overwrite``, ``progress``, ``strict``, ``check_replicas``, ``part`` (``"1/4"``: this
            job's share of the files) and ``ray`` (a cluster address, or ``"auto"``).

    Returns:
        A ``ConvertReport``: the files and tensors written, bytes read and written, seconds,
        peak memory, where each config.json value came from, and notes (``to_dict()`` gives
        what ``ms2hf convert --json`` prints).

    Raises:
        Ms2hfError: any problem with the input, the options or the output folder, with a
            message naming the file, parameter and what was expected; nothing half-written is
            left looking finished.
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
    """Describe a checkpoint from its headers and layout metadata alone (no tensor byte read).

    Args:
        path: a training output (either format, as ``convert`` takes it), a unified folder
            (what ``merge`` writes) or a Hugging Face folder.
        options: a ``ConvertOptions`` to start from.
        **overrides: ``ConvertOptions`` fields that shape the "what convert would write" part:
            ``dtype``, ``max_shard_size``, ``step``, ``config``, ``reference_config``,
            ``tokenizer_dir``, ``given``, ``lora``...

    Returns:
        An ``InspectReport``: format, steps present and the one read, ranks and stages, every
        parameter's shape, dtype and how it is split and saved, byte counts, the model and its
        config.json with each value's origin, LoRA details, and the files convert would write
        (``to_dict()`` gives what ``ms2hf inspect --json`` prints).

    Raises:
        Ms2hfError: the path is no checkpoint ms2hf reads, or its files are damaged.
    """
    return _inspect.inspect(path, make_options(options, **overrides))
