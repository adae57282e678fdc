from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ms2hf.io.dtypes import to_numpy
from ms2hf.io.safetensors_reader import SafetensorsHeader

DATA = Path(__file__).parent / "data"
DENSE_FIXTURES = ["tiny_fp32", "tiny_bf16_dedup", "tiny_fp32_dp2tp2pp2_opt", "tiny_tied_fp32_tp2pp2"]
MOE_FIXTURES = ["moe_fp32_dp2tp2pp2_ep2"]


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, BF16 included, read independently of ms2hf's executor."""
    header = SafetensorsHeader(path)
    raw = path.read_bytes()
    out = {}
    for name, info in header.tensors.items():
        dtype = to_numpy(info.dtype)
        out[name] = np.frombuffer(raw, dtype, info.nbytes // dtype.itemsize, info.start).reshape(info.shape)
    return out


def load_hf_dir(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_tensors(f))
    return out


@pytest.fixture(params=DENSE_FIXTURES)
def dense_fixture(request: pytest.FixtureRequest) -> Path:
    return DATA / request.param
