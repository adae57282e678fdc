"""The I/O floor: the least a conversion must do, done by a plain program.

It reads exactly the model-parameter bytes ``convert`` reads (every block of the source plan,
from the same rank files) and writes exactly as many bytes as ``convert`` writes, into files of
the same sizes, each made durable with ``fsync`` before it is closed, as ``convert`` does. It
does no transform and no checksum. Reads go by ``preadv`` into reused buffers, in file order.

Two ways to schedule the same I/O, both measured, and the faster is the floor:

- ``sequential``: read a chunk, write its share of the output, repeat; ``fsync`` each file.
  The kernel writes back nothing until ``fsync`` (the dirty data is below its thresholds).
- ``overlapped``: one thread reads ahead while another writes, and each written chunk is
  handed to the disk at once (``ms2hf.io.writeback``, the same write-behind ``convert`` uses),
  so reading, writing and the disk all run at the same time.

Run as ``python -m benchmarks.floor PLAN.json MODE``; ``PLAN.json`` is made by ``floor_plan``.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from ms2hf.io.writeback import WriteBehind  # the package imports nothing else eagerly

CHUNK_BYTES = 16 * 2**20
MODES = ("sequential", "overlapped")


def floor_plan(reads: list[tuple[str, int, int]], writes: list[int], out_dir: Path) -> dict:
    """The floor's job: ``reads`` as (path, start, nbytes), ``writes`` as output file sizes."""
    return {
        "reads": sorted(reads),
        "writes": [[str(out_dir / f"floor-{i:05d}.bin"), n] for i, n in enumerate(writes)],
    }


def _chunks(reads: list[list]) -> Iterator[tuple[str, int, int]]:
    for path, start, nbytes in reads:
        for at in range(start, start + nbytes, CHUNK_BYTES):
            yield path, at, min(CHUNK_BYTES, start + nbytes - at)


class _Reader:
    """Reads chunks into reused buffers, keeping one file open at a time."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._fd = -1

    def read(self, path: str, at: int, view: memoryview) -> None:
        if path != self._path:
            self.close()
            self._fd = os.open(path, os.O_RDONLY)
            self._path = path
        got = 0
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], at + got)
            if not n:
                raise OSError(f"{path}: short read at {at + got}")
            got += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Writer:
    """The output stream: files of the planned sizes, one after another, each fsync'd."""

    def __init__(self, writes: list[list], write_behind: bool) -> None:
        self._files = iter(writes)
        self._write_behind = write_behind
        self._fd = -1
        self._left = 0
        self._position = 0
        self._behind: WriteBehind | None = None
        self.remaining = sum(n for _, n in writes)

    def _next_file(self) -> None:
        self._finish()
        path, self._left = next(self._files)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._position = 0
        self._behind = WriteBehind(self._fd) if self._write_behind else None

    def _finish(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def write(self, data: memoryview) -> None:
        while data:
            if self._left == 0:
                self._next_file()
            part = data[: self._left]
            n = os.pwrite(self._fd, part, self._position)
            if self._behind is not None:
                self._behind.written(self._position, n)
            self._position += n
            self._left -= n
            self.remaining -= n
            data = data[n:]

    def close(self) -> None:
        while self._left or self.remaining:
            self.write(memoryview(bytearray(min(CHUNK_BYTES, self.remaining or self._left))))
        self._finish()


def _share(total_in: int, total_out: int, done_in: int, done_out: int) -> int:
    """Output bytes due once ``done_in`` input bytes are read: proportional, exact at the end."""
    return total_out * done_in // total_in - done_out if total_in else total_out


def _read_in_turn(reads: list[list], reader: _Reader) -> Iterator[memoryview]:
    """Each chunk read into one buffer when the writer is done with the previous one."""
    buffer = memoryview(bytearray(CHUNK_BYTES))
    for path, at, n in _chunks(reads):
        reader.read(path, at, buffer[:n])
        yield buffer[:n]


def _read_ahead(reads: list[list], reader: _Reader, depth: int = 4) -> Iterator[memoryview]:
    """Chunks read by a thread of their own, up to ``depth`` ahead of the writer."""
    free: queue.Queue[memoryview] = queue.Queue()
    full: queue.Queue[tuple[memoryview, int] | None] = queue.Queue()
    for _ in range(depth):
        free.put(memoryview(bytearray(CHUNK_BYTES)))
    failed: list[OSError] = []

    def produce() -> None:
        try:
            for path, at, n in _chunks(reads):
                buffer = free.get()
                reader.read(path, at, buffer[:n])
                full.put((buffer, n))
        except OSError as e:
            failed.append(e)
        finally:
            full.put(None)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    while (item := full.get()) is not None:
        buffer, n = item
        yield buffer[:n]
        free.put(buffer)
    thread.join()
    if failed:
        raise failed[0]


def run(plan: dict, mode: str) -> None:
    reads, writes = plan["reads"], plan["writes"]
    total_in = sum(n for _, _, n in reads)
    writer = _Writer(writes, write_behind=mode == "overlapped")
    total_out = writer.remaining
    reader = _Reader()
    chunks = _read_in_turn(reads, reader) if mode == "sequential" else _read_ahead(reads, reader)
    done_in = done_out = 0
    for chunk in chunks:
        done_in += len(chunk)
        due = min(len(chunk), _share(total_in, total_out, done_in, done_out))
        writer.write(chunk[:due])
        done_out += due
    reader.close()
    writer.close()


def main(argv: list[str]) -> int:
    plan_path, mode = argv
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}")
    run(json.loads(Path(plan_path).read_text()), mode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
