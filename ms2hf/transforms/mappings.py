"""Rename tables: how MindSpore Transformers parameters become Hugging Face tensors.

A model family's table reads the way Megatron-Bridge's mapping registries read: each row names a
MindSpore parameter (``*`` stands for a decoder layer's number) and the Hugging Face tensor or
tensors made of it, with the rule that cuts them: a plain rename, the QKV split, the gate/up
split, or an MoE layer's grouped experts (``{e}`` stands for the expert). Both vocabularies are
spelled in the table and nowhere else. Rows are pure functions from shapes to ``OutputTensor``
recipes (``ms2hf.transforms.pieces``); nothing here touches tensor bytes.

The table also fixes the order of the Hugging Face tensors (what shards are packed from): rows
outside the layers before the first layer row come first, then every layer's rows in table
order, then the remaining rows. Rows carry a ``group`` so that a layer is checked whole: the
groups a family requires must be complete in every layer, and a layer must have exactly one of
the family's MLP groups (``docs/qwen3.md``, ``docs/qwen3-moe.md``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ms2hf.errors import ModelError
from ms2hf.transforms.pieces import OutputTensor, copy, row_runs, transposed_window

Shapes = Mapping[str, tuple[int, ...]]

LAYER = "*"
"""In a row's names: a decoder layer's number."""
EXPERT = "{e}"
"""In a grouped-experts row's Hugging Face names: an expert's number."""
_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class WeightLayout:
    """How fused weights are laid out; the training yaml's flags, with their defaults."""

    contiguous_qkv: bool = False
    """``use_contiguous_weight_layout_attention``: [q; k; v] instead of per-group blocks."""
    interleaved_fc1: bool = True
    """``use_interleaved_weight_layout_mlp``: gate and up rows alternate instead of halves."""


@dataclass(frozen=True)
class Context:
    """What a row needs besides its own tensor: every shape, the model's sizes, the layout."""

    shapes: Shapes
    dims: Any
    """The family's ``Dims`` (attribute names are config.json names)."""
    layout: WeightLayout
    expert_scale: float = 1.0
    """A routing scale folded into the routed experts' output projections (``scaled`` rows)."""


class Row(Protocol):
    """One row of a table: a MindSpore parameter and the Hugging Face tensors made of it."""

    @property
    def source(self) -> str: ...

    @property
    def group(self) -> str: ...

    @property
    def required(self) -> bool: ...

    def outputs(self, source: str, layer: str, ctx: Context) -> list[OutputTensor]:
        """The tensors made of ``source`` (a name matching ``self.source``; ``layer`` is the
        number that stands for ``*``, or ``""``)."""
        ...

    def targets(self) -> tuple[str, ...]:
        """The Hugging Face names this row writes, with ``*`` and ``{e}`` left in."""
        ...


def in_layer(pattern: str, layer: str) -> str:
    """A table name in layer ``layer`` (a name outside the layers is itself)."""
    return pattern.replace(LAYER, layer, 1) if layer else pattern


@dataclass(frozen=True)
class Rename:
    """The whole parameter under a new name."""

    source: str
    target: str
    group: str = ""
    required: bool = True

    def outputs(self, source: str, layer: str, ctx: Context) -> list[OutputTensor]:
        return [copy(in_layer(self.target, layer), source, ctx.shapes[source])]

    def targets(self) -> tuple[str, ...]:
        return (self.target,)


@dataclass(frozen=True)
class TiedHead:
    """The output head made of the embedding when training saved no output layer (tied
    embeddings): Hugging Face loaders accept the copy, and tools that expect the head find it."""

    target: str
    embedding: str
    output_layer: str
    group: str = ""
    required: bool = False

    @property
    def source(self) -> str:
        return self.output_layer

    def outputs(self, source: str, layer: str, ctx: Context) -> list[OutputTensor]:
        name = self.output_layer if self.output_layer in ctx.shapes else self.embedding
        return [copy(self.target, name, ctx.shapes[name])]

    def targets(self) -> tuple[str, ...]:
        return (self.target,)


@dataclass(frozen=True)
class QkvSplit:
    """``linear_qkv`` -> q, k, v. Grouped (Megatron) layout: per query group, its ``r = nh / ng``
    query heads, then one key head, then one value head; contiguous layout: [q; k; v]
    (``docs/qwen3.md#qkv``)."""

    source: str
    q: str
    k: str
    v: str
    group: str = ""
    required: bool = True

    def outputs(self, source: str, layer: str, ctx: Context) -> list[OutputTensor]:
        dims = ctx.dims
        d, nh, ng = dims.head_dim, dims.num_attention_heads, dims.num_key_value_heads
        shape = ctx.shapes[source]
        if ctx.layout.contiguous_qkv:
            q, k, v = [(0, nh * d)], [(nh * d, ng * d)], [(nh * d + ng * d, ng * d)]
        else:
            r = nh // ng
            per_group = (r + 2) * d
            q = [(g * per_group, r * d) for g in range(ng)]
            k = [(g * per_group + r * d, d) for g in range(ng)]
            v = [(g * per_group + r * d + d, d) for g in range(ng)]
        return [
            row_runs(in_layer(target, layer), source, shape, runs)
            for target, runs in ((self.q, q), (self.k, k), (self.v, v))
        ]

    def targets(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)


