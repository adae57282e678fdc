"""Every training-output format, told apart by what is on disk, planned as one ``SourcePlan``.

A user points at a training output (the folder holding ``checkpoint/``), at ``checkpoint/``
itself, or at one ``iteration_XXXXXXXX/`` folder. What is there tells the format: ``rank_N/``
folders are the legacy layout, read with the ``strategy/`` folder beside ``checkpoint/``
(``docs/legacy-format.md``); ``iteration_*`` folders and the tracker are Checkpoint 2.0
(``docs/checkpoint2.md``). ``convert``, ``inspect``, ``verify --against`` and ``merge`` all come
through here, so they accept the same paths and say the same about what they found.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ms2hf.errors import FormatError
from ms2hf.io.sources.iterations import ITERATION_DIR, TRACKER
from ms2hf.io.sources.plan import CKPT2, LEGACY, SourcePlan

_RANK_DIR = re.compile(r"rank_\d+")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Location:
    """Where a training output's checkpoint is, and in which format."""

    source_format: str
    checkpoint_dir: Path
    """The rank folders' parent (legacy) or the iteration folders' (Checkpoint 2.0)."""
    strategy_dir: Path | None = None
    """Legacy only: the strategy files."""
    iteration_dir: Path | None = None
    """Checkpoint 2.0: the one iteration folder given, if one was."""


def _holds(folder: Path) -> tuple[bool, bool]:
    """Whether ``folder`` holds legacy rank folders, and Checkpoint 2.0 iterations."""
    legacy = ckpt2 = False
    try:
        with os.scandir(folder) as listing:  # is_dir from the listing: no stat per entry
            entries = list(listing)
    except OSError:
        return False, False
    for e in entries:
        legacy |= bool(_RANK_DIR.fullmatch(e.name)) and e.is_dir()
        ckpt2 |= e.name == TRACKER or (bool(ITERATION_DIR.fullmatch(e.name)) and e.is_dir())
    return legacy, ckpt2


def is_training_output(path: Path) -> bool:
    """A training output, its ``checkpoint/`` folder, or one iteration folder."""
    if not path.is_dir():
        return False
    if ITERATION_DIR.fullmatch(path.name) or (path / "checkpoint").is_dir():
        return True
    return any(_holds(path))


def locate(
    path: PathLike | None,
    *,
    checkpoint_dir: PathLike | None = None,
    strategy_dir: PathLike | None = None,
    step: str | None = None,
) -> Location:
    """Find the checkpoint and its format from ``path`` (or the explicit folders)."""
    root = Path(path) if path is not None else None
    if checkpoint_dir is None:
        if root is None:
            raise FormatError("give a training output folder, or --checkpoint-dir")
        if not root.is_dir():
            raise FormatError(
                f"{root}: training output folder does not exist (expected a folder holding "
                "checkpoint/, the checkpoint/ folder itself, or an iteration_XXXXXXXX/ folder)"
            )
        if ITERATION_DIR.fullmatch(root.name):
            return Location(CKPT2, root.parent, iteration_dir=root)
        checkpoint = root / "checkpoint" if (root / "checkpoint").is_dir() else root
    else:
        checkpoint = Path(checkpoint_dir)
        if not checkpoint.is_dir():
            raise FormatError(f"{checkpoint}: checkpoint folder does not exist or is not a folder")
        if ITERATION_DIR.fullmatch(checkpoint.name):
            return Location(CKPT2, checkpoint.parent, iteration_dir=checkpoint)
    legacy, ckpt2 = _holds(checkpoint)
    if legacy and ckpt2 and strategy_dir is None and (step is None or "_" not in step):
        raise FormatError(
            f"{checkpoint}: holds both legacy rank_N folders and Checkpoint 2.0 iteration "
            "folders; name the iteration_XXXXXXXX folder itself, or pass --step EPOCH_STEP "
            "(or --strategy-dir) for the legacy save"
        )
    if legacy:
        return Location(LEGACY, checkpoint, _strategy(root, checkpoint, strategy_dir))
    if ckpt2:
        if strategy_dir is not None:
            raise FormatError(
                f"--strategy-dir {strategy_dir}: {checkpoint} is a Checkpoint 2.0 save, which has "
                "no strategy files (metadata.json describes the layout); leave it out"
            )
        return Location(CKPT2, checkpoint)
    raise FormatError(
        f"{checkpoint}: no training checkpoint here: expected rank_N folders (legacy, with "
        f"strategy/ beside) or iteration_XXXXXXXX folders and {TRACKER} (Checkpoint 2.0)"
    )


def _strategy(root: Path | None, checkpoint: Path, given: PathLike | None) -> Path:
    """``--strategy-dir``, else ``strategy/`` beside ``checkpoint/``."""
    if given is not None:
        return Path(given)
    candidate = checkpoint.parent / "strategy"
    if root is not None and (root / "checkpoint").is_dir():
        candidate = root / "strategy"
    if not candidate.exists():
        raise FormatError(
            f"{candidate}: does not exist; the legacy save in {checkpoint} (rank_N folders) "
            "needs its strategy files: pass --strategy-dir"
        )
    return candidate


def plan_training_output(
    path: PathLike | None,
    step: str | None = None,
    *,
    checkpoint_dir: PathLike | None = None,
    strategy_dir: PathLike | None = None,
) -> SourcePlan:
    """The source plan of a training output in either format (``found`` says what it is)."""
    where = locate(path, checkpoint_dir=checkpoint_dir, strategy_dir=strategy_dir, step=step)
    if where.source_format == LEGACY:
        from ms2hf.io.sources.legacy import plan_source

        assert where.strategy_dir is not None
        return plan_source(where.checkpoint_dir, where.strategy_dir, step)
    from ms2hf.io.sources.ckpt2 import plan_iteration
    from ms2hf.io.sources.iterations import choose_iteration

    folder, chosen = choose_iteration(where.checkpoint_dir, step, where.iteration_dir)
    return plan_iteration(folder, chosen)


def found(plan: SourcePlan) -> str:
    """What was found and which step is read, for the log of a command that converts it:
    ``checkpoint: a Checkpoint 2.0 save (iteration_00001000); steps present: 500, 1000; reading
    1000 (the tracker's)``."""
    what = "legacy rank folders" if plan.source_format == LEGACY else "a Checkpoint 2.0 save"
    present = ", ".join(plan.choice.present) if plan.choice else plan.step
    reason = f" ({plan.choice.reason})" if plan.choice else ""
    return f"{plan.root}: {what}; steps present: {present}; reading {plan.step}{reason}"
