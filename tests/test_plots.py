"""Figures render headlessly to real PNG files."""

from __future__ import annotations

import pytest
import torch

import qbdl.metrics as M
from qbdl.report import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 300, 10, generator=g) * 2, -1)
    y = torch.multinomial(p.mean(0), 1, generator=g).squeeze(1)
    p_out = torch.softmax(torch.randn(4, 100, 10, generator=g) * 0.5, -1)
    return p, y, p_out


def _assert_png(path, min_bytes: int = 5000):
    assert path.exists()
    blob = path.read_bytes()
    assert blob[:8] == PNG_MAGIC
    assert len(blob) > min_bytes
    # no temp files left behind by the atomic write
    assert [f.name for f in path.parent.iterdir() if f.name.endswith(".tmp")] == []


def test_all_figures_render(tmp_path, data):
    p, y, p_out = data
    ent = M.predictive_entropy(p)
    correct = p.mean(0).argmax(-1) == y
    curves = {"fp32": M.referral_curve(p, y), "int8": M.referral_curve(p[:1], y)}
    figures = {
        "reliability": plots.reliability_diagram(M.reliability_bins(p, y)),
        "uce": plots.uncertainty_calibration_diagram(M.uncertainty_calibration_bins(p, y)),
        "referral": plots.referral_curves(curves, target=0.9),
        "density": plots.entropy_density(ent[correct], ent[~correct]),
        "densities": plots.entropy_densities(
            {"fp32": (ent[correct], ent[~correct]), "int8": (ent[correct][:50], ent[~correct])}
        ),
        "roc": plots.ood_roc_curves(
            {"entropy": M.ood_roc_curve(p, p_out), "mi": M.ood_roc_curve(p, p_out, score="mi")}
        ),
    }
    for name, fig in figures.items():
        out = plots.save_figure(fig, tmp_path / "figs" / "nested" / f"{name}.png")
        assert out == tmp_path / "figs" / "nested" / f"{name}.png"
        _assert_png(out)


def test_referral_plot_draws_variants_and_references(data):
    p, y, _ = data
    fig = plots.referral_curves({"a": M.referral_curve(p, y), "b": M.referral_curve(p[:2], y)}, target=0.95)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"a", "b", "oracle", "random", "target 0.95"} <= set(labels)
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--" and line.get_xdata().size]
    assert len(dashed) == 2  # one oracle reference per variant


def test_plots_accept_dicts_and_empty_class(tmp_path):
    # all points correct -> empty "incorrect" group must not crash; dict-shaped bins work too
    p = torch.eye(3)[[0, 1, 2]].unsqueeze(0)
    y = torch.tensor([0, 1, 2])
    bins = M.reliability_bins(p, y)
    as_dict = {k: getattr(bins, k) for k in ("edges", "count", "confidence", "accuracy")}
    _assert_png(plots.save_figure(plots.reliability_diagram(as_dict), tmp_path / "r.png"), 2000)
    ent = M.predictive_entropy(p)
    _assert_png(plots.save_figure(plots.entropy_density(ent, ent[:0]), tmp_path / "d.png"), 2000)


def test_save_figure_overwrites_and_closes_pyplot_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    plots.save_figure(fig, target)
    _assert_png(target, 1000)
    assert not plt.fignum_exists(fig.number)


def test_empty_inputs_raise():
    with pytest.raises(ValueError, match="at least one"):
        plots.referral_curves({})
    with pytest.raises(ValueError, match="at least one"):
        plots.ood_roc_curves({})
