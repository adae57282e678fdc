"""The benchmark workloads, generated once with the project's own generator and cached.

A workload folder is trusted only when its stamp names the exact generator config it was made
from; anything else is regenerated, so a changed generator or config never measures stale files.
The generator is asked for the training output only, without the expected Hugging Face file
it can write beside it: the benchmark does not read it (tests check values), and writing it
would cost 3 GB of disk and time per workload.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ms2hf.generator import GeneratorConfig, MoeConfig, generate

STAMP = "benchmark-workload.json"

QWEN3_06B = {
    "hidden": 1024,
    "heads": 16,
    "groups": 8,
    "head_dim": 128,
    "ffn": 3072,
    "tied": False,
    "dtype": "fp32",
}
"""Qwen3-0.6B's sizes (untied), saved in fp32 with Adam states: workload W of the issue."""
VOCAB = 151936

SMALL = {
    "hidden": 256,
    "heads": 8,
    "groups": 4,
    "head_dim": 32,
    "ffn": 768,
    "tied": False,
    "dtype": "fp32",
}
"""The quick stand-ins' sizes: a smoke check of the harness in seconds, not figures."""


@dataclass(frozen=True)
class Workload:
    name: str
    config: GeneratorConfig
    description: str


def _workloads(
    dims: dict[str, object],
    layers: int,
    vocab: int,
    moe_layers: int,
    moe_vocab: int,
    moe_ffn: int,
    note: str,
) -> dict[str, Workload]:
    """W (TP2 x PP2), its DP2 + optimizer-sharding variant, two smaller models for scaling
    (layers and vocabulary shrink together, so the model bytes are about 1/4 and 1/2 of W), and
    M64: a Qwen3-MoE with 64 experts per layer over 4 expert-parallel ranks, shaped as
    Qwen3-30B-A3B at half width when ``dims`` are 0.6B's (4 KV groups, ``moe_ffn`` 384 for 768),
    each layer's grouped expert weights larger than the memory budget of the memcap runs."""

    def qwen(layers: int, vocab: int, **rest: object) -> GeneratorConfig:
        return GeneratorConfig(layers=layers, vocab=vocab, **{**dims, **rest})

    tp2pp2 = {"tp": 2, "pp": 2}
    sharded = {"tp": 2, "dp": 2, "pp": 2, "opt_shard": -1}
    moe = MoeConfig(experts=64, moe_ffn=moe_ffn, top_k=8, ep=4)
    return {
        w.name: w
        for w in (
            Workload("W", qwen(layers, vocab, **tp2pp2), f"{note}fp32 + Adam, TP2 x PP2"),
            Workload(
                "W-dp2-opt",
                qwen(layers, vocab, **sharded),
                f"{note}W as TP2 x DP2 x PP2 with optimizer sharding (-1)",
            ),
            Workload("S8", qwen(layers * 2 // 7, vocab // 4, **tp2pp2), f"{note}about 1/4 of W"),
            Workload("S14", qwen(layers // 2, vocab // 2, **tp2pp2), f"{note}about 1/2 of W"),
            Workload(
                "M64",
                qwen(moe_layers, moe_vocab, groups=4, moe=moe, **sharded),
                f"{note}Qwen3-MoE, {moe_layers} layers x 64 experts, fp32 + Adam, "
                "TP2 x DP2 x PP2, EP4, optimizer sharding",
            ),
        )
    }


def full_workloads() -> dict[str, Workload]:
    """The issues' workloads: W of Qwen3-0.6B's sizes (28 layers, S8 and S14 with 8 and 14)."""
    return _workloads(QWEN3_06B, 28, VOCAB, 6, VOCAB, 384, "Qwen3-0.6B dims: ")


def quick_workloads() -> dict[str, Workload]:
    """Small stand-ins with the same roles and names, for a smoke check of the harness."""
    return _workloads(SMALL, 8, 32768, 2, 8192, 64, "quick: ")


def _stamp(config: GeneratorConfig) -> dict[str, object]:
    """As read back from the stamp file: through JSON, where tuples become lists."""
    return json.loads(json.dumps({"generator_config": dataclasses.asdict(config)}))


def ensure(workload: Workload, cache: Path, log: Callable[[str], None] = print) -> Path:
    """The workload's training output folder under ``cache``, generated when missing or stale."""
    root = cache / "workloads" / workload.name
    stamp = root / STAMP
    try:
        if json.loads(stamp.read_text()) == _stamp(workload.config):
            return root
    except (OSError, ValueError):
        pass
    if root.exists():
        shutil.rmtree(root)
    log(f"generating workload {workload.name} ({workload.description}) into {root} ...")
    started = time.perf_counter()
    generate(workload.config, root, expected=False)
    stamp.write_text(json.dumps(_stamp(workload.config), indent=1))
    log(f"  generated in {time.perf_counter() - started:.0f} s")
    return root
