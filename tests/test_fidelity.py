"""qbdl.fidelity: the ablation forward reproduces the BNN (all parts off) and the INT8 QBNN (all on), the
budget adds up, and the MC noise floor shrinks as 1/sqrt(S)."""

import json
import math

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

from qbdl.bayes import dnn_to_bnn, mc_logits
from qbdl.fidelity import (
    CONFIGS,
    ablation_model,
    error_budget,
    format_budget,
    main,
    mc_noise_floor,
    mc_noise_floor_of,
    plot_budget,
    set_parts,
)
from qbdl.quant import calibrate, prepare, quantize_bnn

S, SEED = 3, 5


class TinyResNet(nn.Module):
    """What the budget must handle, small: quant stub, conv+BN+ReLU, a residual add+ReLU, avg pool, fc, dequant."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.bn1, self.relu = (
            nn.Conv2d(in_chans, 8, 3, 1, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.add = FloatFunctional()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(self.quant(x))))
        y = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(x)))))
        x = self.add.add_relu(y, x)
        return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))


def _bnn(estimator: str = "reparameterization") -> nn.Module:
    torch.manual_seed(0)
    dnn = TinyResNet().eval()
    for m in dnn.modules():  # BN with negative scales too: the fold must keep the BNN's random numbers
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return dnn_to_bnn(dnn, moped_delta=0.1, prior_sigma=0.1, estimator=estimator).eval()


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def nets():
    bnn = _bnn()
    calib = [_data(32, 1)]
    qs = {
        sampler: quantize_bnn(bnn, calib, sampler=sampler, mc_samples=2, observer="minmax", seed=3)
        for sampler in ("fresh", "bank")
    }
    return bnn, qs


@pytest.mark.parametrize("sampler", ["fresh", "bank"])
def test_all_off_is_the_bnn_bit_for_bit_and_all_on_is_the_qbnn(nets, sampler):
    bnn, qs = nets
    q = qs[sampler]
    x = _data(64, 7)
    ref_q = mc_logits(q, x, S, seed=SEED)
    abl = ablation_model(bnn, q)
    assert torch.equal(mc_logits(set_parts(abl), x, S, seed=SEED), mc_logits(bnn, x, S, seed=SEED))
    on = mc_logits(set_parts(abl, True, True, True), x, S, seed=SEED)
    lsb = q.fc.out_scale
    # FP32 emulation vs int32 kernels: single activations one LSB apart now and then, propagated to the logits
    assert float((on - ref_q).abs().max()) <= 8 * lsb, float((on - ref_q).abs().max()) / lsb
    assert float((on - ref_q).abs().mean()) <= 0.5 * lsb
    assert float((on.argmax(-1) == ref_q.argmax(-1)).float().mean()) >= 0.97
    # all parts on again, another seed: still the QBNN (the ablation reads the QBNN's sample for each index)
    assert (
        float((mc_logits(abl, x, 2, seed=SEED + 1) - mc_logits(q, x, 2, seed=SEED + 1)).abs().mean())
        <= 0.5 * lsb
    )


def test_each_part_alone_uses_the_right_random_numbers(nets):
    """(a), (c) alone keep the BNN's Gaussian draws (close to the BNN); (b) alone takes the QBNN's samples."""
    bnn, qs = nets
    q = qs["fresh"]
    x = _data(64, 8)
    bnn0, bnn1 = mc_logits(bnn, x, S, seed=SEED), mc_logits(bnn, x, S, seed=SEED + 1)
    qref = mc_logits(q, x, S, seed=SEED)
    mc = float((bnn1 - bnn0).abs().mean())  # MC noise of one logit between two seeds
    abl = ablation_model(bnn, q)
    for parts in [(True, False, False), (False, False, True), (True, False, True)]:
        out = mc_logits(set_parts(abl, *parts), x, S, seed=SEED)
        assert float((out - bnn0).abs().mean()) < 0.3 * mc, parts
        assert not torch.equal(out, bnn0)
    for parts in [(False, True, False), (True, True, False), (False, True, True)]:
        out = mc_logits(set_parts(abl, *parts), x, S, seed=SEED)
        assert float((out - qref).abs().mean()) < 0.3 * mc, parts


def test_fp32_layers_follow_the_bnn_and_leave_input_and_logits_unquantized(nets):
    """Every layer FP32 with all parts on is exactly activations-only minus the input and logit sites; the first
    and last layers FP32 keep the inner layers' INT8 samples."""
    bnn, qs = nets
    x = _data(32, 9)
    abl = ablation_model(bnn, qs["fresh"])
    order = abl.ablation.graph_order
    assert order == ["conv1", "conv2", "conv3", "fc"]
    layers = {m.site_name: m for m in abl.modules() if hasattr(m, "feeds_output")}
    assert [n for n, m in layers.items() if m.feeds_output] == ["fc"]
    assert [n for n, m in layers.items() if m.input_site is not None] == ["conv1"]
    assert not any(n.endswith("input_site") for n, _ in abl.named_modules())  # a reference, not a child
    all_fp32 = mc_logits(set_parts(abl, True, True, True, fp32=order), x, S, seed=SEED)
    set_parts(abl, activations=True)
    layers["conv1"].input_site.activations = layers["fc"].activations = False
    assert torch.equal(all_fp32, mc_logits(abl, x, S, seed=SEED))
    assert not torch.equal(all_fp32, mc_logits(set_parts(abl, activations=True), x, S, seed=SEED))
    # first and last FP32: exactly all parts on with only those two layers (and the input, the logits) switched
    mixed = mc_logits(set_parts(abl, True, True, True, fp32=["conv1", "fc"]), x, S, seed=SEED)
    set_parts(abl, True, True, True)
    for n in ("conv1", "fc"):
        layers[n].weights = layers[n].sampling = False
    layers["conv1"].input_site.activations = layers["fc"].activations = False
    assert torch.equal(mixed, mc_logits(abl, x, S, seed=SEED))
    assert not torch.equal(mixed, mc_logits(set_parts(abl, True, True, True), x, S, seed=SEED))
    with pytest.raises(ValueError, match="not quantized layers"):
        set_parts(abl, fp32=["nope"])


