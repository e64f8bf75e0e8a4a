"""The figures of one run: reliability, uncertainty calibration, entropy densities, referral, risk, OOD ROC."""

from __future__ import annotations

from pathlib import Path

from qbdl.report import plots


def save_plots(curves: dict, out_dir: str | Path, target_accuracy: float) -> dict[str, str]:
    """Draw the paper's figures for every variant; returns {plot name: file path}."""
    out_dir = Path(out_dir)
    files: dict[str, str] = {}

    def save(fig, name: str) -> None:
        files[name] = str(plots.save_figure(fig, out_dir / f"{name}.png"))

    for v, c in curves.items():
        save(plots.reliability_diagram(c["reliability"]), f"reliability_{v}")
        save(plots.uncertainty_calibration_diagram(c["uncertainty"]), f"uncertainty_calibration_{v}")
        save(plots.entropy_density(c["entropy_correct"], c["entropy_incorrect"]), f"entropy_density_{v}")
    save(
        plots.referral_curves({v: c["referral"] for v, c in curves.items()}, target=target_accuracy),
        "referral",
    )
    save(plots.generalized_risk_curves({v: c["referral"] for v, c in curves.items()}), "generalized_risk")
    ood_names = sorted({n for c in curves.values() for n in c["roc"]})
    for name in ood_names:
        rocs = {v: c["roc"][name] for v, c in curves.items() if name in c["roc"]}
        save(plots.ood_roc_curves(rocs), f"ood_roc_{name}")
    return files
