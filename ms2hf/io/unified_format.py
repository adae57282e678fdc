"""The unified checkpoint folder MindSpore's ``unified_safetensors`` writes
(``docs/old-tools.md#unified-folder``).

``part{i}.safetensors`` (0-based, as MindSpore numbers them) hold whole parameters in their
training dtypes, ``param_name_map.json`` says which part holds each, ``hyper_param.safetensors``
holds the training scalars. MindSpore's loaders and the old reverse tool find tensors through
the map, so ``merge`` writes it and ``reverse`` reads it in both forms the old tools accept.
"""

from __future__ import annotations

from pathlib import Path

from ms2hf.errors import FormatError
from ms2hf.io.config_files import read_json_object

PARAM_NAME_MAP = "param_name_map.json"
HYPER_PARAM = "hyper_param.safetensors"
METADATA = {"format": "ms"}


def part_name(index: int) -> str:
    return f"part{index}.safetensors"


def unified_dir(output_dir: Path, step: str) -> Path:
    """Where the old merge puts its result: ``{output_dir}/{step}_ckpt_convert/unified_safe``."""
    return output_dir / f"{step}_ckpt_convert" / "unified_safe"


def read_param_name_map(path: Path) -> dict[str, str]:
    """``{parameter: file name}`` from a map in either form: ``{"weight_map": {...}}`` (what
    ``unified_safetensors`` writes) or the bare mapping (what older tools wrote)."""
    doc = read_json_object(path, "a parameter name map")
    mapping = doc.get("weight_map", doc)
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise FormatError(
            f'{path}: expected {{"weight_map": {{name: file}}}} or {{name: file}}, '
            "mapping parameter names to safetensors file names"
        )
    return mapping
