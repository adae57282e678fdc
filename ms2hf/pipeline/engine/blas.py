"""One BLAS thread while the engine's workers run: the workers are the parallelism.

The engine's only BLAS call is the LoRA merge's product (``ms2hf.transforms.lora_merge``). Left
alone, OpenBLAS starts threads of its own for each product on top of the workers that already
keep every core busy, and the two pools take the cores from each other: converting the W-lora
benchmark workload warm with two workers took 6.5 s with OpenBLAS's threads, 2.8 s with one
(``benchmarks/``, ``--sections lora``). numpy has no call for this, so the OpenBLAS numpy loaded
is found among the process's mapped files and its own thread setting is used, as threadpoolctl
does. Where there is none (another BLAS, a system without ``/proc``), nothing changes but speed.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np  # noqa: F401  (loads the BLAS this module looks for)

Controls = tuple[Callable[[], int], Callable[[int], None]]

_NAMES = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)
"""The getter and setter of the thread count, by the names OpenBLAS builds export: numpy's
wheels (``scipy_openblas``, 64-bit integers), and a system OpenBLAS."""


def _mapped_openblas() -> list[str]:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            fields = (line.split(maxsplit=5) for line in maps)
            return sorted({f[5].strip() for f in fields if len(f) == 6 and "openblas" in f[5]})
    except OSError:
        return []


@functools.cache
def openblas_controls() -> Controls | None:
    """The thread count getter and setter of the OpenBLAS in this process, if there is one."""
    for path in _mapped_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _NAMES:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                get, put = getattr(lib, get_name), getattr(lib, set_name)
                get.restype, get.argtypes = ctypes.c_int, []
                put.restype, put.argtypes = None, [ctypes.c_int]
                return get, put
    return None


_lock = threading.Lock()
_holders = 0
_before = 0


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """OpenBLAS limited to one thread inside, its setting put back when the last of several
    overlapping users (write tasks on threads of one process) leaves."""
    global _holders, _before
    controls = openblas_controls()
    if controls is None:
        yield
        return
    get, put = controls
    with _lock:
        if _holders == 0:
            _before = get()
            put(1)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                put(_before)
