"""``config.json`` for the converted model, and where each of its values came from.

Sizes come from the weights. What the weights cannot tell (norm epsilon, rope theta, token ids,
context length) comes from the training yaml or a reference config when given, else from the
published Qwen3 (or Qwen3-MoE) configs; every value carries its origin so a run can say which it
used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ms2hf.errors import ModelError

DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

# From the published Qwen3 configs (Qwen3-0.6B ... 235B-A22B share these).
QWEN3_DEFAULTS: dict[str, Any] = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "use_cache": True,
    "use_sliding_window": False,
}

# From the published Qwen3-MoE configs (Qwen3-30B-A3B; 235B-A22B differs only in sizes). Routing
# is not in the weights: top-k and its normalisation come from the training yaml or these.
# intermediate_size sizes only dense layers (mlp_only_layers); with none, no weight has it and
# no loader uses it, so unless the yaml gives it (intermediate_size / ffn_hidden_size) it is 30B's.
QWEN3_MOE_DEFAULTS: dict[str, Any] = {
    **QWEN3_DEFAULTS,
    "intermediate_size": 6144,
    "norm_topk_prob": True,
    "num_experts_per_tok": 8,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}
DEFAULTS = {"qwen3": QWEN3_DEFAULTS, "qwen3_moe": QWEN3_MOE_DEFAULTS}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
GIVEN_ONLY = frozenset({"pad_token_id", "max_window_layers"})
"""Keys written only when a yaml or reference config states them (or derived, then replaced)."""


@dataclasses.dataclass(frozen=True)
class ConfigValue:
    value: Any
    origin: str


def build_config(
    architecture: str,
    model_type: str,
    dims: object,
    dtype: str,
    given: Mapping[str, tuple[Any, str]],
) -> dict[str, ConfigValue]:
    """Every config.json entry with its origin: weights, the user's files, or a default.

    A given value never overrides one the weights decide (those are checked, not taken); it is
    taken for the model's defaulted keys, including sizes the weights leave open (None in dims).
    """
    stated = given.get("model_type", (model_type, ""))
    if stated[0] != model_type:
        raise ModelError(f"{stated[1]} = {stated[0]!r}, but the weights are a {model_type!r} model")
    defaults = DEFAULTS[model_type]
    out: dict[str, ConfigValue] = {
        "architectures": ConfigValue([architecture], "model"),
        "model_type": ConfigValue(model_type, "model"),
    }
    for name, value in dataclasses.asdict(dims).items():  # type: ignore[call-overload]
        if value is not None:
            out[name] = ConfigValue(value, "weights")
    vocab = out["vocab_size"].value
    for name, value in defaults.items():
        if name in TOKEN_IDS and value >= vocab:  # a small test model: no such embedding row
            value, origin = None, f"unset ({model_type} default {value} >= vocab_size {vocab})"
        else:
            origin = f"{model_type} default"
        out.setdefault(name, ConfigValue(value, origin))
    # Published configs set it to the layer count; it only matters with sliding windows.
    out["max_window_layers"] = ConfigValue(
        out["num_hidden_layers"].value, "the layer count, as published"
    )
    for name, (value, origin) in given.items():
        if name in out and out[name].origin == "weights":
            continue
        if name in defaults or name in GIVEN_ONLY:
            out[name] = ConfigValue(value, origin)
    out["rope_parameters"] = rope_parameters(out["rope_theta"], out["rope_scaling"])
    dtype_name = DTYPE_NAMES.get(dtype, "float32")
    out["torch_dtype"] = ConfigValue(dtype_name, "--dtype")
    out["dtype"] = ConfigValue(dtype_name, "--dtype")
    return out


def rope_parameters(theta: ConfigValue, scaling: ConfigValue) -> ConfigValue:
    """transformers 5 reads rope settings only from ``rope_parameters``, older stacks only from
    ``rope_theta``/``rope_scaling``; writing both keeps every loader on the same values."""
    rope = dict(scaling.value or {"rope_type": "default"})
    return ConfigValue({**rope, "rope_theta": theta.value}, theta.origin)


def config_json(values: Mapping[str, ConfigValue]) -> dict[str, Any]:
    return {name: v.value for name, v in sorted(values.items())}
