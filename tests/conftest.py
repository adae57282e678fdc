from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings

from ms2hf.cli import main
from ms2hf.commands.merge import MergeOptions, merge
from tests.oracle.files import read_tensors

# Property and fuzz tests: derandomized by default, so a CI run is the same run every time and
# a failure reproduces; HYPOTHESIS_PROFILE=thorough explores with fresh random examples, many more
# of them (``examples`` scales each test's count), for a run on demand.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("thorough", derandomize=False, deadline=None)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
THOROUGH_FACTOR = 20


def examples(n: int) -> int:
    """A property test's example count: ``n`` in CI, ``THOROUGH_FACTOR`` times more on demand."""
    return n * THOROUGH_FACTOR if PROFILE == "thorough" else n


DATA = Path(__file__).parent / "data"
CONFIGS = Path(__file__).parent / "configs"
"""Stand-ins for users' training yamls and reference configs (tests/configs/README.md)."""
DATA_CKPT2 = Path(__file__).parent / "data-ckpt2"
CKPT2_TWINS = {
    "tiny_fp32_dp2tp2pp2_opt": "tiny_fp32_dp2tp2pp2_opt",
    "tiny_fp32_dp2tp2pp2_opt_dedup": "tiny_fp32_dp2tp2pp2_opt",
    "tiny_tied_fp32_tp2pp2_dedup": "tiny_tied_fp32_tp2pp2",
    "moe_fp32_dp2tp2pp2_ep2_dedup": "moe_fp32_dp2tp2pp2_ep2",
}
"""Each genuine Checkpoint 2.0 fixture and the legacy fixture of the same run (its manifest's
``source``)."""
DENSE_FIXTURES = [
    "tiny_fp32",
    "tiny_bf16_dedup",
    "tiny_fp32_dp2tp2pp2_opt",
    "tiny_tied_fp32_tp2pp2",
]
MOE_FIXTURES = ["moe_fp32_dp2tp2pp2_ep2"]
DATA_LORA = Path(__file__).parent / "data-lora"
LORA_FIXTURES = ["tiny_lora_fp32_tp2pp2", "moe_lora_fp32_dp2tp2pp2_ep2"]
"""The genuine LoRA fine-tunes: a dense Qwen3 and a Qwen3-MoE."""
EXPECTED_DTYPE = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, BF16 included, read by the ``safetensors`` library
    itself (``tests/oracle/files.py``), not by ms2hf's reader."""
    return read_tensors(path)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file a user or loader sees (ms2hf's hidden run record is about the run, not output)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def every_file(folder: Path) -> dict[str, bytes]:
    """Every file, hidden ones too (a run record, or a temporary file that must be gone)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def load_hf_dir(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_tensors(f))
    return out


def assert_matches_ground_truth(out: Path, fixture: Path, dtype: str) -> None:
    """The converted folder holds exactly the fixture's ground-truth tensors, cast as ``dtype``
    says (``source`` keeps them), bit for bit."""
    truth = load_tensors(fixture / "ground_truth" / "hf_model.safetensors")
    if dtype != "source":
        truth = {name: want.astype(EXPECTED_DTYPE[dtype]) for name, want in truth.items()}
    assert_same_tensors(load_hf_dir(out), truth)


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same tensor names, and each tensor of the same dtype and shape, bit for bit."""
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert g.tobytes() == w.tobytes(), name


@pytest.fixture(params=DENSE_FIXTURES)
def dense_fixture(request: pytest.FixtureRequest) -> Path:
    return DATA / request.param


@pytest.fixture(scope="session")
def unified_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """A fixture's unified (merged) folder, in several parts, made once per session: read it,
    never change it (copy it first)."""
    done: dict[Path, Path] = {}

    def get(fixture: Path) -> Path:
        if fixture not in done:
            out = tmp_path_factory.mktemp(f"unified-{fixture.name}")
            options = MergeOptions(part_size=200_000, progress=False)
            report = merge(fixture / "checkpoint", fixture / "strategy", out, options)
            done[fixture] = report.output_dir
        return done[fixture]

    return get


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` configures the ms2hf logger for a terminal (its own handler, no propagation);
    every test that runs the command line leaves it as the next test expects."""
    logger = logging.getLogger("ms2hf")
    state = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = state


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    """``ms2hf ARGV...`` in-process: its exit status and what it printed to stderr."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def fails(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    """``ms2hf ARGV... -q`` must keep the error contract (exit status 2, one line, no
    traceback): that line."""
    code, err = run_cli(capsys, *argv, "-q")
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert "Traceback" not in line
    return line


def fitting_tokens(name: str, dest: Path) -> Path:
    """``tests/configs/NAME`` with its token ids replaced by ids the tiny model's vocabulary
    has (the genuine ones are past it), everything else as it is; written to ``dest``."""
    text = (CONFIGS / name).read_text()
    for key, token in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        text = re.sub(rf'("?{key}"?:\s*)\d+', rf"\g<1>{token}", text)
    dest.write_text(text)
    return dest
