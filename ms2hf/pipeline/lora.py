"""What a run makes of a LoRA fine-tune: which output, the scale, and where alpha came from.

The rank ``r`` is in the tensors; ``lora_alpha`` is not. It is taken from, in order of
preference, ``--lora-alpha``, the training yaml's ``model.model_config.pet_config`` and the
``adapter_config.json`` mindformers writes beside ``checkpoint/`` (``docs/lora.md#2``). Every
source given must agree: a wrong scale gives a model that loads and runs and is silently not the
one trained, so a disagreement stops the run and names both values, and no source at all stops
it naming the three ways to give one. The run's file stores ``int(lora_alpha)``: it agrees with
a value whose integer part it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ms2hf.errors import ModelError
from ms2hf.io.config_files import (
    RUN_ADAPTER_CONFIG,
    ConfigValue,
    read_pet_config,
    read_run_adapter_config,
)

LORA_MODES = ("merged", "adapter", "base")
"""``merged``: the fine-tuned model (the default on a LoRA run); ``adapter``: a PEFT adapter;
``base``: the model the fine-tune started from."""
ALPHA_FLAG = "--lora-alpha"
YAML_KEYS = {"alpha": "lora_alpha", "rank": "lora_rank", "dropout": "lora_dropout"}
RUN_FILE_KEYS = {"alpha": "lora_alpha", "rank": "r", "dropout": "lora_dropout"}


@dataclass(frozen=True)
class LoraGiven:
    """What the flag and the files say about a run's LoRA, each value with its origin, in order
    of preference (flag, training yaml, the run's ``adapter_config.json``)."""

    alpha: tuple[ConfigValue, ...] = ()
    rank: tuple[ConfigValue, ...] = ()
    dropout: tuple[ConfigValue, ...] = ()
    problem: str | None = None
    """Why the yaml's ``pet_config`` cannot describe this run (another method), when so."""


def run_adapter_config(folder: Path | None) -> Path | None:
    """The ``adapter_config.json`` a LoRA run left in its output folder: ``folder`` itself or,
    when ``folder`` is its ``checkpoint/`` (or a Checkpoint 2.0 iteration in it), a parent."""
    if folder is None:
        return None
    for where in (folder, folder.parent, folder.parent.parent):
        path = where / RUN_ADAPTER_CONFIG
        if path.is_file():
            return path
    return None


def lora_given(alpha: float | None, train_yaml: Path | None, run_config: Path | None) -> LoraGiven:
    """Read what each source says; nothing is decided before the checkpoint's ``r`` is known."""
    found: dict[str, list[ConfigValue]] = {"alpha": [], "rank": [], "dropout": []}
    if alpha is not None:
        found["alpha"].append(ConfigValue(alpha, ALPHA_FLAG))
    problem = None
    if train_yaml is not None:
        pet = read_pet_config(train_yaml)
        pet_type = pet.get("pet_type")
        if pet_type is not None and str(pet_type.value).lower() != "lora":
            problem = f"{pet_type.origin} = {pet_type.value!r}, not lora"
        for name, key in YAML_KEYS.items():
            if key in pet:
                found[name].append(pet[key])
    if run_config is not None:
        run = read_run_adapter_config(run_config)
        for name, key in RUN_FILE_KEYS.items():
            if key in run:
                found[name].append(run[key])
    return LoraGiven(tuple(found["alpha"]), tuple(found["rank"]), tuple(found["dropout"]), problem)


def _number(value: ConfigValue) -> float:
    v = value.value
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ModelError(f"{value.origin} = {v!r}: lora_alpha must be a finite number > 0")
    return float(v)


def _from_run_file(value: ConfigValue) -> bool:
    return value.origin.startswith(f"{RUN_ADAPTER_CONFIG}: ")


def _agree(chosen: ConfigValue, other: ConfigValue) -> bool:
    """Equal values; a run file's value (mindformers writes ``int(lora_alpha)``) agrees with one
    whose integer part it is."""
    a, b = _number(chosen), _number(other)
    return a == b or (_from_run_file(other) and b == math.trunc(a))


def resolve_alpha(given: LoraGiven, rank: int, rank_source: str) -> ConfigValue:
    """``lora_alpha`` with its origin, checked; the ranks the files state checked against the
    tensors' ``rank`` (read from ``rank_source``)."""
    for claim in given.rank:
        if claim.value != rank:
            raise ModelError(
                f"{claim.origin} = {claim.value!r} disagrees with the checkpoint: "
                f"{rank_source} gives r = {rank}"
            )
    if given.problem is not None:
        raise ModelError(f"{given.problem}, but the checkpoint holds LoRA weights")
    if not given.alpha:
        raise ModelError(
            f"lora_alpha is unknown: the checkpoint holds LoRA weights (r = {rank}) but not the "
            f"scale alpha / r; give {ALPHA_FLAG}, or the training yaml with --config "
            "(model.model_config.pet_config.lora_alpha), or keep the run's "
            f"{RUN_ADAPTER_CONFIG} next to checkpoint/"
        )
    chosen = given.alpha[0]
    for other in given.alpha[1:]:
        if not _agree(chosen, other):
            raise ModelError(
                f"{chosen.origin} = {chosen.value!r} and {other.origin} = {other.value!r} "
                "disagree on lora_alpha; give only the right one (the run's "
                f"{RUN_ADAPTER_CONFIG} holds int(lora_alpha))"
            )
    if _number(chosen) <= 0:
        truncated = (
            " (the run's file holds int(lora_alpha): below 1 it is 0)"
            if _from_run_file(chosen)
            else ""
        )
        raise ModelError(
            f"{chosen.origin} = {chosen.value!r}: lora_alpha must be > 0{truncated}; give "
            f"{ALPHA_FLAG}"
        )
    return chosen


def dropout(given: LoraGiven) -> float:
    """The run's ``lora_dropout`` for the adapter config (no effect on inference; 0.0 unknown)."""
    for value in given.dropout:
        if isinstance(value.value, (int, float)) and not isinstance(value.value, bool):
            return float(value.value)
    return 0.0


@dataclass(frozen=True)
class LoraRequest:
    """What the user asked of a LoRA run."""

    mode: str | None = None
    """One of ``LORA_MODES``; None: the merged model when the checkpoint has LoRA."""
    given: LoraGiven = LoraGiven()
    base_model: str | None = None
    """``base_model_name_or_path`` of a PEFT adapter (``--base-model``)."""


@dataclass(frozen=True)
class LoraPlan:
    """What a run makes of a checkpoint's LoRA: reported by ``convert`` and ``inspect``."""

    mode: str
    rank: int
    modules: int
    """MindSpore modules with LoRA."""
    targets: tuple[str, ...]
    """Hugging Face module names with LoRA (PEFT's ``target_modules``)."""
    alpha: ConfigValue | None
    """None when not needed (``base``) and not given."""
    dropout: float
    base_model: str | None

    @property
    def scale(self) -> float:
        assert self.alpha is not None
        return float(self.alpha.value) / self.rank

    def describe(self, verb: str = "writing") -> str:
        """One line for the run's log (``inspect``: ``verb`` "convert writes")."""
        alpha = (
            f"alpha {self.alpha.value!r} (from {self.alpha.origin}), scale {self.scale:g}"
            if self.alpha is not None
            else "alpha not known"
        )
        return (
            f"LoRA fine-tune: r {self.rank}, {alpha}, on {self.modules} modules "
            f"({', '.join(self.targets)}); {verb} {MADE[self.mode]}"
        )


MADE = {
    "merged": "the fine-tuned model, LoRA merged (--lora adapter: a PEFT adapter; --lora base: "
    "the base model)",
    "adapter": "a PEFT adapter (--lora adapter)",
    "base": "the base model, without the fine-tuning (--lora base)",
}
"""What each mode writes, as the run and ``inspect`` say it."""
