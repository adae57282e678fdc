"""Claiming an output folder: no user file is lost, an interrupted run resumes, and a finished
folder holds the model's files and nothing else.

While a run is unfinished the folder holds a small record, ``.ms2hf-run.json``: the fingerprint
of the whole plan (inputs with their sizes and modification times, every output tensor's recipe),
the size of every shard and, as each shard is committed, its content digest. The same command,
run again after a kill, a full disk or an error, keeps a shard only if its size and recomputed
digest still match the record, and ends byte-identical to an uninterrupted run. A different
command may take over an unfinished folder too: a failed run's leftovers are not a conversion
anyone wants to keep.

A run ends by writing the index (last, so a folder with an index is complete) with the shards'
digests in its metadata, where ``verify`` finds them and a model repository may carry them, and
by removing the record: what ``huggingface_hub.upload_folder`` would upload is then the model's
files alone. A finished folder is not converted into again without ``overwrite``.

A non-empty folder ms2hf did not make is refused unless ``overwrite``. Even then only the files
ms2hf names are touched: this run's shards and index, the weight files of an earlier ms2hf layout
(so that loaders find one weight set, not an old one beside the new), and ms2hf's own partial
files. A weight set ms2hf does not name (``pytorch_model.bin``) makes the run refuse, touching
nothing. Files the run reads (a reference config or tokenizer files kept in the output folder)
are never removed. Small files (config, tokenizer) are replaced atomically when written, never
removed first. The folder is locked for the life of the run: two runs never interleave in it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ms2hf.errors import Ms2hfError, OutputError
from ms2hf.io.config_files import RUN_ADAPTER_CONFIG
from ms2hf.io.hf_output import ADAPTER_WEIGHTS, HF_INDEX, write_json
from ms2hf.io.safetensors_writer import PARTIAL_SUFFIX
from ms2hf.io.shard_digest import file_digest
from ms2hf.io.tokenizer_files import same_file
from ms2hf.io.unified_format import HYPER_PARAM, PARAM_NAME_MAP

log = logging.getLogger("ms2hf")

RUN_RECORD = ".ms2hf-run.json"
RECORD_FORMAT = 1
FINISHED_KEY = "ms2hf"
"""Under the index's ``metadata``: ``{"digests": {shard: digest}}`` of a finished run."""
_SHOWN = 3


@dataclass(frozen=True)
class FolderKind:
    """What a finished folder of one output format holds, and what else ms2hf names in it."""

    index: str
    """Written last; its ``metadata`` carries the finished run's digests."""
    own: Callable[[str], bool]
    """Files ms2hf writes in this format, in any layout: replaced or removed by a run."""
    foreign: Callable[[str], bool]
    """Other weight sets loaders would find beside the run's: the run refuses."""
    publishable: bool = True
    """A finished run's digests go into the index and its record is removed (a folder to
    publish); otherwise the record stays, marked complete, and the index is written as is (a
    unified folder keeps MindSpore's own form)."""
    foreign_index: bool = False
    """The index is another tool's document, written exactly as that tool writes it (a PEFT
    adapter's config: no ms2hf metadata, no final newline); a finished run still removes its
    record, so a folder to publish holds that tool's files alone."""


_HF_SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_HF_WEIGHTS = re.compile(
    r"(\.safetensors|^(pytorch|adapter)_model.*\.bin|^tf_model.*\.h5|^flax_model.*\.msgpack"
    r"|\.index\.json)$"
)


def _hf_own(name: str) -> bool:
    return name == HF_INDEX or bool(_HF_SHARD.match(name))


HF_FOLDER = FolderKind(
    HF_INDEX, _hf_own, lambda name: not _hf_own(name) and bool(_HF_WEIGHTS.search(name))
)
"""A Hugging Face model folder: ``model*.safetensors`` and the index are ms2hf's names; other
``*.safetensors``, ``pytorch_model*.bin``, TF and Flax weights and their indexes are another
weight set (transformers prefers ``model.safetensors`` over an index, vLLM and upload tools take
every ``*.safetensors``)."""
_PART = re.compile(r"^part\d+\.safetensors$")
UNIFIED_FOLDER = FolderKind(
    PARAM_NAME_MAP,
    lambda name: name in (PARAM_NAME_MAP, HYPER_PARAM) or bool(_PART.match(name)),
    lambda name: False,
    publishable=False,
)
"""A unified folder (``merge``): not published, and in MindSpore's own form, so the record
stays beside it, marked complete."""
ADAPTER_FOLDER = FolderKind(
    RUN_ADAPTER_CONFIG,
    lambda name: name in (RUN_ADAPTER_CONFIG, ADAPTER_WEIGHTS),
    lambda name: name != ADAPTER_WEIGHTS and bool(_HF_WEIGHTS.search(name)),
    foreign_index=True,
)
"""A PEFT adapter folder (``convert --lora adapter``): ``adapter_model.safetensors`` and, last,
``adapter_config.json`` as PEFT writes it; any other weight file is another weight set."""


