"""The ``ms2hf`` command line.

Commands other than ``convert`` and ``merge`` import their modules when they run: every run
pays for what is imported at start-up, and a conversion's start-up is part of its time.

Options go anywhere, as people type them: before the command (``-v``, ``-q``), between the two
folders, or after them (each command's arguments are parsed intermixed). A consumer that stops
reading (``ms2hf inspect ... | head``) ends the run quietly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from ms2hf import __version__
from ms2hf.commands.convert import ConvertOptions, convert
from ms2hf.commands.legacy_flags import (
    add_merge_flags,
    add_reverse_flags,
    merge_request,
    reverse_request,
)
from ms2hf.commands.merge import PART_SIZE, MergeOptions, merge
from ms2hf.errors import Ms2hfError
from ms2hf.pipeline.engine.budget import parse_size
from ms2hf.pipeline.given import parse_setting, settings
from ms2hf.pipeline.lora import LORA_MODES
from ms2hf.pipeline.parts import Part
from ms2hf.pipeline.shards import SHARD_LAYOUTS
from ms2hf.transforms.casts import TARGETS
from ms2hf.transforms.registry import FAMILIES

log = logging.getLogger("ms2hf")

Handler = Callable[[argparse.Namespace], int]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def positive_size_arg(text: str) -> int:
    value = size_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return value


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
    add_hf_options(p)
    add_resource_options(p)
    add_output_options(p)


def add_hf_options(p: argparse.ArgumentParser) -> None:
    """What the Hugging Face checkpoint is made of: dtype, shards, config and tokenizer files."""
    p.add_argument(
        "--dtype",
        choices=list(TARGETS),
        default="bf16",
        help="output dtype for floating-point tensors (default: bf16; source keeps each tensor's)",
    )
    p.add_argument(
        "--max-shard-size",
        type=positive_size_arg,
        default=5_000_000_000,
        metavar="SIZE",
        help="largest output file, decimal units as huggingface_hub (default: 5GB)",
    )
    p.add_argument(
        "--reference-config",
        type=Path,
        metavar="HF_CONFIG_JSON",
        help="a Hugging Face config.json giving what the weights cannot tell (rope theta, norm "
        "epsilon, token ids, context length); its sizes must agree with the weights",
    )
    p.add_argument(
        "--tokenizer-dir",
        type=Path,
        metavar="DIR",
        help="copy the tokenizer and generation_config files found in DIR into the output",
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config.json value, over the yaml and reference config (which may then disagree "
        "on it), e.g. --set max_position_embeddings=40960; VALUE is JSON or a plain string",
    )
    add_routing_options(p)
    add_lora_options(p)


def add_routing_options(p: argparse.ArgumentParser) -> None:
    """What to do with a MoE routing scale (the yaml's routed_scaling_factor) that Hugging
    Face's Qwen3-MoE cannot state; without either, such a scale stops the run."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--fold-routing-scale",
        dest="routing_scale",
        action="store_const",
        const="fold",
        help="multiply every expert's down_proj by the yaml's routing scale (in fp32, before "
        "the output cast): the same model, which Hugging Face's Qwen3-MoE can run",
    )
    group.add_argument(
        "--ignore-routing-scale",
        dest="routing_scale",
        action="store_const",
        const="ignore",
        help="drop the routing scale: the converted model routes without it, so its outputs "
        "differ from the trained model's",
    )


def add_lora_options(p: argparse.ArgumentParser) -> None:
    """What to make of a LoRA fine-tune (docs/lora.md)."""
    p.add_argument(
        "--lora",
        choices=LORA_MODES,
        help="on a LoRA fine-tune: merged (the fine-tuned model; the default), adapter (a PEFT "
        "adapter folder) or base (the model without the fine-tuning)",
    )
    p.add_argument(
        "--lora-alpha",
        type=float,
        metavar="ALPHA",
        help="LoRA alpha (scale alpha / r), when neither the training yaml's pet_config nor the "
        "run's adapter_config.json next to checkpoint/ gives it; all values given must agree",
    )
    p.add_argument(
        "--base-model",
        metavar="NAME",
        help="the adapter's base_model_name_or_path (a hub id or folder of the base model)",
    )


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="TRAIN_YAML",
        help="training yaml: weight layout flags, sizes to check, and config.json values",
    )


