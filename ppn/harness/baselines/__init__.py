"""One-shot pruning baselines on ppn's own model (experiments/BENCHMARK.md), each written from its paper."""
