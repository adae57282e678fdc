"""Files read a few threads ahead come back in order, and a failing read is raised at its
file's turn, after every file before it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ms2hf.io.read_ahead import BATCH, read_in_order


def test_results_come_in_order_and_a_failure_at_its_turn() -> None:
    paths = [Path(str(i)) for i in range(7 * BATCH + 5)]
    assert list(read_in_order(paths, lambda p: int(p.name))) == list(range(len(paths)))

    def read(path: Path) -> int:
        if path.name in ("37", "90"):
            raise OSError(f"cannot read {path}")
        return int(path.name)

    got: list[int] = []
    with pytest.raises(OSError, match="cannot read 37"):
        got.extend(read_in_order(paths, read))
    assert got == list(range(37))