def add_output_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that writes a checkpoint folder."""
    add_config_option(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder, replacing only the files this run writes",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="make NaN or inf in the weights an error (default: a warning naming the tensor)",
    )


def add_check_replicas_option(p: argparse.ArgumentParser) -> None:
    """For commands reading a training output saved with redundancy."""
    p.add_argument(
        "--check-replicas",
        action="store_true",
        help="read every copy of every block and require it to match the copy used",
    )


def add_resource_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory-budget",
        type=positive_size_arg,
        metavar="SIZE",
        help="buffer memory the run may hold, e.g. 512MiB (default: 1/4 of available memory)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="threads assembling and writing tensors (default: CPU count)",
    )


def part_arg(text: str) -> Part:
    try:
        return Part.parse(text)
    except Ms2hfError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_scale_options(p: argparse.ArgumentParser) -> None:
    """Spreading a run over several hosts: on a Ray cluster, or as parts of a job array."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="write on the Ray cluster at ADDRESS (auto: RAY_ADDRESS, or the cluster started on "
        "this host; or HOST:PORT), whose hosts share the output folder; --memory-budget and "
        "--workers are then each task's (needs pip install 'ms2hf[ray]')",
    )
    group.add_argument(
        "--part",
        type=part_arg,
        metavar="I/N",
        help="write only part I of N (1-based) of the output files, so that N jobs of a "
        "scheduler array share the output folder; then run the same command without --part "
        "to check the parts and finish",
    )


def hf_options(args: argparse.Namespace) -> ConvertOptions:
    """What ``add_hf_options``, ``add_config_option`` and ``--step`` set: what to write."""
    return ConvertOptions(
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        step=getattr(args, "step", None),
        config=args.config,
        reference_config=args.reference_config,
        tokenizer_dir=args.tokenizer_dir,
        given=settings(dict(parse_setting(text) for text in args.settings), "--set"),
        routing_scale=args.routing_scale,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
        base_model=args.base_model,
    )


def run_fields(args: argparse.Namespace) -> dict[str, Any]:
    """How to run, as ``add_resource_options``, ``add_output_options`` and the verbosity flags
    set it: the fields ``ConvertOptions`` and ``MergeOptions`` share."""
    return {
        "memory_budget": args.memory_budget,
        "workers": args.workers,
        "overwrite": args.overwrite,
        "progress": not args.quiet,
        "strict": args.strict,
        "check_replicas": getattr(args, "check_replicas", False),
        "ray": getattr(args, "ray", None),
        "part": getattr(args, "part", None),
    }


def run_options(args: argparse.Namespace) -> ConvertOptions:
    """``hf_options`` and how to run."""
    return dataclasses.replace(hf_options(args), **run_fields(args))


def _add_convert(sub: Subcommands) -> Handler:
    p = sub.add_parser(
        "convert",
        help="training output (legacy or Checkpoint 2.0) -> Hugging Face checkpoint",
        description="Convert a MindSpore Transformers Qwen3 training output, legacy or Checkpoint "
        "2.0, into a Hugging Face checkpoint in one streaming pass.",
    )
    p.add_argument(
        "training_output",
        type=Path,
        nargs="?",
        metavar="TRAINING_OUTPUT",
        help="folder holding checkpoint/ (legacy rank_N folders with strategy/ beside, or "
        "Checkpoint 2.0 iterations), checkpoint/ itself, or one iteration_XXXXXXXX/ folder",
    )
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="output folder")
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="the rank_N (or iteration) folders' parent, if elsewhere",
    )
    p.add_argument(
        "--strategy-dir", type=Path, help="strategy files (or one merged file), if elsewhere"
    )
    _add_step(p)
    add_run_options(p)
    add_scale_options(p)
    add_check_replicas_option(p)
    _add_json(p, "print the run's report (files, bytes, seconds, GB/s, peak memory) as JSON")
    _add_verbosity(p)
    return _run_convert


def _add_step(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--step",
        metavar="STEP",
        help="which checkpoint: a Checkpoint 2.0 iteration (1000; default: the tracker's) or a "
        "legacy EPOCH_STEP (1000_1, or 1000 when one 1000_N; default: the newest in every rank)",
    )


