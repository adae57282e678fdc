"""A seeded MindSpore Transformers training output with its expected Hugging Face tensors, for
tests, benchmarks and ``ms2hf demo``: rank files, Adam states, scalars and protobuf strategy
files as real runs write them, dense Qwen3 or Qwen3-MoE, for any TP, DP, PP, EP, optimizer
sharding and redundancy setting, fully trained or a LoRA fine-tune."""

from ms2hf.generator.checkpoint import Generated, generate
from ms2hf.generator.config import GeneratorConfig, LoraConfig, MoeConfig

__all__ = ["Generated", "GeneratorConfig", "LoraConfig", "MoeConfig", "generate"]
