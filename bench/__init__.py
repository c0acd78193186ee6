"""Benchmarks of moe_asr, run from the repository root as ``python -m bench.<name>`` (see bench/README.md).

Not installed and imported by no package module: benchmarks depend on the packages, never the reverse.
"""
