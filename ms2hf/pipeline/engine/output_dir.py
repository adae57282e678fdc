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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ms2hf.errors import Ms2hfError, OutputError
from ms2hf.io.config_files import RUN_ADAPTER_CONFIG
from ms2hf.io.hf_output import ADAPTER_WEIGHTS, HF_INDEX, HF_SHARD, write_json
from ms2hf.io.safetensors_writer import PARTIAL_SUFFIX
from ms2hf.io.shard_digest import file_digest
from ms2hf.io.tokenizer_files import same_file
from ms2hf.io.unified_format import HYPER_PARAM, PARAM_NAME_MAP
from ms2hf.pipeline.parts import Part

log = logging.getLogger("ms2hf")

RUN_RECORD = ".ms2hf-run.json"
RECORD_FORMAT = 1
IDENTITY = "identity"
"""Under a record: ``{shard: [size, inode, mtime_ns]}`` of shards written on other hosts."""
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


_HF_WEIGHTS = re.compile(
    r"(\.safetensors|^(pytorch|adapter)_model.*\.bin|^tf_model.*\.h5|^flax_model.*\.msgpack"
    r"|\.index\.json)$"
)


def _hf_own(name: str) -> bool:
    return name == HF_INDEX or bool(HF_SHARD.match(name))


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
    """An output folder claimed by one run (or one part of a run), and the shards already
    finished in it."""

    def __init__(
        self,
        folder: Path,
        fingerprint: str,
        shards: Mapping[str, int],
        finished: dict[str, str],
        part: Part | None = None,
        identify: bool = False,
        identities: dict[str, list[int]] | None = None,
    ) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.shards = dict(shards)
        self.finished = finished
        """Shard name -> digest, for every shard complete on disk (reused or written now)."""
        self.part = part
        self.identify = identify
        """Record each committed shard's identity too (``IDENTITY``): shards written on other
        hosts (parts, Ray tasks) are then trusted by it instead of read back."""
        self.identities = dict(identities or {})
        self.parts_taken = 0
        """Part records this run took over (a run finishing parts)."""
        self.complete = False
        self.path = folder / (part_record_name(part) if part else RUN_RECORD)
        self._lock = threading.Lock()

    def record(self, name: str, digest: str) -> None:
        """Note a committed shard, so that a rerun after a kill can reuse it."""
        identity = _identity(self.folder / name) if self.identify else None
        with self._lock:
            self.finished[name] = digest
            if identity is not None:
                self.identities[name] = identity
            self.save()

    def save(self) -> None:
        doc: dict[str, Any] = {
            "ms2hf_run": RECORD_FORMAT,
            "fingerprint": self.fingerprint,
            "shards": dict(sorted(self.shards.items())),
            "finished": dict(sorted(self.finished.items())),
            "complete": self.complete,
        }
        identities = {n: i for n, i in self.identities.items() if n in self.finished}
        if identities:
            doc[IDENTITY] = dict(sorted(identities.items()))
        if self.part is not None:
            doc["part"] = [self.part.index, self.part.count]
        write_json(self.path, doc)

    def finish(self, kind: FolderKind, document: Mapping[str, Any]) -> None:
        """Write the index, last. A folder to publish gets the shards' digests in the index's
        metadata and loses the record: it holds the model's files alone."""
        if not kind.publishable:
            write_json(self.folder / kind.index, document)
            self.complete = True
            self.identities.clear()  # for resuming only: a finished record is the same anywhere
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

    def sweep(self) -> None:
        """Remove the temporary files of attempts that died (a Ray task killed midway leaves
        its own): called with every file committed, by a run holding the folder alone."""
        for name in sorted(os.listdir(self.folder)):
            if _partial(name):
                _unlink(self.folder / name)

    @property
    def progress(self) -> str:
        """How far the run got, and how to go on: for messages about an interrupted run."""
        again = f"the same command (--part {self.part})" if self.part else "the same command"
        return (
            f"{len(self.finished)} of {len(self.shards)} file(s) finished and kept in "
            f"{self.folder}; run {again} again to resume"
        )


