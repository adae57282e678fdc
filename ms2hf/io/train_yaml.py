"""The model settings of a MindSpore Transformers training yaml, under Hugging Face names.

Users meet several spellings of one setting (``num_layers``/``num_hidden_layers``,
``num_query_groups``/``num_key_value_heads``, ...), so every alias is folded to the Hugging Face
name here and the rest of ms2hf sees one vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ms2hf.errors import FormatError

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
}


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-6`` as a string, and yamls write epsilons that way."""
    return float(value) if isinstance(value, str) and _EXPONENT_FLOAT.match(value) else value


def read_train_config(path: str | Path) -> dict[str, tuple[Any, str]]:
    """``{hf_name: (value, where it came from)}`` from ``model.model_config`` of the yaml."""
    import yaml  # here, not above: only runs given a yaml pay for PyYAML's import (~25 ms)

    path = Path(path)
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
    out: dict[str, tuple[Any, str]] = {}
    for key, value in section.items():
        name = ALIASES.get(key)
        if name is None or value is None:
            continue
        value = _number(value)
        origin = f"{path.name}: model.model_config.{key}"
        if name in out and out[name][0] != value:
            raise FormatError(
                f"{path}: {out[name][1]} = {out[name][0]!r} and {origin} = {value!r} disagree"
            )
        out[name] = (value, origin)
    untie = out.pop("untie_embeddings_and_output_weights", None)
    if untie is not None and "tie_word_embeddings" not in out:
        out["tie_word_embeddings"] = (not untie[0], untie[1])
    return out