def test_flipout_bnn_all_off_is_exact():
    bnn = _bnn("flipout")
    pq = calibrate(prepare(bnn, backend="x86"), [_data(32, 1)], mc_samples=2)
    abl = ablation_model(bnn, pq)  # a calibrated prepared model: converted inside (fresh)
    x = _data(16, 3)
    assert torch.equal(mc_logits(set_parts(abl), x, 2, seed=SEED), mc_logits(bnn, x, 2, seed=SEED))
    out = mc_logits(set_parts(abl, weights=True), x, 2, seed=SEED)
    assert torch.isfinite(out).all()


def test_error_budget_adds_up(nets, tmp_path):
    bnn, qs = nets
    q = qs["fresh"]
    g = torch.Generator().manual_seed(11)
    test = [(_data(24, 20 + i), torch.randint(0, 10, (24,), generator=g)) for i in range(2)]
    ood = {"noise": [(3 * _data(24, 30), torch.full((24,), -1))]}
    b = error_budget(bnn, q, test, ood, mc_samples=2, seed=SEED, floor_seeds=2)
    assert set(b["configs"]) == set(CONFIGS) | {"bnn", "qbnn"}
    assert b["configs"]["none"] == b["configs"]["bnn"]  # all off: the BNN, exactly
    assert b["checks"]["all_off_vs_bnn"] == {"max_abs_logit": 0.0, "equal": True}
    assert b["checks"]["all_on_vs_qbnn"]["argmax_agreement"] >= 0.97
    assert {"accuracy", "nll", "uce", "ece", "ood_auroc/noise"} <= set(b["metrics"])
    for m, gm in b["gap"].items():
        assert math.isclose(sum(gm["shapley"].values()), gm["emulated"], abs_tol=1e-12), m
        assert math.isclose(gm["emulated"] + gm["kernel_residual"], gm["gap"], abs_tol=1e-9), m
        assert gm["gap"] == b["configs"]["qbnn"][m] - b["configs"]["bnn"][m]
        assert gm["mc_floor"] >= 0 and len(b["floor_values"][m]) == 3
    for ks in b["checks"]["kernel_layers"].values():  # same int8 inputs: FP32 emulation within 1 LSB
        assert ks["max_lsb"] <= 1 and ks["mismatch_share"] < 0.05
    assert len(b["layers"]) == 4 and all(v["mu_sqnr_db"] > 30 for v in b["layers"].values())
    assert all(0.5 < v["sample_noise_var_ratio"] < 2 for v in b["layers"].values() if v["bayesian"])
    sites = b["sites"]
    assert all(set(s["clip"]) == {"test", "noise"} for s in sites.values())
    assert all(0 <= v <= 1 for s in sites.values() for v in s["clip"].values())
    # calibrated on N(0,1) inputs: the 3x wider OOD inputs are clipped far more often at the input
    inp = next(s for s in sites.values() if s["kind"] == "input")
    assert inp["clip"]["noise"] > inp["clip"]["test"]
    mixed = b["mixed"]["first_last_fp32"]
    assert mixed["fp32_layers"] == ["conv1", "fc"]
    for m, v in mixed["metrics"].items():
        assert (
            v - b["configs"]["abc"][m] == mixed["vs_all_on"][m]
            and v - b["configs"]["bnn"][m] == mixed["gap"][m]
        )
    sg = b["sigma_grid"]
    assert all(sg["vs_a"][m] == b["configs"]["a"][m] - sg["metrics"][m] for m in sg["metrics"])
    assert sg["metrics"] != b["configs"]["a"]  # the exact sigma was used
    json.dumps(b, allow_nan=True)
    assert "first_last_fp32 (conv1, fc at FP32" in format_budget(b)
    assert "gap" in format_budget(b)
    assert plot_budget(b, tmp_path / "f.png").stat().st_size > 1000