@dataclass(frozen=True)
class GateUpSplit:
    """``linear_fc1`` -> gate, up: rows alternate (interleaved, the default) or are halves
    (``docs/qwen3.md#gate-up``)."""

    source: str
    gate: str
    up: str
    group: str = ""
    required: bool = True

    def outputs(self, source: str, layer: str, ctx: Context) -> list[OutputTensor]:
        shape = ctx.shapes[source]
        if shape[0] % 2:
            raise ModelError(f"{source} has {shape[0]} rows; gate and up need an even count")
        f = shape[0] // 2
        gate, up = in_layer(self.gate, layer), in_layer(self.up, layer)
        if ctx.layout.interleaved_fc1:
            return [
                row_runs(gate, source, shape, [(0, f)], 2),
                row_runs(up, source, shape, [(1, f)], 2),
            ]
        return [row_runs(gate, source, shape, [(0, f)]), row_runs(up, source, shape, [(f, f)])]

    def targets(self) -> tuple[str, ...]:
        return (self.gate, self.up)


@dataclass(frozen=True)
class GroupedExperts:
    """An MoE layer's grouped expert operand -> one tensor per expert and target. Experts are
    stored transposed and stacked along dim 0: ``weight1`` ``[E*H, 2*Fm]`` holds expert e's
    gate and up as the column halves of rows ``[e*H, (e+1)*H)``; ``weight2`` ``[E*Fm, H]``
    holds its down projection in rows ``[e*Fm, (e+1)*Fm)`` (``docs/qwen3-moe.md#experts``).
    ``targets`` is ``(gate, up)`` for ``weight1`` and ``(down,)`` for ``weight2``."""

    source: str
    experts: tuple[str, ...]
    group: str = ""
    required: bool = True
    scaled: bool = False
    """The experts' output projection: a folded routing scale multiplies it (the layer's output
    is linear in it, ``docs/qwen3-moe.md#routing``)."""

    def outputs(self, source: str, layer: str, ctx: Context) -> list[OutputTensor]:
        made = self._windows(source, layer, ctx)
        if self.scaled and ctx.expert_scale != 1.0:
            return [dataclasses.replace(t, scale=ctx.expert_scale) for t in made]
        return made

    def _windows(self, source: str, layer: str, ctx: Context) -> list[OutputTensor]:
        dims = ctx.dims
        e_count, h, f = dims.num_experts, dims.hidden_size, dims.moe_intermediate_size
        names = [in_layer(t, layer) for t in self.experts]
        out: list[OutputTensor] = []
        for e in range(e_count):
            ex = str(e)
            if len(names) == 2:  # weight1: gate and up, the column halves of H rows
                rows = (e * h, (e + 1) * h)
                out.append(transposed_window(names[0].replace(EXPERT, ex), source, rows, (0, f)))
                out.append(
                    transposed_window(names[1].replace(EXPERT, ex), source, rows, (f, 2 * f))
                )
            else:  # weight2: down, Fm rows of H columns
                rows = (e * f, (e + 1) * f)
                out.append(transposed_window(names[0].replace(EXPERT, ex), source, rows, (0, h)))
        return out

    def targets(self) -> tuple[str, ...]:
        return self.experts


@dataclass(frozen=True)
class Skip:
    """A parameter that is not a weight (a statistic of training): no tensor is made of it,
    and ``inspect`` lists it as skipped."""

    source: str
    group: str = ""
    required: bool = False

    def outputs(self, source: str, layer: str, ctx: Context) -> list[OutputTensor]:
        return []

    def targets(self) -> tuple[str, ...]:
        return ()


def layer_pattern(name: str) -> tuple[str, str]:
    """``decoder.layers.7.mlp.linear_fc1.weight`` -> (``decoder.layers.*.mlp...``, ``"7"``);
    a name without a layer number is its own pattern."""
    m = _LAYER_NUMBER.search(name)
    if m is None:
        return name, ""
    return name[: m.start()] + f".{LAYER}." + name[m.end() :], m.group(1)


def natural_key(name: str) -> tuple[Any, ...]:
    """Sorts parameter names with their numbers as numbers: layer 2 before layer 10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


@dataclass(frozen=True)
class Planned:
    """A table applied to a checkpoint's parameters."""

    outputs: tuple[OutputTensor, ...]
    skipped: frozenset[str]
    """Parameters deliberately left out (``Skip`` rows)."""


