"""Data-shift summaries (hand-checked numbers) and the box-plot figures."""

from __future__ import annotations

import math

import pytest
from matplotlib.patches import PathPatch

from qbdl.metrics.shift import box_stats, corruption_errors, paired_differences, severity_summary
from qbdl.report.shift_plots import save_figure, severity_boxplot, shift_difference_plot

# results[variant][corruption][severity] = {metric: value}; severities as strings (JSON) for bnn
RESULTS = {
    "bnn": {
        "fog": {"1": {"error": 0.1, "ece": 0.02}, "2": {"error": 0.2, "ece": 0.04}},
        "snow": {"1": {"error": 0.2, "ece": 0.01}, "2": {"error": 0.4, "ece": 0.03}},
        "blur": {"1": {"error": 0.3, "ece": 0.05}, "2": {"error": 0.5, "ece": 0.09}},
    },
    "qbnn": {
        "fog": {1: {"acc": 0.85, "ece": 0.03}, 2: {"acc": 0.75, "ece": 0.05}},
        "snow": {1: {"acc": 0.7, "ece": 0.01}, 2: {"acc": 0.5, "ece": 0.06}},
        "blur": {1: {"acc": 0.7, "ece": 0.07}, 2: {"acc": 0.5, "ece": 0.09}},
    },
}


def test_box_stats_hand_checked() -> None:
    s = box_stats([4.0, 1.0, 3.0, 2.0, float("nan")])
    assert s == {"mean": 2.5, "min": 1.0, "q1": 1.75, "median": 2.5, "q3": 3.25, "max": 4.0, "n": 4}
    assert math.isnan(box_stats([])["mean"])


def test_severity_summary() -> None:
    out = severity_summary(RESULTS, metrics=["ece"])
    assert sorted(out["bnn"]) == [1, 2]
    b1 = out["bnn"][1]["ece"]
    assert b1["min"] == 0.01 and b1["max"] == 0.05 and b1["median"] == 0.02 and b1["n"] == 3
    assert b1["mean"] == pytest.approx(0.08 / 3) and b1["q1"] == pytest.approx(0.015)
    assert out["qbnn"][2]["ece"]["q3"] == pytest.approx(0.075)  # [0.05, 0.06, 0.09]: halfway 0.06..0.09
    assert set(severity_summary(RESULTS)["bnn"][1]) == {"error", "ece"}


def test_mce_hand_checked() -> None:
    ce = corruption_errors(RESULTS, baseline="bnn")
    # qbnn errors: fog 0.15+0.25=0.4 vs 0.3 -> 4/3; snow 0.3+0.5=0.8 vs 0.6 -> 4/3; blur 0.8 vs 0.8 -> 1
    assert ce["qbnn"]["CE"] == pytest.approx({"fog": 4 / 3, "snow": 4 / 3, "blur": 1.0})
    assert ce["qbnn"]["mCE"] == pytest.approx((4 / 3 + 4 / 3 + 1) / 3)
    assert ce["qbnn"]["mean_error"] == pytest.approx((0.15 + 0.25 + 0.3 + 0.5 + 0.3 + 0.5) / 6)
    assert ce["bnn"]["mCE"] == pytest.approx(1.0)
    assert ce["bnn"]["mean_error"] == pytest.approx(1.7 / 6)
    rel = corruption_errors(RESULTS, "bnn", clean={"bnn": {"error": 0.05}, "qbnn": {"acc": 0.9}})
    # fog: (0.15-0.1)+(0.25-0.1)=0.2 over (0.1-0.05)+(0.2-0.05)=0.2 -> 1
    assert rel["qbnn"]["relative_CE"]["fog"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="baseline"):
        corruption_errors(RESULTS, "dnn")


def test_paired_differences() -> None:
    d = paired_differences(RESULTS, "ece", "qbnn", "bnn")
    assert d[1] == pytest.approx({"fog": 0.01, "snow": 0.0, "blur": 0.02})


def _boxes(fig) -> int:
    return sum(isinstance(p, PathPatch) for ax in fig.axes for p in ax.patches)


def test_plots_render_with_the_right_boxes(tmp_path) -> None:
    fig = severity_boxplot(RESULTS, "ece", clean={"bnn": 0.01, "qbnn": 0.02})
    assert _boxes(fig) == 2 * (2 + 1)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["clean", "1", "2"]
    assert save_figure(fig, tmp_path / "box.png").stat().st_size > 1000
    assert _boxes(severity_boxplot(RESULTS, "ece", variants=["qbnn"])) == 2
    diff = shift_difference_plot(RESULTS, "ece", clean={"bnn": 0.01, "qbnn": 0.02})
    assert _boxes(diff) == 3
    assert save_figure(diff, tmp_path / "diff.png").stat().st_size > 1000
    with pytest.raises(KeyError):
        shift_difference_plot(RESULTS, "ece", minuend="dnn")
