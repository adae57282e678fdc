"""The configuration files a user gives, read as values that remember where they came from.

Two files describe what the weights cannot tell: the MindSpore Transformers training yaml
(``model.model_config``) and a Hugging Face ``config.json`` of the original model (a "reference
config"). Both are read into ``{config.json name: ConfigValue}``: every alias folded to the Hugging
Face name, every value carrying its origin (``"train.yaml: model.model_config.num_layers"``) so
that a run can say where each config.json entry came from, and a disagreement can name both
sides. Flags given on the command line become ``ConfigValue`` too (origin: the flag).

transformers 5 saves rope settings only inside ``rope_parameters`` while older releases save
``rope_theta`` and ``rope_scaling``; both spellings are folded into the old names here, and the
config writer derives ``rope_parameters`` from them again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ms2hf.errors import FormatError


@dataclass(frozen=True)
class ConfigValue:
    """A configuration value and where it came from: a file and key, a flag, the weights, a
    default."""

    value: Any
    origin: str
    disagrees: tuple[ConfigValue, ...] = ()
    """Other files' different values for this setting: a disagreement for the user to settle,
    reported with every other problem of the run rather than alone."""


Given = dict[str, ConfigValue]
"""Values given by the user's files and flags, under config.json names."""


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold one object (``what`` it should be, for the message)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what}: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: expected a JSON object ({what})")
    return doc


ALIASES: dict[str, str] = {
    "num_layers": "num_hidden_layers",
    "num_hidden_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "vocab_size": "vocab_size",
    "num_heads": "num_attention_heads",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "n_kv_heads": "num_key_value_heads",
    "num_key_value_heads": "num_key_value_heads",
    "kv_channels": "head_dim",
    "head_dim": "head_dim",
    "ffn_hidden_size": "intermediate_size",
    "intermediate_size": "intermediate_size",
    "layernorm_epsilon": "rms_norm_eps",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "untie_embeddings_and_output_weights": "untie_embeddings_and_output_weights",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "use_contiguous_weight_layout_attention": "use_contiguous_weight_layout_attention",
    "use_interleaved_weight_layout_mlp": "use_interleaved_weight_layout_mlp",
    "num_experts": "num_experts",
    "num_routed_experts": "num_experts",
    "num_moe_experts": "num_experts",
    "moe_intermediate_size": "moe_intermediate_size",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "num_experts_per_tok": "num_experts_per_tok",
    "moe_router_topk": "num_experts_per_tok",
    "norm_topk_prob": "norm_topk_prob",
    "decoder_sparse_step": "decoder_sparse_step",
    "mlp_only_layers": "mlp_only_layers",
    "num_experts_chosen": "num_experts_per_tok",
    # what the model is: checked against the weights' family, never written from here
    "model_type": "model_type",
    "architectures": "architectures",
    # MoE routing the Hugging Face model may not be able to state (docs/qwen3-moe.md#routing)
    "routed_scaling_factor": "routed_scaling_factor",
    "moe_router_topk_scaling_factor": "routed_scaling_factor",
    "moe_router_score_function": "moe_router_score_function",
    "scoring_func": "moe_router_score_function",
    "moe_router_enable_expert_bias": "moe_router_enable_expert_bias",
    "balance_via_topk_bias": "moe_router_enable_expert_bias",
    "moe_router_num_groups": "moe_router_num_groups",
    "n_group": "moe_router_num_groups",
    "moe_router_group_topk": "moe_router_group_topk",
    "topk_group": "moe_router_group_topk",
}


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-6`` as a string, and yamls write epsilons that way."""
    return float(value) if isinstance(value, str) and _EXPONENT_FLOAT.match(value) else value


def _model_config(path: Path) -> dict[str, Any]:
    """The yaml's ``model.model_config`` section."""
    import yaml  # here, not above: only runs given a yaml pay for PyYAML's import (~25 ms)

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read the training yaml: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise FormatError(f"{path}: not valid YAML: {e}") from e
    model = doc.get("model") if isinstance(doc, dict) else None
    section = model.get("model_config") if isinstance(model, dict) else None
    if not isinstance(section, dict):
        raise FormatError(f"{path}: no 'model: model_config:' section")
    return section


def read_train_config(path: str | Path) -> Given:
    """The settings of ``model.model_config`` in the yaml, under config.json names."""
    path = Path(path)
    section = _model_config(path)
    out: Given = {}
    clashes = []
    for key, value in section.items():
        name = ALIASES.get(key)
        if name is None or value is None:
            continue
        value = _number(value)
        origin = f"{path.name}: model.model_config.{key}"
        if name in out and out[name].value != value:
            clashes.append(f"{out[name].origin} = {out[name].value!r} and {origin} = {value!r}")
        out[name] = ConfigValue(value, origin)
    if clashes:
        raise FormatError(f"{path}: {'; '.join(clashes)} disagree")
    untie = out.pop("untie_embeddings_and_output_weights", None)
    if untie is not None and "tie_word_embeddings" not in out:
        out["tie_word_embeddings"] = ConfigValue(not untie.value, untie.origin)
    return out


