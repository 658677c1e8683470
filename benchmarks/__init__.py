"""Benchmarks of hf_weightstream; run them from the repository root, e.g. ``python -m benchmarks.bench_core``.

A package (not loose scripts) so that the benchmark's worker subprocesses and the plotting module import each
other the same way whether the repository is pip-installed or not.
"""
