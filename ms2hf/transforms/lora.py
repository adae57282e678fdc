"""LoRA fine-tunes: a checkpoint's LoRA weights, checked, and what is made of them
(``docs/lora.md``).

Beside each frozen base weight ``<module>.weight`` a LoRA run saves ``<module>.lora_A.weight``
``[r, in]`` and ``<module>.lora_B.weight`` ``[out, r]``; the fine-tuned weight is
``W + (alpha / r) * B @ A``. The family's table names the parameters that may carry LoRA, all of
them row-selection rows (a rename, the QKV split, the gate/up split): every Hugging Face tensor
cut from such a parameter is a set of its rows, so its LoRA is the same rows of ``B`` with the
whole ``A``. The rule therefore follows the table, with no LoRA spelling of its own:

- the merged model: each such tensor carries a ``LoraDelta`` that the engine adds, band by band,
  in float64 (``ms2hf.transforms.lora_merge``);
- a PEFT adapter: per Hugging Face module ``base_model.model.<module>.lora_A.weight`` (a copy of
  ``A``: q, k and v share one) and ``...lora_B.weight`` (its rows of ``B``).

Pure functions of names and shapes, like the tables: nothing here reads a tensor byte.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ms2hf.errors import ModelError
from ms2hf.transforms.mappings import Table, layer_pattern, natural_key
from ms2hf.transforms.pieces import LoraDelta, OutputTensor, copy

Shapes = Mapping[str, tuple[int, ...]]

LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
PEFT_PREFIX = "base_model.model."
"""PEFT's key prefix: ``PeftModel`` wraps the ``*ForCausalLM`` model as ``base_model.model``."""
WEIGHT = ".weight"


@dataclass(frozen=True)
class LoraModule:
    """One MindSpore module with LoRA: its base weight and its two LoRA parameters."""

    module: str
    """``decoder.layers.0.self_attention.linear_qkv``"""

    @property
    def weight(self) -> str:
        return self.module + WEIGHT

    @property
    def a(self) -> str:
        return self.module + ".lora_A.weight"

    @property
    def b(self) -> str:
        return self.module + ".lora_B.weight"


@dataclass(frozen=True)
class LoraWeights:
    """A checkpoint's LoRA: one rank for all modules (mindformers has one ``lora_rank``)."""

    rank: int
    modules: tuple[LoraModule, ...]


def base_weight(name: str) -> str:
    """The weight a LoRA half belongs to (``<module>.lora_A.weight`` -> ``<module>.weight``);
    any other name is its own."""
    m = LORA_KEY.match(name)
    return m.group("module") + WEIGHT if m else name


def is_lora_name(name: str) -> bool:
    """A parameter a LoRA rewrite made (or a foreign one that claims to be LoRA)."""
    return "lora" in name.lower()


def _halves(shapes: Shapes, table: Table) -> dict[str, dict[str, str]]:
    """``{module: {"A": name, "B": name}}`` for every LoRA-named parameter, each name checked to
    be a LoRA half the table converts."""
    allowed = ", ".join(p.removesuffix(WEIGHT) for p in table.lora) or "none"
    halves: dict[str, dict[str, str]] = {}
    for name in sorted(n for n in shapes if is_lora_name(n)):
        m = LORA_KEY.match(name)
        if m is None:
            raise ModelError(
                f"parameter {name!r} is not a LoRA weight ms2hf converts: expected "
                "<module>.lora_A.weight or <module>.lora_B.weight (no LoRA bias, no other naming)"
            )
        module = m.group("module")
        if layer_pattern(module + WEIGHT)[0] not in table.lora:
            raise ModelError(
                f"parameter {name!r}: LoRA on {module}, a module the conversion rules do not map "
                f"(LoRA is converted on {allowed}; never on embeddings, norms, the router, "
                "experts or the output layer)"
            )
        halves.setdefault(module, {})[m.group("half")] = name
    return halves


def _checked_module(module: str, half: Mapping[str, str], shapes: Shapes) -> tuple[LoraModule, int]:
    """The module and its rank; every shape agreeing with the others and with the base."""
    lm = LoraModule(module)
    if len(half) < 2:
        have = next(iter(half))
        lack = "B" if have == "A" else "A"
        raise ModelError(
            f"parameter {half[have]!r} has no partner {module}.lora_{lack}.weight: a LoRA needs "
            "both lora_A and lora_B"
        )
    base = shapes.get(lm.weight)
    if base is None:
        raise ModelError(f"LoRA parameters {lm.a!r} and {lm.b!r} have no base weight {lm.weight!r}")
    a, b = shapes[lm.a], shapes[lm.b]
    if len(a) != 2 or len(b) != 2 or len(base) != 2:
        raise ModelError(
            f"{lm.a} {list(a)}, {lm.b} {list(b)} and {lm.weight} {list(base)} must be matrices"
        )
    if a[0] != b[1]:
        raise ModelError(
            f"ranks disagree: {lm.a} has {a[0]} rows and {lm.b} has {b[1]} columns; lora_A is "
            "[r, in] and lora_B is [out, r] with the same r"
        )
    if a[0] < 1 or a[1] != base[1] or b[0] != base[0]:
        raise ModelError(
            f"{lm.b} {list(b)} @ {lm.a} {list(a)} does not fit the base weight {lm.weight} "
            f"{list(base)}: expected lora_A [r, {base[1]}] and lora_B [{base[0]}, r]"
        )
    return lm, a[0]


