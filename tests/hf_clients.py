"""What the real-client tests share (``test_transformers_roundtrip.py``, ``test_peft_roundtrip``):
the tiny model's sizes, its MoE variant, the generator run that saves it as MindSpore would, and a
record of every warning the clients log or raise (a converted model must load without one)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ms2hf.generator import GeneratorConfig, MoeConfig

SIZES = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
"""The tiny model, in config.json's names."""
ATTENTION = "eager"
MOE = MoeConfig(experts=8, moe_ffn=32, top_k=2, ep=2, mlp_only_layers=(0,))
"""The tiny Qwen3-MoE: a dense first layer, then eight experts, two per token, over expert
parallel 2."""


def moe_entries(moe: MoeConfig) -> dict[str, Any]:
    """``moe`` in config.json's names (a Qwen3-MoE's, top-k weights normalized)."""
    return {
        "num_experts": moe.experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.moe_ffn,
        "mlp_only_layers": list(moe.mlp_only_layers),
        "norm_topk_prob": True,
    }


def training_run(**settings: Any) -> GeneratorConfig:
    """A TP2 x PP2 training run of the tiny model (``settings``: the generator's other fields)."""
    return GeneratorConfig(
        layers=SIZES["num_hidden_layers"],
        hidden=SIZES["hidden_size"],
        heads=SIZES["num_attention_heads"],
        groups=SIZES["num_key_value_heads"],
        head_dim=SIZES["head_dim"],
        ffn=SIZES["intermediate_size"],
        vocab=SIZES["vocab_size"],
        **{"tp": 2, "pp": 2, **settings},
    )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def client_warnings(*packages: str) -> Iterator[list[str]]:
    """Every warning the ``packages`` (``transformers``, ``peft``) log or raise inside."""
    records = _Records()
    loggers = [logging.getLogger(name) for name in packages]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            yield records.messages
            records.messages += [
                str(w.message) for w in raised if any(p in w.filename for p in packages)
            ]
    finally:
        for logger in loggers:
            logger.removeHandler(records)
