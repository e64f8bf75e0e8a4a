"""Fuzzing (hypothesis): the metric functions and the image readers never crash other than documented.

Metrics: valid MC probabilities of any shape give finite results (no NaN); arbitrary arrays give results or
the documented ValueError. Image readers: random bytes and truncated PNG/TIFF/JPEG files are reported
(bad_files / image_problem) or decode; never an unhandled exception, never a silent drop.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from fabricate import KATHER_CLASSES, KATHER_FOLDER, make_colorectal, make_imagenet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_log import record

from qbdl import metrics
from qbdl.data import ColorectalDataModule, ImageNetDataModule
from qbdl.data.sources import FileSource, image_problem, verify_source

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_FILES = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _finite_values(obj, where: str = "") -> None:
    """Every number in a (nested) result is finite; None marks 'undefined' and is allowed."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite_values(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _finite_values(v, f"{where}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), f"{where} = {obj}"
    elif isinstance(obj, torch.Tensor) and obj.is_floating_point():
        assert torch.isfinite(obj).all(), where


@st.composite
def mc_probs(draw, max_s: int = 4, max_b: int = 24, max_c: int = 6):
    """Valid p [S, B, C] (softmax of logits of any scale, incl. one-hot-like and ties) and targets y [B]."""
    s = draw(st.integers(1, max_s))
    b = draw(st.integers(1, max_b))
    c = draw(st.integers(2, max_c))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 10.0, 100.0, 1e4]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, c, generator=g, dtype=torch.float64) * scale
    if draw(st.booleans()):  # exact ties across examples
        logits = logits.round()
    p = torch.softmax(logits, -1).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    if draw(st.booleans()):  # all correct: referral/AURC corner cases
        y = p.mean(0).argmax(-1)
    return p, y


def test_fuzz_summarize_valid_inputs_finite():
    stats = Counter()

    @FUZZ
    @given(data=mc_probs(), ood=st.one_of(st.none(), mc_probs()), target=st.floats(0.0, 1.0))
    def check(data, ood, target):
        p, y = data
        ood_p = None
        if ood is not None:
            q, _ = ood
            if q.shape[-1] != p.shape[-1]:
                q = torch.softmax(torch.randn(q.shape[0], q.shape[1], p.shape[-1], dtype=torch.float64), -1)
            ood_p = {"fuzz": q.to(p.dtype)}
        res = metrics.summarize(p, y, ood=ood_p, target_accuracy=target)
        _finite_values(res)
        assert (
            0.0 <= res["accuracy"] <= 1.0
            and res["nll"] >= 0
            and 0 <= res["ece"] <= 1
            and 0 <= res["uce"] <= 1
        )
        assert res["mi_mean"] >= 0
        if ood_p is not None:
            assert 0.0 <= res["ood_auroc"] <= 1.0
        stats["examples"] += 1

    check()
    record(
        "test_fuzz_summarize_valid_inputs_finite",
        "fuzzing",
        "metrics.summarize on random valid p [S<=4, B<=24, C<=6] (logit scale 0..1e4, ties, all-correct), "
        "with/without an OOD set, random target accuracy",
        "hypothesis-generated inputs",
        stats["examples"],
        "no exception, every value finite and in range",
    )


FUNCS = {
    "ece": lambda p, y: metrics.expected_calibration_error(p, y),
    "mce": lambda p, y: metrics.maximum_calibration_error(p, y),
    "uce": lambda p, y: metrics.uncertainty_calibration_error(p, y),
    "nll": metrics.nll,
    "brier": metrics.brier,
    "accuracy": metrics.accuracy,
    "referral_auc": lambda p, y: metrics.referral_auc(p, y, score="mi"),
    "referral_rate": lambda p, y: metrics.referral_rate_at_accuracy(p, y, 0.995, score="maxprob"),
    "aurc": metrics.aurc,
    "eaurc": metrics.eaurc,
    "referral_curve": lambda p, y: metrics.referral_curve(p, y),
    "reliability_bins": lambda p, y: metrics.reliability_bins(p, y, n_bins=7),
    "uncertainty_bins": lambda p, y: metrics.uncertainty_calibration_bins(p, y, n_bins=3),
}


