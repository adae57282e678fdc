"""Checks on the bytes a run moves: NaN and inf in what is written, agreement of replicas.

Non-finite weights are found as they are written, for a small fraction of the copy's cost. A
non-finite weight makes a model generate garbage, and a cast can make one (fp32 values above
65504 overflow fp16). The check runs on every output band after the cast, so it sees exactly what
is written. It tests bit patterns, not values: a float is NaN or inf exactly when its exponent
bits are all ones, i.e. when its magnitude bits reach the pattern of +inf. One integer pass per
chunk (mask, then max) decides that for every float dtype alike, BF16 included, where numpy's own
``isfinite`` runs through a slow generic loop.

``--check-replicas``: a save with redundancy has every rank of a replica group write the same
block, and a conversion reads only the lowest rank's copy. Copies that differ mean the rank files
come from different saves, or one of them is damaged, and then the copy read may be the wrong one;
this check reads every copy to make sure. It costs a read of all the replicas, which is why it is
a flag. Byte ranges are compared in bounded chunks (``first_difference``), as ``verify`` does.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ms2hf.errors import LayoutError, ModelError
from ms2hf.io.dtypes import nbytes as tensor_nbytes
from ms2hf.io.dtypes import to_numpy
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.sources.plan import Block, SourceParam, SourcePlan
from ms2hf.pipeline.engine.assemble import assembled_bands, fit_row
from ms2hf.pipeline.engine.budget import MAX_BAND_BYTES
from ms2hf.pipeline.plan import PlannedTensor
from ms2hf.transforms.pieces import OutputTensor, copy

log = logging.getLogger("ms2hf")

_BYTE = np.dtype(np.uint8)

# dtype -> (unsigned view, magnitude mask, smallest non-finite magnitude)
_PATTERNS: dict[str, tuple[type[np.unsignedinteger], int, int]] = {
    "F64": (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F32": (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
    "F8_E5M2": (np.uint8, 0x7F, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F, 0x7F),  # no inf; NaN is S.1111.111
}
CHUNK_ELEMENTS = 1 << 18
"""Small enough for the scratch chunk to stay in cache."""


def has_nonfinite(values: np.ndarray, dtype: str) -> bool:
    """Whether ``values`` (of safetensors dtype ``dtype``) hold a NaN or an inf."""
    pattern = _PATTERNS.get(dtype)
    if pattern is None:
        return False  # integers and booleans are always finite
    unsigned, mask, threshold = pattern
    bits = values.reshape(-1).view(unsigned)
    scratch = np.empty(min(CHUNK_ELEMENTS, bits.size), unsigned)
    for at in range(0, bits.size, CHUNK_ELEMENTS):
        chunk = bits[at : at + CHUNK_ELEMENTS]
        part = scratch[: chunk.size]
        np.bitwise_and(chunk, unsigned(mask), out=part)
        if part.max() >= threshold:
            return True
    return False


def source_has_nonfinite(
    tensor: OutputTensor, params: Mapping[str, SourceParam], files: MappedFiles
) -> bool:
    """Whether the source rows of ``tensor`` (and of a fine-tuned weight's LoRA) already hold
    NaN or inf, before any cast, scale or merge: read only when a written band was found
    non-finite, to say which it was."""
    parts = [dataclasses.replace(tensor, scale=1.0, delta=None)]
    if tensor.delta is not None:
        a = params[tensor.delta.a]
        parts += [tensor.delta.b, copy(a.name, a.name, a.shape)]
    for part in parts:
        param = params[part.source]
        dtype = to_numpy(param.dtype)
        buffer = fit_row(np.empty(MAX_BAND_BYTES, np.uint8), part, dtype)
        bands = assembled_bands(part, dtype, buffer, params, files)
        if any(has_nonfinite(band, param.dtype) for _, band, _ in bands):
            return True
    return False


F16_MAX = 65504.0


@dataclass(frozen=True)
class FiniteCheck:
    """The band check of every write task: warn once per tensor, or fail when ``strict``. It
    tells NaN or inf already in the training checkpoint from values the cast made infinite."""

    strict: bool
    _warned: set[str] = field(default_factory=set, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __reduce__(self) -> tuple[type[FiniteCheck], tuple[bool]]:
        """A fresh check on another host (a Ray task): what was warned here stays here."""
        return FiniteCheck, (self.strict,)

    def clean(self, dtype: str, values: np.ndarray) -> bool:
        """Whether every band cut from ``values`` (of ``dtype``) passes: the engine checks a
        staged parameter once instead of each of its tensors, and each of them only if not."""
        return not has_nonfinite(values, dtype)

    def __call__(
        self, planned: PlannedTensor, band: np.ndarray, in_source: Callable[[], bool]
    ) -> None:
        if not has_nonfinite(band, planned.dtype):
            return
        tensor = planned.tensor
        with self._lock:
            if tensor.name in self._warned and not self.strict:
                return
            self._warned.add(tensor.name)
        what = f"tensor {tensor.name!r} (from parameter {tensor.source!r}"
        if in_source():
            what += ") holds NaN or inf already in the training checkpoint (training diverged?)"
        else:
            limit = f" (largest F16 value: {F16_MAX:g})" if planned.dtype == "F16" else ""
            scaled = f" after the routing scale {tensor.scale}" if tensor.scale != 1.0 else ""
            what += (
                f"): finite values beyond {planned.dtype}'s range{limit}{scaled} became inf in "
                f"the cast to {planned.dtype}; --dtype bf16 keeps the training dtype's range"
            )
        if self.strict:
            raise ModelError(f"{what}; --strict refuses non-finite weights")
        log.warning("warning: %s (--strict makes this an error)", what)


CHUNK_BYTES = 4 * 2**20
"""The comparison's scratch is one boolean per byte of a chunk, never of a whole tensor."""


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """The index of the first byte where two equally long uint8 arrays differ, or None."""
    for at in range(0, a.size, CHUNK_BYTES):
        x, y = a[at : at + CHUNK_BYTES], b[at : at + CHUNK_BYTES]
        if not np.array_equal(x, y):
            return at + int(np.flatnonzero(x != y)[0])
    return None


def _block_bytes(mapped: MappedFiles, param: SourceParam, block: Block) -> np.ndarray:
    nbytes = tensor_nbytes(param.dtype, block.shape)
    return mapped.view(block.path, block.start, _BYTE, (nbytes,))


def check_replicas(source: SourcePlan, mapped: MappedFiles) -> int:
    """Compare every replica with the block it copies; the number compared."""
    compared = 0
    for param in source.params.values():
        primary = {b.offsets: b for b in param.blocks}
        for replica in param.replicas:
            block = primary[replica.offsets]
            read = _block_bytes(mapped, param, block)
            at = first_difference(read, _block_bytes(mapped, param, replica))
            if at is not None:
                raise LayoutError(
                    f"parameter {param.name!r}: rank {replica.rank} ({replica.path}) and rank "
                    f"{block.rank} ({block.path}) hold different bytes for its block at offsets "
                    f"{list(block.offsets)} (first at byte {at} of {read.size}); replicas must "
                    "agree, "
                    "so the rank files come from different saves or one is damaged"
                )
            compared += 1
    if compared:
        log.info("--check-replicas: %d replica block(s) agree with the blocks read", compared)
    else:
        log.info("--check-replicas: no replicas to compare (the save removed redundancy)")
    return compared
