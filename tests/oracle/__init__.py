"""The test oracle: an independent account of what a correct conversion gives.

Written from ``docs/`` (the formats and the math) with numpy and the ``safetensors`` library,
and sharing no code with ``ms2hf``'s readers, layout math or rules, so that a test comparing
ms2hf's output with the oracle's can fail when either is wrong. It is slow and holds whole
tensors in memory: it is for small test checkpoints only.
"""