def test_mc_noise_floor_shrinks_as_inverse_sqrt_samples():
    """Synthetic: probabilities from fixed logits + Gaussian MC noise; the floor of the NLL goes as S^-1/2."""
    n, c = 200, 5
    base = torch.randn(n, c, generator=torch.Generator().manual_seed(0)) * 2
    y = base.argmax(1)

    def predict(samples: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.softmax(base + torch.randn(samples, n, c, generator=g), -1)

    def nll(p: torch.Tensor) -> float:
        return float(-torch.log(p.mean(0)[torch.arange(n), y]).mean())

    sizes = [16, 64, 256]
    floors = [mc_noise_floor_of(predict, nll, s, range(24)) for s in sizes]  # 276 seed pairs each
    ls, lf = [math.log(s) for s in sizes], [math.log(f) for f in floors]
    mx, my = sum(ls) / len(ls), sum(lf) / len(lf)
    slope = sum((a - mx) * (b - my) for a, b in zip(ls, lf)) / sum((a - mx) ** 2 for a in ls)
    assert -0.62 < slope < -0.38, (floors, slope)  # 1/sqrt(S): -0.5 (1/S would be -1)
    assert mc_noise_floor([1.0]) == 0.0
    assert mc_noise_floor([1.0, 2.0, 4.0]) == pytest.approx((1 + 3 + 2) / 3)


def write_run_dir(path, bnn, qbnn) -> None:
    """A finished-run directory of the tiny BNN on 8x8 digits: results.json (config), bnn.safetensors, models/."""
    from qbdl.models.files import save_state
    from qbdl.quant import save_qbnn

    cfg = {
        "data": {"_target_": "qbdl.data.DigitsDataModule", "root": None, "batch_size": 64, "eval_batch_size": 64,
                 "num_workers": 0, "pin_memory": False, "seed": 0, "image_size": 8, "train_fraction": 0.6,
                 "val_fraction": 0.12, "test_fraction": 0.28, "mean": [0.3053], "std": [0.376],
                 "augment": False, "augment_shift": 1, "n_photos": 64, "photo_min_levels": 10},
        "model": {"_target_": "test_fidelity.TinyResNet"},
        "bayes": {"estimator": "reparameterization", "prior": "moped", "prior_sigma": 0.1, "moped_delta": 0.1},
        "eval": {"mc_samples": 2, "seed": 1, "n_bins": 15, "score": "entropy", "batch_size": 64,
                 "builtin_ood": ["photos"], "ood": {}, "target_accuracy": 0.995},
        "bnn": {"beta": 1.0},
        "quant": {"backend": "x86", "sampler": "fresh", "bank_size": 2, "calib_batches": 1, "mc_samples": 2,
                  "observer": "minmax", "fresh_kernel": "auto", "noise_slots": 4, "calib_batch_size": None},
    }  # fmt: skip
    (path / "results.json").write_text(json.dumps({"config": cfg}))
    save_state(bnn, path / "bnn.safetensors")
    (path / "models").mkdir()
    save_qbnn(qbnn, str(path / "models" / "qbnn.qbdl"))


def test_cli_on_a_run_directory(nets, tmp_path, capsys):
    bnn, qs = nets
    write_run_dir(tmp_path, bnn, qs["fresh"])
    assert main([str(tmp_path), "--max-batches", "1", "--floor-seeds", "1"]) == 0
    out = json.loads((tmp_path / "fidelity.json").read_text())
    assert out["mc_samples"] == 2 and out["seed"] == 1 and "ood_auroc/photos" in out["gap"]
    assert (tmp_path / "fidelity.png").exists()
    assert "all off == BNN: True" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
    # under drift: the same budget on a corrupted copy of the test split
    assert (
        main([str(tmp_path), "--max-batches", "1", "--floor-seeds", "1", "--shift", "gaussian_noise:5"]) == 0
    )
    shifted = json.loads((tmp_path / "fidelity_gaussian_noise_5.json").read_text())
    assert shifted["shift"] == {"corruption": "gaussian_noise", "severity": 5, "seed": 0}
    assert shifted["n_test"] == out["n_test"] and shifted["configs"]["bnn"] != out["configs"]["bnn"]
    assert (tmp_path / "fidelity_gaussian_noise_5.png").exists()
    assert main([str(tmp_path), "--shift", "no_such_corruption:3"]) == 2
    assert main([str(tmp_path), "--shift", "gaussian_noise"]) == 2
    assert "CORRUPTION:SEVERITY" in capsys.readouterr().err


def test_mc_logits_first_index_continues_the_same_stream(nets):
    bnn, qs = nets
    x = _data(4, 9)
    for model in (bnn, qs["fresh"]):
        assert torch.equal(mc_logits(model, x, 2, seed=1, first_index=2), mc_logits(model, x, 4, seed=1)[2:])


def test_welch_interval_matches_scipy_and_verdicts_on_hand_cases():
    from scipy import stats

    from qbdl.fidelity.draws import paired_interval, verdict, welch_interval

    a, b = [0.91, 0.93, 0.90, 0.95, 0.92], [0.94, 0.96, 0.93, 0.97]
    w = welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert w["diff"] == pytest.approx(sum(a) / 5 - sum(b) / 4)
    assert (w["lo"], w["hi"], w["p"], w["df"]) == pytest.approx((ci.low, ci.high, ref.pvalue, ref.df))
    exact = {"diff": 0.5, "se": 0.0, "df": 2.0, "lo": 0.5, "hi": 0.5, "p": 0.0}  # constant draws: no spread
    assert welch_interval([1.0, 1.0], [0.5, 0.5]) == exact
    with pytest.raises(ValueError, match=">= 2 draws"):
        welch_interval([1.0], [1.0, 2.0])
    assert verdict(-0.1, 0.2, 0.3) == "within"
    assert verdict(-0.1, 0.4, 0.3) == "undecided"
    assert verdict(0.31, 0.5, 0.3) == "beyond" and verdict(-0.9, -0.4, 0.3) == "beyond"
    assert verdict(-0.3, 0.1, 0.3) == "undecided"  # the interval touches the floor: not shown inside
    ref = stats.ttest_rel(a[:4], b)
    p = paired_interval(a[:4], b)
    ci = ref.confidence_interval(0.95)
    assert (p["lo"], p["hi"], p["p"], p["df"]) == pytest.approx((ci.low, ci.high, ref.pvalue, 3))


def test_draws_cli_compares_disjoint_mc_draws(nets, tmp_path, capsys):
    bnn, qs = nets
    write_run_dir(tmp_path, bnn, qs["fresh"])
    assert main([str(tmp_path), "--max-batches", "1", "--draws", "3"]) == 0
    out = json.loads((tmp_path / "fidelity_draws.json").read_text())
    assert out["draws"] == 3 and out["mc_samples"] == 2 and "ood_auroc/photos" in out["metrics"]
    nll = out["metrics"]["nll"]
    assert len(set(nll["bnn"])) == 3 and len(set(nll["qbnn"])) == 3  # independent draws, not one repeated
    assert nll["floor"] == pytest.approx(mc_noise_floor(nll["bnn"]))
    assert nll["lo"] <= nll["diff"] <= nll["hi"] and nll["verdict"] in ("within", "beyond", "undecided")
    assert "| nll |" in capsys.readouterr().out
    assert main([str(tmp_path), "--max-batches", "1", "--draws", "1"]) == 2
    # which part: the ablation model with (a) and (c) on runs on the BNN's random numbers, so draws pair up
    assert main([str(tmp_path), "--max-batches", "1", "--draws", "3", "--parts", "ac"]) == 0
    ac = json.loads((tmp_path / "fidelity_draws_ac.json").read_text())
    assert ac["paired"] and ac["parts"] == "ac" and not out["paired"]
    assert ac["metrics"]["nll"]["bnn"] == nll["bnn"]  # the same BNN draws
    assert main([str(tmp_path), "--max-batches", "1", "--draws", "3", "--parts", "x"]) == 2
