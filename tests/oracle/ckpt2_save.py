"""What a mindformers 2.1.0 Checkpoint 2.0 save writes, from full tensors and a parallel layout.

The reference recipe of ``docs/checkpoint2.md`` ("Writing one"), in executable form, checked by
``tests/test_oracle_ckpt2_save.py`` to give the four genuine fixtures byte for byte (every file:
``metadata.json``, ``common.json``, the tracker, every ``-model-`` and ``-opt-`` file). It is a
test oracle for ms2hf's generator, not a part of it; numpy and json only.

Scope, as far as the fixtures confirm it: Qwen3 / Qwen3-MoE under Graph mode, data x context x
tensor parallel ``[dp, cp, tp]`` per stage, pipeline stages of equal size, expert parallel,
optimizer sharding over the full data-parallel group (``optimizer_weight_shard_size: -1``),
normal and de-duplicated (``remove_redundancy: True``) saves. Other optimizer shard sizes and MoE
with optimizer sharding are not confirmed by any fixture: see the doc's open questions.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MS_DTYPE = {
    "float32": "Float32",
    "bfloat16": "BFloat16",
    "float16": "Float16",
    "int32": "Int32",
    "int64": "Int64",
}
ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int32": "I32", "int64": "I64"}
BITS = {
    "Float32": 32,
    "BFloat16": 16,
    "Float16": 16,
    "Int32": 32,
    "Int64": 64,
}  # mindformers' size table


@dataclass
class Parallel:
    tp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    opt_shard: bool = False  # enable_parallel_optimizer with optimizer_weight_shard_size -1
    dedup: bool = False  # remove_redundancy
    prefix: str | None = "qwen3"  # None: files are named model-... / opt-...

    @property
    def per_stage(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def world(self) -> int:
        return self.per_stage * self.pp


@dataclass
class Layout:
    device_matrix: list[int]
    tensor_map: list  # per tensor dim: an int (one axis, -1 none) or a list of axes
    alias_name: list[str]
    rank_list: list[int]

    def to_json(self) -> dict:
        return {
            "device_matrix": self.device_matrix,
            "tensor_map": self.tensor_map,
            "interleaved_parallel": False,
            "alias_name": self.alias_name,
            "rank_list": self.rank_list,
        }


@dataclass
class Param:
    name: str
    shape: list[int]
    dtype: str  # numpy-ish name: float32, bfloat16, ...
    stage: int
    layout: Layout
    trainable: bool = True  # has adam_m./adam_v. states
    grid: list[int] = field(default_factory=list)
    slice_of_rank: list[int] = field(default_factory=list)  # by local rank


# ----------------------------------------------------------------------------- layouts


def _kind(name: str) -> str:
    if name.endswith("router.fi_accu"):
        return "fi_accu"
    if name.endswith(("experts.weight1", "experts.weight2")):
        return "expert"
    if name.endswith("router.weight"):
        return "router"
    if name.endswith(
        ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
    ):
        return "column"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    return "norm"


def layout_for(name: str, shape: list[int], par: Parallel, stage: int) -> Layout:
    n = par.per_stage
    ranks = list(range(stage * n, (stage + 1) * n))
    kind = _kind(name)
    if kind == "fi_accu":
        return Layout([n], [-1], ["a"], ranks)
    if kind in ("expert", "router"):
        dm: list[int] = [n // par.ep, par.ep]
        tmap: list = [0, -1] if kind == "expert" else [-1, -1]
    else:
        dm = [par.dp, par.cp, par.tp]
        tmap = {"column": [0, -1], "row": [-1, 0], "norm": [-1] * len(shape)}[kind]
    if par.opt_shard:
        # Optimizer sharding folds every device axis the tensor map leaves unused into dim 0,
        # after dim 0's own axis, in device-matrix order (left to right).
        used = {a for e in tmap for a in (e if isinstance(e, list) else [e]) if a != -1}
        unused = [a for a in range(len(dm) - 1, -1, -1) if a not in used]
        head = tmap[0] if isinstance(tmap[0], list) else ([] if tmap[0] == -1 else [tmap[0]])
        # Assumed, not seen in a fixture: a dim 0 the folded axes do not divide stays unfolded.
        if unused and shape[0] % math.prod(dm[len(dm) - 1 - a] for a in head + unused) == 0:
            tmap = [head + unused] + tmap[1:]
    return Layout(dm, tmap, [chr(ord("a") + i) for i in range(len(dm))], ranks)


def _axes(entry) -> list[int]:
    return [a for a in (entry if isinstance(entry, list) else [entry]) if a != -1]


def shard(p: Param) -> None:
    """Fill the parameter's grid (axis_fragmentations) and each local rank's slice id."""
    dm = p.layout.device_matrix
    size = lambda a: dm[len(dm) - 1 - a]  # noqa: E731 - tensor-map axes count from the right
    p.grid = [math.prod(size(a) for a in _axes(e)) for e in p.layout.tensor_map]
    flat = [a for e in p.layout.tensor_map for a in (_axes(e) or [-1])]
    p.slice_of_rank = []
    for local in range(len(p.layout.rank_list)):
        coord = np.unravel_index(local, dm)
        sid, stride = 0, 1
        for a in reversed(flat):
            if a != -1:
                sid += int(coord[len(dm) - 1 - a]) * stride
                stride *= size(a)
        p.slice_of_rank.append(sid)


def _region(p: Param, sid: int) -> tuple[slice, ...]:
    local = [s // g for s, g in zip(p.shape, p.grid)]
    idx = np.unravel_index(sid, p.grid) if p.grid else ()
    return tuple(slice(int(i) * n, (int(i) + 1) * n) for i, n in zip(idx, local))


# ----------------------------------------------------------------------------- the save


def plan_qwen3(tensors: dict[str, np.ndarray], par: Parallel, num_layers: int) -> list[Param]:
    """Parameters (model ones and their Adam states) with stage and layout, in the order every
    rank reports them: each stage's model parameters sorted by name, each followed by its
    ``adam_m.`` and ``adam_v.`` state."""
    per = num_layers // par.pp
    out = []
    for name in sorted(k for k in tensors if not k.startswith(("adam_m.", "adam_v."))):
        if name.startswith("decoder.layers."):
            stage = int(name.split(".")[2]) // per
        elif name.startswith("embedding."):
            stage = 0
        else:
            stage = par.pp - 1
        t = tensors[name]
        trainable = not name.endswith("router.fi_accu")
        p = Param(
            name,
            list(t.shape),
            t.dtype.name,
            stage,
            layout_for(name, list(t.shape), par, stage),
            trainable,
        )
        shard(p)
        out.append(p)
        if trainable:
            for state in ("adam_m.", "adam_v."):
                s = Param(
                    state + name,
                    p.shape,
                    tensors[state + name].dtype.name,
                    stage,
                    p.layout,
                    True,
                    p.grid,
                    p.slice_of_rank,
                )
                out.append(s)
    return out


def _file(par: Parallel, kind: str, i: int, n: int) -> str:
    stem = f"{kind}-{i:07d}-{n:07d}"
    return (f"{par.prefix}-{stem}" if par.prefix else stem) + ".safetensors"


def _shard_key(name: str, sid: int) -> str:
    return str((name, (sid,)))


def save(
    root: Path,
    iteration: int,
    tensors: dict[str, np.ndarray],
    par: Parallel,
    num_layers: int,
    common: dict,
    scalars: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``root/latest_checkpointed_iteration.txt`` and ``root/iteration_XXXXXXXX/`` as
    mindformers does. ``tensors``: full model parameters and their ``adam_m.``/``adam_v.`` states;
    ``scalars``: what a normal save's optimizer files also hold (``learning_rate``,
    ``global_step``)."""
    params = plan_qwen3(tensors, par, num_layers)
    model_keys = {p.name for p in params if not p.name.startswith(("adam_m.", "adam_v."))}
    n = par.per_stage
    # what each global rank holds, in its reporting order: [(param, slice id)]
    held: dict[int, list[tuple[Param, int]]] = {
        r: [(p, p.slice_of_rank[r - p.stage * n]) for p in params if p.stage == r // n]
        for r in range(par.world)
    }
    holders: dict[str, list[int]] = defaultdict(list)
    name_of: dict[str, str] = {}
    for r in range(par.world):
        for p, sid in held[r]:
            holders[_shard_key(p.name, sid)].append(r)
            name_of[_shard_key(p.name, sid)] = p.name

    # state_dict_metadata: first sighting over ranks 0..W-1; chunks in order of first sighting
    sdm: dict[str, dict] = {}
    for r in range(par.world):
        for p, sid in held[r]:
            local = [s // g for s, g in zip(p.shape, p.grid)]
            chunk = {"global_offset": [sid], "local_shape": local}
            if p.name not in sdm:
                counts: dict[int, int] = defaultdict(int)
                replica = []
                for s in p.slice_of_rank:
                    replica.append(counts[s])
                    counts[s] += 1
                sdm[p.name] = {
                    "properties": {
                        "dtype": MS_DTYPE[p.dtype],
                        "replica_id": replica,
                        "allow_shape_mismatch": False,
                        "allow_to_save": True,
                    },
                    "global_shape": p.shape,
                    "axis_fragmentations": p.grid,
                    "layout": p.layout.to_json(),
                    "chunk": [chunk],
                }
            elif chunk not in sdm[p.name]["chunk"]:
                sdm[p.name]["chunk"].append(chunk)

    files: dict[str, list[tuple[Param, int]]] = {}  # file name -> [(param, slice id)]
    storage: dict[str, list[dict]] = {}
    if not par.dedup:
        for r in range(par.world):
            for p, sid in held[r]:
                kind = "model" if p.name in model_keys else "opt"
                fname = _file(par, kind, r, par.world)
                files.setdefault(fname, []).append((p, sid))
                key = _shard_key(p.name, sid)
                storage.setdefault(key, []).append(
                    {"file_name": fname, "storage_rank": r, "rank_group": holders[key]}
                )
    else:
        for kind in ("model", "opt"):
            side = {
                k: v for k, v in holders.items() if (name_of[k] in model_keys) == (kind == "model")
            }
            sizes = {}
            tensor_of = {}
            for r in range(par.world):
                for p, sid in held[r]:
                    key = _shard_key(p.name, sid)
                    if key in side and key not in sizes:
                        sizes[key] = (
                            math.prod(s // g for s, g in zip(p.shape, p.grid))
                            * BITS[MS_DTYPE[p.dtype]]
                        )
                        tensor_of[key] = (p, sid)
            load = dict.fromkeys(range(par.world), 0)
            assignment: dict[int, dict[str, list[int]]] = {}
            for key, ranks in sorted(
                side.items(), key=lambda kv: (len(kv[1]), -sizes[kv[0]], kv[0])
            ):
                ranks = sorted(ranks)
                chosen = min(ranks, key=lambda x: load[x])
                assignment.setdefault(chosen, {})[key] = ranks
                load[chosen] += sizes[key]
            total = len(assignment)
            for i, r in enumerate(sorted(assignment)):
                fname = _file(par, kind, i, total)
                for key, ranks in assignment[r].items():
                    files.setdefault(fname, []).append(tensor_of[key])
                    storage[key] = [{"file_name": fname, "storage_rank": r, "rank_group": ranks}]

    folder = Path(root) / f"iteration_{iteration:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    for fname, items in files.items():
        entries = {
            p.name: np.ascontiguousarray(tensors[p.name][_region(p, sid)]) for p, sid in items
        }
        order = sorted(entries)
        if scalars and not par.dedup and "-opt-" in fname:
            entries.update(scalars)
            order += list(scalars)
        write_safetensors(folder / fname, {k: entries[k] for k in order})
    (folder / "common.json").write_text(
        json.dumps(common, ensure_ascii=False, indent=4), encoding="utf-8"
    )
    meta = {"state_dict_metadata": sdm, "storage_data": storage}
    (folder / "metadata.json").write_text(
        json.dumps(meta, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration), encoding="utf-8")
    return folder


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """MindSpore's layout of a safetensors file: ``__metadata__`` ``{"format":"ms"}`` first,
    tensors in the given order, compact JSON padded with spaces to a multiple of 8."""
    header: dict = {"__metadata__": {"format": "ms"}}
    start = 0
    for name, t in tensors.items():
        nbytes = t.nbytes
        header[name] = {
            "dtype": ST_DTYPE[t.dtype.name],
            "shape": list(t.shape),
            "data_offsets": [start, start + nbytes],
        }
        start += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(t.tobytes())
