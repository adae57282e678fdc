"""``verify``: is a Hugging Face folder whole and consistent, and does it hold a training output's
weights?

The checks, cheapest first: every header strictly parsed; the index names every tensor once,
every file it names exists and ``total_size`` adds up; the shapes are those ``config.json``
describes; shards an ms2hf run recorded still have the digest it wrote; and, given the training
output, every tensor is recomputed from the source through the same plan ``convert`` uses and
compared byte for byte. Bytes are streamed in bands through memory maps, never loaded whole.
Problems are collected rather than raised, so one run lists everything wrong with a folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ms2hf.errors import FormatError, Ms2hfError
from ms2hf.io.config_files import RUN_ADAPTER_CONFIG, read_train_config
from ms2hf.io.dtypes import nbytes
from ms2hf.io.hf_output import ADAPTER_WEIGHTS, HF_INDEX, HF_SINGLE
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.safetensors_reader import SafetensorsHeader, TensorInfo
from ms2hf.io.safetensors_writer import ShardLayout
from ms2hf.io.shard_digest import file_digest
from ms2hf.io.sources import plan_training_output
from ms2hf.io.sources.plan import SourceParam
from ms2hf.pipeline.engine.budget import MemoryBudget, format_size
from ms2hf.pipeline.engine.checks import first_difference
from ms2hf.pipeline.engine.execute import Sink, WriteTask, write_task
from ms2hf.pipeline.engine.memory import paused_gc
from ms2hf.pipeline.engine.output_dir import (
    RUN_RECORD,
    part_records,
    read_finished,
    read_run_record,
)
from ms2hf.pipeline.engine.progress import Progress
from ms2hf.pipeline.lora import (
    LoraRequest,
    lora_given,
    run_adapter_config,
)
from ms2hf.pipeline.plan import PlannedFile, PlannedTensor, planned_outputs
from ms2hf.transforms.casts import TARGETS, output_dtype
from ms2hf.transforms.pieces import OutputTensor
from ms2hf.transforms.registry import expected_tensors

SHOWN_PROBLEMS = 20


@dataclass(frozen=True)
class VerifyOptions:
    step: str | None = None
    config: Path | None = None
    """The training yaml, for the fused-weight layout flags the source was trained with (and a
    LoRA run's pet_config)."""
    routing_scale: str | None = None
    """As the conversion was given it: a folded routing scale is part of the expected bytes."""
    memory_budget: int | None = None
    workers: int | None = None
    lora: str | None = None
    """What a model folder made from a LoRA fine-tune holds: ``merged`` (default) or ``base``;
    an adapter folder is recognised as one."""
    lora_alpha: float | None = None


@dataclass
class VerifyReport:
    folder: Path
    files: int = 0
    tensors: int = 0
    nbytes: int = 0
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        what = f"{self.files} file(s), {self.tensors} tensors, {format_size(self.nbytes)}"
        if self.ok:
            return f"{self.folder}: OK ({what}); checked {', '.join(self.checked)}"
        lines = [f"{self.folder}: {len(self.problems)} problem(s) ({what}):"]
        lines += [f"  - {p}" for p in self.problems[:SHOWN_PROBLEMS]]
        if len(self.problems) > SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - SHOWN_PROBLEMS} more")
        return "\n".join(lines)


def _read_index(folder: Path, report: VerifyReport) -> tuple[dict[str, str] | None, Any]:
    """The weight map (None for a lone ``model.safetensors``) and the declared total size."""
    path = folder / HF_INDEX
    if not path.exists():
        if not (folder / HF_SINGLE).is_file():
            report.problems.append(f"neither {HF_INDEX} nor {HF_SINGLE}")
            return {}, None
        return None, None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        report.problems.append(f"{HF_INDEX}: not readable JSON ({e})")
        return {}, None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v for k, v in weight_map.items()
    ):
        report.problems.append(f"{HF_INDEX}: no 'weight_map' of tensor names to file names")
        return {}, None
    metadata = doc.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total is None:
        report.problems.append(f"{HF_INDEX}: no metadata.total_size (transformers needs it)")
    return weight_map, total


def _read_headers(
    folder: Path, files: list[str], report: VerifyReport
) -> dict[str, dict[str, TensorInfo]]:
    headers: dict[str, dict[str, TensorInfo]] = {}
    for name in files:
        try:
            header = SafetensorsHeader(folder / name)
        except FormatError as e:
            report.problems.append(
                f"{name}: named by the index but missing"
                if not (folder / name).exists()
                else str(e)
            )
            continue
        if header.metadata.get("format") != "pt":
            report.problems.append(
                f"{name}: metadata format is {header.metadata.get('format')!r}, loaders expect 'pt'"
            )
        headers[name] = header.tensors
    for name in sorted(p.name for p in folder.glob("*.safetensors") if p.name not in files):
        report.problems.append(f"{name}: a shard the index does not name (left from another run?)")
    return headers


