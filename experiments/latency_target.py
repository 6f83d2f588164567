"""Cutting to a latency: does a model cut to T milliseconds per token run at T?

Times the dense model's pruned variants once (`ppn.speed.profile_costs`, what
`ppn profile` does) into a latency table, then, for each target (the table's
milliseconds outside the blocks plus a fraction of its dense blocks' milliseconds, so
every target is one a cut can meet), cuts the plan's model with
`plan.keep(target_ms, cost=<table>)` and times the cut model the same way
(`ppn.speed.measure_latency`: batch 1, a 512-token prompt). Reported per target:
the table's prediction for the cut, the measured milliseconds and the relative
error against the target (the aim: within 5%); then the same target met by
measurement, starting from that cut's timing (`ppn.speed.cut_to_latency`: the cut is timed and the table's target
corrected until it lands within 5%, at most 4 cuts), its milliseconds and rounds.

    python experiments/latency_target.py --run-dir runs/smollm2-135m   # after `ppn fit`
    python experiments/latency_target.py --smoke                        # tiny model, seconds

Writes results/speed/latency_target.json and .md (the latency table inside its config)
and the table as `ppn profile` writes it to runs/latency/costs.json. Run it alone:
timings beside another busy process mean little.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import ppn
from ppn import speed
from ppn.harness.report import write_results

COLUMNS = ["phase", "target_fraction", "target_ms", "predicted_ms", "measured_ms", "relative_error",
           "kept_fraction", "refined_ms", "refined_error", "refined_rounds"]


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/smollm2-135m"
    fractions: tuple[float, ...] = (0.8, 0.6, 0.4)  # of the dense blocks' predicted ms per token
    phase: str = "decode"
    context: int = 512
    repeats: int = 5
    tolerance: float = 0.05  # of speed.cut_to_latency, which measures and corrects the table's cut
    out_dir: str = "results/speed"
    name: str = "latency_target"
    table: str = "runs/latency/costs.json"
    smoke: bool = False


def _setup(cfg: Config):
    """(model, plan): the run's fitted model and plan, or a tiny random pair in smoke mode."""
    if cfg.smoke:
        from ppn.testing import random_plan, tiny_model

        model = tiny_model()
        return model, random_plan(model.config)
    return ppn.load_model(Path(cfg.run_dir) / "model"), ppn.Plan.load(Path(cfg.run_dir) / "plan.json")


def main(cfg: Config) -> list[dict]:
    model, plan = _setup(cfg)
    table = speed.profile_costs(model, group_width=plan.units.group_width, context=cfg.context,
                                repeats=cfg.repeats)
    table_path = speed.save_costs(table, cfg.table)
    costs = speed.load_costs(table_path, plan.units, cfg.phase)
    dense_ms = speed.measure_latency(model, cfg.context, repeats=cfg.repeats)[cfg.phase]
    rows = [{"phase": cfg.phase, "target_fraction": 1.0, "target_ms": None, "predicted_ms":
             costs.base + costs.of(plan.units.full()), "measured_ms": dense_ms, "relative_error": None,
             "kept_fraction": 1.0}]
    def measure(pruned):
        return speed.measure_latency(pruned, cfg.context, repeats=cfg.repeats)[cfg.phase]

    for fraction in cfg.fractions:
        target = costs.base + fraction * costs.of(plan.units.full())
        keep = plan.keep(target, cost=costs)
        cut = speed.cut_to_latency(model, plan, target, costs, tolerance=cfg.tolerance, measure=measure)
        measured = cut.measured_each[0]  # its first cut is the table's own
        rows.append({"phase": cfg.phase, "target_fraction": fraction, "target_ms": target,
                     "predicted_ms": costs.base + costs.of(keep), "measured_ms": measured,
                     "relative_error": measured / target - 1.0,
                     "kept_fraction": keep.num_params() / plan.units.total,
                     "refined_ms": cut.measured_ms, "refined_error": cut.measured_ms / target - 1.0,
                     "refined_rounds": cut.rounds, "refined_kept_fraction": cut.keep.num_params() / plan.units.total})
        print(rows[-1])
    write_results(cfg.name, rows, COLUMNS, out_dir=cfg.out_dir,
                  title=f"Cut to a {cfg.phase} latency: target against measured milliseconds per token "
                        f"({'a tiny model' if cfg.smoke else cfg.run_dir}, batch 1, {cfg.context}-token prompt)",
                  config=dataclasses.asdict(cfg) | {"costs_table": table})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=Config.run_dir)
    parser.add_argument("--phase", default=Config.phase, choices=speed.PHASES)
    parser.add_argument("--out-dir", default=Config.out_dir)
    parser.add_argument("--smoke", action="store_true")
    a = parser.parse_args()
    overrides = (dict(context=16, repeats=2, name="latency_target_smoke", table=f"{a.out_dir}/costs_smoke.json")
                 if a.smoke else {})
    main(Config(run_dir=a.run_dir, phase=a.phase, out_dir=a.out_dir, smoke=a.smoke, **overrides))
