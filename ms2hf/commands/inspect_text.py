"""Reports as text for people: short enough to read for a 1000-rank, 36,000-tensor checkpoint.

Per-layer parameters laid out alike are folded into one line (``decoder.layers.*.``), and long
file lists are summarised; ``--json`` gives everything unfolded.
"""

from __future__ import annotations

import fnmatch
import re
import textwrap
from collections.abc import Iterable, Sequence

from ms2hf.commands.inspect import TRAINING, InspectReport, ParamReport
from ms2hf.io.sources.plan import LEGACY
from ms2hf.pipeline.engine.budget import format_size
from ms2hf.pipeline.given import origin_lines

_LAYER = re.compile(r"\.layers\.\d+\.")
LISTED_FILES = 16
WIDTH = 100


def _wrapped(line: str) -> list[str]:
    """A long list on lines of ``WIDTH``, continued with an indent under its label."""
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.wrap(
        line, WIDTH, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def _fold(name: str) -> str:
    return _LAYER.sub(".layers.*.", name)


def _folded(names: Iterable[str]) -> list[str]:
    counts: dict[str, int] = {}
    for name in names:
        counts[_fold(name)] = counts.get(_fold(name), 0) + 1
    return [f"{name} (x{n})" if n > 1 else name for name, n in counts.items()]


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _split(p: ParamReport) -> str:
    """Blocks per dim; experts split whole over ranks are named as such."""
    parts = [f"dim{i}/{n}" for i, n in enumerate(p.split) if n > 1]
    if p.experts_per_block and p.split[0] > 1:
        parts[0] = f"ep/{p.split[0]} ({p.experts_per_block} experts each)"
    if p.optimizer_chunks > 1:
        parts.append(f"opt/{p.optimizer_chunks}")
    return " ".join(parts) or "whole"


def _span(values: Iterable[int]) -> str:
    v = sorted(set(values))
    return str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


def param_lines(report: InspectReport) -> list[str]:
    """Shape and dtype, and for a training output the stage, how each block is cut, how many
    ranks hold it (replicas) and how many copies were saved."""
    training = report.kind == TRAINING
    groups: dict[tuple[str, ...], list[ParamReport]] = {}
    for p in report.params:
        key: tuple[str, ...] = (_fold(p.name), _shape(p.shape), p.dtype)
        if training:
            key += (_split(p), str(p.replicas), str(p.saved_copies))
        groups.setdefault(key, []).append(p)
    header = ["parameter", "shape", "dtype"]
    rows = [header + ["stage", "split", "replicas", "saved"] if training else header]
    for (name, *rest), members in groups.items():
        label = f"{name} (x{len(members)})" if len(members) > 1 else name
        if training:
            rest.insert(2, _span(p.stage for p in members))
        rows.append([label, *rest])
    return [f"parameters: {len(report.params)}", *_table(rows)]


def file_lines(report: InspectReport) -> list[str]:
    files = report.files
    head = f"files: {len(files)}, {format_size(report.bytes.files)}"
    if len(files) > LISTED_FILES:
        sizes = [f.bytes for f in files]
        return [f"{head} ({format_size(min(sizes))} to {format_size(max(sizes))} each)"]
    training = report.kind == TRAINING
    rows = [["file", *(["rank", "stage"] if training else []), "size", "tensors"]]
    for f in files:
        where = [str(f.rank), str(f.stage)] if training else []
        rows.append([f.path, *where, format_size(f.bytes), str(f.tensors)])
    return [head, *_table(rows)]


def summary_lines(report: InspectReport) -> list[str]:
    b = report.bytes
    lines = [f"{report.path}: {report.kind}"]
    if report.kind == TRAINING:
        lines[0] += f" ({report.source_format} format)"
        unit = "step" if report.source_format == LEGACY else "iteration"
        present = ", ".join(report.steps_present) or str(report.step)
        lines += _wrapped(
            f"{unit}s present: {present}; reading {report.step} ({report.step_reason})"
        )
        saved = "each block saved once" if report.remove_redundancy else "every replica saved"
        lines.append(
            f"{unit} {report.step}: {report.ranks} ranks, {report.stages} pipeline stage(s) of "
            f"{report.ranks // report.stages}; {saved}"
        )
        for step, missing in report.incomplete_steps.items():
            lines += _wrapped(
                f"incomplete step {step}: missing in "
                + ", ".join(f"rank_{r}" for r in missing)
                + " (not converted unless every rank has it)"
            )
    if report.counters:
        lines += _wrapped(
            "run counters: " + ", ".join(f"{k}={v!r}" for k, v in report.counters.items())
        )
    counts = [f"model weights {format_size(b.weights)}"]
    if b.weights_saved != b.weights:
        counts[0] += f" ({format_size(b.weights_saved)} as saved, with replicas)"
    if b.optimizer:
        counts.append(f"optimizer states {format_size(b.optimizer)} (never read)")
    if b.scalars:
        counts.append(f"scalars {format_size(b.scalars)}")
    lines += _wrapped("bytes: " + ", ".join(counts))
    lines.append(
        "weights by dtype: "
        + ", ".join(f"{d} {format_size(n)}" for d, n in sorted(report.dtypes.items()))
    )
    if report.scalars:
        lines += _wrapped(
            "scalars: " + ", ".join(f"{s.name} {s.dtype} {_shape(s.shape)}" for s in report.scalars)
        )
    return lines


def model_lines(report: InspectReport) -> list[str]:
    m = report.model
    if m.model_type is None:
        return [f"model: not recognised: {m.error}"]
    lines = [f"model: {m.model_type}; config.json values by where they come from:"]
    lines += [part for line in origin_lines(m.config) for part in _wrapped(line)]
    if m.skipped:
        lines += _wrapped(
            "skipped (statistics of training, not weights; no Hugging Face tensor is made of "
            f"them): {', '.join(_folded(m.skipped))}"
        )
    return lines


def lora_lines(report: InspectReport) -> list[str]:
    """A LoRA fine-tune: rank, targets, alpha and where it came from, what convert makes."""
    if report.lora is None:
        return []
    return _wrapped(report.lora.describe("convert writes"))


def output_lines(report: InspectReport) -> list[str]:
    out = report.output
    if report.output_error is not None:
        return _wrapped(f"convert would stop: {report.output_error}")
    if out is None:
        return []
    lines = _wrapped(
        f"convert would write ({out.dtype}): {out.tensors} tensors, {out.parameters:,} "
        f"parameters, {format_size(out.bytes)} in {len(out.files)} file(s), then "
        + ", ".join(out.also)
    )
    rows = [["file", "tensors", "size"]]
    rows += [[f.name, str(f.tensors), format_size(f.bytes)] for f in out.files[:LISTED_FILES]]
    lines += _table(rows)
    if len(out.files) > LISTED_FILES:
        lines.append(f"  ... and {len(out.files) - LISTED_FILES} more")
    return lines


def slice_lines(report: InspectReport, patterns: Sequence[str]) -> list[str]:
    """For each parameter matching one of ``patterns`` (shell wildcards), every block: where it
    goes, who held it in training and every file it is in (the first is the copy read)."""
    lines: list[str] = []
    for p in report.params:
        if not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in patterns):
            continue
        lines.append(f"{p.name}: {_shape(p.shape)} {p.dtype}, {len(p.slices)} block(s)")
        rows = [["offsets", "shape", "holders", "files"]]
        for s in p.slices:
            at = ",".join(map(str, s.offsets)) or "-"
            holders = ",".join(map(str, s.holders))
            rows += [[at, _shape(s.shape), holders, s.files[0]]]
            rows += [["", "", "", f] for f in s.files[1:]]
        lines += _table(rows)
    if not lines:
        lines.append(f"no parameter matches {' or '.join(patterns)}")
    return lines


def inspect_text(report: InspectReport, params: Sequence[str] = ()) -> str:
    """The report; with ``params`` (shell wildcards), also the blocks of those parameters."""
    sections = [summary_lines, file_lines, param_lines, model_lines, lora_lines, output_lines]
    lines = [line for section in sections for line in section(report)]
    if params:
        lines += slice_lines(report, params)
    return "\n".join(lines)
