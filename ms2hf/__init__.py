"""ms2hf: MindSpore Transformers Qwen3 training checkpoints -> Hugging Face, in one streaming pass.

The public names are imported on first use (PEP 562), so that ``import ms2hf.cli`` loads only
what the command it runs needs: start-up time is a visible part of converting a small model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "convert": "ms2hf.api",
    "inspect": "ms2hf.api",
    "Ms2hfError": "ms2hf.errors",
    "ConvertOptions": "ms2hf.commands.convert",
    "ConvertReport": "ms2hf.commands.convert",
    "InspectReport": "ms2hf.commands.inspect",
}

__all__ = [
    "ConvertOptions",
    "ConvertReport",
    "InspectReport",
    "Ms2hfError",
    "__version__",
    "convert",
    "inspect",
]

if TYPE_CHECKING:
    from ms2hf.api import convert, inspect
    from ms2hf.commands.convert import ConvertOptions, ConvertReport
    from ms2hf.commands.inspect import InspectReport
    from ms2hf.errors import Ms2hfError


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ms2hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
