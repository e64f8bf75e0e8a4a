"""notebooks/analysis.ipynb executes (nbclient, the venv's python3 kernel) on a tiny run and draws its figures."""

import os
from pathlib import Path

import pytest
import torch
from helpers_run import compose_config
from omegaconf import open_dict
from test_wandb import CLI_TINY

from qbdl.pipeline.run import run

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def test_analysis_notebook_runs_on_a_tiny_run(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run_dir = tmp_path / "run"
    cfg = compose_config(run_dir, [*CLI_TINY, "logger=none"], tiny=False)
    with open_dict(cfg):
        cfg.pop(
            "hydra"
        )  # the job's own config only, as under `python -m qbdl.run` (hydra.job.num is unset here)
    threads = torch.get_num_threads()
    try:
        results = run(cfg)
    finally:
        torch.set_num_threads(threads)  # CLI_TINY sets threads=1; leave the process as it was
    figs = tmp_path / "figs"
    # the kernel inherits the environment: RUN_DIR comes from QBDL_RUN_DIR
    monkeypatch.setenv("QBDL_RUN_DIR", str(run_dir))
    monkeypatch.setenv("QBDL_FIG_DIR", str(figs))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # kernel "python3" = ipykernel's native spec, i.e. this interpreter (the venv's python)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    names = {p.name for p in figs.glob("*.png")}
    variants = list(results["variants"])
    expected = {"referral.png", "entropy_densities.png", "ood_roc_photos.png", "ood_roc_rotated.png"}
    expected |= {f"reliability_{v}.png" for v in variants} | {f"uce_{v}.png" for v in variants}
    assert expected <= names, expected - names
    for name in expected:
        assert (figs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) >= len(expected)  # figures displayed inline, too
    table = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert all(v in table for v in variants) and "OOD AUROC" in table
    assert os.environ["QBDL_RUN_DIR"] == str(run_dir)