def _check_index(
    weight_map: Mapping[str, str],
    total: Any,
    headers: Mapping[str, Mapping[str, TensorInfo]],
    report: VerifyReport,
) -> dict[str, tuple[str, TensorInfo]]:
    """Every tensor once, where the index says; the tensors found, by name."""
    found: dict[str, tuple[str, TensorInfo]] = {}
    for file, tensors in headers.items():
        for name, info in tensors.items():
            if name in found:
                report.problems.append(f"{name}: in both {found[name][0]} and {file}")
            elif weight_map.get(name) != file:
                report.problems.append(
                    f"{file}: holds {name}, which the index "
                    + (f"places in {weight_map[name]}" if name in weight_map else "does not list")
                )
            found[name] = (file, info)
    for name, file in weight_map.items():
        if file in headers and name not in headers[file]:
            report.problems.append(f"{HF_INDEX}: places {name} in {file}, which does not hold it")
    nbytes = sum(info.nbytes for _, info in found.values())
    if total is not None and total != nbytes:
        report.problems.append(
            f"{HF_INDEX}: total_size is {total}, the tensors hold {nbytes} bytes"
        )
    report.files, report.tensors, report.nbytes = len(headers), len(found), nbytes
    report.checked.append("headers and index")
    return found


def _check_shapes(
    folder: Path, found: Mapping[str, tuple[str, TensorInfo]], report: VerifyReport
) -> None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise FormatError("config.json: not a JSON object")
        expected = expected_tensors(config)
    except (OSError, ValueError, Ms2hfError) as e:
        report.problems.append(f"config.json: cannot check shapes against it ({e})")
        return
    for name in expected.required:
        if name not in found:
            report.problems.append(f"{name}: config.json implies it, the folder lacks it")
    for name, (file, info) in found.items():
        want = expected.required.get(name) or expected.optional.get(name)
        if want is None:
            report.problems.append(f"{file}: {name} is not a tensor of this {config['model_type']}")
        elif info.shape != want:
            report.problems.append(
                f"{file}: {name} has shape {list(info.shape)}, config.json implies {list(want)}"
            )
    report.checked.append(f"shapes against config.json ({config['model_type']})")


def _check_record(folder: Path, headers: Mapping[str, object], report: VerifyReport) -> None:
    """Shards an ms2hf run finished must still be the bytes it wrote: the digests a finished run
    left in the index, or those an unfinished run recorded so far (it never finished the rest)."""
    parts = part_records(folder)
    if parts:
        report.problems.append(
            f"{', '.join(parts)}: parts of a run not finished yet (--part); the same command "
            "without --part checks them and finishes"
        )
    record = read_run_record(folder)
    if record == {}:
        report.problems.append(f"{RUN_RECORD}: unreadable")
        return
    if record is not None:
        for name in sorted(set(record["shards"]) - set(record["finished"])):
            report.problems.append(f"{name}: the ms2hf run writing this folder never finished it")
        digests, where = record["finished"], RUN_RECORD
    else:
        digests, where = read_finished(folder), HF_INDEX
        if digests is None:
            return
    for name, digest in sorted(digests.items()):
        if name in headers and file_digest(folder / name) != digest:
            report.problems.append(f"{name}: bytes differ from what ms2hf wrote ({where})")
    report.checked.append(f"digests in {where}")


class _Compare:
    """A file's sink that compares instead of writing: each tensor's recomputed bytes against
    the bytes the file holds at its place; a tensor that differs is reported once, with the
    first byte that does."""

    def __init__(
        self, path: Path, layout: ShardLayout, mapped: MappedFiles, differs: _Differs
    ) -> None:
        self.path = path
        self.layout = layout
        self.mapped = mapped
        self.differs = differs
        self.bad: set[str] = set()

    def write(self, name: str, offset: int, data: np.ndarray) -> None:
        if name in self.bad:
            return
        raw = data.reshape(-1).view(np.uint8)
        at = self.layout.starts[name] + offset
        written = self.mapped.view(self.path, at, np.dtype(np.uint8), raw.shape)
        first = first_difference(raw, written)
        if first is not None:
            self.bad.add(name)
            self.differs(name, offset + first)

    def write_run(self, names: Sequence[str], sizes: Sequence[int], data: np.ndarray) -> None:
        at = 0
        for name, size in zip(names, sizes):
            self.write(name, 0, data[at : at + size])
            at += size

    def commit(self) -> str:
        return ""

    def abort(self) -> None:
        pass


