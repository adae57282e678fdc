"""Claiming an output folder: user files are never deleted, and an interrupted run resumes.

Before writing anything, a run writes a small record, ``.ms2hf-run.json``: the fingerprint of
its whole plan (inputs with their sizes and modification times, every output tensor's recipe),
the size of every shard it will write and the names of the small files it writes after them.
As each shard is committed its content digest is added. A later run with the same fingerprint
keeps a shard only if its size and recomputed digest still match the record: the same command,
run again after a kill, finishes the job and ends byte-identical to an uninterrupted run,
having checked rather than assumed what it reused.

A non-empty folder without a record was not made by ms2hf and is refused unless ``overwrite``
(checked first, before any planning); a folder recording a different plan is refused too when
the run claims it, since replacing it would destroy a finished conversion. Even then only the
files ms2hf names are touched, this run's and the previous run's: each is either verified and
kept, or removed before the first shard is written. That includes the small files written after
the shards (config, and the index last), so no folder ever looks complete while it is not. The
folder is locked for the life of the run: two runs never interleave in one folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ms2hf.errors import Ms2hfError, OutputError
from ms2hf.io.hf_output import write_json
from ms2hf.io.safetensors_writer import PARTIAL_SUFFIX, temporary_name
from ms2hf.io.shard_digest import file_digest

RUN_RECORD = ".ms2hf-run.json"
RECORD_FORMAT = 1
_SHOWN = 3


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
            },
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
    """The previous run's record; None when there is none; ``{}`` when it is unreadable."""
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
        and isinstance(doc.get("shards"), dict)
        and isinstance(doc.get("then"), list)
        and isinstance(doc.get("finished"), dict)
        and all(_plain_name(n) for n in [*doc["shards"], *doc["then"], *doc["finished"]])
    )
    return doc if valid else {}


def _plain_name(name: object) -> bool:
    """A record only ever names files directly in its folder."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _refuse(folder: Path, reason: str) -> OutputError:
    return OutputError(
        f"{folder}: {reason}; choose an empty or new folder, or pass --overwrite to replace the "
        "files ms2hf writes there (nothing else is touched)"
    )


def prepare_output_dir(folder: Path, overwrite: bool) -> None:
    """Create ``folder``, or accept it: empty, made by ms2hf (a run record), or ``overwrite``.

    Called before any planning work so that a wrong target fails at once; whether an ms2hf
    folder holds this very plan is decided when the run claims it (``claim_output_dir``)."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the output folder: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable")
    if overwrite or (folder / RUN_RECORD).exists():
        return
    foreign = sorted(p.name for p in folder.iterdir() if not p.name.endswith(PARTIAL_SUFFIX))
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (" ..." if len(foreign) > _SHOWN else "")
        raise _refuse(folder, f"folder is not empty ({shown}) and was not made by ms2hf")


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


@contextmanager
def claim_output_dir(
    folder: Path,
    fingerprint: str,
    shards: Mapping[str, int],
    then: Sequence[str],
    overwrite: bool,
) -> Iterator[OutputRun]:
    """Make ``folder`` ready for a run writing ``shards`` (name -> size) and then the files
    ``then``; keep the shards a previous run of the same plan finished. ``folder`` must have
    been accepted by ``prepare_output_dir``; it stays locked until the context exits."""
    lock_fd = _lock(folder)
    try:
        previous = read_run_record(folder)
        same = previous is not None and previous.get("fingerprint") == fingerprint
        if previous is not None and not same and not overwrite:
            raise _refuse(
                folder,
                f"its ms2hf run record {RUN_RECORD} is unreadable"
                if not previous
                else "it holds the output of a different ms2hf run (other inputs or options)",
            )
        earlier = [*previous["shards"], *previous["then"]] if previous else []
        finished = (
            {
                name: digest
                for name, digest in previous["finished"].items()
                if name in shards and _reusable(folder, name, shards[name], digest)
            }
            if same and previous
            else {}
        )
        for name in {*earlier, *shards, *then, RUN_RECORD}:
            _unlink(temporary_name(folder / name))
        for name in {*earlier, *shards, *then} - set(finished):
            _unlink(folder / name)
        run = OutputRun(folder, fingerprint, shards, then, finished)
        run.save()
        yield run
    finally:
        os.close(lock_fd)  # releases the lock
