"""What to generate: the model's sizes, the parallel run that saved it, and how it saved."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ms2hf.errors import Ms2hfError
from ms2hf.transforms import qwen3, qwen3_moe
from ms2hf.transforms.family import ModelFamily
from ms2hf.transforms.mappings import WeightLayout
from ms2hf.transforms.registry import by_name

SOURCE_DTYPES = {"fp32": "F32", "bf16": "BF16"}
"""``params_dtype`` of the training run -> the safetensors dtype of its saved parameters."""
LEGACY = "legacy"
CKPT2 = "ckpt2"
SAVE_FORMATS = (LEGACY, CKPT2)
"""How the run saves: per-rank files and strategies, or Checkpoint 2.0 (``use_legacy_format:
False``, ``docs/checkpoint2.md``)."""
COUNTS = ("layers", "hidden", "heads", "groups", "head_dim", "ffn", "vocab", "tp", "dp", "pp")
MOE_COUNTS = ("experts", "moe_ffn", "top_k", "ep", "decoder_sparse_step")


def _require_counts(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(owner, name) < 1:
            raise Ms2hfError(
                f"{type(owner).__name__}.{name} = {getattr(owner, name)}: must be >= 1"
            )


@dataclass(frozen=True)
class MoeConfig:
    """What makes the model a Qwen3-MoE: its experts, how training split them, and which
    layers keep a dense MLP (Hugging Face's ``mlp_only_layers`` / ``decoder_sparse_step`` rule).
    Defaults are the genuine MoE fixture's, without expert parallelism."""

    experts: int = 8
    moe_ffn: int = 32
    """Each expert's ``moe_intermediate_size``."""
    top_k: int = 2
    """``num_experts_per_tok``: routing only, not in the weights."""
    ep: int = 1
    """Expert parallelism: each rank of a stage holds ``experts / ep`` whole experts."""
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1

    def __post_init__(self) -> None:
        _require_counts(self, MOE_COUNTS)
        if self.top_k > self.experts:
            raise Ms2hfError(
                f"MoeConfig.top_k = {self.top_k}: a token cannot pick more than the "
                f"{self.experts} experts"
            )
        if self.experts % self.ep:
            raise Ms2hfError(
                f"MoeConfig.experts = {self.experts} cannot be split into whole experts over "
                f"ep = {self.ep} ranks"
            )


DEFAULT_LORA_TARGETS = ".*word_embeddings|.*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2"
"""The ``target_modules`` of the genuine LoRA fixtures' ``pet_config`` (the embedding matches but
is no linear layer, so it gets no LoRA)."""


@dataclass(frozen=True)
class LoraConfig:
    """A LoRA fine-tune as mindformers runs one: the yaml's ``pet_config``. Defaults are the
    genuine LoRA fixtures'."""

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.1
    target_modules: str = DEFAULT_LORA_TARGETS
    """mindformers' regex, matched against each cell's local name (``docs/lora.md#1``)."""

    def __post_init__(self) -> None:
        _require_counts(self, ("rank",))
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise Ms2hfError(f"LoraConfig.alpha = {self.alpha}: must be a finite number > 0")
        try:
            re.compile(self.target_modules)
        except re.error as e:
            raise Ms2hfError(f"LoraConfig.target_modules: not a regex: {e}") from e


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
    moe: MoeConfig | None = None
    """None: dense Qwen3."""
    save_format: str = LEGACY
    """``legacy`` or ``ckpt2``."""
    lora: LoraConfig | None = None
    """A LoRA fine-tune: frozen base weights, LoRA weights with Adam states; None: full training."""

    def __post_init__(self) -> None:
        _require_counts(self, COUNTS)
        if self.save_format not in SAVE_FORMATS:
            raise Ms2hfError(
                f"GeneratorConfig.save_format = {self.save_format!r}: expected one of "
                f"{', '.join(SAVE_FORMATS)}"
            )
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
        if self.moe is not None:
            self._check_moe(self.moe)

    def _check_moe(self, moe: MoeConfig) -> None:
        """Experts are laid out over all of a stage's devices, ``ep`` of them per expert group;
        and a model with no MoE layer is dense Qwen3, not a Qwen3-MoE."""
        if self.devices_per_stage % moe.ep:
            raise Ms2hfError(
                f"MoeConfig.ep = {moe.ep} does not divide the {self.devices_per_stage} devices "
                f"of a stage (dp {self.dp} x tp {self.tp})"
            )
        outside = [i for i in moe.mlp_only_layers if not 0 <= i < self.layers]
        if outside:
            raise Ms2hfError(
                f"MoeConfig.mlp_only_layers {list(moe.mlp_only_layers)}: layers {outside} do not "
                f"exist in a {self.layers}-layer model"
            )
        if len(self.dense_layers) == self.layers:
            raise Ms2hfError(
                f"MoeConfig.mlp_only_layers {list(moe.mlp_only_layers)} with "
                f"decoder_sparse_step {moe.decoder_sparse_step} leave no layer with experts"
            )

    @property
    def dense_layers(self) -> frozenset[int]:
        """The layers with a dense MLP: all of them without experts."""
        if self.moe is None:
            return frozenset(range(self.layers))
        moe = self.moe
        return qwen3_moe.dense_layers(moe.decoder_sparse_step, moe.mlp_only_layers, self.layers)

    @classmethod
    def from_dims(cls, dims: qwen3.Dims, ep: int = 1, **settings: Any) -> GeneratorConfig:
        """A run training a model of these sizes (a family's ``Dims``); ``ep`` applies to a
        Qwen3-MoE, ``settings`` are the other fields (parallel layout, dtype, seed...)."""
        moe = None
        if isinstance(dims, qwen3_moe.MoeDims):
            moe = MoeConfig(
                experts=dims.num_experts,
                moe_ffn=dims.moe_intermediate_size,
                top_k=min(qwen3_moe.DEFAULTS["num_experts_per_tok"], dims.num_experts),
                ep=ep,
                mlp_only_layers=dims.mlp_only_layers,
                decoder_sparse_step=dims.decoder_sparse_step,
            )
        return cls(
            layers=dims.num_hidden_layers,
            hidden=dims.hidden_size,
            heads=dims.num_attention_heads,
            groups=dims.num_key_value_heads,
            head_dim=dims.head_dim,
            ffn=dims.intermediate_size or 1,
            vocab=dims.vocab_size,
            tied=dims.tie_word_embeddings,
            moe=moe,
            **settings,
        )

    @property
    def weight_layout(self) -> WeightLayout:
        return WeightLayout(self.contiguous_qkv, self.interleaved_fc1)

    @property
    def family(self) -> ModelFamily:
        return by_name("qwen3" if self.moe is None else "qwen3-moe")

    @property
    def dims(self) -> qwen3.Dims:
        """The model's sizes under config.json names, as the family's rules read them."""
        dense = qwen3.Dims(
            hidden_size=self.hidden,
            vocab_size=self.vocab,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.groups,
            head_dim=self.head_dim,
            intermediate_size=self.ffn,
            tie_word_embeddings=self.tied,
        )
        if self.moe is None:
            return dense
        return qwen3_moe.MoeDims(
            **vars(dense),
            num_experts=self.moe.experts,
            moe_intermediate_size=self.moe.moe_ffn,
            decoder_sparse_step=self.moe.decoder_sparse_step,
            mlp_only_layers=self.moe.mlp_only_layers,
        )

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
