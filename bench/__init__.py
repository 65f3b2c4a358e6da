"""Benchmarks for gsu-jax: unlearning step time, per-example gradient throughput and memory, and scaling.

Not part of the library or the test suite. Run ``python -m bench --quick`` (CPU, a few minutes) or
``python -m bench --full`` (GPU, one call); see ``bench/README.md`` for what is measured and how.
"""
