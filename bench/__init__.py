"""Benchmarks (not tests): side-by-side comparisons, results in bench/results/*.json and docs/benchmarks.md.

Run all with `make bench` (or `python -m bench.run_all [--only B1,B2] [--quick]`), one with
`python -m bench.b1_train_step`.
"""