NOT_TAKEN = frozenset({"torch_dtype", "dtype", "transformers_version", "_name_or_path", "auto_map"})
"""Entries the run decides itself (dtype from ``--dtype``). ``model_type`` and ``architectures``
are read to be checked against the weights' family, never written from here."""
ROPE_PARAMETERS = "rope_parameters"
REFERENCE_ALIASES: dict[str, str] = {"num_local_experts": "num_experts"}
"""transformers 5 saves Qwen3-MoE's expert count under another name; it is checked all the same."""


def read_reference_config(path: str | Path) -> Given:
    """Every entry of a Hugging Face ``config.json``, under the names ms2hf uses."""
    path = Path(path)
    doc = read_json_object(path, "a Hugging Face config.json")
    origin = f"reference {path.name}"
    out: Given = {
        REFERENCE_ALIASES.get(str(key), str(key)): ConfigValue(value, f"{origin}: {key}")
        for key, value in doc.items()
        if key not in NOT_TAKEN and key != ROPE_PARAMETERS
    }
    out.update(_rope_entries(doc, out, path, origin))
    return out


def _rope_entries(doc: dict[str, Any], flat: Given, path: Path, origin: str) -> Given:
    """``rope_theta`` and ``rope_scaling`` read out of ``rope_parameters``, when it is there."""
    rope = doc.get(ROPE_PARAMETERS)
    if rope is None:
        return {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise FormatError(
            f"{path}: {ROPE_PARAMETERS} must be one flat object such as "
            '{"rope_type": "default", "rope_theta": 1000000.0}; per-layer-type rope settings are '
            "not used by Qwen3"
        )
    out: Given = {}
    theta = rope.get("rope_theta")
    if theta is not None:
        if "rope_theta" in flat and flat["rope_theta"].value != theta:
            raise FormatError(
                f"{path}: rope_theta = {flat['rope_theta'].value!r} and "
                f"{ROPE_PARAMETERS}.rope_theta = {theta!r} disagree"
            )
        out["rope_theta"] = ConfigValue(theta, f"{origin}: {ROPE_PARAMETERS}.rope_theta")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default" and not doc.get(
        "rope_scaling"
    ):
        out["rope_scaling"] = ConfigValue(scaling, f"{origin}: {ROPE_PARAMETERS}")
    return out


PET_CONFIG = "pet_config"
PET_KEYS = ("pet_type", "lora_rank", "lora_alpha", "lora_dropout")
"""What ``model.model_config.pet_config`` says about a LoRA run (``docs/lora.md#1``)."""


def read_pet_config(path: str | Path) -> Given:
    """The training yaml's parameter-efficient fine-tuning settings, under their own names; empty
    when the yaml has no ``pet_config`` (a full fine-tune)."""
    path = Path(path)
    pet = _model_config(path).get(PET_CONFIG)
    if pet is None:
        return {}
    if not isinstance(pet, dict):
        raise FormatError(f"{path}: model.model_config.{PET_CONFIG} is not a mapping")
    origin = f"{path.name}: model.model_config.{PET_CONFIG}"
    return {
        key: ConfigValue(_number(pet[key]), f"{origin}.{key}")
        for key in PET_KEYS
        if pet.get(key) is not None
    }


RUN_ADAPTER_CONFIG = "adapter_config.json"
"""What mindformers writes into a LoRA run's output folder, and what PEFT names its config."""
RUN_ADAPTER_KEYS = ("r", "lora_alpha", "lora_dropout")


def read_run_adapter_config(path: str | Path) -> Given:
    """``r``, ``lora_alpha`` and ``lora_dropout`` of the ``adapter_config.json`` mindformers
    writes into a LoRA run's output folder (``docs/lora.md#1``). Its ``target_modules`` (the
    yaml's regex split on ``|``) means nothing to PEFT and is not read. A file that says the run
    was not plain LoRA is refused: mindformers' layers compute plain LoRA only."""
    path = Path(path)
    doc = read_json_object(path, "a LoRA adapter config")
    peft_type = doc.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise FormatError(f"{path}: peft_type is {peft_type!r}; only LORA runs are converted")
    for switch in ("use_rslora", "use_dora"):
        if doc.get(switch):
            raise FormatError(
                f"{path}: {switch} is true, but mindformers' LoRA layers compute plain LoRA "
                "(scale alpha / r, no DoRA); is this the run's own file?"
            )
    return {
        key: ConfigValue(doc[key], f"{path.name}: {key}")
        for key in RUN_ADAPTER_KEYS
        if doc.get(key) is not None
    }
