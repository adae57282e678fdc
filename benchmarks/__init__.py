"""Benchmarks for ms2hf: ``python -m benchmarks.run`` (see ``benchmarks/run.py``)."""