def _lock(folder: Path, shared: bool) -> int:
    """Hold the folder for the run: exclusively, or shared with the other parts of one run."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise OutputError(f"{folder}: cannot open the output folder: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        what = (
            "a run without --part is writing into this folder"
            if shared
            else "another ms2hf run is writing into this folder (a run, or parts of one: --part)"
        )
        raise OutputError(f"{folder}: {what}") from None
    except OSError:
        pass  # a file system without locks (some network mounts): run without the guard
    return fd


_PART_RECORD = re.compile(r"^\.ms2hf-run\.part-(\d+)-of-(\d+)\.json$")


def part_record_name(part: Part) -> str:
    """The record of one part of a run (``--part``): one per part, so parts never write the
    same file."""
    return f".ms2hf-run.part-{part.index}-of-{part.count}.json"


def part_records(folder: Path) -> list[str]:
    """The part records in ``folder``, by name."""
    try:
        return _part_records(os.listdir(folder))
    except OSError:
        return []


def _part_records(names: Iterable[str]) -> list[str]:
    return sorted(name for name in names if _PART_RECORD.match(name))


def read_run_record(folder: Path, name: str = RUN_RECORD) -> dict[str, Any] | None:
    """An unfinished run's record (or a part's, by its name); None when there is none; ``{}``
    when it is unreadable."""
    path = folder / name
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
        and isinstance(doc.get("finished"), dict)
        and isinstance(doc.get("complete", False), bool)
        and isinstance(doc.get(IDENTITY, {}), dict)
        and all(_plain_name(n) for n in [*doc["shards"], *doc["finished"]])
        and all(
            isinstance(v, list) and len(v) == 3 and all(type(x) is int for x in v)
            for v in doc.get(IDENTITY, {}).values()
        )
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
    not name. Called before a run writes anything, so that a wrong target fails at once."""
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
    if overwrite or RUN_RECORD in names or _part_records(names):
        return
    if read_finished(folder, kind.index) is not None:
        raise OutputError(
            f"{folder}: holds a finished ms2hf conversion (`ms2hf verify {folder}` checks it); "
            "pass --overwrite to convert into it again, or choose another folder"
        )
    foreign = [n for n in names if not _partial(n)]
    if foreign:
        raise _refuse(folder, f"folder is not empty ({_shown(foreign)}) and was not made by ms2hf")


def _identity(path: Path) -> list[int] | None:
    """``[size, inode, modification time]``: what changes when a file is replaced or written."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_ino, st.st_mtime_ns]


def _reusable(folder: Path, name: str, size: int, digest: object, identity: object) -> bool:
    """A finished shard still in place: its identity as recorded at commit (shards written on
    other hosts, whose rereading would cost one host what the run spread over many), else its
    size and recomputed digest."""
    path = folder / name
    now = _identity(path)
    if now is None or now[0] != size:
        return False
    if identity is not None and now == identity:
        return True
    try:
        return file_digest(path) == digest
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


@dataclass(frozen=True)
class _Earlier:
    """What the records in a folder say of earlier runs (or parts) of this plan and others."""

    main: dict[str, Any] | None
    """The record of a run without parts: None when absent, ``{}`` when unreadable."""
    parts: dict[str, dict[str, Any]]
    """Part records by name (unreadable ones left out: nothing in them is trusted)."""

    @classmethod
    def read(cls, folder: Path, names: Iterable[str]) -> _Earlier:
        """The records among ``names``, the folder's files."""
        parts = {name: read_run_record(folder, name) for name in _part_records(names)}
        return cls(read_run_record(folder), {n: d for n, d in parts.items() if d})

    def records(self) -> list[dict[str, Any]]:
        return [d for d in (self.main, *self.parts.values()) if d]

    def finished(self, fingerprint: str) -> tuple[dict[str, str], dict[str, list[int]]]:
        """Digests and identities of the shards finished by runs (or parts) of ``fingerprint``."""
        digests: dict[str, str] = {}
        identities: dict[str, list[int]] = {}
        for doc in self.records():
            if doc["fingerprint"] == fingerprint:
                digests.update(doc["finished"])
                identities.update(doc.get(IDENTITY, {}))
        return digests, identities

    def others(self, fingerprint: str) -> list[dict[str, Any]]:
        return [d for d in self.records() if d["fingerprint"] != fingerprint]

    def shards(self) -> set[str]:
        """Every shard any record names."""
        return {name for doc in self.records() for name in doc["shards"]}


