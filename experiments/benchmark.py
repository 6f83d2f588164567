"""The benchmark of experiments/BENCHMARK.md: dense, ppn and every baseline at every size,
the fine-tuned fairness rows, and speed; one table and one plot.

    python experiments/benchmark.py --quick     # about an hour on a 2-core CPU
    python experiments/benchmark.py             # the full preset (a GPU's job)
    python experiments/benchmark.py --smoke     # tiny random model, seconds

Same as `ppn bench`; see ppn/benchmark.py. Resumes where it stopped.
"""

import argparse

from ppn.harness.benchmark import run
from ppn.harness.arguments import add_bench_arguments, bench_config

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    run(bench_config(parser.parse_args()))
