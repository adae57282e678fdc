"""``--check-replicas``: every further copy of a block must hold the bytes of the copy read.

A save with redundancy has every rank of a replica group write the same block, and a conversion
reads only the lowest rank's copy. Copies that differ mean the rank files come from different
saves, or one of them is damaged, and then the copy read may be the wrong one; this check reads
every copy to make sure. It costs a read of all the replicas, which is why it is a flag.
"""

from __future__ import annotations

import logging

import numpy as np

from ms2hf.errors import LayoutError
from ms2hf.io.dtypes import nbytes as tensor_nbytes
from ms2hf.io.mapped import MappedFiles
from ms2hf.pipeline.compare import first_difference
from ms2hf.pipeline.source_plan import Block, SourceParam, SourcePlan

log = logging.getLogger("ms2hf")

_BYTE = np.dtype(np.uint8)


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
                    f"{list(block.offsets)} (first at byte {at} of {read.size}); replicas must agree, "
                    "so the rank files come from different saves or one is damaged"
                )
            compared += 1
    if compared:
        log.info("--check-replicas: %d replica block(s) agree with the blocks read", compared)
    else:
        log.info("--check-replicas: no replicas to compare (the save removed redundancy)")
    return compared
