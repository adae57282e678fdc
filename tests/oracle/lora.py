"""LoRA fine-tunes, worked out independently: the merged model and the PEFT adapter.

Input: whole MCore tensors ``{name: ndarray}`` of a LoRA run, as
``ground_truth/mcore_full.safetensors`` holds them (or as another oracle reassembles them from
rank files). Optimizer states
(``adam_m.*``, ``adam_v.*``, ``accu_grads.*``) and scalars are ignored.

Output, as ``docs/lora.md`` describes:

- :func:`merged_model`: every Hugging Face tensor of the fine-tuned model in float32, each LoRA
  target as ``float32(float64(W) + s * (B @ A))`` with ``s = lora_alpha / r`` (see
  :func:`merge_weight` for the exact float64 order), every other tensor the base value upcast.
- :func:`adapter`: the PEFT adapter, tensor dict (byte copies of ``lora_A``, row slices of
  ``lora_B``, stored dtype kept) and the ``adapter_config.json`` dict.
- :func:`base_model`: the plain conversion (what the run started from), stored dtype kept.

numpy only; nothing from ``ms2hf``. It holds whole tensors in memory: small test checkpoints only.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.oracle import qwen3

SKIPPED_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.")
"""Optimizer-side entries: never model tensors."""

LORA_KEY = re.compile(r"^(?P<base>.+)\.lora_(?P<which>[AB])\.weight$")
LAYER_TARGET = re.compile(
    r"^decoder\.layers\.(?P<layer>\d+)\."
    r"(?P<module>self_attention\.linear_(?:qkv|proj)|mlp\.linear_fc[12])$"
)
HF_TARGET_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The order the adapter config lists its target modules in (only those present)."""

PEFT_PREFIX = "base_model.model."


class LoraRejected(ValueError):
    """A checkpoint or setting the LoRA rules refuse (docs/lora.md, "What is rejected")."""


# --------------------------------------------------------------------------------------------
# Scale and the merge arithmetic
# --------------------------------------------------------------------------------------------


def lora_scale(lora_alpha: float | None, r: int) -> float:
    """``s = lora_alpha / r`` as a float64, correctly rounded (plain LoRA, not rsLoRA)."""
    if lora_alpha is None:
        raise LoraRejected(
            "lora_alpha is not known: give it (yaml pet_config, adapter_config.json or a flag)"
        )
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise LoraRejected(f"lora_alpha must be a number, got {lora_alpha!r}")
    if not np.isfinite(lora_alpha) or lora_alpha <= 0:
        raise LoraRejected(f"lora_alpha must be > 0, got {lora_alpha!r}")
    if r <= 0:
        raise LoraRejected(f"LoRA rank must be > 0, got {r}")
    return float(lora_alpha) / float(r)


def merge_weight(w: np.ndarray, b: np.ndarray, a: np.ndarray, s: float) -> np.ndarray:
    """``float32(W + s * (B @ A))`` computed in float64 in one fixed order.

    Every operand is converted exactly to float64 (float32, bfloat16 and float16 all convert
    exactly). ``B @ A`` is summed over the rank index k = 0, 1, ..., r-1 in that order, each term
    ``B[:, k] * A[k, :]`` being exact (two 24-bit significands fit in 53 bits); then the sum is
    scaled by ``s``, added to ``W`` and rounded once, to nearest even, to float32. Done with
    elementwise numpy operations so that no BLAS kernel decides the summation order.
    """
    if a.ndim != 2 or b.ndim != 2 or w.ndim != 2:
        raise LoraRejected("LoRA merge needs 2-D W, A and B")
    r = a.shape[0]
    if b.shape[1] != r or w.shape != (b.shape[0], a.shape[1]):
        raise LoraRejected(f"LoRA shapes disagree: W {w.shape}, B {b.shape}, A {a.shape}")
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    acc = b64[:, 0:1] * a64[0:1, :]
    for k in range(1, r):
        acc = acc + b64[:, k : k + 1] * a64[k : k + 1, :]
    return (w.astype(np.float64) + s * acc).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The base model: tests/oracle/qwen3.py's rules (SPEC sections 4 and 5)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """A layer's attention sizes, read off its tensors as SPEC section 4 says."""

    heads: int
    groups: int
    head_dim: int


def dims_of(mcore: Mapping[str, np.ndarray], layer: int = 0) -> Dims:
    p = f"decoder.layers.{layer}.self_attention."
    (d,) = mcore[p + "q_layernorm.weight"].shape
    heads = int(mcore[p + "linear_proj.weight"].shape[1]) // d
    qkv_rows = int(mcore[p + "linear_qkv.weight"].shape[0])
    groups = (qkv_rows // d - heads) // 2
    if groups <= 0 or heads % groups or (heads + 2 * groups) * d != qkv_rows:
        raise LoraRejected(
            f"cannot read heads/groups from linear_qkv rows {qkv_rows}, head_dim {d}"
        )
    return Dims(heads, groups, int(d))


def split_qkv(
    rows: np.ndarray, dims: Dims, contiguous: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``linear_qkv`` rows -> (q, k, v) by the oracle's Qwen3 rule; any trailing width, so the
    same rule serves ``linear_qkv.weight`` and ``linear_qkv.lora_B.weight``."""
    return qwen3.split_qkv(rows, dims.heads, dims.groups, dims.head_dim, contiguous)


