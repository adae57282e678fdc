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

from ms2hf.io.config_files import ConfigValue
from ms2hf.transforms.family import ModelFamily

DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
GIVEN_ONLY = frozenset({"pad_token_id", "max_window_layers"})
"""Keys written only when a yaml or reference config states them (or derived, then replaced)."""


def build_config(
    family: ModelFamily, dims: object, dtype: str, given: Mapping[str, ConfigValue]
) -> dict[str, ConfigValue]:
    """Every config.json entry with its origin: weights, the user's files, or a default.

    A given value never overrides one the weights decide (those are checked, not taken); it is
    taken for the model's defaulted keys, including sizes the weights leave open (None in dims).
    """
    model_type = family.model_type
    defaults = family.defaults
    out: dict[str, ConfigValue] = {
        "architectures": ConfigValue([family.architecture], "model"),
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
    for name, value in given.items():
        if name in out and out[name].origin == "weights":
            continue
        if name in defaults or name in GIVEN_ONLY:
            out[name] = value
    out["rope_parameters"] = rope_parameters(out["rope_theta"], out["rope_scaling"])
    dtype_name = DTYPE_NAMES.get(dtype, "float32")
    out["torch_dtype"] = ConfigValue(dtype_name, "--dtype")
    out["dtype"] = ConfigValue(dtype_name, "--dtype")
    return out


POSITIVE = frozenset({"max_position_embeddings", "rms_norm_eps", "rope_theta"})
"""Entries that must be above zero (a zero epsilon or rope theta is a broken model)."""


def _kind(default: Any) -> tuple[tuple[type, ...], str] | None:
    """The types a given value may have, from the published default's; None: any."""
    if isinstance(default, bool):
        return (bool,), "true or false"
    if isinstance(default, int):
        return (int,), "a whole number"
    if isinstance(default, float):
        return (int, float), "a number"
    if isinstance(default, str):
        return (str,), "a string"
    return None


def _is(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def value_problems(
    family: ModelFamily, config: Mapping[str, ConfigValue], given: Mapping[str, ConfigValue]
) -> list[str]:
    """Given values config.json would carry that no loader can use: the wrong type, a size
    below one, or a token id past the vocabulary (transformers builds the embedding's padding
    row from ``pad_token_id`` and fails on one it does not have)."""
    vocab = config["vocab_size"].value
    problems = []
    for name, value in given.items():
        if config.get(name) is not value:
            continue  # not taken (a size the weights decide, or a setting of another kind)
        v = value.value
        if name in TOKEN_IDS:
            ids = v if isinstance(v, list) else [v]
            bad = [i for i in ids if i is not None and not (_is(i, (int,)) and 0 <= i < vocab)]
            if bad:
                problems.append(
                    f"{value.origin} = {v!r}: no such token in this model (vocab_size {vocab}, "
                    f"from the embedding); set a token id below {vocab}, or --set {name}=null"
                )
            continue
        kind = _kind(family.defaults.get(name, 0 if name in GIVEN_ONLY else None))
        if kind is not None and not _is(v, kind[0]):
            problems.append(f"{value.origin} = {v!r}: expected {kind[1]}")
        elif name in POSITIVE and not v > 0:
            problems.append(f"{value.origin} = {v!r}: must be above zero")
        elif name == "rope_scaling" and v is not None and not isinstance(v, dict):
            problems.append(f"{value.origin} = {v!r}: expected null or an object")
    return problems


def rope_parameters(theta: ConfigValue, scaling: ConfigValue) -> ConfigValue:
    """transformers 5 reads rope settings only from ``rope_parameters``, older stacks only from
    ``rope_theta``/``rope_scaling``; writing both keeps every loader on the same values."""
    rope = dict(scaling.value) if isinstance(scaling.value, dict) else {"rope_type": "default"}
    return ConfigValue({**rope, "rope_theta": theta.value}, theta.origin)


def config_json(values: Mapping[str, ConfigValue]) -> dict[str, Any]:
    return {name: v.value for name, v in sorted(values.items())}
