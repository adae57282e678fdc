"""``ms2hf demo``: make a small MindSpore training output, convert it, and check every byte.

It lets the README's first command prove the tool on a fresh machine with nothing else installed
(no MindSpore, no model download). The expected tensors come from the generator, not from the
converter, and the check casts them by ``docs/casts.md`` on its own, so a wrong layout, placement or
cast shows up as a mismatch and a non-zero exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ms2hf.commands.convert import ConvertOptions, ConvertReport, convert
from ms2hf.generator import Generated, GeneratorConfig, generate
from ms2hf.generator.config import CKPT2, LEGACY
from ms2hf.io.dtypes import to_numpy
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.safetensors_reader import SafetensorsHeader, TensorInfo
from ms2hf.pipeline.engine.budget import format_size
from ms2hf.transforms.casts import cast_into, output_dtype
from ms2hf.transforms.registry import by_name

DEMO_PARALLEL = {"tp": 2, "dp": 2, "pp": 2, "opt_shard": -1, "seed": 2024}
"""Every kind of split at once: tensor, data and pipeline parallel, with optimizer sharding."""
DEMO_EP = 4
"""Expert parallelism for a family with experts: each rank of a stage holds a quarter of them."""


def demo_config(model: str, save_format: str = LEGACY) -> GeneratorConfig:
    """The run the demo trains for ``--model``: the family's example model on
    ``DEMO_PARALLEL``, saved in ``save_format``. Every family writes the same file names, so one
    replaces another's files in one folder."""
    return GeneratorConfig.from_dims(
        by_name(model).example, ep=DEMO_EP, save_format=save_format, **DEMO_PARALLEL
    )


SHOWN = 5


@dataclass(frozen=True)
class DemoResult:
    generated: Generated
    report: ConvertReport
    tensors: int
    mismatched: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatched

    def summary(self) -> str:
        c, files = self.generated.config, self.generated.rank_files
        sharded = " with optimizer sharding" if c.opt_shard else ""
        sizes = f"{c.layers} layers, hidden {c.hidden}"
        model, ep = f"Qwen3 ({sizes})", ""
        if c.moe is not None:
            model = f"Qwen3-MoE ({sizes}, {c.moe.experts} experts per layer)"
            ep = f" x EP{c.moe.ep}"
        saved = "Checkpoint 2.0 files" if c.save_format == CKPT2 else "rank files"
        made = (
            f"demo: {model} trained on TP{c.tp} x DP{c.dp} x PP{c.pp}{ep}{sharded}: "
            f"{len(files)} {saved} "
            f"({format_size(sum(p.stat().st_size for p in files))}) in {self.generated.root}; "
            f"converted to {self.report.output_dir} in {self.report.seconds:.1f} s: "
        )
        if self.ok:
            return made + f"all {self.tensors} tensors match the expected bytes"
        shown = ", ".join(self.mismatched[:SHOWN]) + (" ..." * (len(self.mismatched) > SHOWN))
        differ = f"{len(self.mismatched)} of {self.tensors} tensors differ from the expected bytes"
        return f"{made}{differ}: {shown}"


def _tensors(paths: list[Path]) -> dict[str, tuple[Path, TensorInfo]]:
    return {name: (p, info) for p in paths for name, info in SafetensorsHeader(p).tensors.items()}


def mismatches(hf_dir: Path, expected: Path, dtype: str) -> list[str]:
    """Names of the tensors that are missing, extra, or not the expected tensor cast to
    ``dtype``."""
    want = _tensors([expected])
    got = _tensors(sorted(hf_dir.glob("*.safetensors")))
    bad = set(want) ^ set(got)
    with MappedFiles() as files:
        for name in set(want) & set(got):
            (src_path, src), (out_path, out) = want[name], got[name]
            out_dtype = output_dtype(src.dtype, dtype)
            if (out.dtype, out.shape) != (out_dtype, src.shape):
                bad.add(name)
                continue
            cast = np.empty(src.shape, to_numpy(out_dtype))
            cast_into(cast, files.view(src_path, src.start, to_numpy(src.dtype), src.shape))
            actual = files.view(out_path, out.start, to_numpy(out.dtype), out.shape)
            if cast.tobytes() != actual.tobytes():
                bad.add(name)
    return sorted(bad)


def run_demo(
    out_dir: Path,
    dtype: str = "bf16",
    progress: bool = False,
    model: str = "qwen3",
    save_format: str = LEGACY,
) -> DemoResult:
    """Generate ``demo_config(model, save_format)`` into ``out_dir/training_output``, convert
    into ``out_dir/hf``, compare.

    Running it again replaces the files it wrote (the same names each time), nothing else; the
    conversion names the save it reads, so runs of both formats can share the folder.
    """
    generated = generate(demo_config(model, save_format), out_dir / "training_output")
    options = ConvertOptions(
        dtype=dtype, config=generated.train_yaml, overwrite=True, progress=progress
    )
    if save_format == CKPT2:
        report = convert(generated.iteration_dir, out_dir / "hf", options)
    else:
        where = {"checkpoint_dir": generated.checkpoint_dir, "strategy_dir": generated.strategy_dir}
        report = convert(None, out_dir / "hf", options, **where)
    want = SafetensorsHeader(generated.expected).tensors
    return DemoResult(
        generated, report, len(want), tuple(mismatches(out_dir / "hf", generated.expected, dtype))
    )
