"""qbdl's own histogram observer against torch.ao's HistogramObserver (the reference it replaces)."""

import warnings

import pytest
import torch

from qbdl.quant.histogram import HistogramRange


def _torch_ao_range(batches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference is deprecated; qbdl no longer runs it
        ao = pytest.importorskip("torch.ao.quantization.observer")
        obs = ao.HistogramObserver(dtype=torch.quint8, reduce_range=False)
        for x in batches:
            obs(x)
        scale, zp = obs.calculate_qparams()
    scale, zp = float(scale), int(zp)
    return -zp * scale, (255 - zp) * scale


CASES = {
    # ranges that grow batch by batch (re-binning), heavy tails (clipping), one-sided ReLU outputs, a constant
    "growing": [torch.randn(4096, generator=torch.Generator().manual_seed(0)) * (1 + i) for i in range(5)],
    "heavy_tail": [torch.distributions.StudentT(2.0).sample((20000,)) for _ in range(3)],
    "relu": [torch.relu(torch.randn(2, 8, 16, 16) * 3 + 0.5) for _ in range(4)],
    "constant_then_spread": [torch.full((100,), 0.7), torch.randn(1000)],
    "shrinking": [torch.randn(5000) * 4, torch.randn(5000) * 0.5],
}


@pytest.mark.parametrize("case", list(CASES))
def test_histogram_range_equals_torch_ao(case):
    torch.manual_seed(1)
    batches = CASES[case]
    h = HistogramRange()
    for x in batches:
        h.observe(x)
    assert h.range() == _torch_ao_range(batches)
