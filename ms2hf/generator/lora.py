"""A LoRA fine-tune's training network and the files its run leaves, as mindformers makes them
(``docs/lora.md#1-what-a-lora-run-saves``).

mindformers walks the model's cells by their local attribute names and tries ``re.match`` of the
yaml's ``target_modules`` on each; the first cell that matches on a path is wrapped if it is a
column- or row-parallel linear layer, and otherwise left alone with everything beneath it. A
wrapped layer keeps its frozen weight and gains ``lora_A`` ``[r, in]`` and ``lora_B``
``[out, r]`` right after it in the network: a column-parallel layer's ``lora_A`` is replicated
(a ``LinearNoTP``) and its ``lora_B`` split by rows like the weight; a row-parallel layer's
``lora_A`` is split by columns like the weight and its ``lora_B`` replicated. Only the LoRA
weights are trained (Adam states, gradient accumulators); every other weight is frozen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from ms2hf.generator.config import LoraConfig
from ms2hf.transforms.family import NetworkParam, Role
from ms2hf.transforms.mappings import Table, layer_pattern

HALVES = {
    Role.COLUMN: (Role.REPLICATED_LINEAR, Role.COLUMN),
    Role.ROW: (Role.ROW, Role.REPLICATED_LINEAR),
}
"""The roles of a wrapped layer's ``(lora_A, lora_B)`` by the layer's own role."""


def wraps(target_modules: str, module: str) -> bool:
    """Whether mindformers puts LoRA on ``module`` (a parameter's path without ``.weight``): the
    first cell on its path whose local name matches must be the module itself."""
    for i, name in enumerate(module.split(".")):
        if re.match(target_modules, name):
            return i == module.count(".")
    return False


def with_lora(
    params: Sequence[NetworkParam], lora: LoraConfig, table: Table
) -> tuple[list[NetworkParam], frozenset[str]]:
    """The network with the LoRA weights inserted after each wrapped layer's weight, and the
    names of the wrapped weights (their op class gains ``WithLoRA``)."""
    out: list[NetworkParam] = []
    wrapped: set[str] = set()
    for p in params:
        out.append(p)
        module = p.name.removesuffix(".weight")
        if layer_pattern(p.name)[0] not in table.lora or not wraps(lora.target_modules, module):
            continue
        wrapped.add(p.name)
        rows, cols = p.shape
        role_a, role_b = HALVES[p.role]
        out.append(NetworkParam(f"{module}.lora_A.weight", (lora.rank, cols), role_a))
        out.append(NetworkParam(f"{module}.lora_B.weight", (rows, lora.rank), role_b))
    return out, frozenset(wrapped)


def pet_config(lora: LoraConfig) -> dict[str, object]:
    """The yaml's ``model.model_config.pet_config``, as the genuine fixtures' runs had it."""
    return {
        "pet_type": "lora",
        "lora_rank": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "lora_a_init": "normal",
        "lora_b_init": "zeros",
        "target_modules": lora.target_modules,
        "freeze_include": ["*"],
        "freeze_exclude": ["*lora*"],
    }


def run_adapter_config(lora: LoraConfig) -> str:
    """The ``adapter_config.json`` mindformers' ``LoraModel.save_pet_config`` writes into the
    output folder: sorted keys, indent 2, no final newline, ``int`` alpha and rank, and the
    regex split on ``|`` as ``target_modules``."""
    doc = {
        "base_model_name_or_path": "none",
        "bias": "none",
        "lora_alpha": int(lora.alpha),
        "lora_bias": False,
        "lora_dropout": lora.dropout,
        "peft_type": "LORA",
        "r": int(lora.rank),
        "target_modules": lora.target_modules.split("|"),
        "task_type": "CAUSAL_LM",
    }
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False)
