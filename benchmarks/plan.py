"""Planning alone: ``python -m benchmarks.plan ROOT`` reads a training output's layout and
headers and makes convert's plans (the source plan, then the Hugging Face files), writing
nothing; it prints what it planned and the seconds each part took, as JSON. The harness measures
its wall time and peak memory from outside (``benchmarks.measure``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ms2hf.commands.convert import ConvertOptions, plan_for
from ms2hf.io.sources import plan_training_output
from ms2hf.pipeline.engine.memory import paused_gc


@paused_gc()  # as convert plans
def main(argv: list[str]) -> int:
    (root,) = argv
    started, cpu = time.perf_counter(), time.process_time()
    source = plan_training_output(Path(root))
    planned = time.perf_counter()
    hf = plan_for(source, ConvertOptions(), {})
    done = time.perf_counter()
    metadata = next(Path(root).glob("checkpoint/iteration_*/metadata.json"), None)
    doc = {
        "source_plan_seconds": planned - started,
        "hf_plan_seconds": done - planned,
        "seconds": done - started,
        "cpu_seconds": time.process_time() - cpu,
        "ranks": source.ranks,
        "files": len(source.files),
        "parameters": len(source.params),
        "blocks": sum(len(p.blocks) + len(p.replicas) for p in source.params.values()),
        "model_bytes": source.param_bytes,
        "hf_tensors": len(hf.weight_map),
        "metadata_bytes": metadata.stat().st_size if metadata else 0,
    }
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
