"""The gate posterior against an exact reference (`ppn.reference`), on a tiny model
with 12 gates whose every mask's likelihood is enumerated.

    python experiments/exact_reference.py                       # 100 SBC replicates per method
    python experiments/exact_reference.py --replicates 10 --smoke

1. One data set (tokens sampled from the network with a prior draw's masks): the
   open probabilities' posterior mean and sd under NUTS on the exact likelihood,
   SVI (AutoNormal) on the exact likelihood, and SVI on the fit's Jensen bound.
2. Simulation-based calibration of NUTS (the reference itself) and of SVI on the
   Jensen bound (the fit's objective): rank histograms and χ² tests.

Writes <out-dir>/exact_reference.json (comparison), exact_reference_sbc.json
(+ .md, and exact_reference_sbc.png, the rank histograms). The SBC ranks are saved
after every replicate in <state-dir>/sbc_<method>_<settings>.npy: a killed run resumes there.
"""

import argparse

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from ppn import plots
from ppn import reference as ref
from ppn.harness.report import write_results
from ppn.testing import tiny_model
from ppn.units import Units

SIZES = (0.3, 0.6)


def reference_network():
    """A 2-block model with 2 heads and 2 MLP groups per block (12 gates), weights
    scaled by 6 so that which units are open changes its predictions."""
    graphdef, state = nnx.split(tiny_model(seed=3, num_heads=2, num_kv_heads=1, intermediate_size=32))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 6.0 if x.ndim > 1 else x, state))
    return model, Units(model.config, group_width=16)


def main(replicates: int = 100, steps: int = 1500, draws: int = 99, smoke: bool = False,
         out_dir: str = "results/posterior", state_dir: str = "runs/exact_reference") -> dict:
    model, units = reference_network()
    sizes = jnp.asarray(SIZES)
    nuts_kw = dict(num_warmup=50 if smoke else 400)
    samples = 50 if smoke else 500
    config = {"sizes": SIZES, "replicates": replicates, "svi_steps": steps, "draws": draws, "gates": units.num_gates,
              "model": "experiments/exact_reference.py:reference_network()", "batch": 2, "length": 16,
              "nuts_warmup": nuts_kw["num_warmup"]}
    # 1. one data set, three posteriors
    graphdef, state = nnx.split(model)
    masks = jax.random.bernoulli(jax.random.PRNGKey(7), 0.6, (len(SIZES), units.num_gates)).astype(jnp.float32)
    batches = [ref._simulate(graphdef, units, state, masks[s], jax.random.PRNGKey(10 + s), 4, 16)
               for s in range(len(SIZES))]
    table = ref.mask_log_likelihoods(model, units, batches)
    posteriors = {"nuts (exact)": ref.nuts_draws(table, units, sizes, num_samples=samples, **nuts_kw),
                  "svi (exact likelihood)": ref.svi_draws(table, units, sizes, jensen=False, steps=steps,
                                                          num_samples=samples),
                  "svi (Jensen bound, the fit's objective)": ref.svi_draws(table, units, sizes, steps=steps,
                                                                           num_samples=samples)}
    exact = posteriors["nuts (exact)"]
    rows = [{"posterior": name, "mean_abs_error": float(np.abs(d.mean(0) - exact.mean(0)).mean()),
             "max_abs_error": float(np.abs(d.mean(0) - exact.mean(0)).max()),
             "median_sd_ratio": float(np.median(d.std(0) / exact.std(0)))} for name, d in posteriors.items()]
    write_results("exact_reference", rows, list(rows[0]), out_dir=out_dir, config=config,
                  title="Open probabilities' posterior against NUTS on the exact likelihood (12 gates, 2 sizes)")
    # 2. simulation-based calibration
    sbc, ranks = [], {}
    for method, kw in (("nuts", nuts_kw), ("svi", {"steps": steps})):
        settings = "_".join(f"{k}{v}" for k, v in kw.items())  # a rerun resumes only the same settings
        ranks[method] = ref.sbc_ranks(model, units, sizes, replicates, method=method, num_draws=draws,
                                      checkpoint=f"{state_dir}/sbc_{method}_draws{draws}_{settings}.npy", **kw)
        sbc.append({"method": method, "replicates": replicates, **ref.rank_uniformity(ranks[method], draws)})
    write_results("exact_reference_sbc", sbc, list(sbc[0]), out_dir=out_dir, config=config,
                  title="Simulation-based calibration of the open probabilities (χ² on 10 rank bins)")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, (method, r) in zip(axes, ranks.items()):
        ax.hist(r.reshape(-1), bins=10, range=(0, draws + 1), color="C0")
        ax.axhline(r.size / 10, color="grey", ls="--", lw=0.8)
        ax.set(title=f"{method}: pooled ranks", xlabel="rank of the truth among posterior draws")
    axes[0].set_ylabel("count")
    plots.save_figure(fig, f"{out_dir}/exact_reference_sbc.png")
    plt.close(fig)
    return {"comparison": rows, "sbc": sbc}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicates", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1500, help="SVI steps")
    parser.add_argument("--draws", type=int, default=99, help="posterior draws per replicate")
    parser.add_argument("--smoke", action="store_true", help="a few replicates and steps: checks the wiring")
    parser.add_argument("--out-dir", default="results/posterior")
    parser.add_argument("--state-dir", default="runs/exact_reference",
                        help="each method's SBC ranks so far: a rerun resumes after the last replicate")
    a = parser.parse_args()
    if a.smoke:
        a.replicates, a.steps, a.draws = min(a.replicates, 2), 50, 9
    print(main(a.replicates, a.steps, a.draws, a.smoke, a.out_dir, a.state_dir))
