"""``config.json`` for the converted model, and where each of its values came from.

Sizes come from the weights. What the weights cannot tell (norm epsilon, rope theta, token ids,
context length) comes from the training yaml or a reference config when given, else from the
published Qwen3 defaults; every value carries its origin so a run can say which it used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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

# Values the weights decide; a yaml or reference config may only agree with them.
SHAPE_KEYS = frozenset(
    {
        "hidden_size",
        "vocab_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "tie_word_embeddings",
        "num_experts",
        "moe_intermediate_size",
        "mlp_only_layers",
        "decoder_sparse_step",
    }
)


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
    defaults: Mapping[str, Any] = QWEN3_DEFAULTS,
) -> dict[str, ConfigValue]:
    """Every config.json entry with its origin: weights, the user's files, or a default."""
    out: dict[str, ConfigValue] = {
        "architectures": ConfigValue([architecture], "model"),
        "model_type": ConfigValue(model_type, "model"),
    }
    for name, value in dataclasses.asdict(dims).items():  # type: ignore[call-overload]
        out[name] = ConfigValue(value, "weights")
    for name, value in defaults.items():
        out[name] = ConfigValue(value, "Qwen3 default")
    for name, (value, origin) in given.items():
        if name in SHAPE_KEYS or name in out and out[name].origin == "weights":
            continue
        if name in defaults or name in ("pad_token_id", "num_experts_per_tok", "norm_topk_prob"):
            out[name] = ConfigValue(value, origin)
    out.setdefault("max_window_layers", ConfigValue(out["num_hidden_layers"].value, "weights"))
    dtype_name = DTYPE_NAMES.get(dtype, "float32")
    out["torch_dtype"] = ConfigValue(dtype_name, "--dtype")
    out["dtype"] = ConfigValue(dtype_name, "--dtype")
    return out


def config_json(values: Mapping[str, ConfigValue]) -> dict[str, Any]:
    return {name: v.value for name, v in sorted(values.items())}