def test_fuzz_metric_functions_valid_inputs():
    stats = Counter()

    @FUZZ
    @given(data=mc_probs(), name=st.sampled_from(sorted(FUNCS)))
    def check(data, name):
        p, y = data
        out = FUNCS[name](p, y)
        if hasattr(out, "_asdict"):
            out = out._asdict()
        elif hasattr(out, "__dict__") and not isinstance(out, float):
            out = vars(out)
        _finite_values(out, name)
        stats[name] += 1

    check()
    record(
        "test_fuzz_metric_functions_valid_inputs",
        "fuzzing",
        f"{len(FUNCS)} metric functions (ECE, MCE, UCE, NLL, Brier, accuracy, referral curve/AUC/rate, AURC, "
        "E-AURC, reliability/uncertainty bins) on random valid p",
        "hypothesis-generated inputs",
        sum(stats.values()),
        "no exception, no NaN/inf",
    )


_weird_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def arbitrary_arrays(draw):
    """Arrays that are often invalid: any shape (0-4 dims, zero sizes), NaN/inf/negative, unnormalised."""
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    n = int(np.prod(shape)) if shape else 1
    vals = draw(st.lists(_weird_floats, min_size=n, max_size=n))
    p = torch.tensor(vals, dtype=torch.float32).reshape(shape)
    ylen = draw(st.integers(0, 5))
    y = torch.tensor(draw(st.lists(st.integers(-2, 6), min_size=ylen, max_size=ylen)), dtype=torch.long)
    if draw(st.booleans()):
        y = y.float()
    return p, y


@st.composite
def nearly_valid(draw):
    """Valid (p, y) with at most one defect: a NaN/inf/negative entry, unnormalised rows, a target out of range,
    float targets, a missing sample axis, mismatched lengths."""
    p, y = draw(mc_probs())
    defect = draw(
        st.sampled_from(
            ["none", "nan", "inf", "negative", "unnormalised", "y>=C", "y<0", "y float", "2-D p", "short y"]
        )
    )
    p = p.clone()
    if defect in ("nan", "inf", "negative"):
        p[0, 0, 0] = {"nan": float("nan"), "inf": float("inf"), "negative": -0.5}[defect]
    elif defect == "unnormalised":
        p = p * 2
    elif defect == "y>=C":
        y = y.clone()
        y[0] = p.shape[-1]
    elif defect == "y<0":
        y = y.clone()
        y[0] = -1
    elif defect == "y float":
        y = y.float()
    elif defect == "2-D p":
        p = p[0]
    elif defect == "short y":
        y = y[:-1]
    return p, y


def test_fuzz_metrics_invalid_inputs_only_value_error():
    outcomes = Counter()

    @FUZZ
    @given(
        data=st.one_of(arbitrary_arrays(), nearly_valid()),
        name=st.sampled_from(sorted(FUNCS) + ["summarize", "ood_auroc", "ood_fpr"]),
    )
    def check(data, name):
        p, y = data
        try:
            if name == "summarize":
                out = metrics.summarize(p, y)
            elif name == "ood_auroc":
                out = metrics.ood_auroc(p, p.flip(0) if p.ndim else p)
            elif name == "ood_fpr":
                out = metrics.ood_fpr_at_tpr(p, p, tpr=0.95)
            else:
                out = FUNCS[name](p, y)
        except ValueError:
            outcomes["ValueError"] += 1
            return
        if hasattr(out, "_asdict"):
            out = out._asdict()
        _finite_values(out, name)
        outcomes["valid result"] += 1

    check()
    record(
        "test_fuzz_metrics_invalid_inputs_only_value_error",
        "fuzzing",
        "metric functions + summarize + ood_auroc/fpr95 on arbitrary arrays (0-4 dims, empty, NaN/inf, "
        "negative, unnormalised) and on valid inputs with one defect (NaN/inf/negative entry, unnormalised, "
        "target out of range or float, 2-D p, length mismatch)",
        "hypothesis-generated inputs",
        sum(outcomes.values()),
        f"{outcomes['ValueError']} documented ValueError, {outcomes['valid result']} finite results, "
        "no other exception",
    )


