"""The figures: drawn without choosing a backend, one colour per method, ppn in front."""

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from ppn import plots
from ppn.harness import benchmark, figures

DENSE = 30.0


def _row(method, pattern, fraction, perplexity, **extra):
    return {"method": method, "pattern": pattern, "size": fraction, "kept_fraction": fraction,
            "perplexity": perplexity, **extra}


ROWS = [
    _row("dense", "dense", 1.0, DENSE),
    _row(benchmark.DENSE_FINETUNED, "dense", 1.0, 20.0),
    *[_row("ppn", "structured", f, p, prefill_ratio=1 / f, decode_ratio=0.9 / f) for f, p in ((0.7, 40), (0.5, 60))],
    *[_row("flap", "structured", f, p, prefill_ratio=1.1 / f, decode_ratio=1 / f) for f, p in ((0.7, 200), (0.5, 900))],
    _row("flap fine-tuned (fit budget)", "structured", 0.5, 55.0),
    *[_row("wanda", "unstructured", f, p) for f, p in ((0.7, 35), (0.5, 57))],
    _row("wanda", "2:4", 0.5, 110.0),
    _row("magnitude", "unstructured", 0.5, 5000.0),
]


@pytest.fixture(autouse=True)
def no_backend_choice(monkeypatch):
    """Choosing a backend in library code breaks notebooks' inline figures."""
    def refuse(*args, **kwargs):
        raise AssertionError("library code called matplotlib.use")

    monkeypatch.setattr(matplotlib, "use", refuse)
    yield
    plt.close("all")


def test_no_library_module_chooses_a_backend():
    root = Path(plots.__file__).parent
    assert [p.name for p in root.rglob("*.py") if "matplotlib.use(" in p.read_text()] == []


def test_method_colours_are_distinct_and_cover_every_method():
    colours = figures.METHOD_COLOURS
    assert len(set(colours.values())) == len(colours)
    assert all(m in colours for m in benchmark.METHODS if m != "finetuned")
    assert figures.method_colour("flap fine-tuned (fit budget)") == colours["flap"]
    assert figures.method_colour(benchmark.DENSE_FINETUNED) == colours["dense"]
    assert figures.method_colour("obs") == figures.method_colour("obs")  # a new method: a fixed spare colour


def test_benchmark_figure_emphasises_ppn_and_dashes_unstructured_rows(tmp_path):
    fig = figures.benchmark_figure(ROWS, path=tmp_path / "b.png")
    assert isinstance(fig, Figure) and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    quality = fig.axes[0]
    lines = {line.get_label(): line for line in quality.get_lines()}
    assert lines["ppn"].get_linewidth() == max(line.get_linewidth() for line in lines.values())
    assert lines["ppn"].get_zorder() == max(line.get_zorder() for line in quality.get_lines())
    assert {label for label, line in lines.items() if line.get_linestyle() == "--"} == {
        "wanda", "wanda (2:4)", "magnitude"}
    for method in ("ppn", "flap", "wanda", "magnitude"):
        assert lines[method].get_color() == figures.METHOD_COLOURS[method]
    assert quality.get_legend() is None and len(fig.legends) == 1  # the legend sits outside the axes


def test_benchmark_figure_caps_the_axis_and_marks_points_beyond_it():
    fig = figures.benchmark_figure(ROWS)
    quality = fig.axes[0]
    top = figures.DENSE_MULTIPLE * DENSE
    assert quality.get_yscale() == "log" and quality.get_ylim() == pytest.approx((20.0 / 1.25, top))
    on_edge = [line for line in quality.get_lines() if not line.get_clip_on()]
    # flap and magnitude at 0.5, side by side (0.02 of the sizes' span apart)
    assert sorted(float(line.get_xdata()[0]) for line in on_edge) == pytest.approx([0.49, 0.51])
    assert {line.get_color() for line in on_edge} == {figures.METHOD_COLOURS["flap"], figures.METHOD_COLOURS["magnitude"]}
    assert all(float(line.get_ydata()[0]) == top for line in on_edge)
    assert any(label.startswith(f"above {top:.0f}") for label in quality.get_legend_handles_labels()[1])


def test_benchmark_figure_writes_the_png_atomically(tmp_path):
    figures.benchmark_figure(ROWS, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["bench.png"]


@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_training_curves_draw_the_guide_scales_of_a_point_guide_without_a_log_axis(scale, recwarn):
    metrics = [{"step": i, "nll_per_token": 3.0, "rho": 0.5, "expected_size": 0.5} for i in range(4)]
    for m in metrics[1::2]:
        m.update(heldout_elbo=-3.0, heldout_elbo_by_size=[-3.0] * 4, guide_scale_q05=scale / 2,
                 guide_scale_q50=scale, guide_scale_q95=2 * scale)
    fig = plots.training_curves(metrics)
    axis = fig.axes[3]
    assert axis.get_yscale() == ("log" if scale else "linear") and ("point guide" in axis.get_title()) == (not scale)
    assert not [w for w in recwarn if "log-scaled" in str(w.message)]
    plt.close(fig)