def _add_json(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--json", action="store_true", help=text)


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


def _run_convert(args: argparse.Namespace) -> int:
    report = convert(
        args.training_output,
        args.hf_dir,
        run_options(args),
        checkpoint_dir=args.checkpoint_dir,
        strategy_dir=args.strategy_dir,
    )
    log.info("%s", report.summary())
    if args.json:
        _print_json(report.to_dict())
    return 0


def _add_inspect(sub: Subcommands) -> Handler:
    p = sub.add_parser(
        "inspect",
        help="describe a training output, unified or Hugging Face folder (headers only)",
        description="Describe a checkpoint from its headers and strategy files alone: ranks, "
        "stages, how every parameter is split and saved, bytes, the model and its config, and "
        "what convert would write with the given options.",
    )
    p.add_argument(
        "path",
        type=Path,
        metavar="PATH",
        help="training output (checkpoint/ + strategy/, or a Checkpoint 2.0 checkpoint/ or "
        "iteration folder), unified or Hugging Face folder",
    )
    _add_step(p)
    add_hf_options(p)
    add_config_option(p)
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also list every block of the parameters matching PATTERN (shell wildcards, e.g. "
        "'*.layers.0.*'): offsets, shape, the ranks that held it, the files it is in",
    )
    _add_json(p, "print the full report as JSON (every parameter and block, unfolded)")
    _add_verbosity(p)
    return _run_inspect


def _run_inspect(args: argparse.Namespace) -> int:
    from ms2hf.commands.inspect import inspect
    from ms2hf.commands.inspect_text import inspect_text

    report = inspect(args.path, hf_options(args))
    if args.json:
        _print_json(report.to_dict())
    else:
        print(inspect_text(report, args.param))
    return 0


def _add_merge(sub: Subcommands) -> Handler:
    p = sub.add_parser(
        "merge",
        help="training output -> unified MindSpore checkpoint (drop-in for unified_safetensors.py)",
        description="Merge the rank files of one step into whole parameters, as MindSpore's "
        "unified_safetensors does, without optimizer states, and without deleting anything.",
    )
    add_merge_flags(p)
    p.add_argument(
        "--part-size",
        type=positive_size_arg,
        default=PART_SIZE,
        metavar="SIZE",
        help="split into ceil(total / SIZE) balanced part files (default: 3GiB, as MindSpore)",
    )
    add_output_options(p)
    add_check_replicas_option(p)
    add_resource_options(p)
    _add_verbosity(p)
    return _run_merge


def _run_merge(args: argparse.Namespace) -> int:
    options = MergeOptions(config=args.config, part_size=args.part_size, **run_fields(args))
    request = merge_request(args, options)
    _log_notes(request.notes)
    report = merge(request.source, request.strategy, request.output, request.options)
    log.info("%s", report.summary())
    return 0


def _log_notes(notes: Sequence[str]) -> None:
    """What the old tools' flags changed (or did not), said once before the run."""
    for note in notes:
        log.info("note: %s", note)


def _add_reverse(sub: Subcommands) -> Handler:
    p = sub.add_parser(
        "reverse",
        help="unified MindSpore checkpoint -> Hugging Face (drop-in for convert_weight.py "
        "--reversed)",
        description="Convert a merged (unified) Qwen3 checkpoint into the Hugging Face checkpoint "
        "convert writes. Model flags are optional and checked against the weights.",
    )
    add_reverse_flags(p)
    p.add_argument(
        "--layout",
        choices=SHARD_LAYOUTS,
        default="size",
        help="output files: size-based shards (default), or per-layer as the old tool wrote",
    )
    add_run_options(p)
    _add_verbosity(p)
    return _run_reverse


def _run_reverse(args: argparse.Namespace) -> int:
    from ms2hf.commands.reverse import reverse

    request = reverse_request(args, run_options(args))
    _log_notes(request.notes)
    report = reverse(request.source, request.output, request.options, request.model)
    log.info("%s", report.summary())
    return 0


def _add_verify(sub: Subcommands) -> Handler:
    p = sub.add_parser(
        "verify",
        help="check a Hugging Face folder, and optionally its bytes against the training output",
        description="Check every header, the index (every tensor once, every file present, "
        "total_size), the shapes against config.json and the digests an ms2hf run recorded; "
        "with --against, recompute every tensor from the training output and compare bytes. "
        "Exit status 0: all good; 1: problems found (listed); 2: could not check.",
    )
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="the Hugging Face folder")
    p.add_argument(
        "--against",
        type=Path,
        metavar="TRAINING_OUTPUT",
        help="the training output it was converted from (any form convert takes)",
    )
    _add_step(p)
    add_config_option(p)
    add_routing_options(p)
    p.add_argument(
        "--lora",
        choices=[m for m in LORA_MODES if m != "adapter"],
        help="a model folder made from a LoRA fine-tune holds the merged (default) or base "
        "model; an adapter folder is recognised as one",
    )
    p.add_argument(
        "--lora-alpha", type=float, metavar="ALPHA", help="LoRA alpha, as convert was given it"
    )
    add_resource_options(p)
    _add_verbosity(p)
    return _run_verify