def test_fuzz_ood_metrics_valid_inputs():
    stats = Counter()

    @FUZZ
    @given(a=mc_probs(max_c=4), b=mc_probs(max_c=4), score=st.sampled_from(["entropy", "mi", "maxprob"]))
    def check(a, b, score):
        p_in, _ = a
        p_out, _ = b
        if p_out.shape[-1] != p_in.shape[-1]:
            p_out = torch.softmax(torch.randn(p_out.shape[0], p_out.shape[1], p_in.shape[-1]), -1)
        p_out = p_out.to(p_in.dtype)
        for fn in (metrics.ood_auroc, metrics.ood_aupr):
            v = fn(p_in, p_out, score=score)
            assert math.isfinite(v) and 0.0 <= v <= 1.0
        v = metrics.ood_fpr_at_tpr(p_in, p_out, score=score)
        assert math.isfinite(v) and 0.0 <= v <= 1.0
        stats["examples"] += 1

    check()
    record(
        "test_fuzz_ood_metrics_valid_inputs",
        "fuzzing",
        "ood_auroc / ood_aupr / ood_fpr_at_tpr on random in/out probabilities (entropy, MI, max-prob scores)",
        "hypothesis-generated inputs",
        stats["examples"],
        "no exception, every value finite in [0, 1]",
    )


# ------------------------------------------------------------------------------------------- image readers


def _image_bytes(fmt: str, seed: int, w: int, h: int, mode: str) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(
        mode if not (fmt == "JPEG" and mode in ("RGBA", "P")) else "RGB"
    )
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def image_files(draw):
    """File contents: a valid image, a truncated one (any cut), a bit-flipped one, or random bytes."""
    kind = draw(st.sampled_from(["valid", "truncated", "flipped", "random"]))
    if kind == "random":
        return kind, draw(st.binary(min_size=0, max_size=600))
    fmt = draw(st.sampled_from(["PNG", "TIFF", "JPEG"]))
    data = _image_bytes(
        fmt,
        draw(st.integers(0, 1000)),
        draw(st.integers(1, 40)),
        draw(st.integers(1, 40)),
        draw(st.sampled_from(["RGB", "L", "RGBA", "P"])),
    )
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "flipped":
        arr = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(arr) - 1))
            arr[i] ^= 1 << draw(st.integers(0, 7))
        data = bytes(arr)
    return f"{kind} {fmt}", data


def test_fuzz_file_reader_reports_or_decodes():
    """The readers' verification (FileSource + verify_source, used by colorectal and ImageNet) on fuzzed files."""
    outcomes = Counter()
    tmp = Path(tempfile.mkdtemp(prefix="qbdl-fuzz-"))
    try:

        @settings(max_examples=80, deadline=None)
        @given(files=st.lists(image_files(), min_size=1, max_size=6))
        def check(files):
            paths = []
            for i, (_, data) in enumerate(files):
                path = tmp / f"f{i}.tif"
                path.write_bytes(data)
                paths.append(path)
            src = FileSource(paths, [0] * len(paths))
            good, bad = verify_source(src, np.arange(len(paths)), "skip", "fuzz")
            assert len(good) + len(bad) == len(paths)  # every file is kept or reported, none dropped
            assert all(reason for _, reason in bad)
            for i in good.tolist():
                img, _ = src[i]  # what verification accepted decodes
                assert img.width >= 1 and img.height >= 1
            for (kind, _), i in zip(files, range(len(files)), strict=True):
                outcomes[f"{kind.split()[0]} -> {'kept' if i in set(good.tolist()) else 'reported'}"] += 1

        check()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record(
        "test_fuzz_file_reader_reports_or_decodes",
        "fuzzing",
        "image files (valid / truncated at any byte / bit-flipped PNG, TIFF, JPEG in RGB, L, RGBA, P; random bytes) "
        "through FileSource + verify_source",
        "hypothesis-generated files",
        sum(outcomes.values()),
        "every file decoded or reported with a reason, none dropped: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())),
    )