_Differs = Callable[[str, int], None]
"""Told ``(tensor, byte offset in it)`` of the first byte of a tensor that differs."""


def _planned_files(
    outputs: Sequence[OutputTensor],
    found: Mapping[str, tuple[str, TensorInfo]],
    params: Mapping[str, SourceParam],
    problems: dict[str, str],
) -> tuple[tuple[PlannedFile, ...], dict[str, ShardLayout]]:
    """The folder's files as a write plan of the tensors the source gives, in the dtypes the
    files hold, at the places they hold them: what ``convert`` would make, to compare."""
    by_file: dict[str, list[tuple[TensorInfo, PlannedTensor]]] = {}
    for tensor in outputs:
        if tensor.name not in found:
            problems[tensor.name] = f"{tensor.name}: the source gives it, the folder lacks it"
            continue
        file, info = found[tensor.name]
        source = params[tensor.source]
        if info.shape != tensor.shape:
            problems[tensor.name] = (
                f"{file}: {tensor.name} has shape {list(info.shape)}, "
                f"the source gives {list(tensor.shape)}"
            )
        elif info.dtype not in {output_dtype(source.dtype, t) for t in TARGETS}:
            problems[tensor.name] = (
                f"{file}: {tensor.name} is {info.dtype}, which no conversion of {source.dtype} "
                "gives"
            )
        else:
            by_file.setdefault(file, []).append((info, PlannedTensor(tensor, info.dtype)))
    files, layouts = [], {}
    for file, tensors in sorted(by_file.items()):
        tensors.sort(key=lambda t: t[0].start)
        files.append(PlannedFile(file, tuple(t for _, t in tensors)))
        layouts[file] = ShardLayout(
            b"",
            tuple(t.entry for _, t in tensors),
            {t.tensor.name: info.start for info, t in tensors},
            0,
        )
    return tuple(files), layouts


def _check_against(
    folder: Path,
    found: Mapping[str, tuple[str, TensorInfo]],
    training_output: Path,
    options: VerifyOptions,
    report: VerifyReport,
    adapter: dict[str, Any] | None,
) -> None:
    """Every tensor recomputed from the training output as ``convert`` makes it: on a LoRA
    fine-tune the merged model (``--lora base``: the base model), or for an adapter folder
    (``adapter``: its config) the adapter, whose config must then state the run's r, alpha and
    targets."""
    source = plan_training_output(training_output, options.step)
    given = read_train_config(options.config) if options.config else {}
    request = LoraRequest(
        "adapter" if adapter is not None else options.lora,
        lora_given(options.lora_alpha, options.config, run_adapter_config(training_output)),
    )
    _, lora, outputs = planned_outputs(
        source, given, "fp32", options.routing_scale, request, config_checks=False
    )
    if adapter is not None and lora is not None and lora.alpha is not None:
        stated = {"r": lora.rank, "lora_alpha": lora.alpha.value, "target_modules": lora.targets}
        for key, value in stated.items():
            got = adapter.get(key)
            if (list(got) if isinstance(got, list) else got) != (
                list(value) if isinstance(value, tuple) else value
            ):
                report.problems.append(
                    f"{RUN_ADAPTER_CONFIG}: {key} is {got!r}, the training output gives {value!r}"
                )
    budget = MemoryBudget.resolve(options.memory_budget, options.workers)
    problems: dict[str, str] = {}
    files, layouts = _planned_files(outputs, found, source.params, problems)
    task = WriteTask(folder, files, layouts, source.params, None, budget)

    def differs(name: str, at: int) -> None:
        file, info = found[name]
        row = at // max(1, nbytes(info.dtype, info.shape[1:]))
        problems[name] = f"{file}: {name} differs from the source (first at row {row})"

    def compare(task: WriteTask, f: PlannedFile) -> Sink:
        return _Compare(folder / f.name, task.layouts[f.name], mapped, differs)

    # The same jobs convert runs (small tensors in runs, their parameters staged once), into
    # sinks that compare instead of writing.
    with MappedFiles() as mapped, Progress(0, "verify", False) as progress:
        write_task(task, mapped, progress, lambda name, digest: None, compare)
    report.problems += [problems[t.name] for t in outputs if t.name in problems]
    produced = {t.name for t in outputs}
    for name in sorted(set(found) - produced):
        report.problems.append(f"{found[name][0]}: {name} does not come from {training_output}")
    report.checked.append(f"bytes against {training_output} (step {source.step})")


