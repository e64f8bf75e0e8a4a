"""qbdl.export / qbdl.predict on a digits run: ONNX Runtime (and OpenVINO) against qbdl's own INT8 engine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_run import compose_config
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from qbdl.bayes import dnn_to_bnn, elbo_loss, mc_logits, sample_seed, set_mc_index  # noqa: E402
from qbdl.export import MetadataError, Model, read_onnx_metadata, validate  # noqa: E402
from qbdl.export.core import export_model, export_run, preprocessing_of  # noqa: E402
from qbdl.export.graph import ExportError, build_onnx  # noqa: E402
from qbdl.export.metadata import fit_threshold  # noqa: E402
from qbdl.export.reference import qbdl_noise  # noqa: E402
from qbdl.models.files import save_state  # noqa: E402
from qbdl.quant import calibrate, convert, prepare, quantize_bnn, save_qbnn  # noqa: E402
from qbdl.quant.activations import DeQuantize  # noqa: E402

SEED = 0


def _reestimate_bn(model: nn.Module, batches: list) -> None:
    """BN running statistics over training batches at the final weights (a short fit's momentum averages lag)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m in bns:
        m.momentum = 0.1
    model.eval()


def _out_scale(model: nn.Module) -> float:
    return next(m for m in model.modules() if isinstance(m, DeQuantize)).inputs[0][0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits run directory as qbdl.run leaves it (results.json config, bnn.safetensors, models/*.qbdl).

    The networks are fitted for seconds only (resnet20 at 16x16: DNN one epoch, BNN 4 steps), enough for a
    model whose decisions are not ties; the in-memory qbnn (flipout) and qdnn come along.
    """
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(out, ["quant=flipout", "quant.calib_batches=2", "eval.mc_samples=4"])
    from hydra.utils import instantiate

    torch.manual_seed(SEED)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    dnn = instantiate(cfg.model, num_classes=10, in_chans=1)
    opt = torch.optim.Adam(dnn.parameters(), lr=3e-3)
    dnn.train()
    for x, y in dm.train_dataloader():  # one epoch: 17 steps
        opt.zero_grad()
        F.cross_entropy(dnn(x), y).backward()
        opt.step()
    train_x = [x for x, _ in dm.calib_dataloader()][:8]
    _reestimate_bn(dnn, train_x)
    bnn = dnn_to_bnn(dnn, **OmegaConf.to_container(cfg.bayes))
    opt = torch.optim.Adam(bnn.parameters(), lr=5e-4)
    bnn.train()
    for _, (x, y) in zip(range(4), dm.train_dataloader()):
        opt.zero_grad()
        elbo_loss(bnn(x), y, bnn, 1078).backward()
        opt.step()
    _reestimate_bn(bnn, train_x)
    save_state(bnn, out / "bnn.safetensors")
    calib = [b for _, b in zip(range(2), dm.calib_dataloader())]
    opts = {"sampler": "flipout", "bank_size": 2, "mc_samples": 1, "observer": "histogram", "seed": SEED}
    qbnn = quantize_bnn(bnn, calib, **opts)
    qdnn = quantize_bnn(dnn, calib, observer="histogram")
    (out / "models").mkdir()
    save_qbnn(qbnn, str(out / "models" / "qbnn.qbdl"))
    save_qbnn(qdnn, str(out / "models" / "qdnn.qbdl"))
    config = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    (out / "results.json").write_text(json.dumps({"config": config}))
    done = export_run(out)
    x_test = torch.cat([x for x, _ in dm.test_dataloader()])
    y_test = torch.cat([y for _, y in dm.test_dataloader()])
    return {
        "dir": out,
        "dm": dm,
        "qbnn": qbnn,
        "qdnn": qdnn,
        "bnn": bnn,
        "exported": done,
        "x": x_test,
        "y": y_test,
    }


def _session(data) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(
        data if isinstance(data, bytes) else str(data), so, providers=["CPUExecutionProvider"]
    )


def test_det_int8_export_agrees_with_qdnn(run):
    """ONNX Runtime's QDQ INT8 ResNet-20 vs qbdl's oneDNN engine: top-1 on >= 99.5%, logits within 1 LSB."""
    sess = _session(run["dir"] / "export" / "qdnn.onnx")
    x = run["x"]
    got = sess.run(["logits"], {"input": x.numpy()})[0][0]
    with torch.no_grad():
        want = run["qdnn"](x).numpy()
    lsb = np.abs(got - want) / _out_scale(run["qdnn"])
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.995
    assert (lsb <= 1.001).mean() >= 0.99, np.quantile(lsb, [0.5, 0.99, 1])
    assert (got.argmax(1) == run["y"].numpy()).mean() > 0.3  # a fitted model, not chance (0.1)


def _flipout_bnn(bias: bool) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=bias), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, bias=bias), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=bias), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10, bias=bias),
    )  # fmt: skip
    return dnn_to_bnn(net.eval(), moped_delta=0.1).eval()


def _same_noise(q, x: torch.Tensor, samples: int, perturbations: int, seed: int = 5, exact: bool = True):
    proto, layout = build_onnx(q, samples=samples, perturbations=perturbations, noise="input", exact=exact)
    feeds = {"input": x.numpy(), **qbdl_noise(q, layout, len(x), samples, seed)}
    got = _session(proto.SerializeToString()).run(["logits"], feeds)[0]
    ref = []
    for s in range(samples):  # qbdl's engine: sample s on bank entry s mod K (exported: s mod perturbations)
        set_mc_index(q, s % perturbations)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(sample_seed(seed, s))
            ref.append(q(x).float())
    set_mc_index(q, None)
    return got, torch.stack(ref).numpy()


def test_flipout_export_equals_qbdl_with_the_same_noise_on_a_bias_free_net():
    """Same signs and perturbations: the exported QBNN's logits within 1 LSB of qbdl's on >= 99% (K = 1 and 2)."""
    bnn = _flipout_bnn(bias=False)
    calib = [torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = convert(
        calibrate(prepare(bnn, per_example=True), calib, mc_samples=2), sampler="flipout", bank_size=2
    )
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(9))
    for k in (1, 2):
        got, ref = _same_noise(q, x, samples=4, perturbations=k)
        lsb = np.abs(got - ref) / _out_scale(q)
        assert (lsb <= 1.001).mean() >= 0.99, (k, (lsb <= 1.001).mean())
        assert (lsb < 1e-3).mean() >= 0.9  # mostly bit-equal
    # and the samples are samples: they differ between MC draws and between copies of one image
    assert np.abs(got[0] - got[1]).max() > 0


def test_flipout_export_equals_qbdl_with_the_same_noise_on_the_digits_resnet(run):
    """ResNet-20 (BN folded into biases), S = 4, K = 2: the exported QBNN computes qbdl's arithmetic (float biases on
    the exact int32 accumulators, oneDNN's multiply-add requantization, signed_add's fused multiply-add), so its
    logits are within 1 LSB of qbdl's on >= 99% and almost all bit-equal. Rounding the mean term's bias onto
    QLinearConv's grid instead (exact=False) is within an LSB per layer, but the flips compound over 20 layers."""
    q, x = run["qbnn"], run["x"][:128]
    got, ref = _same_noise(q, x, samples=4, perturbations=2)
    lsb = np.abs(got - ref) / _out_scale(q)
    assert (lsb <= 1.001).mean() >= 0.99, np.quantile(lsb, [0.5, 0.99, 1])
    assert (lsb < 1e-3).mean() >= 0.95, (lsb < 1e-3).mean()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    got_grid, _ = _same_noise(q, x, samples=4, perturbations=2, exact=False)
    assert (np.abs(got_grid - ref) / _out_scale(q) < 1e-3).mean() < (lsb < 1e-3).mean()


def test_seeded_export_reproduces_and_samples(run):
    sess = _session(run["dir"] / "export" / "qbnn.onnx")
    x = run["x"][:32].numpy()
    a = sess.run(None, {"input": x, "seed": np.array([3])})
    b = sess.run(None, {"input": x, "seed": np.array([3])})
    c = sess.run(None, {"input": x, "seed": np.array([4])})
    names = [o.name for o in sess.get_outputs()]
    assert names == ["probs", "entropy", "mi", "logits"]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[3], c[3])
    logits = a[3]
    assert logits.shape == (4, 32, 10)
    assert all(not np.array_equal(logits[0], logits[s]) for s in range(1, 4))  # MC samples differ
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(a[0], probs.mean(0), atol=1e-5)
    ent = -(a[0] * np.log(a[0])).sum(1)
    np.testing.assert_allclose(a[1], ent, atol=1e-4)
    assert (a[2] >= 0).all() and (a[2] > 0).any()


def test_seeded_export_matches_qbdl_accuracy_and_uncertainty(run):
    """The runtime's own randomness vs qbdl's QBNN on 128 test images, 2 seeds each: accuracy, NLL, mean MI."""
    sess = _session(run["dir"] / "export" / "qbnn.onnx")
    x, y = run["x"][:128], run["y"][:128].numpy()

    def stats(p: np.ndarray, mi: np.ndarray) -> np.ndarray:
        return np.array(
            [(p.argmax(1) == y).mean(), -np.log(p[np.arange(len(y)), y] + 1e-12).mean(), mi.mean()]
        )

    onnx_s, qbdl_s = [], []
    for seed in range(2):
        probs, _, mi = sess.run(["probs", "entropy", "mi"], {"input": x.numpy(), "seed": np.array([seed])})
        onnx_s.append(stats(probs, mi))
        p = torch.softmax(mc_logits(run["qbnn"], x, 4, seed=seed), -1).double().numpy()
        pbar = p.mean(0)
        h = -(pbar * np.log(pbar)).sum(1)
        qbdl_s.append(stats(pbar, np.maximum(h - (-(p * np.log(p)).sum(-1)).mean(0), 0)))
    d = np.mean(onnx_s, 0) - np.mean(qbdl_s, 0)
    assert abs(d[0]) <= 0.02 and abs(d[1]) <= 0.05, d
    assert abs(d[2]) <= 0.5 * np.mean(qbdl_s, 0)[2] + 1e-3, d


def test_metadata_of_the_export(run):
    meta = read_onnx_metadata(run["dir"] / "export" / "qbnn.onnx")
    assert (
        meta["kind"] == "qbnn" and meta["mc_samples"] == 4 and meta["classes"] == [str(i) for i in range(10)]
    )
    assert meta["preprocessing"] == preprocessing_of(run["dm"])
    assert meta["preprocessing"]["source_size"] == [8, 8]
    r = meta["referral"]
    assert r["fitted_on"] == "val" and r["score"] == "entropy" and r["target_accuracy"] == 0.995
    assert r["threshold"] is not None and 0 <= r["val_referred"] <= 1
    assert meta["source"]["file"] == "qbnn.qbdl"
    q = read_onnx_metadata(run["dir"] / "export" / "qdnn.onnx")
    assert q["kind"] == "qdnn" and q["noise"] == "none" and q["mc_samples"] == 1


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("classes",), ["a", "a"] + [str(i) for i in range(8)], "distinct"),
        (("classes", 0), "x\n=cmd", "printable"),
        (("preprocessing", "std", 0), 0.0, "std"),
        (("preprocessing", "mean", 0), float("nan"), "mean"),
        (("preprocessing", "image_size"), True, "image_size"),
        (("preprocessing", "source_size"), "../../etc/passwd", "source_size"),
        (("mc_samples",), 10**9, "mc_samples"),
        (("referral", "threshold"), "0.5", "threshold"),
        (("source", "fingerprint"), "not hex!", "fingerprint"),
        (("format",), "qbdl-onnx/999", "format"),
        (("extra",), 1, "no keys beyond"),
    ],
)
def test_metadata_is_validated_on_load(run, path, value, match):
    meta = json.loads(json.dumps(read_onnx_metadata(run["dir"] / "export" / "qbnn.onnx")))
    d = meta
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    with pytest.raises(MetadataError, match=match):
        validate(meta, "tampered.onnx")


def test_tampered_or_foreign_onnx_files_are_refused(run, tmp_path):
    import onnx

    src = run["dir"] / "export" / "qdnn.onnx"
    m = onnx.load(str(src))
    m.metadata_props[0].value = m.metadata_props[0].value.replace('"qdnn"', '"qbnn"')
    onnx.save(m, str(tmp_path / "kind.onnx"))
    with pytest.raises(MetadataError, match="noise"):
        Model(tmp_path / "kind.onnx")
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "plain.onnx"))
    with pytest.raises(MetadataError, match="no qbdl metadata"):
        read_onnx_metadata(tmp_path / "plain.onnx")
    (tmp_path / "cut.onnx").write_bytes(src.read_bytes()[:5000])
    with pytest.raises(MetadataError):
        read_onnx_metadata(tmp_path / "cut.onnx")


def test_fit_threshold():
    scores = [0.1, 0.2, 0.2, 0.5, 0.9, 1.0]
    correct = [True, True, True, True, False, True]
    assert fit_threshold(scores, correct, 1.0) == (0.5, 1.0, pytest.approx(2 / 6))
    t, kept, referred = fit_threshold(scores, correct, 0.8)
    assert t == 1.0 and referred == 0.0
    assert fit_threshold([0.3, 0.1], [False, False], 0.5) == (-1.0, 0.0, 1.0)  # unreachable: refer everything


def test_export_refuses_other_samplers(run):
    calib = [b for _, b in zip(range(1), run["dm"].calib_dataloader())]
    fresh = quantize_bnn(run["bnn"], calib, sampler="fresh", mc_samples=1)
    with pytest.raises(ExportError, match="flipout"):
        build_onnx(fresh)
    with pytest.raises(ExportError, match="perturbations=5"):
        build_onnx(run["qbnn"], perturbations=5)


def test_export_run_requantizes_a_non_flipout_qbnn(run, tmp_path):
    import shutil

    d = tmp_path / "run"
    (d / "models").mkdir(parents=True)
    for f in ("results.json", "bnn.safetensors"):
        shutil.copy(run["dir"] / f, d / f)
    calib = [b for _, b in zip(range(1), run["dm"].calib_dataloader())]
    save_qbnn(quantize_bnn(run["bnn"], calib, sampler="fresh", mc_samples=1), str(d / "models" / "qbnn.qbdl"))
    done = export_run(d, which=("qbnn",), samples=2, val_limit=64)
    assert set(done) == {"qbnn"} and (d / "export" / "qbnn_flipout.qbdl").is_file()
    meta = read_onnx_metadata(d / "export" / "qbnn.onnx")
    assert meta["mc_samples"] == 2 and meta["source"]["file"] == "qbnn_flipout.qbdl"


def _digit_pngs(folder: Path, n_good: int = 18) -> list[str]:
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    images = load_digits().images
    for i in range(n_good):
        Image.fromarray(np.round(images[i] * 255 / 16).astype(np.uint8), "L").save(
            folder / f"digit_{i:02d}.png"
        )
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG header, then nothing
    Image.fromarray(np.zeros((12, 12), np.uint8), "L").save(folder / "wrong_size.png")
    return ["corrupt.png", "wrong_size.png"]


_NO_TORCH = """
import sys, builtins
sys.modules["torch"] = None  # any `import torch` now fails
real_import = builtins.__import__
def guarded(name, *a, **k):
    if name.split(".")[0] in ("torch", "torchvision", "lightning", "hydra"):
        raise ImportError("blocked in this test: " + name)
    return real_import(name, *a, **k)
builtins.__import__ = guarded
from qbdl.predict import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in ("torch", "torchvision", "lightning") for m in sys.modules if sys.modules[m])
sys.exit(code)
"""


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.slow)])
def test_predict_without_torch(run, tmp_path, runtime):
    pytest.importorskip(runtime)
    bad = _digit_pngs(tmp_path / "images")
    out = tmp_path / "pred.csv"
    model = run["dir"] / "export" / "qbnn.onnx"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NO_TORCH), str(model), str(tmp_path / "images"), "--out", str(out),
         "--runtime", runtime, "--batch-size", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = out.read_text().splitlines()
    assert rows[0] == "file,class,class_index,prob,entropy,mi,refer" and len(rows) == 1 + 18
    assert not any(b in "".join(rows) for b in bad)
    skipped = (tmp_path / "pred.skipped.csv").read_text()
    for b in bad:
        assert b in skipped and b in proc.stdout
    assert "18 of 20 images predicted" in proc.stdout and "referred:" in proc.stdout
    cells = [r.split(",") for r in rows[1:]]
    assert all(
        c[1] == c[2] and 0 < float(c[3]) <= 1 and float(c[5]) >= 0 and c[6] in ("True", "False")
        for c in cells
    )
    # the digits are mostly recognised (the file names carry the true labels of load_digits' first images)
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7]
    assert sum(int(c[2]) == labels[i] for i, c in enumerate(cells)) >= 6


def test_predict_json_output(run, tmp_path):
    from qbdl.predict import main

    _digit_pngs(tmp_path / "images", n_good=3)
    listing = tmp_path / "list.txt"
    listing.write_text("images/digit_00.png\nimages/corrupt.png\nimages/missing.png\nimages/digit_02.png\n")
    out = tmp_path / "p.json"
    assert main([str(run["dir"] / "export" / "qdnn.onnx"), str(listing), "--out", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert [Path(p["file"]).name for p in doc["predictions"]] == ["digit_00.png", "digit_02.png"]
    assert {Path(s["file"]).name for s in doc["skipped"]} == {"corrupt.png", "missing.png"}
    assert doc["summary"]["predicted"] == 2 and doc["summary"]["mc_samples"] == 1


def _with_sign_output(path: Path) -> bytes:
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    name = next(n.output[0] for n in m.graph.node if n.output[0].startswith("signs_sub"))
    m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m.SerializeToString()


def test_in_graph_signs_are_balanced_and_uncorrelated(run):
    data = _with_sign_output(run["dir"] / "export" / "qbnn.onnx")
    x = run["x"][:64].numpy()
    sess = _session(data)
    s7 = sess.run(None, {"input": x, "seed": np.array([7])})[-1]
    s8 = sess.run(None, {"input": x, "seed": np.array([8])})[-1]
    assert s7.shape[0] == 4 * 64 and set(np.unique(s7)) == {-1.0, 1.0}
    n = s7.size
    assert abs(s7.mean()) < 4 / n**0.5  # +-1 balanced (4 sigma)
    for a, b in ((s7[:, :-1], s7[:, 1:]), (s7[:-1], s7[1:]), (s7, s8)):  # neighbours, rows, seeds
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 4 / a.size**0.5


@pytest.mark.slow
def test_openvino_runs_the_same_graph(run, tmp_path):
    """OpenVINO on the seeded QBNN: the same in-graph signs as ONNX Runtime, logits a few LSB apart at most."""
    ov = pytest.importorskip("openvino")
    path = tmp_path / "signs.onnx"
    path.write_bytes(_with_sign_output(run["dir"] / "export" / "qbnn.onnx"))
    x = run["x"][:64].numpy()
    feeds = {"input": x, "seed": np.array([7])}
    a = _session(path).run(None, feeds)
    compiled = ov.Core().compile_model(str(path), "CPU")
    res = compiled.create_infer_request().infer(feeds)
    b = [np.array(res[o]) for o in compiled.outputs]
    assert np.array_equal(a[-1], b[-1])  # the hash is exact in both runtimes' arithmetic
    lsb = np.abs(a[3] - b[3]) / _out_scale(run["qbnn"])
    # OpenVINO's INT8 kernels round requantization differently: an LSB here and there, compounding a little
    assert np.median(lsb) <= 1.001 and (lsb <= 4.001).mean() >= 0.99, np.quantile(lsb, [0.5, 0.9, 1])
    assert (a[0].argmax(1) == b[0].argmax(1)).mean() >= 0.85


def test_export_model_without_validation_data_has_no_threshold(run, tmp_path):
    e = export_model(run["qdnn"], tmp_path / "m.onnx", classes=[str(i) for i in range(10)],
                     preprocessing=preprocessing_of(run["dm"]))  # fmt: skip
    assert e.meta["referral"]["threshold"] is None and read_onnx_metadata(e.path)["kind"] == "qdnn"


def test_export_cli_on_one_qbdl_file(run, tmp_path, capsys):
    from qbdl.export.__main__ import main

    out = tmp_path / "q.onnx"
    assert main([str(run["dir"] / "models" / "qdnn.qbdl"), "--out", str(out)]) == 0
    assert read_onnx_metadata(out)["referral"]["fitted_on"] == "val" and "qdnn:" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.qbdl")]) == 2


def test_predict_from_a_split_of_the_runs_datamodule(run, tmp_path, capsys):
    """--split test: the run's configured test split (labels in the rows, accuracy in the summary); the rows are
    the exported model's own outputs on those images with predict's seeds."""
    from qbdl.predict import main

    model, out = run["dir"] / "export" / "qbnn.onnx", tmp_path / "split.json"
    assert main([str(model), "--split", "test", "--out", str(out), "--quiet", "--seed", "1"]) == 0
    doc = json.loads(out.read_text())
    rows, y = doc["predictions"], run["y"].numpy()
    assert [r["file"] for r in rows] == [f"test[{i}]" for i in range(len(y))]
    assert [r["label"] for r in rows] == y.tolist()
    want = _session(model).run(["probs"], {"input": run["x"][:32].numpy(), "seed": np.array([1_000_003])})[0]
    assert [r["class_index"] for r in rows[:32]] == want.argmax(1).tolist()
    np.testing.assert_allclose([r["prob"] for r in rows[:32]], want.max(1), rtol=1e-6)
    hits = [r["class_index"] == r["label"] for r in rows]
    assert doc["summary"]["accuracy"] == pytest.approx(np.mean(hits))
    kept = [h for h, r in zip(hits, rows) if not r["refer"]]
    assert doc["summary"]["accuracy_kept"] == pytest.approx(np.mean(kept))
    assert "accuracy:" in capsys.readouterr().out
    # a data override that changes the images' size no longer fits the model: refused, not mispredicted
    assert main([str(model), "--split", "test", "--data", "image_size=8", "--out", str(out), "--quiet"]) == 2
    assert "model takes (1, 16, 16)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(model), str(tmp_path), "--split", "test"])


def test_predict_qbdl_applies_the_referral_threshold_fitted_on_val(run, tmp_path):
    """A .qbdl through qbdl's engine refers like an exported model: threshold fitted on the validation split."""
    from qbdl.predict import _QbdlEngine, main

    engine = _QbdlEngine(run["dir"] / "models" / "qbnn.qbdl", None)
    ref = engine.meta["referral"]
    assert ref["fitted_on"] == "val" and ref["target_accuracy"] == 0.995 and ref["threshold"] is not None
    if ref["threshold"] >= 0:  # the kept validation images reach the target
        assert ref["val_accuracy_kept"] >= 0.995
    out = tmp_path / "val.json"
    assert (
        main([str(run["dir"] / "models" / "qbnn.qbdl"), "--split", "val", "--out", str(out), "--quiet"]) == 0
    )
    doc = json.loads(out.read_text())
    assert doc["summary"]["threshold"] == ref["threshold"]
    assert all(r["refer"] == (r["entropy"] > ref["threshold"]) for r in doc["predictions"])
    # other MC seeds than the fit's: the share referred on val is close to the fitted one
    assert abs(doc["summary"]["referred_share"] - ref["val_referred"]) <= 0.1


def _equivalence(run, exported, reference, seeds: int = 5) -> None:
    """exported(seed, sets) / reference(seed, sets) -> {set: probs [S, N, C]}, `seeds` seeds each: accuracy, NLL, UCE and
    OOD AUROC (entropy; the digits' photos and rotated sets) equivalent within the run's declared margins
    (eval.equivalence), by the project's TOST on the per-seed differences (qbdl.report.multi.claims.tost_p)."""
    from qbdl.metrics import accuracy, nll, ood_auroc, uncertainty_calibration_error
    from qbdl.report.multi.claims import ALPHA, tost_p

    margins = json.loads((run["dir"] / "results.json").read_text())["config"]["eval"]["equivalence"]
    dm, x, y = run["dm"], run["x"], run["y"]
    ood = {k: torch.stack([d[i][0] for i in range(len(d))]) for k, d in dm.ood_datasets().items()}

    def metrics(probs: dict) -> dict:  # probs: [S, N, C] per set
        p = probs.pop("in")
        out = {"accuracy": accuracy(p, y), "nll": nll(p, y), "uce": uncertainty_calibration_error(p, y)}
        out.update({f"ood_auroc_{k}": ood_auroc(p, po, "entropy") for k, po in probs.items()})
        return out

    sets = [("in", x), *ood.items()]
    got = [metrics(exported(seed, sets)) for seed in range(seeds)]
    ref = [metrics(reference(seed, sets)) for seed in range(seeds)]
    found = {}
    for name in got[0]:
        d = [a[name] - b[name] for a, b in zip(got, ref)]
        margin = margins["ood_auroc" if name.startswith("ood_auroc") else name]
        found[name] = (float(np.mean(d)), float(np.std(d, ddof=1)), margin, float(tost_p(d, margin)))
    assert all(f[3] < ALPHA for f in found.values()), found  # (mean difference, sd, margin, p) per metric


def _softmax(logits) -> torch.Tensor:
    return torch.softmax(torch.as_tensor(logits).double(), -1)


@pytest.mark.slow  # ~6 min on a loaded 2-core box
def test_seeded_export_is_equivalent_to_qbdl_within_the_runs_margins(run):
    """The runtime's own randomness (in-graph Flipout signs) vs qbdl's Flipout QBNN, 5 seeds each."""
    sess, q = _session(run["dir"] / "export" / "qbnn.onnx"), run["qbnn"]
    samples = read_onnx_metadata(run["dir"] / "export" / "qbnn.onnx")["mc_samples"]

    def exported(seed, sets):
        return {k: _softmax(sess.run(["logits"], {"input": v.numpy(), "seed": np.array([100 + 10 * seed + i])})[0])
                for i, (k, v) in enumerate(sets)}  # fmt: skip

    _equivalence(run, exported, lambda seed, sets: {k: _softmax(mc_logits(q, v, samples, seed=seed)) for k, v in sets})


# -- the bank of K constant INT8 networks (--sampler bank)


@pytest.fixture(scope="module")
def bank(run):
    """The digits run's BNN quantized with sampler 'bank' (K = 3), and qbdl's logits of each of its 3 networks."""
    calib = [b for _, b in zip(range(2), run["dm"].calib_dataloader())]
    q = quantize_bnn(run["bnn"], calib, sampler="bank", bank_size=3, mc_samples=1, observer="histogram", seed=SEED)
    x = run["x"][:96]
    ref = []
    for k in range(3):  # qbdl's engine: MC index k -> entry k of every sampled layer
        set_mc_index(q, k)
        with torch.no_grad():
            ref.append(q(x).float().numpy())
    set_mc_index(q, None)
    return {"q": q, "x": x, "ref": np.stack(ref)}


@pytest.mark.parametrize("exact", [False, True])
def test_bank_export_equals_qbdl_on_the_same_entries(bank, exact):
    """Row s*N+n through network entries[row]: each row's logits within 1 LSB of qbdl's engine on that entry, on
    >= 99% (the QLinearConv form rounds the sampled bias onto its grid, as the det INT8 export does; exact: qbdl's
    arithmetic, almost all bit-equal), whatever entries the rows take (some networks get no row at all)."""
    q, x, ref = bank["q"], bank["x"], bank["ref"]
    proto, layout = build_onnx(q, samples=2, noise="input", exact=exact)
    assert layout.bank_size == 3 and not layout.layers
    sess = _session(proto.SerializeToString())
    n = len(x)
    rng = np.random.default_rng(1)
    for entries in (np.repeat([0, 2], n), rng.integers(0, 3, 2 * n), np.full(2 * n, 1)):
        got = sess.run(["logits"], {"input": x.numpy(), "entries": entries.astype(np.int64)})[0].reshape(2 * n, -1)
        want = ref[entries, np.tile(np.arange(n), 2)]
        lsb = np.abs(got - want) / _out_scale(q)
        assert (lsb <= 1.001).mean() >= 0.99, np.quantile(lsb, [0.5, 0.99, 1])
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
        if exact:
            assert (lsb < 1e-3).mean() >= 0.95
    assert np.abs(ref[0] - ref[1]).max() > 0  # the networks are different samples


def test_seeded_bank_export_draws_each_images_networks(bank):
    """Seeded: image n's S samples are S distinct networks ((o_n + s) mod K), o_n uniform over the K networks
    (chi-square, fixed seeds) and independent between images; a seed reproduces its call; S = K gives every image
    all K networks, so the predictive mean is qbdl's mc over the bank whatever the seed."""
    from scipy import stats

    q, x, ref = bank["q"], bank["x"], bank["ref"]
    sess = _session(build_onnx(q, samples=2, noise="seed", exact=True)[0].SerializeToString())

    def which(logits: np.ndarray) -> np.ndarray:  # [S, N, C] -> the network each row ran (nearest reference)
        d = np.abs(logits[:, None] - ref[None]).max(-1)  # [S, K, N]
        return d.argmin(1)

    offsets = []
    for seed in range(40):
        lg = sess.run(["logits"], {"input": x.numpy(), "seed": np.array([seed])})[0]
        e = which(lg)
        assert np.array_equal((e[0] + 1) % 3, e[1])  # sample 1 is the next network after sample 0
        offsets.append(e[0])
    again = sess.run(["logits"], {"input": x.numpy(), "seed": np.array([39])})[0]
    assert np.array_equal(which(again)[0], offsets[-1])
    counts = np.bincount(np.concatenate(offsets), minlength=3)
    assert stats.chisquare(counts).pvalue > 1e-3, counts  # uniform over the 3 networks
    o = np.stack(offsets)  # [seeds, N]: neighbouring images and successive seeds draw independently
    assert stats.chi2_contingency(np.histogram2d(o[:, :-1].ravel(), o[:, 1:].ravel(), bins=3)[0])[1] > 1e-3
    assert stats.chi2_contingency(np.histogram2d(o[:-1].ravel(), o[1:].ravel(), bins=3)[0])[1] > 1e-3
    full = _session(build_onnx(q, samples=3, noise="seed", exact=True)[0].SerializeToString())
    want = torch.softmax(torch.from_numpy(ref).double(), -1).mean(0).numpy()
    for seed in (0, 5):
        probs = full.run(["probs"], {"input": x.numpy(), "seed": np.array([seed])})[0]
        assert np.abs(probs - want).max() < 0.02 and (probs.argmax(1) == want.argmax(1)).mean() >= 0.99


@pytest.mark.slow
def test_openvino_runs_the_bank_graph(bank, tmp_path):
    """OpenVINO on the bank graph, batches of 1 (two networks get no row: their If branch is skipped) and 7."""
    ov = pytest.importorskip("openvino")
    q, x = bank["q"], bank["x"]
    path = tmp_path / "bank.onnx"
    path.write_bytes(build_onnx(q, samples=2, noise="seed", exact=False, in_shape=tuple(x.shape[1:]))[0]
                     .SerializeToString())  # fmt: skip
    compiled = ov.Core().compile_model(str(path), "CPU")
    req = compiled.create_infer_request()
    for b in (1, 7):
        feeds = {"input": x[:b].numpy(), "seed": np.array([3])}
        a = _session(path).run(["logits"], feeds)[0]
        res = req.infer(feeds)
        got = np.array(res[next(o for o in compiled.outputs if "logits" in o.get_names())])
        assert got.shape == a.shape == (2, b, 10)
        lsb = np.abs(a - got) / _out_scale(q)
        assert np.median(lsb) <= 1.001 and (a.argmax(-1) == got.argmax(-1)).mean() >= 0.85


def test_export_run_with_a_bank(run, tmp_path):
    """export_run(sampler='bank'): re-quantized with K networks, S capped at K, metadata says so, predict runs it."""
    import shutil

    d = tmp_path / "run"
    (d / "models").mkdir(parents=True)
    for f in ("results.json", "bnn.safetensors"):
        shutil.copy(run["dir"] / f, d / f)
    shutil.copy(run["dir"] / "models" / "qbnn.qbdl", d / "models" / "qbnn.qbdl")  # a flipout qbnn
    done = export_run(d, which=("qbnn",), samples=8, sampler="bank", bank_size=2, val_limit=64)
    meta = read_onnx_metadata(d / "export" / "qbnn.onnx")
    assert meta["sampling"] == "bank" and meta["perturbations"] == 2 and meta["mc_samples"] == 2
    assert meta["source"]["file"] == "qbnn_bank.qbdl" and (d / "export" / "qbnn_bank.qbdl").is_file()
    assert done["qbnn"].meta["referral"]["threshold"] is not None
    out = Model(d / "export" / "qbnn.onnx").run(run["x"][:5].numpy(), seed=1)
    assert out["probs"].shape == (5, 10) and out["logits"].shape == (2, 5, 10)
    with pytest.raises(ExportError, match="sampler must be"):
        export_run(d, which=("qbnn",), sampler="fresh")
    with pytest.raises(MetadataError, match="sampling"):
        validate({**meta, "sampling": "fresh"})