def _run_verify(args: argparse.Namespace) -> int:
    from ms2hf.commands.verify import VerifyOptions, verify

    options = VerifyOptions(
        step=args.step,
        config=args.config,
        routing_scale=args.routing_scale,
        memory_budget=args.memory_budget,
        workers=args.workers,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
    )
    report = verify(args.hf_dir, args.against, options)
    print(report.summary())
    return 0 if report.ok else 1


def _add_demo(sub: Subcommands) -> Handler:
    p = sub.add_parser(
        "demo",
        help="generate a small training output, convert it, and check every tensor",
        description="Write a small seeded Qwen3 training output (TP2 x DP2 x PP2, optimizer "
        "sharding) into OUT_DIR/training_output, convert it into OUT_DIR/hf, and compare every "
        "tensor with the expected bytes. Exits non-zero on any mismatch.",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder for both outputs")
    p.add_argument(
        "--dtype", choices=list(TARGETS), default="bf16", help="output dtype (default: bf16)"
    )
    p.add_argument(
        "--model",
        choices=[f.name for f in FAMILIES],
        default="qwen3",
        help="the model family's example model; a family with experts splits them over expert "
        "parallel 4 (default: qwen3)",
    )
    p.add_argument(
        "--format",
        choices=["legacy", "ckpt2"],
        default="legacy",
        help="how the training output is saved: legacy rank folders and strategies, or "
        "Checkpoint 2.0 (use_legacy_format: False) (default: legacy)",
    )
    _add_verbosity(p)
    return _run_demo


def _run_demo(args: argparse.Namespace) -> int:
    from ms2hf.commands.demo import run_demo

    result = run_demo(
        args.out_dir, args.dtype, progress=not args.quiet, model=args.model, save_format=args.format
    )
    print(result.summary())
    return 0 if result.ok else 1


COMMANDS: list[Callable[[Subcommands], Handler]] = [
    _add_convert,
    _add_inspect,
    _add_merge,
    _add_reverse,
    _add_verify,
    _add_demo,
]


VERBOSITY = ("-q", "--quiet", "-v", "--verbose")
"""Accepted before the command as well as after it."""
SIGPIPE_STATUS = 141
"""What a shell reports for a program ended by SIGPIPE (128 + 13): the reader went away."""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(
        prog="ms2hf",
        description="MindSpore Transformers Qwen3 checkpoints -> Hugging Face, streaming.",
    )
    parser.add_argument("--version", action="version", version=f"ms2hf {__version__}")
    _add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    for add in COMMANDS:
        before = set(sub.choices)
        handler = add(sub)
        for name in set(sub.choices) - before:
            handlers[name] = handler
    return parser, handlers


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, Handler]]:
    """The command and its options, wherever they were typed: ``-v``/``-q`` before the command
    are the command's, and its options may sit between or after its folders (argparse alone
    takes ``convert out/ --dtype bf16 hf/`` for a third folder)."""
    parser, handlers = build_parser()
    leading = [a for a in argv[: _first_word(argv)] if a in VERBOSITY]
    rest = list(argv[len(leading) :])
    if not rest or rest[0] not in handlers:
        return parser.parse_args(argv), handlers  # help, --version, or argparse's own error
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = commands.choices[rest[0]].parse_intermixed_args([*rest[1:], *leading])
    args.command = rest[0]
    return args, handlers


def _first_word(argv: Sequence[str]) -> int:
    """The index of the first argument that is not a verbosity flag."""
    for i, arg in enumerate(argv):
        if arg not in VERBOSITY:
            return i
    return len(argv)


class _TerminalHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Messages to stderr; a reader that went away (``2>&1 | head``) ends them silently."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], BrokenPipeError):
            super().handleError(record)


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    handler = _TerminalHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("ms2hf")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _stdout_gone() -> int:
    """The reader of stdout went away: end quietly, as ``head`` expects of the commands before
    it. Later writes (the interpreter's final flush) go nowhere instead of failing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is no file descriptor (captured): nothing will flush it at exit
    return SIGPIPE_STATUS


def main(argv: Sequence[str] | None = None) -> int:
    args, handlers = parse(sys.argv[1:] if argv is None else argv)
    _configure_logging(args)
    try:
        code = handlers[args.command](args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _stdout_gone()
    except Ms2hfError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"ms2hf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"ms2hf {args.command}: interrupted; {e or INTERRUPTED}", file=sys.stderr)
        return 130


INTERRUPTED = (
    "no partial file was left behind: run the same command again to resume, keeping the files "
    "already finished"
)


if __name__ == "__main__":
    sys.exit(main())
