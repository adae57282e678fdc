"""What to generate: the model's sizes, the parallel run that saved it, and how it saved."""

from __future__ import annotations

from dataclasses import dataclass

from ms2hf.errors import Ms2hfError

SOURCE_DTYPES = {"fp32": "F32", "bf16": "BF16"}
"""``params_dtype`` of the training run -> the safetensors dtype of its saved parameters."""
COUNTS = ("layers", "hidden", "heads", "groups", "head_dim", "ffn", "vocab", "tp", "dp", "pp")


@dataclass(frozen=True)
class GeneratorConfig:
    """One training run, small or large. Defaults are the fixtures' tiny Qwen3 on one device."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    groups: int = 2
    """Query groups: Hugging Face's ``num_key_value_heads``."""
    head_dim: int = 32
    ffn: int = 192
    vocab: int = 512
    tied: bool = False
    dtype: str = "fp32"
    """The parameters' dtype as saved: ``fp32`` or ``bf16``; Adam states are always fp32."""
    tp: int = 1
    dp: int = 1
    pp: int = 1
    opt_shard: int = 0
    """Optimizer sharding: 0 off, -1 across each parameter's whole replica group, n > 0 in
    groups of n (MindSpore's ``optimizer_weight_shard_size``)."""
    remove_redundancy: bool = False
    contiguous_qkv: bool = False
    """``use_contiguous_weight_layout_attention``."""
    interleaved_fc1: bool = True
    """``use_interleaved_weight_layout_mlp``."""
    seed: int = 0
    prefix: str = "qwen3"
    step: int = 1000

    def __post_init__(self) -> None:
        for name in COUNTS:
            if getattr(self, name) < 1:
                raise Ms2hfError(f"GeneratorConfig.{name} = {getattr(self, name)}: must be >= 1")
        if self.dtype not in SOURCE_DTYPES:
            raise Ms2hfError(
                f"GeneratorConfig.dtype = {self.dtype!r}: expected one of "
                f"{', '.join(SOURCE_DTYPES)}"
            )
        if self.layers % self.pp:
            raise Ms2hfError(
                f"GeneratorConfig.layers = {self.layers} cannot be split evenly over "
                f"pp = {self.pp} pipeline stages"
            )
        if self.heads % self.groups:
            raise Ms2hfError(
                f"GeneratorConfig.heads = {self.heads} is not a multiple of groups = {self.groups}"
            )
        if self.opt_shard < -1:
            raise Ms2hfError(
                f"GeneratorConfig.opt_shard = {self.opt_shard}: expected 0 (off), -1 or a "
                "positive size"
            )
        if self.seed < 0:
            raise Ms2hfError(f"GeneratorConfig.seed = {self.seed}: must be >= 0")

    @property
    def devices_per_stage(self) -> int:
        return self.dp * self.tp

    @property
    def world(self) -> int:
        return self.devices_per_stage * self.pp

    @property
    def source_dtype(self) -> str:
        return SOURCE_DTYPES[self.dtype]

    @property
    def file_suffix(self) -> str:
        """``{epoch}_{step in epoch}``: with the usual ``sink_size: 1`` the epoch is the step."""
        return f"{self.step}_1"
