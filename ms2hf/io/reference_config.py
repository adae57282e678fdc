"""A Hugging Face ``config.json`` given as a reference, under the names config.json uses.

The weights decide every size; a reference config supplies what they cannot tell (norm epsilon,
rope theta and scaling, token ids, context length). Its sizes are returned too, so that they are
checked against the weights like any other given value rather than silently ignored.

transformers 5 saves rope settings only inside ``rope_parameters`` while older releases save
``rope_theta`` and ``rope_scaling``; both spellings are folded into the old names here, and the
config writer derives ``rope_parameters`` from them again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ms2hf.errors import FormatError

NOT_TAKEN = frozenset(
    {"architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "auto_map"}
)
"""Entries the run decides itself (class from the weights, dtype from ``--dtype``)."""
ROPE_PARAMETERS = "rope_parameters"
ALIASES = {"num_local_experts": "num_experts"}
"""transformers 5 saves Qwen3-MoE's expert count under another name; it is checked all the same."""


def read_reference_config(path: str | Path) -> dict[str, tuple[Any, str]]:
    """``{config name: (value, where it came from)}`` for every entry of the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read the reference config: {e.strerror or e}") from e
    except ValueError as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: expected a JSON object (a Hugging Face config.json)")
    origin = f"reference {path.name}"
    out = {
        ALIASES.get(key, key): (value, f"{origin}: {key}")
        for key, value in doc.items()
        if key not in NOT_TAKEN and key != ROPE_PARAMETERS
    }
    out.update(_rope_entries(doc, out, path, origin))
    return out


def _rope_entries(
    doc: dict[str, Any], flat: dict[str, tuple[Any, str]], path: Path, origin: str
) -> dict[str, tuple[Any, str]]:
    """``rope_theta`` and ``rope_scaling`` read out of ``rope_parameters``, when it is there."""
    rope = doc.get(ROPE_PARAMETERS)
    if rope is None:
        return {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise FormatError(
            f"{path}: {ROPE_PARAMETERS} must be one flat object such as "
            '{"rope_type": "default", "rope_theta": 1000000.0}; per-layer-type rope settings are '
            "not used by Qwen3"
        )
    out: dict[str, tuple[Any, str]] = {}
    theta = rope.get("rope_theta")
    if theta is not None:
        if "rope_theta" in flat and flat["rope_theta"][0] != theta:
            raise FormatError(
                f"{path}: rope_theta = {flat['rope_theta'][0]!r} and "
                f"{ROPE_PARAMETERS}.rope_theta = {theta!r} disagree"
            )
        out["rope_theta"] = (theta, f"{origin}: {ROPE_PARAMETERS}.rope_theta")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default" and not doc.get(
        "rope_scaling"
    ):
        out["rope_scaling"] = (scaling, f"{origin}: {ROPE_PARAMETERS}")
    return out