def test_fuzz_datamodules_on_corrupted_files():
    """Colorectal and ImageNet datamodules with fuzzed files in place of real ones: setup reports skips."""
    base = Path(tempfile.mkdtemp(prefix="qbdl-fuzz-dm-"))
    outcomes = Counter()
    try:
        crc_clean = make_colorectal(base / "crc_clean", n_per_class=2, size=16)
        inet_clean = make_imagenet(base / "inet_clean", n_classes=2, n_per_class=3, size=16)

        @FUZZ_FILES
        @given(
            files=st.lists(image_files(), min_size=1, max_size=4),
            which=st.sampled_from(["colorectal", "imagenet"]),
        )
        def check(files, which):
            work = base / "work"
            shutil.rmtree(work, ignore_errors=True)
            if which == "colorectal":
                shutil.copytree(crc_clean, work)
                targets = sorted((work / KATHER_FOLDER / KATHER_CLASSES[0]).iterdir()) + sorted(
                    (work / KATHER_FOLDER / KATHER_CLASSES[1]).iterdir()
                )
                dm = ColorectalDataModule(
                    root=work, num_workers=0, image_size=8, batch_size=4, on_bad_file="skip"
                )
                n_all = 16
            else:
                shutil.copytree(inet_clean, work)
                targets = sorted(p for d in sorted((work / "train").iterdir()) for p in sorted(d.iterdir()))
                dm = ImageNetDataModule(
                    root=work, num_workers=0, image_size=8, resize_size=8, verify=True, val_fraction=0.3
                )
                n_all = 12
            for (_, data), path in zip(files, targets, strict=False):
                path.write_bytes(data)
            dm.setup()
            kept = sum(len(v) for v in dm.split_indices().values())
            assert kept + len(dm.bad_files) == n_all
            for split in ("train", "val", "test"):
                ds = dm.dataset(split)
                for i in range(len(ds)):
                    assert torch.isfinite(ds[i][0]).all()
            outcomes[which] += 1
            outcomes["reported"] += len(dm.bad_files)

        check()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    record(
        "test_fuzz_datamodules_on_corrupted_files",
        "fuzzing",
        "ColorectalDataModule (16 tiles) and ImageNetDataModule (12 images, verify=True) with 1-4 files replaced "
        "by fuzzed contents",
        "hypothesis-generated files",
        outcomes["colorectal"] + outcomes["imagenet"],
        f"setup never crashed; {outcomes['reported']} bad file(s) reported in bad_files, the rest kept and "
        "decoded to finite tensors",
    )


def test_image_problem_on_every_truncation_point():
    """Exhaustive companion: every cut of a small PNG/TIFF/JPEG is detected by the verification."""
    n = 0
    missed = []
    for fmt in ("PNG", "TIFF", "JPEG"):
        data = _image_bytes(fmt, 0, 12, 9, "RGB")
        for cut in range(0, len(data), max(1, len(data) // 60)):
            n += 1
            if image_problem(lambda d=data[:cut]: Image.open(io.BytesIO(d))) is None:
                missed.append((fmt, cut, len(data)))
    record(
        "test_image_problem_on_every_truncation_point",
        "fuzzing",
        "12x9 RGB PNG, TIFF, JPEG cut at ~60 evenly spaced byte offsets each",
        "truncated image file",
        n,
        f"{n - len(missed)}/{n} detected" + (f"; accepted: {missed[:5]}" if missed else ""),
    )
    assert not missed, missed
