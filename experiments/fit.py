"""The main job: fit a push puppet network on the Shakespeare train split, then cut
the fitted model to every size of experiments/BENCHMARK.md and report validation perplexity.

    python experiments/fit.py                 # SmolLM2-135M, default CPU budget (~20 min)
    python experiments/fit.py --full          # the full budget
    python experiments/fit.py --smoke         # tiny random model, seconds

Same as `ppn fit`; see ppn/pipeline.py.
"""

import argparse

from ppn.harness.arguments import add_job_arguments, job_config
from ppn.harness.job import run
from ppn.sharding import initialize_distributed

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    args = parser.parse_args()
    initialize_distributed(args.distributed)
    run(job_config(args))