ROW_SELECTIONS = (Rename, QkvSplit, GateUpSplit)
"""Rows whose tensors are whole-column row selections of their parameter: a LoRA on the
parameter follows them row for row (``ms2hf.transforms.lora``)."""


@dataclass(frozen=True)
class Table:
    """A family's rows, the groups every layer must have, the MLP groups a layer has one of, and
    the parameters a LoRA fine-tune may wrap (the linear layers mindformers' LoRA rewrites)."""

    rows: tuple[Row, ...]
    layer_groups: tuple[str, ...]
    mlp_groups: tuple[str, ...]
    lora: tuple[str, ...] = ()
    """Sources (``*`` for the layer) whose ``<module>.lora_A/B.weight`` are converted; each must
    be a row selection (``ROW_SELECTIONS``), so its LoRA ``B`` is cut by the same rows."""

    def __post_init__(self) -> None:
        sources = [r.source for r in self.rows]
        if len(set(sources)) != len(sources):
            raise ValueError("a table names one MindSpore parameter in two rows")
        rows = {r.source: r for r in self.rows}
        for source in self.lora:
            if not isinstance(rows.get(source), ROW_SELECTIONS):
                raise ValueError(f"LoRA target {source!r} is not a row-selection row of the table")

    def row(self, name: str) -> tuple[Row, str] | None:
        """The row of a parameter and its layer number, or None when the table lacks it."""
        pattern, layer = layer_pattern(name)
        for r in self.rows:
            if r.source == pattern:
                return r, layer
        return None

    def _split(self) -> tuple[list[Row], list[Row], list[Row]]:
        """Rows before the layers, the layer rows, rows after the layers."""
        layered = [i for i, r in enumerate(self.rows) if LAYER in r.source]
        first, last = (layered[0], layered[-1]) if layered else (len(self.rows), len(self.rows))
        rows = list(self.rows)
        return rows[:first], [r for r in rows if LAYER in r.source], rows[last + 1 :]

    def apply(self, ctx: Context, layers: Mapping[int, Mapping[str, str]]) -> Planned:
        """Every Hugging Face tensor of the checkpoint, in table order; any parameter the
        table lacks, or a layer that is not whole, is an error naming it."""
        head, layer_rows, tail = self._split()
        out: list[OutputTensor] = []
        skipped: set[str] = set()
        used: set[str] = set()

        def emit(row: Row, source: str, layer: str) -> None:
            made = row.outputs(source, layer, ctx)
            out.extend(made)
            used.update(t.source for t in made)
            if isinstance(row, Skip):
                skipped.add(source)

        for row in head:
            self._global(row, ctx, emit)
        for i, keys in layers.items():
            present = {r.group for r in layer_rows if r.source in keys}
            self._check_layer(i, keys, present, layer_rows)
            for row in layer_rows:
                if row.source in keys:
                    emit(row, keys[row.source], str(i))
        for row in tail:
            self._global(row, ctx, emit)
        unexpected = sorted(set(ctx.shapes) - used - skipped)
        if unexpected:
            shown = ", ".join(unexpected[:5])
            more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
            raise ModelError(
                f"unexpected parameters for this model: {shown}{more}. Qwen3 has no biases and "
                "no other weights; ms2hf will not drop them silently"
            )
        return Planned(tuple(out), frozenset(skipped))

    @staticmethod
    def _global(row: Row, ctx: Context, emit: Any) -> None:
        if row.source in ctx.shapes or isinstance(row, TiedHead):
            emit(row, row.source, "")
        elif row.required:
            raise ModelError(
                f"parameter {row.source!r} is missing; a Qwen3 checkpoint must have it"
            )

    def _check_layer(
        self, i: int, keys: Mapping[str, str], present: set[str], rows: Sequence[Row]
    ) -> None:
        mlps = [g for g in self.mlp_groups if g in present]
        if len(mlps) > 1:
            raise ModelError(
                f"layer {i} has both a dense MLP and experts ({', '.join(mlps)} parameters)"
            )
        wanted = {*self.layer_groups, *(mlps or self.mlp_groups[:1])}
        missing = [
            r.source for r in rows if r.group in wanted and r.required and r.source not in keys
        ]
        if missing:
            names = ", ".join(in_layer(s, str(i)) for s in missing)
            raise ModelError(f"layer {i} lacks {names}")


def layer_keys(names: Sequence[str] | Mapping[str, Any]) -> dict[int, dict[str, str]]:
    """``{layer: {row pattern: full name}}`` for every name holding a layer number."""
    layers: dict[int, dict[str, str]] = {}
    for name in names:
        pattern, layer = layer_pattern(name)
        if layer:
            layers.setdefault(int(layer), {})[pattern] = name
    return dict(sorted(layers.items()))
