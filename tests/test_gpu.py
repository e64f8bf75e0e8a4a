"""The GPU path (skipped without CUDA): FP32 variants on the GPU and INT8 ones on the CPU in one run;
fake-quant simulation on the GPU."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_run import compose_config

from qbdl.bayes import dnn_to_bnn, mc_logits
from qbdl.models import resnet20
from qbdl.quant import simulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_simulate_runs_on_the_gpu_as_on_the_cpu(bits):
    torch.manual_seed(0)
    bnn = dnn_to_bnn(resnet20(10, 1), moped_delta=0.05).eval()
    calib = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    sim = simulate(bnn, bits, calib, mc_samples=1)
    x = torch.randn(32, 1, 16, 16)
    cpu = mc_logits(sim, x, 2, seed=3)
    gpu = mc_logits(sim.cuda(), x.cuda(), 2, seed=3).cpu()
    # the same grids; a value within a float rounding of a half-step may land one step apart on the GPU
    assert (cpu.argmax(-1) == gpu.argmax(-1)).float().mean() > 0.95
    assert float((cpu - gpu).abs().mean()) < 0.05 * float(cpu.abs().mean())


def test_gpu_run_evaluates_fp32_on_cuda_and_int8_on_cpu(tmp_path):
    from qbdl.pipeline.run import run

    res = run(compose_config(tmp_path, ["trainer=gpu", "trainer.devices=1"]))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["variants"] == res["variants"]
    for v in ("dnn", "bnn", "bnn_mean"):
        assert res["variants"][v]["device"].startswith("cuda"), v
    for v in ("qbnn", "qdnn"):
        assert res["variants"][v]["device"] == "cpu", v
    assert res["estimate"]["seconds"]["evaluation"]["bnn"] > 0
