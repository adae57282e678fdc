"""The real clients of a converted LoRA fine-tune: PEFT and transformers.

A tiny Qwen3 (and a Qwen3-MoE with a dense first layer, LoRA on attention) is made by
transformers, and LoRA weights for it in Hugging Face space, as MindSpore's fused layers imply
them (q, k and v share one ``lora_A``, gate and up another). The reference is computed from those
Hugging Face-space weights alone: each LoRA module merged by the oracle's rule
(tests/oracle/lora.py) into the original model, loaded by transformers. The generator writes the
MindSpore LoRA training output from the same weights (TP2 x PP2); ms2hf converts it to a PEFT
adapter and to the merged model.

- The merged model, loaded by ``AutoModelForCausalLM``, gives the reference logits bit for bit:
  its weights are the reference's (the same float64 rule, rounded once).
- The adapter, loaded by ``PeftModel.from_pretrained`` onto the original base model, loads with
  no missing or unexpected LoRA key and no warning, and gives the reference logits to within
  float32 rounding: PEFT adds ``s * B (A x)`` at run time in float32 rather than using merged
  weights. Each layer's products then differ by float32 roundings over sums of ~hidden terms, so
  the logits may differ by about layers x hidden x 2**-24 (4 x 64 x 6e-8 = 1.5e-5) of their
  scale; the test allows 2e-5 of it (measured: 2.2e-6 of logits of scale 0.61 for Qwen3, 3e-7
  for the MoE), while the LoRA itself moves the logits by ~0.8 (checked to matter).

Needs the ``test-hf`` extra (transformers, peft, a CPU torch); skipped without it, except in CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never wait on the network

if os.environ.get("CI"):
    import peft
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

import ms2hf
from ms2hf.generator import LoraConfig, generate
from tests.conftest import load_tensors
from tests.hf_clients import ATTENTION, MOE, SIZES, moe_entries, training_run
from tests.hf_clients import client_warnings as logged_warnings
from tests.oracle import lora as oracle

SETTINGS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 128, "bos_token_id": 1}
RANK, ALPHA = 8, 24
DENSE = ".*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2"
MOE_TARGETS = ".*linear_qkv|.*linear_proj"
"""Qwen3-MoE's LoRA is on attention: with the dense layer's MLP too, PEFT 0.21 on transformers
5 cannot load the adapter (it turns every gate/up/down target into the fused experts;
docs/lora.md#4), which ``ms2hf`` says when it writes one."""
SHARED_A = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
"""Modules whose lora_A is another's: MindSpore's fused linear_qkv and linear_fc1 have one."""


def hf_config(moe: bool) -> Any:
    if moe:
        return transformers.Qwen3MoeConfig(**SIZES, **SETTINGS, **moe_entries(MOE))
    return transformers.Qwen3Config(**SIZES, **SETTINGS)


def original_model(moe: bool, path: Path) -> None:
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(moe), attn_implementation=ATTENTION
    )
    model.save_pretrained(path)


def lora_weights(base: dict[str, np.ndarray], kinds: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``<module>.lora_A.weight`` / ``.lora_B.weight`` for the linear layers of ``kinds`` that
    mindformers wraps (never experts), in Hugging Face space, A shared as MindSpore shares it;
    B drawn too (a trained adapter), so that the LoRA changes the logits."""
    rng = np.random.default_rng(7)
    out: dict[str, np.ndarray] = {}
    shared: dict[str, np.ndarray] = {}
    for name, w in sorted(base.items()):
        parts = name.split(".")
        if len(parts) < 6 or parts[-2] not in kinds or "experts" in parts:
            continue
        module = name.removesuffix(".weight")
        owner = module.rsplit(".", 1)[0] + "." + SHARED_A.get(parts[-2], parts[-2])
        if owner not in shared:
            shared[owner] = rng.normal(0, 0.2, (RANK, w.shape[1])).astype("f4")
        out[module + ".lora_A.weight"] = shared[owner]
        out[module + ".lora_B.weight"] = rng.normal(0, 0.2, (w.shape[0], RANK)).astype("f4")
    return out


def merged_by_the_rule(base: dict[str, np.ndarray], lora: dict[str, np.ndarray]) -> dict[str, Any]:
    """The weights of every LoRA module, merged by the oracle's rule."""
    scale = oracle.lora_scale(ALPHA, RANK)
    out = {}
    for name, w in base.items():
        module = name.removesuffix(".weight")
        if module + ".lora_A.weight" in lora:
            a, b = lora[module + ".lora_A.weight"], lora[module + ".lora_B.weight"]
            out[name] = torch.from_numpy(oracle.merge_weight(w, b, a, scale))
    return out


def training_output(moe: bool, weights: dict[str, np.ndarray], out: Path) -> Path:
    config = training_run(
        moe=MOE if moe else None,
        lora=LoraConfig(rank=RANK, alpha=ALPHA, target_modules=MOE_TARGETS if moe else DENSE),
    )
    return generate(config, out, weights).root


@pytest.fixture
def client_warnings() -> Iterator[list[str]]:
    """Every warning transformers or PEFT logs or raises while the test runs."""
    with logged_warnings("transformers", "peft") as messages:
        yield messages


def load(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=ATTENTION
    ).eval()


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3", "qwen3-moe"])
def test_peft_and_transformers_give_the_reference_logits(
    moe: bool, tmp_path: Path, client_warnings: list[str]
) -> None:
    original = tmp_path / "original"
    original_model(moe, original)
    base = load_tensors(original / "model.safetensors")
    lora = lora_weights(base, oracle.HF_TARGET_ORDER[: 4 if moe else 7])
    training = training_output(moe, {**base, **lora}, tmp_path / "training")
    ms2hf.convert(training, tmp_path / "adapter", lora="adapter", dtype="fp32", progress=False)
    ms2hf.convert(
        training,
        tmp_path / "merged",
        dtype="fp32",
        progress=False,
        reference_config=original / "config.json",
    )
    torch.manual_seed(0)
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 16))

    reference = load(original)
    with torch.no_grad():
        base_logits = reference(input_ids).logits
        changed = merged_by_the_rule(base, lora)
        assert len(changed) == len(lora) // 2
        assert reference.load_state_dict(changed, strict=False).unexpected_keys == []
        want = reference(input_ids).logits

    client_warnings.clear()
    merged = load(tmp_path / "merged")
    with torch.no_grad():
        got = merged(input_ids).logits
    assert torch.equal(got, want), f"max diff {(got - want).abs().max()}"

    model = peft.PeftModel.from_pretrained(load(original), tmp_path / "adapter").eval()
    result = model.load_adapter(tmp_path / "adapter", adapter_name="check")
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    assert client_warnings == []
    model.set_adapter("default")
    with torch.no_grad():
        adapted = model(input_ids).logits
    scale = want.abs().max()
    assert (adapted - want).abs().max() <= 2e-5 * scale
    assert (base_logits - want).abs().max() > 100 * 2e-5 * scale  # the LoRA matters
    lora_modules = {
        n.rsplit(".", 2)[0] for n, _ in model.named_parameters() if "lora_A.default" in n
    }
    assert len(lora_modules) == len(lora) // 2  # every adapter module, and nothing else, wrapped
