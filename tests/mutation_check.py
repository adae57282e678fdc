"""Plant bugs in the rules and the layout math, one at a time, and show the suite catches each.

Run on demand, not in CI (it runs the suite once per bug)::

    .venv/bin/python -m tests.mutation_check            # every mutation
    .venv/bin/python -m tests.mutation_check qkv-kv     # some, by name

Each mutation replaces one exact piece of source text (the script refuses to run when the text
is no longer there, so a refactor cannot make a mutation silently vanish), runs pytest with
``-x``, records whether it failed and which test failed first, and puts the file back. A
mutation the suite survives is printed as SURVIVED and makes the exit status 1.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    what: str


MUTATIONS = (
    Mutation(
        "qkv-kv",
        "ms2hf/transforms/mappings.py",
        "((self.q, q), (self.k, k), (self.v, v))",
        "((self.q, q), (self.k, v), (self.v, k))",
        "QKV split: key and value heads swapped",
    ),
    Mutation(
        "gate-up-interleave",
        "ms2hf/transforms/mappings.py",
        "row_runs(gate, source, shape, [(0, f)], 2),\n"
        "                row_runs(up, source, shape, [(1, f)], 2),",
        "row_runs(gate, source, shape, [(1, f)], 2),\n"
        "                row_runs(up, source, shape, [(0, f)], 2),",
        "interleaved fc1: gate and up rows swapped",
    ),
    Mutation(
        "experts-halves",
        "ms2hf/transforms/mappings.py",
        "names[1].replace(EXPERT, ex), source, rows, (f, 2 * f)",
        "names[1].replace(EXPERT, ex), source, rows, (0, f)",
        "MoE experts: up_proj taken from the gate half",
    ),
    Mutation(
        "tensor-map-from-left",
        "ms2hf/io/placement.py",
        "            idx = idx * dev[n - 1 - a] + c[n - 1 - a]",
        "            idx = idx * dev[a] + c[a]",
        "layout math: tensor map axes counted from the left",
    ),
    Mutation(
        "mixed-radix-order",
        "ms2hf/io/placement.py",
        "        for a in axes:  # mixed radix, first axis most significant",
        "        for a in reversed(axes):  # mixed radix, first axis most significant",
        "layout math: nested tensor-map entries with the last axis most significant",
    ),
    Mutation(
        "optimizer-chunk-small-shard",
        "ms2hf/io/placement.py",
        "        coords[0] = coords[0] * g.opt_chunks + pos % g.opt_chunks",
        "        group = layout.devices // math.prod(g.model_parts)\n"
        "        coords[0] = coords[0] * g.opt_chunks + pos * g.opt_chunks // group",
        "layout math: optimizer chunk by position block instead of position modulo, which differs "
        "only when the shard size is smaller than the replica group",
    ),
    Mutation(
        "bf16-truncation",
        "ms2hf/transforms/casts.py",
        '    """``cast_into``, for a caller inside ``quiet_casts``."""\n'
        '    np.copyto(dst, src, casting="unsafe")',
        '    """``cast_into``, for a caller inside ``quiet_casts``."""\n'
        '    if dst.dtype.name == "bfloat16" and src.dtype == np.float32:\n'
        "        dst.view(np.uint16)[...] = (src.view(np.uint32) >> 16).astype(np.uint16)\n"
        "        return\n"
        '    np.copyto(dst, src, casting="unsafe")',
        "cast: fp32 -> bf16 by truncation instead of round to nearest even",
    ),
    Mutation(
        "coverage-unchecked",
        "ms2hf/io/sources/legacy.py",
        "    missing = [coords for coords in expected if coords not in c.blocks]",
        "    missing: list[tuple[int, ...]] = []",
        "coverage: a block no rank saved is not reported",
    ),
    Mutation(
        "ckpt2-slice-id-column-major",
        "ms2hf/io/sources/ckpt2.py",
        "        coords = unravel(sid, entry.grid)",
        "        coords = tuple(reversed(unravel(sid, tuple(reversed(entry.grid)))))",
        "Checkpoint 2.0: slice ids unravelled with the first dim fastest",
    ),
    Mutation(
        "ckpt2-whole-as-slice",
        "ms2hf/io/sources/ckpt2.py",
        "header.path, rank, name, info.start, zero, entry.shape",
        "header.path, rank, name, info.start, zero, entry.local",
        "Checkpoint 2.0: a whole stored parameter read as its first slice",
    ),
    Mutation(
        "ckpt2-newer-than-tracker",
        "ms2hf/io/sources/iterations.py",
        "    newer = sorted(i for i in found if i > tracker)",
        "    newer: list[int] = []",
        "Checkpoint 2.0: an iteration newer than the tracker passes silently",
    ),
    Mutation(
        "ckpt2-any-file-name",
        "ms2hf/io/sources/ckpt2_metadata.py",
        "        if not plain_file_name(file):",
        "        if False:",
        "Checkpoint 2.0: a file_name leading out of the iteration folder is followed",
    ),
    Mutation(
        "ckpt2-optimizer-fold",
        "ms2hf/io/sources/ckpt2_metadata.py",
        "    while start > 0 and axes[start - 1] > axes[start]:",
        "    while start > 0 and axes[start - 1] < axes[start]:",
        "Checkpoint 2.0 inspect: the optimizer's axes read from the wrong end of dim 0's entry",
    ),
    Mutation(
        "ckpt2-balanced-ties",
        "ms2hf/generator/ckpt2.py",
        "            rank = min(holders[key], key=load.__getitem__)",
        "            rank = min(holders[key][::-1], key=load.__getitem__)",
        "Checkpoint 2.0 generator: the balanced plan's ties go to the highest rank",
    ),
    Mutation(
        "lora-b-rows-contiguous",
        "ms2hf/transforms/lora.py",
        "dataclasses.replace(p, col_stop=rank) for p in tensor.pieces",
        "dataclasses.replace(p, col_stop=rank, row_step=1) for p in tensor.pieces",
        "LoRA: lora_B rows ignore the interleaved gate/up stride",
    ),
    Mutation(
        "lora-scale-off",
        "ms2hf/pipeline/lora.py",
        "return float(self.alpha.value) / self.rank",
        "return float(self.alpha.value) / (self.rank + 1)",
        "LoRA: the scale is alpha / (r + 1)",
    ),
    Mutation(
        "lora-no-certificate",
        "ms2hf/transforms/lora_merge.py",
        "peak *= (4 * rank + 8) * 2.0**-53",
        "peak *= 0.0",
        "LoRA merge: the BLAS product trusted without a bound",
    ),
    Mutation(
        "lora-zero-sign",
        "ms2hf/transforms/lora_merge.py",
        "        unsure |= zero\n",
        "",
        "LoRA merge: a zero result's sign taken from the bounds",
    ),
    Mutation(
        "lora-alpha-any-agrees",
        "ms2hf/pipeline/lora.py",
        "return a == b or (_from_run_file(other) and b == math.trunc(a))",
        "return True",
        "LoRA alpha: disagreeing sources accepted",
    ),
    Mutation(
        "lora-short-targets",
        "ms2hf/transforms/lora.py",
        "for name in ((kind,) if every[kind] else tuple(modules))",
        "for name in (kind,)",
        "PEFT target_modules: short names even where other modules of that name have no LoRA",
    ),
    Mutation(
        "lora-generator-a-not-shared",
        "ms2hf/generator/lora.py",
        "    Role.COLUMN: (Role.REPLICATED_LINEAR, Role.COLUMN),",
        "    Role.COLUMN: (Role.COLUMN, Role.COLUMN),",
        "LoRA generator: a column-parallel layer's lora_A split over tp",
    ),
)


def run(mutation: Mutation) -> tuple[bool, str, float]:
    """Plant ``mutation``, run the suite, restore: (caught, first failure, seconds)."""
    path = ROOT / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        raise SystemExit(
            f"{mutation.name}: the text to mutate is not in {mutation.path} exactly once"
        )
    started = time.perf_counter()
    try:
        path.write_text(original.replace(mutation.old, mutation.new))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(original)
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return result.returncode != 0, (failed[0] if failed else ""), time.perf_counter() - started


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    survived = 0
    for m in chosen:
        caught, first, seconds = run(m)
        survived += not caught
        verdict = "caught" if caught else "SURVIVED"
        print(f"{m.name:30} {verdict:9} {seconds:6.1f} s  {m.what}")
        if first:
            print(f"{'':30} first failure: {first}")
    print(f"{len(chosen) - survived} of {len(chosen)} planted bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