class OutputRun:
    """An output folder claimed by one run, and the shards already finished in it."""

    def __init__(
        self,
        folder: Path,
        fingerprint: str,
        shards: Mapping[str, int],
        then: Sequence[str],
        finished: dict[str, str],
    ) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.shards = dict(shards)
        self.then = tuple(then)
        self.finished = finished
        """Shard name -> digest, for every shard complete on disk (reused or written now)."""
        self.complete = False
        self._lock = threading.Lock()

    def record(self, name: str, digest: str) -> None:
        """Note a committed shard, so that a rerun after a kill can reuse it."""
        with self._lock:
            self.finished[name] = digest
            self.save()

    def save(self) -> None:
        write_json(
            self.folder / RUN_RECORD,
            {
                "ms2hf_run": RECORD_FORMAT,
                "fingerprint": self.fingerprint,
                "shards": dict(sorted(self.shards.items())),
                "then": list(self.then),
                "finished": dict(sorted(self.finished.items())),
                "complete": self.complete,
            },
        )

    def finish(self, kind: FolderKind, document: Mapping[str, Any]) -> None:
        """Write the index, last. A folder to publish gets the shards' digests in the index's
        metadata and loses the record: it holds the model's files alone."""
        if not kind.publishable:
            write_json(self.folder / kind.index, document)
            self.complete = True
            self.save()
            return
        if kind.foreign_index:
            write_json(self.folder / kind.index, document, newline=False)
            _unlink(self.folder / RUN_RECORD)
            return
        metadata = {**document.get("metadata", {}), FINISHED_KEY: {"digests": self.digests()}}
        write_json(self.folder / kind.index, {**document, "metadata": metadata})
        _unlink(self.folder / RUN_RECORD)

    def digests(self) -> dict[str, str]:
        return dict(sorted(self.finished.items()))

    @property
    def progress(self) -> str:
        """How far the run got, and how to go on: for messages about an interrupted run."""
        return (
            f"{len(self.finished)} of {len(self.shards)} file(s) finished and kept in "
            f"{self.folder}; run the same command again to resume"
        )


def _lock(folder: Path) -> int:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise OutputError(f"{folder}: cannot open the output folder: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{folder}: another ms2hf run is writing into this folder") from None
    except OSError:
        pass  # a file system without locks (some network mounts): run without the guard
    return fd


def read_run_record(folder: Path) -> dict[str, Any] | None:
    """An unfinished run's record; None when there is none; ``{}`` when it is unreadable."""
    path = folder / RUN_RECORD
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return {}
    valid = (
        isinstance(doc, dict)
        and doc.get("ms2hf_run") == RECORD_FORMAT
        and isinstance(doc.get("fingerprint"), str)
        and isinstance(doc.get("shards"), dict)
        and isinstance(doc.get("then"), list)
        and isinstance(doc.get("finished"), dict)
        and isinstance(doc.get("complete", False), bool)
        and all(_plain_name(n) for n in [*doc["shards"], *doc["then"], *doc["finished"]])
    )
    return doc if valid else {}