def split_lora(
    shapes: Shapes, table: Table
) -> tuple[dict[str, tuple[int, ...]], LoraWeights | None]:
    """The base model's parameters and the checkpoint's LoRA (None without LoRA weights).

    Refused (``docs/lora.md#5-what-is-rejected``), each naming the parameter: a LoRA-named tensor
    that is not ``<module>.lora_A/B.weight``; LoRA on a module the table does not convert;
    ``lora_A`` without ``lora_B`` or the reverse; no base weight; shapes that disagree with each
    other or with the base; ranks differing between modules."""
    halves = _halves(shapes, table)
    base = {name: shape for name, shape in shapes.items() if not is_lora_name(name)}
    if not halves:
        return base, None
    modules: list[LoraModule] = []
    ranks: dict[int, str] = {}
    for module in sorted(halves, key=natural_key):
        lm, rank = _checked_module(module, halves[module], shapes)
        ranks.setdefault(rank, lm.a)
        modules.append(lm)
    if len(ranks) > 1:
        shown = ", ".join(f"{name} has r = {r}" for r, name in sorted(ranks.items()))
        raise ModelError(
            f"LoRA ranks differ between modules ({shown}); a run has one lora_rank, so the "
            "checkpoint mixes runs or is damaged"
        )
    return base, LoraWeights(next(iter(ranks)), tuple(modules))


def _lora_rows(tensor: OutputTensor, name: str, source: str, rank: int) -> OutputTensor:
    """``tensor``'s rows of ``source`` (a ``[out, rank]`` lora_B): the same row pieces over
    ``rank`` columns. Only whole-column row selections qualify; a family whose LoRA target is cut
    otherwise is a bug in its table, reported as such."""
    cols = tensor.row_elements
    if len(tensor.shape) != 2 or any(
        p.transpose or p.col_start != 0 or p.col_stop != cols for p in tensor.pieces
    ):
        raise ModelError(
            f"{tensor.name}: not a row selection of {tensor.source}, so its LoRA cannot follow it"
        )
    pieces = tuple(dataclasses.replace(p, col_stop=rank) for p in tensor.pieces)
    return OutputTensor(name, source, (tensor.rows, rank), pieces)


def _by_weight(lora: LoraWeights) -> dict[str, LoraModule]:
    return {m.weight: m for m in lora.modules}


def hf_module(tensor: OutputTensor) -> str:
    """``model.layers.0.self_attn.q_proj`` for ``model.layers.0.self_attn.q_proj.weight``."""
    return tensor.name.removesuffix(WEIGHT)


def merged(
    outputs: Sequence[OutputTensor], lora: LoraWeights, scale: float
) -> tuple[OutputTensor, ...]:
    """The fine-tuned model: every tensor cut from a LoRA module carries its change."""
    modules = _by_weight(lora)
    out = []
    for t in outputs:
        m = modules.get(t.source)
        if m is not None:
            b = _lora_rows(t, hf_module(t) + ".lora_B.weight", m.b, lora.rank)
            t = dataclasses.replace(t, delta=LoraDelta(b, m.a, scale))
        out.append(t)
    return tuple(out)


def adapter(
    outputs: Sequence[OutputTensor], lora: LoraWeights, shapes: Shapes
) -> tuple[OutputTensor, ...]:
    """The PEFT adapter's tensors, in the model's order: per Hugging Face module cut from a LoRA
    module, ``lora_A`` (the whole ``A``) and ``lora_B`` (its rows of ``B``)."""
    modules = _by_weight(lora)
    out: list[OutputTensor] = []
    for t in outputs:
        m = modules.get(t.source)
        if m is None:
            continue
        key = PEFT_PREFIX + hf_module(t)
        out.append(copy(key + ".lora_A.weight", m.a, shapes[m.a]))
        out.append(_lora_rows(t, key + ".lora_B.weight", m.b, lora.rank))
    return tuple(out)


def target_modules(outputs: Sequence[OutputTensor], lora: LoraWeights) -> tuple[str, ...]:
    """The Hugging Face modules with LoRA, as PEFT's ``target_modules`` lists them, in the
    model's order (q, k, v, o, gate, up, down): by their last name (``q_proj``) when every module
    of that name has LoRA, else by their full names. PEFT matches a listed name against the end
    of every module's name, so a short name would also wrap the modules without LoRA (a
    Qwen3-MoE's experts beside a dense layer's MLP, or layers a run left out), each with a
    freshly initialised LoRA and a warning about its missing keys."""
    with_lora = _by_weight(lora)
    kinds: dict[str, list[str]] = {}
    every: dict[str, bool] = {}
    for t in outputs:
        module = hf_module(t)
        kind = module.rsplit(".", 1)[-1]
        has = t.source in with_lora
        every[kind] = every.get(kind, True) and has
        if has:
            kinds.setdefault(kind, []).append(module)
    return tuple(
        name
        for kind, modules in kinds.items()
        for name in ((kind,) if every[kind] else tuple(modules))
    )


def adapter_config(
    rank: int,
    alpha: float,
    targets: Sequence[str],
    dropout: float,
    base_model: str | None,
) -> dict[str, Any]:
    """``adapter_config.json``, keys in the order of the genuine adapters (``docs/lora.md#4``):
    plain LoRA (no rsLoRA, DoRA or bias), which is what mindformers' layers compute and what vLLM
    requires."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
