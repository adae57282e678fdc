"""The old tools' flags, as ``ms2hf merge`` and ``ms2hf reverse`` accept them.

Scripts written for MindSpore Transformers' ``unified_safetensors.py`` and
``convert_weight.py --reversed`` must run with only the program name changed: the same flag
names, ``--flag value`` or ``--flag=value``, booleans as True/False/true/false, ``--reversed``
alone or with a value. Model sizes become claims checked against the weights rather than
inputs; a flag that no longer changes anything is accepted and answered with a note.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from ms2hf.commands.convert import ConvertOptions
from ms2hf.commands.merge import MergeOptions
from ms2hf.errors import Ms2hfError
from ms2hf.io.config_files import ALIASES, ConfigValue
from ms2hf.pipeline.engine.budget import default_workers
from ms2hf.transforms.registry import FAMILIES

REVERSE_SIZE_FLAGS = {
    flag: ALIASES[flag]
    for flag in (
        "num_layers",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "ffn_hidden_size",
        "hidden_size",
        "num_routed_experts",
        "moe_ffn_hidden_size",
    )
}
"""``convert_weight.py`` size flags -> the Hugging Face names the weights are checked under:
the training yaml's spellings, so one alias table serves both."""

_BOOLS = {"true": True, "false": False}


def bool_arg(text: str) -> bool:
    value = _BOOLS.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use True or False")
    return value


def add_merge_flags(p: argparse.ArgumentParser) -> None:
    """``unified_safetensors.py``'s flags (``--checkpoint-dir`` etc. are ms2hf's spellings)."""
    p.add_argument(
        "--mindspore_ckpt_dir",
        "--checkpoint-dir",
        dest="checkpoint_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the rank_N folders' parent (legacy), or a Checkpoint 2.0 checkpoint/ or "
        "iteration_XXXXXXXX/ folder",
    )
    p.add_argument(
        "--src_strategy_dirs",
        "--strategy-dir",
        dest="strategy_dir",
        type=Path,
        metavar="DIR",
        help="strategy files (or one merged file) of a legacy save (default: strategy/ beside "
        "the checkpoint folder)",
    )
    p.add_argument(
        "--output_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="writes {output_dir}/{step}_ckpt_convert/unified_safe/",
    )
    p.add_argument(
        "--file_suffix",
        "--step",
        dest="step",
        metavar="EPOCH_STEP",
        help="which checkpoint, e.g. 1000_1 or 1000 (default: the newest present in every rank; "
        "Checkpoint 2.0: the tracker's iteration)",
    )
    p.add_argument(
        "--filter_out_param_prefix",
        metavar="PREFIX",
        help="leave out parameters whose names start with PREFIX (optimizer states "
        "are always left out)",
    )
    p.add_argument(
        "--has_redundancy",
        type=bool_arg,
        metavar="BOOL",
        help="whether the save kept redundant copies; checked against the files",
    )
    p.add_argument(
        "--max_process_num",
        type=int,
        metavar="N",
        help="old spelling of --workers (capped at the CPU count)",
    )
    p.add_argument(
        "--format",
        choices=["safetensors", "ckpt"],
        help="accepted for compatibility; only safetensors checkpoints are read",
    )


def add_reverse_flags(p: argparse.ArgumentParser) -> None:
    """``convert_weight.py --reversed``'s flags (``--dtype`` is ms2hf's own: same values)."""
    p.add_argument(
        "--input_path",
        "--mindspore_ckpt_path",
        dest="input_path",
        type=Path,
        required=True,
        metavar="PATH",
        help="unified folder (param_name_map.json or *.safetensors) or one file",
    )
    p.add_argument(
        "--output_path",
        "--huggingface_ckpt_path",
        dest="output_path",
        type=Path,
        required=True,
        metavar="DIR",
        help="output folder",
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        help=f"{' or '.join(f.name for f in FAMILIES)}; checked against the model the weights are",
    )
    p.add_argument(
        "--reversed",
        nargs="?",
        const=True,
        type=bool_arg,
        metavar="BOOL",
        help="accepted for compatibility: reverse always goes MindSpore -> HF",
    )
    for flag in REVERSE_SIZE_FLAGS:
        p.add_argument(
            f"--{flag}",
            type=int,
            metavar="N",
            help="checked against the weights (read from their shapes)",
        )
    p.add_argument(
        "--max_worker",
        type=int,
        metavar="N",
        help="old spelling of --workers (capped at the CPU count)",
    )


@dataclass(frozen=True)
class Request:
    """What a command line asks for, with notes about the old flags it used."""

    source: Path
    output: Path
    notes: tuple[str, ...]


@dataclass(frozen=True)
class MergeRequest(Request):
    strategy: Path | None
    options: MergeOptions


@dataclass(frozen=True)
class ReverseRequest(Request):
    model: str | None
    options: ConvertOptions


def legacy_workers(
    workers: int | None, value: int | None, flag: str, notes: list[str]
) -> int | None:
    """``--workers`` from an old worker-count flag, capped at the CPU count."""
    if value is None:
        return workers
    if workers is not None:
        raise Ms2hfError(f"give --workers or {flag}, not both")
    if value < 1:
        raise Ms2hfError(f"{flag} {value}: expected a positive number of workers")
    cpus = default_workers()
    if value > cpus:
        notes.append(f"{flag} {value}: using {cpus} worker threads (the CPU count)")
        return cpus
    return value


def merge_request(args: argparse.Namespace, options: MergeOptions) -> MergeRequest:
    """``options`` holds ms2hf's own options; the old flags are laid over them."""
    notes: list[str] = []
    if args.format == "ckpt":
        raise Ms2hfError("--format ckpt: ms2hf reads safetensors checkpoints only")
    if args.format == "safetensors":
        notes.append("--format safetensors changes nothing: safetensors is the only format read")
    options = replace(
        options,
        step=args.step,
        exclude_prefix=args.filter_out_param_prefix,
        has_redundancy=args.has_redundancy,
        workers=legacy_workers(options.workers, args.max_process_num, "--max_process_num", notes),
    )
    return MergeRequest(
        args.checkpoint_dir, args.output_dir, tuple(notes), args.strategy_dir, options
    )


def reverse_request(args: argparse.Namespace, options: ConvertOptions) -> ReverseRequest:
    """``options`` holds ms2hf's own options; the old flags are laid over them."""
    notes: list[str] = []
    if args.reversed is False:
        raise Ms2hfError(
            "--reversed False asks for Hugging Face -> MindSpore, which ms2hf does not do; "
            "reverse converts a merged MindSpore checkpoint to Hugging Face"
        )
    if args.reversed:
        notes.append(
            "--reversed changes nothing: reverse always converts MindSpore -> Hugging Face"
        )
    given = {
        hf_name: ConfigValue(getattr(args, flag), f"--{flag}")
        for flag, hf_name in REVERSE_SIZE_FLAGS.items()
        if getattr(args, flag) is not None
    }
    options = replace(
        options,
        given={**options.given, **given},
        workers=legacy_workers(options.workers, args.max_worker, "--max_worker", notes),
        shard_layout=args.layout,
    )
    return ReverseRequest(args.input_path, args.output_path, tuple(notes), args.model, options)
