"""Which Checkpoint 2.0 iteration to read (``docs/checkpoint2.md#2-which-iteration-to-read``).

Every save is an ``iteration_XXXXXXXX/`` folder, and the tracker names the last one every rank
finished. A folder newer than the tracker, or any folder without one, may be a save in progress
or one that died half way: it is never chosen silently, only when named.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ms2hf.errors import FormatError
from ms2hf.io.sources.plan import StepChoice

log = logging.getLogger("ms2hf")

TRACKER = "latest_checkpointed_iteration.txt"
ITERATION_DIR = re.compile(r"iteration_(\d{8,})")


def find_iterations(checkpoint_dir: Path) -> dict[int, Path]:
    """Every ``iteration_XXXXXXXX`` folder of a checkpoint folder, by its number."""
    found: dict[int, Path] = {}
    with os.scandir(checkpoint_dir) as listing:  # is_dir from the listing: no stat per entry
        entries = sorted(listing, key=lambda e: e.name)
    for e in entries:
        m = ITERATION_DIR.fullmatch(e.name)
        if m and e.is_dir():
            n = int(m.group(1))
            if n in found:
                raise FormatError(
                    f"{checkpoint_dir}: {found[n].name} and {e.name} are both iteration {n}; "
                    "keep one"
                )
            found[n] = checkpoint_dir / e.name
    return found


def iteration_number(folder: Path) -> int | None:
    m = ITERATION_DIR.fullmatch(folder.name)
    return int(m.group(1)) if m else None


def read_tracker(checkpoint_dir: Path) -> int | None:
    """The iteration the tracker names, or None without a tracker."""
    path = checkpoint_dir / TRACKER
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    if not (text.isascii() and text.isdigit()):
        raise FormatError(f"{path}: holds {text[:40]!r}, expected an iteration number")
    return int(text)


def _step_number(step: str, where: Path, present: str) -> int:
    if not (step.isascii() and step.isdigit()):
        raise FormatError(
            f"--step {step}: {where} is a Checkpoint 2.0 save, whose saves are iterations "
            f"(present: {present}); name one by its number, e.g. --step {present.split(', ')[-1]}"
        )
    return int(step)


def _listing(numbers: Iterable[int]) -> str:
    return ", ".join(map(str, sorted(numbers))) or "none"


def choose_iteration(
    checkpoint_dir: Path, step: str | None, folder: Path | None = None
) -> tuple[Path, StepChoice]:
    """The iteration folder to read (``docs/checkpoint2.md#2-which-iteration-to-read``): the
    one named (``folder``, or ``--step``), else the tracker's. An iteration newer than the
    tracker, or any without a tracker, may be a save in progress or one that died: it is never
    chosen silently; named, it is read with a warning."""
    found = find_iterations(checkpoint_dir)
    present = _listing(found)
    tracker = read_tracker(checkpoint_dir)
    choice = StepChoice(tuple(str(i) for i in sorted(found)), "")
    if folder is not None or step is not None:
        if folder is not None:
            number = iteration_number(folder)
            assert number is not None
            if step is not None and _step_number(step, checkpoint_dir, present) != number:
                raise FormatError(
                    f"--step {step} disagrees with the iteration folder given, {folder}"
                )
            reason = "the folder given"
        else:
            assert step is not None
            number = _step_number(step, checkpoint_dir, present)
            if number not in found:
                raise FormatError(
                    f"{checkpoint_dir}: no folder iteration_{number:08d} for --step {step} "
                    f"(iterations present: {present})"
                )
            folder, reason = found[number], "--step"
        if tracker is None or number > tracker:
            log.warning(
                "warning: reading iteration %d as asked, though %s; check that its save finished",
                number,
                f"no {TRACKER} names it"
                if tracker is None
                else f"it is newer than the tracker's {tracker}",
            )
        return folder, StepChoice(choice.present, reason)
    if not found:
        raise FormatError(f"{checkpoint_dir}: no iteration_XXXXXXXX folder")
    if tracker is None:
        raise FormatError(
            f"{checkpoint_dir}: no {TRACKER}, so no iteration is known to be complete (present: "
            f"{present}); a save in progress or one that died looks the same: name the "
            f"iteration to read, e.g. --step {max(found)}"
        )
    newer = sorted(i for i in found if i > tracker)
    if newer:
        raise FormatError(
            f"{checkpoint_dir}: iterations [{_listing(newer)}] are newer than the tracker's "
            f"{tracker}: a save in progress or one that died; name the iteration: --step "
            f"{tracker} for the tracker's, or --step {newer[-1]} to read the newest anyway"
        )
    if tracker not in found:
        raise FormatError(
            f"{checkpoint_dir / TRACKER}: names iteration {tracker}, but "
            f"iteration_{tracker:08d} is missing (a re-save that died?); present: {present}; "
            "name the iteration to read with --step"
        )
    return found[tracker], StepChoice(choice.present, "the tracker's")
