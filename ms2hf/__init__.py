"""ms2hf: MindSpore Transformers Qwen3 training checkpoints -> Hugging Face, in one streaming pass."""

from ms2hf.api import convert, inspect
from ms2hf.errors import Ms2hfError
from ms2hf.pipeline.convert import ConvertOptions, ConvertReport
from ms2hf.pipeline.inspect import InspectReport

__version__ = "0.1.0"

__all__ = [
    "ConvertOptions",
    "ConvertReport",
    "InspectReport",
    "Ms2hfError",
    "__version__",
    "convert",
    "inspect",
]