def split_gate_up(rows: np.ndarray, interleaved: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``linear_fc1`` rows -> (gate, up) by the oracle's Qwen3 rule."""
    return qwen3.split_fc1(rows, interleaved)


def base_model(
    mcore: Mapping[str, np.ndarray], contiguous_qkv: bool = False, interleaved_fc1: bool = True
) -> dict[str, np.ndarray]:
    """The plain Hugging Face conversion of the base weights, stored dtype kept: the oracle's
    Qwen3 / Qwen3-MoE rules on every parameter but the LoRA weights and optimizer states."""
    params = {
        k: v for k, v in mcore.items() if not k.startswith(SKIPPED_PREFIXES) and ".lora_" not in k
    }
    return qwen3.to_hf(params, contiguous_qkv=contiguous_qkv, interleaved_fc1=interleaved_fc1)


# --------------------------------------------------------------------------------------------
# LoRA pairs and their Hugging Face modules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModule:
    """One Hugging Face module's LoRA: its base rows, ``lora_B`` rows and (shared) ``lora_A``."""

    hf_module: str
    """e.g. ``model.layers.0.self_attn.q_proj``"""
    weight: np.ndarray
    lora_a: np.ndarray
    lora_b: np.ndarray


def lora_pairs(mcore: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{mcore base module: (lora_A, lora_B)}``, checked; raises :class:`LoraRejected`.

    Refused: a ``lora_*`` name that is not ``<base>.lora_A.weight`` / ``<base>.lora_B.weight``
    (a LoRA bias, say); LoRA on a module the rules do not know (the embedding, the router,
    experts, anything but ``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2`` of a
    layer); ``lora_A`` without ``lora_B`` or the reverse; a LoRA whose base weight is absent;
    shapes that disagree with each other or with the base; ranks that differ between modules.
    """
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name, t in mcore.items():
        if name.startswith(SKIPPED_PREFIXES) or "lora" not in name.lower():
            continue
        m = LORA_KEY.match(name)
        if not m:
            raise LoraRejected(
                f"{name}: not a LoRA weight the rules know (<module>.lora_A/B.weight)"
            )
        base = m.group("base")
        if not LAYER_TARGET.match(base):
            raise LoraRejected(f"{name}: LoRA on {base}, a module the rules do not map")
        halves.setdefault(base, {})[m.group("which")] = t
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ranks: dict[int, str] = {}
    for base in sorted(halves):
        got = halves[base]
        if "A" not in got or "B" not in got:
            have, lack = ("A", "B") if "A" in got else ("B", "A")
            raise LoraRejected(f"{base}: lora_{have} without lora_{lack}")
        a, b = got["A"], got["B"]
        w = mcore.get(base + ".weight")
        if w is None:
            raise LoraRejected(f"{base}: LoRA weights but no base weight {base}.weight")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraRejected(
                f"{base}: lora_A {a.shape} and lora_B {b.shape} disagree on the rank"
            )
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
            raise LoraRejected(
                f"{base}: lora_B {b.shape} @ lora_A {a.shape} does not fit the base {w.shape}"
            )
        ranks.setdefault(int(a.shape[0]), base)
        pairs[base] = (a, b)
    if len(ranks) > 1:
        raise LoraRejected(
            "LoRA ranks differ between modules: "
            + ", ".join(f"r={r} on {base}" for r, base in sorted(ranks.items()))
        )
    return pairs


def lora_rank(mcore: Mapping[str, np.ndarray]) -> int | None:
    """The rank ``r`` (rows of every ``lora_A``), or None for a checkpoint without LoRA."""
    pairs = lora_pairs(mcore)
    return int(next(iter(pairs.values()))[0].shape[0]) if pairs else None


def lora_modules(
    mcore: Mapping[str, np.ndarray], contiguous_qkv: bool = False, interleaved_fc1: bool = True
) -> list[LoraModule]:
    """Every LoRA target as Hugging Face modules: q/k/v (gate/up) share ``lora_A`` and take
    their ``lora_B`` rows by the base weight's own row rule; o_proj/down_proj as stored."""
    pairs = lora_pairs(mcore)
    if not pairs:
        return []
    out: list[LoraModule] = []
    for base, (a, b) in pairs.items():
        m = LAYER_TARGET.match(base)
        assert m is not None
        h = f"model.layers.{m.group('layer')}."
        w = mcore[base + ".weight"]
        module = m.group("module")
        if module == "self_attention.linear_qkv":
            dims = dims_of(mcore, int(m.group("layer")))
            split_w, split_b = (
                split_qkv(w, dims, contiguous_qkv),
                split_qkv(b, dims, contiguous_qkv),
            )
            for name, wr, br in zip(("q_proj", "k_proj", "v_proj"), split_w, split_b):
                out.append(LoraModule(h + "self_attn." + name, wr, a, br))
        elif module == "mlp.linear_fc1":
            split_w, split_b = split_gate_up(w, interleaved_fc1), split_gate_up(b, interleaved_fc1)
            for name, wr, br in zip(("gate_proj", "up_proj"), split_w, split_b):
                out.append(LoraModule(h + "mlp." + name, wr, a, br))
        elif module == "self_attention.linear_proj":
            out.append(LoraModule(h + "self_attn.o_proj", w, a, b))
        else:
            out.append(LoraModule(h + "mlp.down_proj", w, a, b))
    return out


# --------------------------------------------------------------------------------------------
# The two outputs
# --------------------------------------------------------------------------------------------


def merged_model(
    mcore: Mapping[str, np.ndarray],
    lora_alpha: float | None,
    contiguous_qkv: bool = False,
    interleaved_fc1: bool = True,
) -> dict[str, np.ndarray]:
    """The fine-tuned model's Hugging Face tensors, all float32 (cast later, SPEC section 6).
    The two flags are the training yaml's fused-weight layout settings."""
    modules = lora_modules(mcore, contiguous_qkv, interleaved_fc1)
    base = base_model(mcore, contiguous_qkv, interleaved_fc1)
    out = {k: v.astype(np.float32) for k, v in base.items()}
    if not modules:
        return out
    s = lora_scale(lora_alpha, int(modules[0].lora_a.shape[0]))
    for mod in modules:
        out[mod.hf_module + ".weight"] = merge_weight(mod.weight, mod.lora_b, mod.lora_a, s)
    return out


def adapter_config(
    r: int,
    lora_alpha: float,
    target_modules: list[str],
    lora_dropout: float = 0.0,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` content, keys in the order the ground truth writes them."""
    lora_scale(lora_alpha, r)  # the same refusals
    alpha: int | float = int(lora_alpha) if float(lora_alpha).is_integer() else float(lora_alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(r),
        "lora_alpha": alpha,
        "lora_dropout": lora_dropout,
        "target_modules": list(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def adapter(
    mcore: Mapping[str, np.ndarray],
    lora_alpha: float | None,
    lora_dropout: float = 0.0,
    base_model_name_or_path: str | None = None,
    contiguous_qkv: bool = False,
    interleaved_fc1: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The PEFT adapter: ``({key: tensor}, adapter_config)``.

    Keys ``base_model.model.<hf module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
    ``[out_module, r]``, in the checkpoint's stored dtype (byte copies; lora_B a row selection).
    """
    modules = lora_modules(mcore, contiguous_qkv, interleaved_fc1)
    if not modules:
        raise LoraRejected("no LoRA weights in the checkpoint: there is no adapter to write")
    tensors: dict[str, np.ndarray] = {}
    present: set[str] = set()
    for mod in modules:
        key = PEFT_PREFIX + mod.hf_module
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(mod.lora_a)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(mod.lora_b)
        present.add(mod.hf_module.rsplit(".", 1)[1])
    r = int(modules[0].lora_a.shape[0])
    targets = [t for t in HF_TARGET_ORDER if t in present]
    return tensors, adapter_config(r, lora_alpha, targets, lora_dropout, base_model_name_or_path)


# --------------------------------------------------------------------------------------------
# Where alpha comes from
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLoraSettings:
    """What a run's own ``adapter_config.json`` (mindformers' writer) says."""

    r: int
    lora_alpha: float
    lora_dropout: float


def read_run_adapter_config(path: str | Path) -> RunLoraSettings:
    """``r``, ``lora_alpha`` and ``lora_dropout`` from the file the run writes next to
    ``checkpoint/``. Its ``target_modules`` (mindformers' regex split on ``|``) is not used.
    mindformers writes ``int(lora_alpha)`` and ``int(lora_rank)`` (an alpha below 1 becomes 0):
    a value <= 0 is refused here rather than turned into a zero or infinite scale."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("peft_type") not in ("LORA", "lora"):
        raise LoraRejected(f"{path}: peft_type is {doc.get('peft_type')!r}, not LORA")
    if doc.get("use_rslora") or doc.get("use_dora"):
        raise LoraRejected(f"{path}: rsLoRA/DoRA are not what mindformers' LoRA layers compute")
    r = doc.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LoraRejected(f"{path}: r is {r!r}")
    alpha = doc.get("lora_alpha")
    lora_scale(alpha, r)
    return RunLoraSettings(r=r, lora_alpha=alpha, lora_dropout=float(doc.get("lora_dropout", 0.0)))
