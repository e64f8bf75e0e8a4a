"""What each INT8 layer keeps resident after its first forward (issue 29 item 2): bytes of every tensor it holds,
counted from its objects, against the budget per weight each sampler needs."""

import copy
import math

import pytest
import torch
from torch import nn

from qbdl.bayes import dnn_to_bnn, set_mc_index
from qbdl.quant import calibrate, convert, native, prepare, quant_layers

pytestmark = pytest.mark.skipif(not native.available(), reason="qbdl's C++ ops are not built here")


def _tensor_bytes(t: torch.Tensor) -> int:
    if t.is_mkldnn:  # a oneDNN-packed weight: its data and channel sums
        return int(torch.ops.qbdl.packed_bytes(t).numel())
    return t.untyped_storage().nbytes()


def held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` through attributes, tuples, lists and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = ("storage", obj.untyped_storage().data_ptr()) if not obj.is_mkldnn else ("mkldnn", id(obj))
        if key in seen:
            return 0
        seen.add(key)
        return _tensor_bytes(obj)
    if isinstance(obj, (tuple, list)):
        return sum(held_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(x, seen) for x in obj.values())
    if isinstance(obj, nn.Module):
        return sum(held_bytes(v, seen) for k, v in vars(obj).items() if k not in ("_modules", "config"))
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("qbdl"):
        return sum(held_bytes(v, seen) for k, v in vars(obj).items() if k != "pack")
    return 0


@pytest.fixture(scope="module")
def prepared():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).eval()  # fmt: skip
    bnn = dnn_to_bnn(net, moped_delta=0.1).eval()
    return calibrate(prepare(bnn, per_example=True), [torch.randn(4, 3, 12, 12)], mc_samples=1)


def _run(q, mc: int = 3) -> None:
    with torch.no_grad():
        for i in range(mc):
            set_mc_index(q, i)
            q(torch.randn(2, 3, 12, 12))
        set_mc_index(q, None)
        q(torch.randn(2, 3, 12, 12))


def test_fresh_layers_keep_at_most_five_bytes_a_weight(prepared):
    q = convert(prepared, sampler="fresh")
    _run(q)
    for m in quant_layers(q):
        n, c = math.prod(m.weight_shape), m.weight_shape[0]  # not m.mu_q: reading it restores the int8 tensors
        assert m.inplace_sampler is not None
        assert m._released is not None  # int8 mu and sigma freed: the operands give them back exactly
        # the packed sample (1, padded), int16 mu/S and sigma/S in packed order (4), the int16 channel slots
        # only where oneDNN stores channel sums (the first conv: input zero point != 0)
        budget = 5 * n + (2 * m.inplace_sampler.mu.numel() if m.inplace_sampler.n_comp else 0)
        padded = m.inplace_sampler.mu.numel() - n  # oneDNN pads channels to its block: 1 + 4 bytes a padded weight
        assert held_bytes(m) <= budget + 5 * padded + 64 * c + 4096, (m, held_bytes(m), budget)
        assert m._ops is None  # the original-order operands were dropped once permuted


def test_released_int8_tensors_come_back_exactly_and_in_order(prepared):
    fresh, kept = convert(prepared, sampler="fresh"), convert(prepared, sampler="fresh")
    before = {k: v.clone() for k, v in kept.state_dict().items()}
    torch.manual_seed(3)
    _run(fresh)
    layers = quant_layers(fresh)
    assert all(m._released is not None for m in layers)
    out = [m.weight_shape for m in layers]
    torch.manual_seed(3)
    _run(fresh)  # forwards and weight_shape leave them released
    assert all(m._released is not None for m in layers) and out == [m.weight_shape for m in layers]
    copied = copy.deepcopy(fresh)  # a copy takes the int8 tensors (it has no packed sampler)
    after = fresh.state_dict()
    assert list(after) == list(before)  # same keys, same order: model_fingerprint is unchanged
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), after.values()))
    assert all(m._released is None for m in layers)


def test_the_old_pools_are_gone_and_a_bank_keeps_its_packed_samples_only(prepared):
    k = 4
    q = convert(prepared, sampler="bank", bank_size=k)
    _run(q)
    for m in quant_layers(q):
        n, c = m.mu_q.numel(), m.mu_q.shape[0]
        # int8 mu and sigma (2) and K packed samples; no operands, no noise (16 x 2 bytes before). A packed sample
        # holds its output channels padded to oneDNN's block (up to 64: AVX-512 packs the 10-class linear as 64
        # rows), twice that for other padding, and an int32 channel sum each
        padded = -(-c // 64) * 64 * (n // c)
        assert m._ops is None
        assert held_bytes(m) <= 2 * n + k * (2 * padded + 4 * 64 + 4 * c) + 64 * c + 4096, (m, held_bytes(m))
        assert held_bytes(m) < 2 * 16 * n  # less than the pool alone held before


def test_the_prepack_path_caches_only_its_int16_operands(prepared):
    q = convert(prepared, sampler="fresh", fresh_kernel="prepack", pack_workers=0)
    _run(q)
    for m in quant_layers(q):
        n = m.mu_q.numel()
        assert m._ops is not None and held_bytes(m._ops) == 4 * n
        assert held_bytes(m) <= 7 * n + 64 * m.mu_q.shape[0] + 4096 + 4 * 64 * 2
