"""A unified (merged) checkpoint described as a ``SourcePlan``: every tensor one whole block.

What ``reverse`` reads is what ``merge`` (or MindSpore's ``unified_safetensors``) writes, or any
folder of safetensors files holding whole MindSpore Transformers tensors, or a single file.
Described with the same type as a training output, it goes through the same model rules and the
same executor as ``convert``, so both commands give byte-identical Hugging Face files.
"""

from __future__ import annotations

from pathlib import Path

from ms2hf.errors import FormatError
from ms2hf.io.safetensors_reader import SafetensorsHeader
from ms2hf.io.sources.plan import UNIFIED, SourceFile, SourceParam, SourcePlan, whole_param
from ms2hf.io.sources.training_keys import sort_keys
from ms2hf.io.unified_format import PARAM_NAME_MAP, read_param_name_map

STEP = "unified"
"""A unified folder has no training step of its own."""


def _listed_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files to read, and the name map that must agree with them when there is one."""
    map_path = folder / PARAM_NAME_MAP
    if map_path.is_file():
        mapping = read_param_name_map(map_path)
        if not mapping:
            raise FormatError(f"{map_path}: names no parameter")
        files = sorted({folder / name for name in mapping.values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise FormatError(f"{map_path}: names {', '.join(missing)}, missing from {folder}")
        return files, mapping
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(
            f"{folder}: neither {PARAM_NAME_MAP} nor any *.safetensors file; expected a merged "
            "(unified) checkpoint folder"
        )
    return files, None


def _check_map(folder: Path, mapping: dict[str, str], found: dict[str, Path]) -> None:
    for name, file in mapping.items():
        if name not in found:
            raise FormatError(
                f"{folder / PARAM_NAME_MAP}: maps {name!r} to {file}, which has no such tensor"
            )
        if found[name].name != file:
            raise FormatError(
                f"{folder / PARAM_NAME_MAP}: maps {name!r} to {file}, "
                f"but it is in {found[name].name}"
            )
    unlisted = sorted(set(found) - set(mapping))
    if unlisted:
        raise FormatError(
            f"{found[unlisted[0]]}: holds {unlisted[0]!r}"
            + (f" and {len(unlisted) - 1} more tensors" if len(unlisted) > 1 else "")
            + f" that {PARAM_NAME_MAP} does not list; are the map and the parts from one run?"
        )


def plan_unified(path: str | Path) -> SourcePlan:
    """Plan reading a unified folder (through its ``param_name_map.json`` when present, else
    every ``*.safetensors`` in it) or one safetensors file."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: does not exist")
    files, mapping = _listed_files(path) if path.is_dir() else ([path], None)
    headers = [SafetensorsHeader(p) for p in files]
    params: dict[str, SourceParam] = {}
    scalars: dict[str, SourceParam] = {}
    found: dict[str, Path] = {}
    optimizer_bytes = scalar_bytes = 0
    for index, header in enumerate(headers):
        for name in header.tensors:
            if name in found:
                raise FormatError(
                    f"{header.path}: tensor {name!r} is also in {found[name]}; a unified "
                    "checkpoint holds each tensor once"
                )
            found[name] = header.path
        keys = sort_keys(header.tensors)
        optimizer_bytes += keys.optimizer_bytes
        scalar_bytes += keys.scalar_bytes
        for info in keys.scalars:
            scalars[info.name] = whole_param(header.path, index, info)
        for info in keys.params:
            params[info.name] = whole_param(header.path, index, info)
    if mapping is not None:
        _check_map(path, mapping, found)
    return SourcePlan(
        step=STEP,
        files=tuple(SourceFile(i, 0, h.path, h.metadata) for i, h in enumerate(headers)),
        params=params,
        scalars=scalars,
        remove_redundancy=False,
        num_stages=1,
        optimizer_bytes=optimizer_bytes,
        scalar_bytes=scalar_bytes,
        source_format=UNIFIED,
        root=path,
    )
