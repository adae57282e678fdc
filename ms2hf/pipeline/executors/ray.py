"""The Ray executor: a run's files written by tasks on the hosts of a Ray cluster.

The driver (this process) has planned the run and claimed the output folder, which every host
of the cluster shares (a network file system). It cuts the files still to write into groups
(``GROUP_BYTES``; an HF shard of 5 GB is a group of its own) and runs each group as one Ray task
of ``write_group``: the same unit of work as a local run (``ms2hf.pipeline.engine.execute``),
with its own threads, memory maps and band buffers, declaring its memory budget and threads as
the Ray resources ``memory`` and ``CPU``, so that Ray places no more tasks on a host than it can
hold. A task writes straight into the shared folder under temporary names of its own (one per
attempt) and renames each file when complete; it returns only the files' digests, so the
driver's memory does not grow with the model. The driver records each file as its task ends,
and writes the small files and the index once every file is committed, as a local run does.

A task whose worker or host dies is retried (``MAX_RETRIES``); a file it had committed is simply
written again, to the same bytes, and the temporary files of killed attempts are removed at the
end. A driver killed midway leaves the folder as a killed local run does: rerun the command.

Ray is imported here only, and this module only when ``--ray`` is given: Ray is an optional
extra (``pip install 'ms2hf[ray]'``) and takes a second or more to import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ms2hf.errors import Ms2hfError, OutputError
from ms2hf.io.mapped import MappedFiles
from ms2hf.pipeline.engine.budget import MemoryBudget, format_size
from ms2hf.pipeline.engine.execute import WriteTask, write_task
from ms2hf.pipeline.engine.output_dir import OutputRun
from ms2hf.pipeline.engine.progress import Progress
from ms2hf.pipeline.executors import Reads
from ms2hf.pipeline.plan import PlannedFile
from ms2hf.pipeline.shards import pack

log = logging.getLogger("ms2hf")

TASK_MEMORY = 2**30
"""Each task's memory budget unless ``--memory-budget`` gives one: its band buffers, the
interpreter and its share of the plan fit in a small part of it."""
TASK_WORKERS = 2
"""Each task's threads unless ``--workers`` says: a host runs as many tasks as its CPUs and
memory allow, so a task needs few."""
GROUP_BYTES = 2**30
"""Files smaller than this are written in groups of consecutive files of about this size: a
task costs tens of milliseconds to place and start, a small file less than that to write."""
MAX_RETRIES = 3
"""Attempts after the first at a task whose worker or host died."""
PROBE_SECONDS = 5.0
"""How long to wait for the cluster's address to answer before saying it does not: Ray itself
would try for minutes."""


def task_budget(memory_budget: int | None, workers: int | None) -> MemoryBudget:
    """Each task's memory budget and threads: the options', or the defaults. The budget is what
    the task declares to Ray; its band buffers stay within it, as in a local run."""
    total = TASK_MEMORY if memory_budget is None else memory_budget
    return MemoryBudget.fitted(total, workers or TASK_WORKERS)


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError as e:
        raise Ms2hfError(
            f"--ray needs Ray, which is not installed here ({e}): pip install 'ms2hf[ray]' "
            "(the version every host of the cluster runs)"
        ) from e
    module: ModuleType = ray  # a Module, whether or not mypy sees Ray's own types
    return module


def resolve_address(address: str) -> str:
    """``host:port`` (or ``ray://host:port``) of the cluster: ``auto`` is ``RAY_ADDRESS``, else
    the cluster started on this host (``ray start``). Probed before Ray is asked to connect: an
    address nobody answers would keep Ray trying for many minutes."""
    text = address.strip()
    if text == "auto":
        text = os.environ.get("RAY_ADDRESS", "").strip() or _local_cluster()
    host, _, port = text.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise Ms2hfError(
            f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT (got {text!r})"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS):
            pass
    except OSError as e:
        raise Ms2hfError(
            f"--ray {address}: cannot reach the Ray cluster at {text} ({e.strerror or e}); is it "
            "running, and may this host reach it?"
        ) from e
    return text


def _local_cluster() -> str:
    """The cluster ``ray start`` last started on this host: what Ray's own ``auto`` finds (the
    address it keeps under its temporary folder, else a running GCS server's), through its
    lookup function, which the pinned Ray version keeps in ``ray._private.services``."""
    ray = _import_ray()
    from ray._private.services import get_ray_address_from_environment

    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        found = None
    if not found or found == "auto":
        raise Ms2hfError(
            "--ray auto: RAY_ADDRESS is not set and no Ray cluster runs on this host; start one "
            f"(ray start --head) or give its address (Ray {ray.__version__})"
        )
    return str(found)


@dataclass(frozen=True)
class GroupResult:
    """What a task sends back: small, whatever the files' size."""

    committed: list[tuple[str, str]]
    """``(file, digest)`` of each file written, in the order they were committed."""
    bytes_read: int
    warnings: list[str]
    """What the run logged at warning level (non-finite weights), for the driver to say."""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def write_group(task: WriteTask) -> GroupResult:
    """A Ray task: write the files of ``task`` on this host (the unit of work of every run),
    under temporary names of this attempt's own. A bad input or a full disk is said as a local
    run says it, with the host it happened on."""
    host = socket.gethostname()
    attempt = f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
    committed: list[tuple[str, str]] = []
    collect = _Collect()
    logger = logging.getLogger("ms2hf")
    logger.addHandler(collect)
    try:
        with MappedFiles() as mapped, Progress(0, "", False) as progress:
            done = lambda name, digest: committed.append((name, digest))  # noqa: E731
            write_task(dataclasses.replace(task, attempt=attempt), mapped, progress, done)
            return GroupResult(committed, mapped.bytes_viewed, collect.messages)
    except Ms2hfError as e:
        raise type(e)(f"on host {host}: {e}{_shared_hint(e, task)}") from e
    finally:
        logger.removeHandler(collect)


def _shared_hint(error: Ms2hfError, task: WriteTask) -> str:
    """A file missing on a task's host is most often a folder the host does not share."""
    missing = not task.folder.is_dir() or "No such file" in str(error)
    return (
        "; --ray needs the training output and the output folder on a file system every host "
        "of the cluster sees, at the same path"
        if missing
        else ""
    )


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Ray prints to stdout, where ``--json`` reports go: to stderr while Ray runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _live_hosts(ray: Any) -> list[dict[str, float]]:
    """The resources of each live host of the cluster."""
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def _check_fits(ray: Any, budget: MemoryBudget) -> None:
    """A task no host can hold would wait for one forever: say so instead."""
    nodes = _live_hosts(ray)
    if any(r.get("memory", 0) >= budget.total and r.get("CPU", 0) >= budget.workers for r in nodes):
        return
    largest: dict[str, float] = max(
        nodes, key=lambda r: (r.get("memory", 0), r.get("CPU", 0)), default={}
    )
    raise Ms2hfError(
        f"--ray: no host of the cluster can run a task of {format_size(budget.total)} memory "
        f"and {budget.workers} CPU(s) (the largest offers {format_size(largest.get('memory', 0))} "
        f"and {largest.get('CPU', 0):g}); lower --memory-budget or --workers"
    )


def _slots(ray: Any, budget: MemoryBudget) -> int:
    """How many tasks the cluster can run at once."""
    return sum(
        min(int(r.get("CPU", 0) // budget.workers), int(r.get("memory", 0) // budget.total))
        for r in _live_hosts(ray)
    )


def groups(files: Sequence[PlannedFile], slots: int) -> list[list[PlannedFile]]:
    """The files of each task: consecutive files, a group at most ``GROUP_BYTES`` (unless one
    file alone is larger), and small enough for every slot to get two groups (so that no host
    idles while another finishes a large group)."""
    sizes = [f.nbytes for f in files]
    target = min(GROUP_BYTES, -(-sum(sizes) // max(1, 2 * slots)))
    return [g for g in pack(files, sizes, max(1, target)) if g]


def _names(files: Sequence[PlannedFile]) -> str:
    shown = ", ".join(f.name for f in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _result(ray: Any, ref: Any, files: Sequence[PlannedFile]) -> GroupResult:
    try:
        result: GroupResult = ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Ms2hfError):
            raise cause from None  # a bad input, a full disk: as a local run says it
        raise OutputError(
            f"the Ray task writing {_names(files)} failed (is ms2hf, of this version, installed "
            f"in the Python every host of the cluster runs?): {e}"
        ) from e
    except ray.exceptions.RayError as e:
        raise OutputError(
            f"the Ray task writing {_names(files)} died {MAX_RETRIES + 1} times (its worker or "
            f"host was lost: {type(e).__name__})"
        ) from e
    return result


@dataclass(frozen=True)
class RayExecutor:
    address: str
    """As given: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``."""
    remote = True

    @contextlib.contextmanager
    def session(self, budget: MemoryBudget) -> Iterator[None]:
        """Connected to the cluster, which can hold a task of ``budget``; Ray's output kept
        off stdout (``--json`` reports go there)."""
        ray = _import_ray()
        address = resolve_address(self.address)
        with _quiet_stdout():
            try:
                ray.init(address=address, log_to_driver=False, logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise Ms2hfError(
                    f"--ray {self.address}: cannot join the Ray cluster at {address}: {e} (this "
                    f"host runs Ray {ray.__version__}; the cluster must run the same)"
                ) from e
            try:
                _check_fits(ray, budget)
                yield
            finally:
                ray.shutdown()

    def write(self, task: WriteTask, output: OutputRun, progress: Progress) -> Reads:
        ray = _import_ray()
        remote = ray.remote(write_group).options(
            num_cpus=task.budget.workers,
            memory=task.budget.total,
            max_retries=MAX_RETRIES,
            retry_exceptions=False,
        )
        cut = groups(task.files, _slots(ray, task.budget))
        pending = {remote.remote(task.only(files)): files for files in cut}
        log.info("%d Ray task(s) submitted to %s", len(pending), self.address)
        read = 0
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    files = pending.pop(ref)
                    result = _result(ray, ref, files)
                    for name, digest in result.committed:
                        output.record(name, digest)
                    for message in result.warnings:
                        log.warning("%s", message)
                    progress.advance(sum(f.nbytes for f in files))
                    read += result.bytes_read
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        return Reads(read)