@paused_gc()
def verify(
    hf_dir: str | Path, against: str | Path | None = None, options: VerifyOptions | None = None
) -> VerifyReport:
    """Check a Hugging Face folder; with ``against``, also recompute every tensor from it."""
    options = options or VerifyOptions()
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder")
    report = VerifyReport(folder)
    is_adapter = (folder / ADAPTER_WEIGHTS).is_file() and not (folder / HF_INDEX).exists()
    if is_adapter:
        weight_map, total = None, None
        single = ADAPTER_WEIGHTS
    else:
        weight_map, total = _read_index(folder, report)
        single = HF_SINGLE
    files = sorted(set(weight_map.values())) if weight_map is not None else [single]
    headers = _read_headers(folder, files, report)
    if weight_map is None:
        weight_map = dict.fromkeys(headers.get(single, {}), single)
    found = _check_index(weight_map, total, headers, report)
    adapter = _check_adapter(folder, found, report) if is_adapter else None
    if not is_adapter:
        _check_shapes(folder, found, report)
    _check_record(folder, headers, report)
    if against is not None:
        _check_against(folder, found, Path(against), options, report, adapter)
    return report


def _names(module: str, target: str) -> bool:
    """PEFT's rule for a listed target: the module's name, or its end after a dot."""
    return module == target or module.endswith("." + target)


_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")


def _check_adapter(
    folder: Path, found: Mapping[str, tuple[str, TensorInfo]], report: VerifyReport
) -> dict[str, Any]:
    """A PEFT adapter folder: its config is plain LoRA as PEFT and vLLM load it, and its tensors
    are the pairs that config describes (``docs/lora.md#4-the-peft-adapter``). The config, or
    ``{}`` when it cannot be read."""
    path = folder / RUN_ADAPTER_CONFIG
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        report.problems.append(f"{RUN_ADAPTER_CONFIG}: not readable JSON ({e})")
        return {}
    if not isinstance(doc, dict):
        report.problems.append(f"{RUN_ADAPTER_CONFIG}: not a JSON object")
        return {}
    expected = {"peft_type": "LORA", "bias": "none", "use_dora": False, "modules_to_save": None}
    for key, value in expected.items():
        if doc.get(key, value) != value:
            report.problems.append(
                f"{RUN_ADAPTER_CONFIG}: {key} is {doc[key]!r}; a plain LoRA adapter has {value!r}"
            )
    rank, targets = doc.get("r"), doc.get("target_modules")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        report.problems.append(f"{RUN_ADAPTER_CONFIG}: r is {rank!r}, not a positive integer")
    alpha = doc.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        report.problems.append(f"{RUN_ADAPTER_CONFIG}: lora_alpha is {alpha!r}, not a number > 0")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        report.problems.append(f"{RUN_ADAPTER_CONFIG}: target_modules is {targets!r}, not a list")
        targets = []
    halves: dict[str, set[str]] = {}
    for name, (file, info) in sorted(found.items()):
        m = _PEFT_KEY.match(name)
        if m is None:
            report.problems.append(f"{file}: {name} is not a PEFT LoRA weight key")
            continue
        halves.setdefault(m.group("module"), set()).add(m.group("half"))
        want = 0 if m.group("half") == "A" else 1
        if len(info.shape) != 2 or info.shape[want] != rank:
            report.problems.append(
                f"{file}: {name} has shape {list(info.shape)}; with r = {rank!r} lora_A is "
                "[r, in] and lora_B [out, r]"
            )
    for module, have in sorted(halves.items()):
        if have != {"A", "B"}:
            report.problems.append(f"{module}: has lora_{min(have)} without its partner")
    if targets:  # PEFT matches a listed name against the end of a module's name
        covered = [m for m in sorted(halves) if any(_names(m, t) for t in targets)]
        unused = [t for t in targets if not any(_names(m, t) for m in halves)]
        if len(covered) < len(halves) or unused:
            report.problems.append(
                f"{RUN_ADAPTER_CONFIG}: target_modules {targets} do not name exactly the "
                f"modules the tensors give LoRA (named none: {sorted(set(halves) - set(covered))}; "
                f"naming no module with LoRA: {unused})"
            )
    report.checked.append(f"{RUN_ADAPTER_CONFIG} and the LoRA pairs")
    return doc
