"""Files of format 1 (written by the quantized-tensor engine, tests/data/make_v1_files.py) load and compute
what they computed then, on the plain-integer engine; files of format 2 (the sampler stored as "mode" /
"sampling") load with their sampler."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qbdl.bayes.predict import set_mc_index
from qbdl.quant import backend as qb
from qbdl.quant import load_qbnn, quant_layers
from qbdl.quant.io import FORMAT

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("backend", ["x86", "fbgemm"])
def test_format_1_files_load_and_match_their_saved_outputs(backend):
    path = DATA / f"qbnn_v1_{backend}.qbdl"
    saved = load_file(DATA / f"qbnn_v1_{backend}_outputs.safetensors")
    plan_reduced = not qb.cpu_caps().onednn_vnni
    expected = []
    if backend == "fbgemm":
        expected.append("deprecated quantized tensors")
    if plan_reduced:  # saved at 0..255 on a VNNI CPU: moved to 0..127 here, a grid half as fine
        expected.append("0..127")
    if expected:
        with pytest.warns(RuntimeWarning) as rec:
            q = load_qbnn(path)
        msgs = " ".join(str(w.message) for w in rec)
        assert all(e in msgs for e in expected), msgs
    else:
        q = load_qbnn(path)
    assert all(m.backend == "x86" and m.in_zp is not None for m in quant_layers(q))
    step = quant_layers(q)[-1].out_scale  # one LSB of the logits
    with torch.no_grad():
        for s in range(2):
            set_mc_index(q, s)
            diff = (q(saved["x"]) - saved[f"mc{s}"]).abs()
            if plan_reduced:
                assert float(diff.max()) < 0.1 * float(saved[f"mc{s}"].abs().max())
            else:
                # the engines' requantization rounds ties differently now and then (at most 1 LSB per
                # activation, a few LSB after propagating through the net); most logits are bit-equal
                assert float(diff.max()) <= 4 * step + 1e-6, (float(diff.max()), step)
                assert float((diff > 1e-6).float().mean()) <= 0.5
    set_mc_index(q, None)


def test_a_file_of_an_unknown_format_names_the_fix(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(DATA / "qbnn_v1_x86.qbdl"), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["qbdl"]), {k: f.get_tensor(k) for k in f.keys()}
    meta["format"] = "qbdl-qbnn/9"
    save_file(tensors, tmp_path / "m.qbdl", metadata={"qbdl": json.dumps(meta)})
    with pytest.raises(
        ValueError, match=r"unsupported format 'qbdl-qbnn/9'.*written by a newer qbdl: upgrade"
    ):
        load_qbnn(tmp_path / "m.qbdl")
    meta["format"] = "someone-else/1"
    save_file(tensors, tmp_path / "m.qbdl", metadata={"qbdl": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"unsupported format 'someone-else/1'.*quantize the BNN again"):
        load_qbnn(tmp_path / "m.qbdl")


def test_a_loaded_format_1_file_saves_in_the_current_format_and_reloads_identically(tmp_path):
    import json

    from safetensors import safe_open

    from qbdl.quant import save_qbnn

    q = load_qbnn(DATA / "qbnn_v1_x86.qbdl")
    save_qbnn(q, tmp_path / "m.qbdl")
    with safe_open(str(tmp_path / "m.qbdl"), framework="pt") as f:
        meta = json.loads(f.metadata()["qbdl"])
    assert meta["format"] == FORMAT
    types = {s["type"] for s in meta["modules"].values()}
    assert {"QMaxPool", "QAdaptiveAvgPool", "QAdd"} <= types and "nn.MaxPool2d" not in types
    q2 = load_qbnn(tmp_path / "m.qbdl")
    x = load_file(DATA / "qbnn_v1_x86_outputs.safetensors")["x"]
    with torch.no_grad():
        for s in range(2):
            set_mc_index(q, s), set_mc_index(q2, s)
            assert torch.equal(q(x), q2(x))


def test_a_format_2_bank_file_loads_as_bank_and_reproduces_its_outputs():
    """qbnn_v2_bank.qbdl: written by the plain-integer engine before the sampler had its own key name."""
    q = load_qbnn(DATA / "qbnn_v2_bank.qbdl")
    saved = load_file(DATA / "qbnn_v2_bank_outputs.safetensors")
    assert q.qbdl_meta["sampler"] == "bank" and "mode" not in q.qbdl_meta
    assert all(m.sampler == "bank" for m in quant_layers(q))  # not silently `fresh`
    if not qb.cpu_caps().onednn_vnni:
        pytest.skip("saved at 0..255 on a VNNI CPU; the AVX2 re-run of format 1 covers the reduced range")
    with torch.no_grad():
        for s in range(2):
            set_mc_index(q, s)
            assert torch.equal(q(saved["x"]), saved[f"mc{s}"])  # the same engine: bit for bit
    set_mc_index(q, None)
