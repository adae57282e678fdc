"""The ``ms2hf`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from ms2hf import __version__
from ms2hf.errors import Ms2hfError
from ms2hf.pipeline.budget import parse_size
from ms2hf.pipeline.convert import ConvertOptions, convert
from ms2hf.transforms.casts import TARGETS

log = logging.getLogger("ms2hf")

Handler = Callable[[argparse.Namespace], int]


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    group.add_argument(
        "-v", "--verbose", action="store_true", help="print details, and tracebacks on errors"
    )


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that writes a Hugging Face checkpoint."""
    p.add_argument(
        "--dtype", choices=list(TARGETS), default="bf16",
        help="output dtype for floating-point tensors (default: bf16; source keeps each tensor's)",
    )
    p.add_argument(
        "--max-shard-size", type=size_arg, default=5_000_000_000, metavar="SIZE",
        help="largest output file, decimal units as huggingface_hub (default: 5GB)",
    )
    add_resource_options(p)
    p.add_argument(
        "--config", type=Path, metavar="TRAIN_YAML",
        help="training yaml: weight layout flags, sizes to check, and config.json values",
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="write into a non-empty folder, replacing only the files this run writes",
    )


def add_resource_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory-budget", type=size_arg, metavar="SIZE",
        help="buffer memory the run may hold, e.g. 512MiB (default: 1/4 of available memory)",
    )
    p.add_argument(
        "--workers", type=positive_int, metavar="N",
        help="threads assembling and writing tensors (default: CPU count)",
    )


def run_options(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        memory_budget=args.memory_budget,
        workers=args.workers,
        step=getattr(args, "step", None),
        config=args.config,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )


def _add_convert(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser(
        "convert",
        help="training output (rank files + strategy) -> Hugging Face checkpoint",
        description="Convert a MindSpore Transformers Qwen3 training output into a Hugging Face "
        "checkpoint in one streaming pass.",
    )
    p.add_argument("training_output", type=Path, nargs="?", metavar="TRAINING_OUTPUT",
                   help="folder holding checkpoint/ and strategy/")
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="output folder")
    p.add_argument("--checkpoint-dir", type=Path, help="the rank_N folders' parent, if elsewhere")
    p.add_argument("--strategy-dir", type=Path, help="strategy files (or one merged file), if elsewhere")
    p.add_argument("--step", metavar="EPOCH_STEP",
                   help="which checkpoint, e.g. 1000_1 (default: newest present in every rank)")
    add_run_options(p)
    _add_verbosity(p)
    return _run_convert


def _run_convert(args: argparse.Namespace) -> int:
    if args.training_output is None and (args.checkpoint_dir is None or args.strategy_dir is None):
        raise Ms2hfError("give TRAINING_OUTPUT, or both --checkpoint-dir and --strategy-dir")
    report = convert(
        args.training_output,
        args.hf_dir,
        run_options(args),
        checkpoint_dir=args.checkpoint_dir,
        strategy_dir=args.strategy_dir,
    )
    log.info("%s", report.summary())
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], Handler]] = [_add_convert]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(
        prog="ms2hf",
        description="MindSpore Transformers Qwen3 checkpoints -> Hugging Face, streaming.",
    )
    parser.add_argument("--version", action="version", version=f"ms2hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    for add in COMMANDS:
        before = set(sub.choices)
        handler = add(sub)
        for name in set(sub.choices) - before:
            handlers[name] = handler
    return parser, handlers


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("ms2hf")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return handlers[args.command](args)
    except Ms2hfError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"ms2hf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ms2hf {args.command}: interrupted; no partial file was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
