"""``--part I/N``: one of N jobs writing a share of a run's files, for hosts without Ray.

A scheduler array (Slurm, PBS, a shell loop over hosts) starts N jobs with the same command and
``--part 1/N`` ... ``--part N/N``; each plans the whole run (planning reads headers only, so that
is cheap) and writes only its own files, into the one shared output folder. The split depends
on the plan alone, so every job computes the same one: the files in plan order, cut into N runs
of consecutive files of about equal bytes. The same command without ``--part`` then finishes:
it checks what the parts wrote, writes whatever is missing, then the small files and the index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ms2hf.errors import Ms2hfError
from ms2hf.pipeline.plan import PlannedFile

_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """Part ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        valid = all(
            isinstance(v, int) and not isinstance(v, bool) for v in (self.index, self.count)
        )
        if not valid or not 1 <= self.index <= self.count:
            raise Ms2hfError(
                f"part {self.index}/{self.count}: expected I/N with 1 <= I <= N, e.g. 2/8"
            )

    @classmethod
    def parse(cls, text: str) -> Part:
        m = _PART.match(text)
        if m is None:
            raise Ms2hfError(f"--part {text!r}: expected I/N (1-based), e.g. --part 2/8")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def files(self, files: Sequence[PlannedFile]) -> list[PlannedFile]:
        """This part's files: those whose middle byte falls in its N-th of the run's bytes."""
        return [f for f, part in zip(files, split(files, self.count)) if part == self.index]


def split(files: Sequence[PlannedFile], count: int) -> list[int]:
    """The part (1-based) of each file: consecutive files, about ``total / count`` bytes each.
    A file belongs to the part where its middle byte lies, so parts differ by at most one
    file's bytes from an even split; with more parts than files, some parts are empty."""
    sizes = [max(1, f.nbytes) for f in files]
    total = sum(sizes)
    parts: list[int] = []
    before = 0
    for size in sizes:
        middle2 = 2 * before + size  # twice the middle byte's offset, to stay in integers
        parts.append(min(count, middle2 * count // (2 * total) + 1))
        before += size
    return parts