def read_finished(folder: Path, index: str = HF_INDEX) -> dict[str, str] | None:
    """The shard digests a finished ms2hf run left in its index; None when the index is absent
    or carries none (not made by ms2hf)."""
    try:
        doc = json.loads((folder / index).read_text(encoding="utf-8"))
        digests = doc["metadata"][FINISHED_KEY]["digests"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    if not isinstance(digests, dict) or not all(
        _plain_name(n) and isinstance(d, str) for n, d in digests.items()
    ):
        return None
    return digests


def _plain_name(name: object) -> bool:
    """A record only ever names files directly in its folder."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _partial(name: str) -> bool:
    """ms2hf's temporary names (``.NAME.ms2hf-partial``): nothing else is ever named so."""
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (" ..." if len(names) > _SHOWN else "")


def _refuse(folder: Path, reason: str) -> OutputError:
    return OutputError(
        f"{folder}: {reason}; choose an empty or new folder, or pass --overwrite to replace the "
        "files ms2hf writes there (nothing else is touched)"
    )


def prepare_output_dir(folder: Path, overwrite: bool, kind: FolderKind = HF_FOLDER) -> None:
    """Create ``folder``, or accept it: empty, an unfinished ms2hf run's, or with ``overwrite``
    one holding other files or a finished conversion; never one holding a weight set ms2hf does
    not name. Called before any planning work, so that a wrong target fails at once."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the output folder: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable")
    names = sorted(p.name for p in folder.iterdir())
    others = [n for n in names if kind.foreign(n)]
    if others:
        raise OutputError(
            f"{folder}: holds another weight set ({_shown(others)}) that loaders and uploads "
            "would take beside (or instead of) the converted one; move it away or choose "
            "another folder"
        )
    if overwrite or (folder / RUN_RECORD).exists():
        return
    if read_finished(folder, kind.index) is not None:
        raise OutputError(
            f"{folder}: holds a finished ms2hf conversion (`ms2hf verify {folder}` checks it); "
            "pass --overwrite to convert into it again, or choose another folder"
        )
    foreign = [n for n in names if not _partial(n)]
    if foreign:
        raise _refuse(folder, f"folder is not empty ({_shown(foreign)}) and was not made by ms2hf")


def _reusable(folder: Path, name: str, size: int, digest: object) -> bool:
    path = folder / name
    try:
        return path.stat().st_size == size and file_digest(path) == digest
    except (OSError, Ms2hfError):
        return False


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot remove: {e.strerror or e}") from e


def _inputs_here(folder: Path, inputs: Sequence[Path]) -> set[str]:
    """Names in ``folder`` that are files this run reads (the same file, by any path)."""
    return {path.name for path in inputs if same_file(path, folder / path.name)}


@contextmanager
def claim_output_dir(
    folder: Path,
    fingerprint: str,
    shards: Mapping[str, int],
    then: Sequence[str],
    overwrite: bool,
    kind: FolderKind = HF_FOLDER,
    inputs: Sequence[Path] = (),
) -> Iterator[OutputRun]:
    """Make ``folder`` ready for a run writing ``shards`` (name -> size), then the files
    ``then`` and the index; keep the shards an unfinished run of the same plan finished.
    ``folder`` must have been accepted by ``prepare_output_dir``; it stays locked until the
    context exits. ``inputs`` are files the run reads: never removed, never overwritten by a
    shard."""
    lock_fd = _lock(folder)
    try:
        previous = read_run_record(folder)
        if previous == {} and not overwrite:
            raise _refuse(folder, f"its ms2hf run record {RUN_RECORD} is unreadable")
        same = bool(previous) and previous is not None and previous["fingerprint"] == fingerprint
        if previous and not same and previous.get("complete") and not overwrite:
            raise _refuse(
                folder, "it holds the output of a different ms2hf run (other inputs or options)"
            )
        if previous and not same and not previous.get("complete"):
            log.info(
                "note: %s holds the unfinished output of an earlier run with other inputs or "
                "options; it is replaced",
                folder,
            )
        finished = (
            {
                name: digest
                for name, digest in previous["finished"].items()
                if name in shards and _reusable(folder, name, shards[name], digest)
            }
            if same and previous
            else {}
        )
        names = sorted(p.name for p in folder.iterdir())
        read = _inputs_here(folder, inputs)
        clobbered = sorted(read & set(shards))
        if clobbered:
            raise OutputError(
                f"{folder}: {_shown(clobbered)} would be overwritten by a shard, but this run "
                "reads it; choose another output folder"
            )
        earlier = previous["shards"] if previous else {}
        stale = [
            n
            for n in names
            if n not in read and n not in finished and (kind.own(n) or n in earlier or _partial(n))
        ]
        for name in stale:
            _unlink(folder / name)
        gone = [n for n in stale if n not in shards and n != kind.index and not _partial(n)]
        if gone:
            log.info(
                "removed from %s (an earlier weight set ms2hf names): %s", folder, ", ".join(gone)
            )
        run = OutputRun(folder, fingerprint, shards, then, finished)
        run.save()
        yield run
    finally:
        os.close(lock_fd)  # releases the lock
