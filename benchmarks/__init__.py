"""The benchmarks, run as modules from the checkout: `python -m benchmarks.bench_ops` etc."""