@contextmanager
def claim_output_dir(
    folder: Path,
    fingerprint: str,
    shards: Mapping[str, int],
    overwrite: bool,
    kind: FolderKind = HF_FOLDER,
    inputs: Sequence[Path] = (),
    part: Part | None = None,
    identify: bool = False,
) -> Iterator[OutputRun]:
    """Make ``folder`` ready for a run writing ``shards`` (name -> size), then its small files
    and the index; keep the shards an unfinished run (or the parts of one) of the same
    plan finished. ``folder`` must have been accepted by ``prepare_output_dir``; it stays locked
    until the context exits. ``inputs`` are files the run reads: never removed, never
    overwritten by a shard.

    With ``part``, only that part's ``shards`` are written: the folder is shared with the other
    parts, so nothing another part may be writing is touched (no stale file is removed but an
    earlier index), and the part keeps its own record. A run without ``part`` takes over the
    parts' records: their shards count as finished here, and the index is written at the end.
    ``identify`` records the identity of each shard committed (written on another host)."""
    lock_fd = _lock(folder, shared=part is not None)
    try:
        names = sorted(os.listdir(folder))
        earlier = _Earlier.read(folder, names)
        if earlier.main == {} and not overwrite:
            raise _refuse(folder, f"its ms2hf run record {RUN_RECORD} is unreadable")
        finished_runs = [d for d in earlier.others(fingerprint) if d.get("complete")]
        if finished_runs and not overwrite:
            raise _refuse(
                folder, "it holds the output of a different ms2hf run (other inputs or options)"
            )
        if earlier.others(fingerprint):
            log.info(
                "note: %s holds the unfinished output of an earlier run with other inputs or "
                "options; %s",
                folder,
                "the run without --part that finishes replaces it" if part else "it is replaced",
            )
        digests, identities = earlier.finished(fingerprint)
        finished = {
            name: digest
            for name, digest in digests.items()
            if name in shards
            and _reusable(folder, name, shards[name], digest, identities.get(name))
        }
        read = _inputs_here(folder, inputs)
        clobbered = sorted(read & set(shards))
        if clobbered:
            raise OutputError(
                f"{folder}: {_shown(clobbered)} would be overwritten by a shard, but this run "
                "reads it; choose another output folder"
            )
        run = OutputRun(
            folder,
            fingerprint,
            shards,
            finished,
            part,
            identify,
            {n: i for n, i in identities.items() if n in finished},
        )
        if part is not None:
            run.save()  # first: the folder is an unfinished ms2hf run's from now on
            main = earlier.main
            if not (main and main.get("complete") and main["fingerprint"] == fingerprint):
                _unlink(folder / kind.index)  # an earlier set's index must not describe this one
            yield run
            return
        named = earlier.shards()
        stale = [
            n
            for n in names
            if n not in read and n not in finished and (kind.own(n) or n in named or _partial(n))
        ]
        for name in stale:
            _unlink(folder / name)
        gone = [n for n in stale if n not in shards and n != kind.index and not _partial(n)]
        if gone:
            log.info(
                "removed from %s (an earlier weight set ms2hf names): %s", folder, ", ".join(gone)
            )
        run.save()
        run.parts_taken = sum(1 for d in earlier.parts.values() if d["fingerprint"] == fingerprint)
        for name in _part_records(names):  # taken over (the run's record now holds what they
            _unlink(folder / name)  # did), or unreadable
        yield run
    finally:
        os.close(lock_fd)  # releases the lock
