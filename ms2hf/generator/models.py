"""Which model family a generator config is: the one place that decides."""

from __future__ import annotations

from ms2hf.generator import qwen3, qwen3_moe
from ms2hf.generator.config import GeneratorConfig
from ms2hf.generator.params import ModelSpec


def model_spec(config: GeneratorConfig) -> ModelSpec:
    if config.moe is None:
        return qwen3.model_spec(config)
    return qwen3_moe.model_spec(config, config.moe)
