"""The real client: tiny Qwen3 models made by transformers (dense tied and untied, and a Qwen3-MoE
with a dense first layer), saved as MindSpore TP2 x PP2 training outputs (the MoE over expert
parallel 2), converted by ms2hf, loaded back with ``AutoModelForCausalLM.from_pretrained``, give
the very same logits (bit for bit in fp32; in bf16, those of the bf16-cast original), and load
with no warning at all (missing or unexpected keys, config fields, token ids).

Needs the ``test-hf`` extra (transformers and a CPU torch); skipped without it, except in CI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("CI"):
    # CI installs the test-hf extra: there a missing client is a failure, never a quiet skip.
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

import ms2hf
from ms2hf.generator import MoeConfig, generate
from tests.conftest import DATA, DENSE_FIXTURES, MOE_FIXTURES, load_tensors
from tests.hf_clients import ATTENTION, MOE, SIZES, client_warnings, moe_entries, training_run

SETTINGS = {
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
}
"""What the weights cannot tell: this reaches config.json through ``reference_config`` only."""


def hf_entries(moe: MoeConfig | None, tied: bool) -> dict[str, Any]:
    """What the original model is made with: the converted model's config must say it too."""
    entries = {**SIZES, **SETTINGS, "tie_word_embeddings": tied}
    if moe is not None:
        entries.update(moe_entries(moe))
    return entries


def hf_config(moe: MoeConfig | None, tied: bool) -> transformers.PretrainedConfig:
    config_class = transformers.Qwen3Config if moe is None else transformers.Qwen3MoeConfig
    return config_class(**hf_entries(moe, tied))


def original_model(config: transformers.PretrainedConfig, path: Path) -> None:
    """A seeded random model, norms perturbed so that a swapped norm would show, saved to ``path``
    by transformers (its config.json has the rope settings in ``rope_parameters`` only)."""
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)


def write_training_output(original: Path, moe: MoeConfig | None, tied: bool, out: Path) -> Path:
    """The project's generator, TP2 x PP2, with the saved model's tensors as its weights: the
    file, not the model's state dict, since transformers fuses a layer's experts in memory and
    saves them per expert, under the names a conversion writes (a tied head is saved once)."""
    config = training_run(tied=tied, dtype="fp32", moe=moe)
    weights = load_tensors(original / "model.safetensors")
    return generate(config, out, weights).root


@pytest.fixture
def transformers_warnings() -> Iterator[list[str]]:
    """Every warning transformers logs or raises while the test runs."""
    with client_warnings("transformers") as messages:
        yield messages


@pytest.mark.parametrize(
    ("moe", "tied"),
    [(None, False), (None, True), (MOE, False)],
    ids=["untied", "tied", "moe"],
)
def test_logits_survive_the_round_trip(
    moe: MoeConfig | None, tied: bool, tmp_path: Path, transformers_warnings: list[str]
) -> None:
    original = tmp_path / "original"
    original_model(hf_config(moe, tied), original)
    training = write_training_output(original, moe, tied, tmp_path / "training")
    torch.manual_seed(0)
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 24))
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out = tmp_path / f"hf_{dtype}"
        ms2hf.convert(
            training, out, dtype=dtype, progress=False, reference_config=original / "config.json"
        )
        transformers_warnings.clear()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            out, dtype=torch_dtype, attn_implementation=ATTENTION
        ).eval()
        assert transformers_warnings == []
        entries = hf_entries(moe, tied)
        assert {k: getattr(loaded.config, k) for k in entries} == entries
        # Cast by transformers' own loader, so that only the weights' path differs between the two.
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            original, dtype=torch_dtype, attn_implementation=ATTENTION
        ).eval()
        assert type(loaded) is type(reference)
        with torch.no_grad():
            want = reference(input_ids).logits
            got = loaded(input_ids).logits
        assert got.dtype == torch_dtype
        assert torch.equal(got, want), (
            f"{dtype}: max diff {(got.float() - want.float()).abs().max()}"
        )
        assert want.float().std() > 0


OPTIONAL_FIELDS = {"pad_token_id", "layer_types"}
"""Fields transformers' Qwen3 configs declare that config.json may leave out: no pad token in the
published Qwen3 configs, and layer types derived from the sliding-window settings."""


@pytest.mark.parametrize("fixture", DENSE_FIXTURES + MOE_FIXTURES)
def test_every_fixture_loads_with_no_warning_and_no_missing_field(
    fixture: str, tmp_path: Path, transformers_warnings: list[str]
) -> None:
    ms2hf.convert(DATA / fixture, tmp_path, progress=False)
    written = json.loads((tmp_path / "config.json").read_text())
    config_class = transformers.AutoConfig.for_model(written["model_type"]).__class__
    assert set(config_class.__annotations__) - set(written) <= OPTIONAL_FIELDS
    transformers_warnings.clear()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=ATTENTION
    )
    assert transformers_warnings == []
    assert model.dtype == torch.bfloat16
    assert type(model).__name__ == written["architectures"][0]
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
    ):
        assert getattr(model.config, key) == written[key], key
    assert model.config.rope_parameters["rope_theta"] == written["rope_theta"]
