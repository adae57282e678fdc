"""The benchmark workloads, generated once with the project's own generator and cached.

A workload folder is trusted only when its stamp names the exact generator config it was made
from; anything else is regenerated, so a changed generator or config never measures stale files.
The expected Hugging Face file the generator writes beside the rank files is deleted after
generation: the benchmark does not read it (tests check values), and it would cost 3 GB of disk.
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

QWEN3_30B_A3B_HALVED = {
    "hidden": 1024,
    "heads": 16,
    "groups": 4,
    "head_dim": 128,
    "ffn": 3072,
    "tied": False,
    "dtype": "fp32",
}
"""Qwen3-30B-A3B's shape at half its width (hidden 2048 -> 1024, 32 -> 16 heads, 4 KV groups,
expert FFN 768 -> 384), for the MoE workload: 64 experts per layer, each layer's grouped expert
weights (300 MB in fp32) larger than the memory budget of the memcap runs."""
MOE_64 = MoeConfig(experts=64, moe_ffn=384, top_k=8, ep=4)


@dataclass(frozen=True)
class Workload:
    name: str
    config: GeneratorConfig
    description: str


def full_workloads() -> dict[str, Workload]:
    """W (TP2 x PP2), its DP2 + optimizer-sharding variant, two smaller models for scaling
    (layers and vocabulary shrink together, so the model bytes are about 1/4, 1/2 and 1 of W),
    and M64, a Qwen3-MoE with 64 experts per layer split over 4 expert-parallel ranks."""

    def qwen(layers: int, vocab: int, **parallel: int) -> GeneratorConfig:
        return GeneratorConfig(layers=layers, vocab=vocab, **QWEN3_06B, **parallel)

    return {
        w.name: w
        for w in (
            Workload("W", qwen(28, VOCAB, tp=2, pp=2), "Qwen3-0.6B dims, fp32 + Adam, TP2 x PP2"),
            Workload(
                "W-dp2-opt",
                qwen(28, VOCAB, tp=2, dp=2, pp=2, opt_shard=-1),
                "W as TP2 x DP2 x PP2 with optimizer sharding (-1)",
            ),
            Workload("S8", qwen(8, VOCAB // 4, tp=2, pp=2), "8 layers, vocab/4 (about 1/4 of W)"),
            Workload(
                "S14", qwen(14, VOCAB // 2, tp=2, pp=2), "14 layers, vocab/2 (about 1/2 of W)"
            ),
            Workload(
                "M64",
                GeneratorConfig(
                    layers=6,
                    vocab=VOCAB,
                    **QWEN3_30B_A3B_HALVED,
                    tp=2,
                    dp=2,
                    pp=2,
                    opt_shard=-1,
                    moe=MOE_64,
                ),
                "Qwen3-MoE, 6 layers x 64 experts (Qwen3-30B-A3B at half width), fp32 + Adam, "
                "TP2 x DP2 x PP2, EP4, optimizer sharding",
            ),
        )
    }


def quick_workloads() -> dict[str, Workload]:
    """Small stand-ins with the same roles, for a smoke check of the harness (seconds)."""
    small = {
        "hidden": 256,
        "heads": 8,
        "groups": 4,
        "head_dim": 32,
        "ffn": 768,
        "tied": False,
        "dtype": "fp32",
    }

    def qwen(layers: int, vocab: int, **parallel: int) -> GeneratorConfig:
        return GeneratorConfig(layers=layers, vocab=vocab, **small, **parallel)

    return {
        w.name: w
        for w in (
            Workload("W", qwen(8, 32768, tp=2, pp=2), "quick: small Qwen3, TP2 x PP2"),
            Workload(
                "W-dp2-opt",
                qwen(8, 32768, tp=2, dp=2, pp=2, opt_shard=-1),
                "quick: TP2 x DP2 x PP2, optimizer sharding",
            ),
            Workload("S8", qwen(2, 8192, tp=2, pp=2), "quick: 1/4 size"),
            Workload("S14", qwen(4, 16384, tp=2, pp=2), "quick: 1/2 size"),
            Workload(
                "M64",
                GeneratorConfig(
                    layers=2,
                    vocab=8192,
                    **small,
                    tp=2,
                    dp=2,
                    pp=2,
                    opt_shard=-1,
                    moe=MoeConfig(experts=64, moe_ffn=64, top_k=8, ep=4),
                ),
                "quick: small Qwen3-MoE, 64 experts, TP2 x DP2 x PP2, EP4",
            ),
        )
    }


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
    generated = generate(workload.config, root)
    generated.expected.unlink()
    stamp.write_text(json.dumps(_stamp(workload.config), indent=1))
    log(f"  generated in {time.perf_counter() - started:.0f} s")
    return root
