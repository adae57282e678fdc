# Fault injection for tests/test_ray.py, loaded by every Python process that a raylet of the test
# cluster starts (tests/ray_cluster.py puts this folder on its nodes' PYTHONPATH); ms2hf itself
# carries no hook. Once ms2hf's shard writer is imported, its commit (rename into place) is
# wrapped, as MS2HF_TEST_HOOK says for this node, with marker files in MS2HF_TEST_DIR:
#   hold: the node's first commit leaves its file complete under its temporary name, writes
#         DIR/held (the worker's pid) and waits to be killed: a task provably mid-run.
#   wait: the node's first commit waits (at most 60 s) for DIR/held: this node stays busy, so
#         a task has to go to the node that holds.
# On any node, while DIR/slow exists, each commit first sleeps 0.2 s (a run long enough to kill
# its driver midway).
import builtins
import os
import sys
import time

_mode = os.environ.get("MS2HF_TEST_HOOK")
_dir = os.environ.get("MS2HF_TEST_DIR")
_MODULE = "ms2hf.io.safetensors_writer"


def _first(tag):
    """True once per test run and tag (across the node's worker processes)."""
    try:
        fd = os.open(os.path.join(_dir, tag), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _patch(module):
    commit = module.ShardWriter.commit

    def hooked(self):
        if os.path.exists(os.path.join(_dir, "slow")):
            time.sleep(0.2)
        if _mode == "hold" and _first("held"):
            while True:
                time.sleep(3600)
        if _mode == "wait" and _first("waited"):
            end = time.monotonic() + 60
            while not os.path.exists(os.path.join(_dir, "held")) and time.monotonic() < end:
                time.sleep(0.01)
        return commit(self)

    module.ShardWriter.commit = hooked
    module._ms2hf_test_hooked = True


if _mode and _dir:
    _import = builtins.__import__

    def _watching(name, *args, **kwargs):
        module = _import(name, *args, **kwargs)
        found = sys.modules.get(_MODULE)
        hooked = getattr(found, "_ms2hf_test_hooked", False)
        if found is not None and not hooked and hasattr(found, "ShardWriter"):
            _patch(found)
        return module

    builtins.__import__ = _watching
