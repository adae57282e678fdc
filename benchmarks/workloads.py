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

from ms2hf.generator import GeneratorConfig, LoraConfig, MoeConfig, generate

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
    data: bool = True
    """False: headers and holes only (sparse files), a save of any size to plan from."""


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
    (layers and vocabulary shrink together, so the model bytes are about 1/4 and 1/2 of W),
    M64: a Qwen3-MoE with 64 experts per layer over 4 expert-parallel ranks, shaped as
    Qwen3-30B-A3B at half width when ``dims`` are 0.6B's (4 KV groups, ``moe_ffn`` 384 for 768),
    each layer's grouped expert weights larger than the memory budget of the memcap runs, and
    W-lora: W as a LoRA fine-tune (rank 16 on every linear layer of every layer), whose
    conversion merges 28 x 7 modules, three quarters of the weights."""

    def qwen(layers: int, vocab: int, **rest: object) -> GeneratorConfig:
        return GeneratorConfig(layers=layers, vocab=vocab, **{**dims, **rest})

    tp2pp2 = {"tp": 2, "pp": 2}
    sharded = {"tp": 2, "dp": 2, "pp": 2, "opt_shard": -1}
    moe = MoeConfig(experts=64, moe_ffn=moe_ffn, top_k=8, ep=4)
    ckpt2 = {"save_format": "ckpt2", **tp2pp2}
    return {
        w.name: w
        for w in (
            Workload("W", qwen(layers, vocab, **tp2pp2), f"{note}fp32 + Adam, TP2 x PP2"),
            Workload(
                "W-ckpt2",
                qwen(layers, vocab, **ckpt2),
                f"{note}W saved as Checkpoint 2.0 (normal save)",
            ),
            Workload(
                "W-ckpt2-dedup",
                qwen(layers, vocab, remove_redundancy=True, **ckpt2),
                f"{note}W saved as Checkpoint 2.0, de-duplicated (balanced plan)",
            ),
            Workload(
                "W-dp2-opt",
                qwen(layers, vocab, **sharded),
                f"{note}W as TP2 x DP2 x PP2 with optimizer sharding (-1)",
            ),
            Workload("S8", qwen(layers * 2 // 7, vocab // 4, **tp2pp2), f"{note}about 1/4 of W"),
            Workload("S14", qwen(layers // 2, vocab // 2, **tp2pp2), f"{note}about 1/2 of W"),
            Workload(
                "W-lora",
                qwen(layers, vocab, **tp2pp2, lora=LoraConfig(rank=16, alpha=32)),
                f"{note}W as a LoRA fine-tune: r 16 on q, k, v, o, gate, up, down; frozen "
                "base without Adam states; converted to the merged model",
            ),
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


QWEN3_235B = {
    "layers": 96,
    "hidden": 4096,
    "heads": 64,
    "groups": 4,
    "head_dim": 128,
    "ffn": 12288,
    "vocab": 151936,
    "dtype": "bf16",
    "prefix": "qwen3_moe",
}
"""Qwen3-235B-A22B's sizes (with 96 layers for 16 equal pipeline stages, not 94)."""


def planning_workloads(quick: bool) -> dict[str, Workload]:
    """Checkpoint 2.0 saves of a Qwen3-MoE with 128 experts per layer over 4096 ranks (TP4 x
    DP64 x PP16, EP32, optimizer sharding), normal and de-duplicated, in sparse files: 480 GB of
    bf16 weights to plan, 2.2 TB of files, a few hundred MB on disk. Quick: 64 ranks."""
    if quick:
        sizes = {**QWEN3_235B, "layers": 8, "hidden": 512, "heads": 8, "vocab": 8192}
        parallel = {"tp": 2, "dp": 8, "pp": 4}
        moe = MoeConfig(experts=16, moe_ffn=128, top_k=4, ep=4)
    else:
        sizes, parallel = QWEN3_235B, {"tp": 4, "dp": 64, "pp": 16}
        moe = MoeConfig(experts=128, moe_ffn=1536, top_k=8, ep=32)
    world = parallel["tp"] * parallel["dp"] * parallel["pp"]
    base = GeneratorConfig(
        **sizes,
        **parallel,
        opt_shard=-1,
        moe=moe,
        save_format="ckpt2",  # type: ignore[arg-type]
    )
    what = f"Qwen3-MoE {sizes['layers']} layers x {moe.experts} experts, {world} ranks"
    return {
        "P4096": Workload("P4096", base, f"{what}, normal save, headers only", data=False),
        "P4096-dedup": Workload(
            "P4096-dedup",
            dataclasses.replace(base, remove_redundancy=True),
            f"{what}, de-duplicated save, headers only",
            data=False,
        ),
    }


def _stamp(workload: Workload) -> dict[str, object]:
    """As read back from the stamp file: through JSON, where tuples become lists."""
    doc = {"generator_config": dataclasses.asdict(workload.config), "data": workload.data}
    return json.loads(json.dumps(doc))


def ensure(workload: Workload, cache: Path, log: Callable[[str], None] = print) -> Path:
    """The workload's training output folder under ``cache``, generated when missing or stale."""
    root = cache / "workloads" / workload.name
    stamp = root / STAMP
    try:
        if json.loads(stamp.read_text()) == _stamp(workload):
            return root
    except (OSError, ValueError):
        pass
    if root.exists():
        shutil.rmtree(root)
    log(f"generating workload {workload.name} ({workload.description}) into {root} ...")
    started = time.perf_counter()
    generate(workload.config, root, expected=False, data=workload.data)
    stamp.write_text(json.dumps(_stamp(workload), indent=1))
    log(f"  generated in {time.perf_counter() - started:.0f} s")
    return root
