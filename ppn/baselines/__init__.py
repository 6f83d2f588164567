"""One-shot pruning baselines on ppn's own model (BENCHMARK.md), each written from its paper."""
