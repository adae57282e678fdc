"""ms2hf: MindSpore Transformers Qwen3 training checkpoints -> Hugging Face, in one streaming pass."""

from ms2hf.errors import Ms2hfError
from ms2hf.pipeline.convert import ConvertOptions, ConvertReport, convert

__version__ = "0.1.0"

__all__ = ["ConvertOptions", "ConvertReport", "Ms2hfError", "__version__", "convert"]
