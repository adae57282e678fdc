"""The small files beside the shards: the index, config.json, tokenizer files, written atomically.

The index goes last: loaders find shards through it, so its presence means the set is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from ms2hf.errors import OutputError
from ms2hf.io.safetensors_writer import temporary_name

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
"""The one weight file of a model written unsharded."""
HF_SHARD = re.compile(r"^model(?:-\d{5}-of-\d{5})?\.safetensors$")
"""Every weight file name ``hf_shard_names`` gives."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""A PEFT adapter's one weight file (its config: ``io.config_files.RUN_ADAPTER_CONFIG``)."""
HF_METADATA = {"format": "pt"}
"""Every Hugging Face shard's ``__metadata__``, as transformers' own files carry
(``docs/hf-output.md#shards``)."""


def hf_shard_names(count: int) -> list[str]:
    """``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return [HF_SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


@contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """A file written under a temporary name, made durable, then renamed into place: a reader
    never sees it half written, and an existing file of that name stays whole until then."""
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: Path, doc: Any, newline: bool = True) -> None:
    """Indented by 2, as transformers writes; PEFT writes its adapter config without the final
    newline (``newline=False``)."""
    with _atomic(path) as f:
        f.write(json.dumps(doc, indent=2).encode("utf-8") + (b"\n" if newline else b""))


def copy_file(source: Path, path: Path) -> None:
    with _atomic(path) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


def index_document(
    weight_map: Mapping[str, str], total_size: int, total_parameters: int | None = None
) -> dict[str, Any]:
    metadata: dict[str, int] = {"total_size": total_size}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    return {"metadata": metadata, "weight_map": dict(weight_map)}
