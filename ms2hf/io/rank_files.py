"""Finding each rank's checkpoint file for one training step.

Layout: ``checkpoint/rank_N/{prefix}_rank_N-{epoch}_{step}.safetensors``. A folder may hold several
steps; the prefix is whatever the yaml said, so only the rank folder and the suffix are trusted.
"""

from __future__ import annotations

import re
from pathlib import Path

from ms2hf.errors import FormatError

_RANK_DIR = re.compile(r"^rank_(\d+)$")
_STEP = re.compile(r"-(\d+)_(\d+)\.safetensors$")


def find_rank_dirs(checkpoint_dir: str | Path) -> dict[int, Path]:
    """``rank_N`` folders by rank, checked to be exactly 0..W-1."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FormatError(f"{root}: checkpoint folder does not exist or is not a folder")
    ranks = {
        int(m.group(1)): p
        for p in root.iterdir()
        if p.is_dir() and (m := _RANK_DIR.match(p.name))
    }
    if not ranks:
        raise FormatError(f"{root}: no rank_N folders (expected rank_0, rank_1, ...)")
    if max(ranks) >= len(ranks):
        # Bounded by the folders found, not by the largest number (a stray rank_99999999).
        missing = [r for r in range(min(max(ranks), len(ranks) + 8)) if r not in ranks][:8]
        total = max(ranks) + 1 - len(ranks)
        names = ", ".join(f"rank_{r}" for r in missing) + (" ..." if total > len(missing) else "")
        raise FormatError(
            f"{root}: rank folders {names} are missing (found {len(ranks)} of {max(ranks) + 1})"
        )
    return dict(sorted(ranks.items()))


def _steps(rank_dir: Path) -> dict[str, list[Path]]:
    files = list(rank_dir.iterdir())
    if any(p.suffix == ".ckpt" for p in files) and any(p.suffix == ".safetensors" for p in files):
        raise FormatError(
            f"{rank_dir}: holds both .ckpt and .safetensors checkpoints; keep one format per folder"
        )
    steps: dict[str, list[Path]] = {}
    for p in files:
        m = _STEP.search(p.name)
        if m is not None:
            steps.setdefault(f"{m.group(1)}_{m.group(2)}", []).append(p)
    return steps


def _step_key(step: str) -> tuple[int, int]:
    epoch, sub = step.split("_")
    return int(epoch), int(sub)


def select_step(rank_dirs: dict[int, Path], step: str | None = None) -> tuple[str, dict[int, Path]]:
    """The chosen step and each rank's file for it; the newest step every rank has by default."""
    per_rank = {rank: _steps(d) for rank, d in rank_dirs.items()}
    if step is None:
        common = set.intersection(*(set(s) for s in per_rank.values()))
        if not common:
            empty = [r for r, s in per_rank.items() if not s]
            where = (
                f"rank_{empty[0]} holds no '*-<epoch>_<step>.safetensors' file"
                if empty
                else "no step is present in every rank folder"
            )
            raise FormatError(f"{rank_dirs[min(rank_dirs)].parent}: {where}")
        step = max(common, key=_step_key)
    chosen: dict[int, Path] = {}
    for rank, steps in per_rank.items():
        files = steps.get(step, [])
        if not files:
            raise FormatError(
                f"{rank_dirs[rank]}: no file for step {step} (expected '*-{step}.safetensors'; "
                f"this folder has steps {sorted(steps, key=_step_key) or 'none'})"
            )
        if len(files) > 1:
            raise FormatError(
                f"{rank_dirs[rank]}: {len(files)} files match step {step}: "
                f"{', '.join(sorted(p.name for p in files))}; remove all but one"
            )
        chosen[rank] = files[0]
    return step, chosen
