"""Bad input gets a clear error or a reported skip, never a silent drop or a deep traceback."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from fabricate import KATHER_CLASSES, KATHER_FOLDER, corrupt_file, make_colorectal, make_imagenet
from PIL import Image
from reliability_log import record, tiny_config, tiny_overrides

from qbdl.data import ColorectalDataModule, ImageNetDataModule
from qbdl.data.errors import BadImageError, DataLeakError, DataNotFoundError
from qbdl.data.splits import check_labels

FULL = os.environ.get("QBDL_RELIABILITY_FULL") == "1"


def _cli(args: list[str], out: Path, timeout: int = 240) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "-m", "qbdl.run", *args, f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _assert_one_paragraph(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]
    assert "HYDRA_FULL_ERROR=1" in text  # the hint printed with the one-paragraph message


# ------------------------------------------------------------------------------------------- CLI errors


def test_cli_missing_dataset_root(tmp_path):
    missing = tmp_path / "no_such_root"
    rc, text = _cli([*tiny_overrides(), "data=colorectal", f"data.root={missing}"], tmp_path / "out")
    assert rc == 2, text[-3000:]
    _assert_one_paragraph(text)
    assert str(missing) in text and "Expected layout" in text and "zenodo" in text.lower()
    assert not (tmp_path / "out" / "checkpoints").exists()
    record(
        "test_cli_missing_dataset_root",
        "bad input",
        "python -m qbdl.run data=colorectal data.root=<missing>",
        "missing dataset root",
        1,
        "exit code 2; one paragraph: path tried, expected layout, where to download",
    )


def test_cli_unknown_backend_fails_before_training(tmp_path):
    rc, text = _cli([*tiny_overrides(ptq=True), "quant.backend=nosuch"], tmp_path / "out")
    assert rc == 2, text[-3000:]
    _assert_one_paragraph(text)
    assert "nosuch" in text and "backend" in text and "x86" in text
    assert not (tmp_path / "out" / "checkpoints").exists()  # no training was wasted
    record(
        "test_cli_unknown_backend_fails_before_training",
        "bad input",
        "python -m qbdl.run quant.backend=nosuch",
        "unknown quantized backend",
        1,
        "exit code 2 at start-up (before any training), message lists the supported engines",
    )


@pytest.mark.skipif(not FULL, reason="Hydra's own composition error; set QBDL_RELIABILITY_FULL=1")
def test_cli_unknown_experiment(tmp_path):
    rc, text = _cli(["+experiment=nosuch"], tmp_path / "out")
    assert rc != 0
    assert "Traceback" not in text
    assert "nosuch" in text and "digits_ptq" in text  # names the available experiments
    record(
        "test_cli_unknown_experiment",
        "bad input",
        "python -m qbdl.run +experiment=nosuch",
        "unknown experiment name",
        1,
        f"exit code {rc} (Hydra composition error), message lists the available experiments",
    )


def _leak_overrides() -> list[str]:
    return [
        "+eval.ood.leak.datamodule._target_=qbdl.data.DigitsDataModule",
        "+eval.ood.leak.datamodule.image_size=16",
        "+eval.ood.leak.n=60",
        "+eval.ood.leak.seed=0",
        "+eval.ood.leak.split=test",
    ]


def test_ood_set_equal_to_test_set_is_refused(tmp_path):
    from qbdl.pipeline.run import run

    with pytest.raises(ValueError, match="OOD set 'leak'") as info:
        run(tiny_config(tmp_path, _leak_overrides()))
    assert isinstance(info.value.__cause__, DataLeakError)
    assert not (tmp_path / "checkpoints").exists()
    record(
        "test_ood_set_equal_to_test_set_is_refused",
        "bad input",
        "eval.ood.leak = 60 images of the digits test split",
        "OOD set drawn from the test set (leak)",
        60,
        "DataLeakError (ValueError) before any training, naming the OOD set and shared items",
    )


@pytest.mark.skipif(not FULL, reason="same path as the in-process test; set QBDL_RELIABILITY_FULL=1")
def test_cli_ood_leak_exit_code(tmp_path):
    rc, text = _cli([*tiny_overrides(), *_leak_overrides()], tmp_path / "out")
    assert rc == 2, text[-3000:]
    _assert_one_paragraph(text)
    assert "leak" in text and "test set" in text


# ------------------------------------------------------------------------------------------- data layer


def _colorectal(tmp_path: Path, n: int = 3, size: int = 24) -> Path:
    return make_colorectal(tmp_path / "crc", n_per_class=n, size=size) / KATHER_FOLDER


def _crc_dm(root: Path, **kw) -> ColorectalDataModule:
    return ColorectalDataModule(root=root.parent, num_workers=0, image_size=16, batch_size=8, **kw)


def test_empty_class_folder(tmp_path):
    crc = _colorectal(tmp_path)
    for f in (crc / KATHER_CLASSES[3]).iterdir():
        f.unlink()
    with pytest.raises(DataNotFoundError, match="is empty") as e1:
        _crc_dm(crc).setup()
    assert KATHER_CLASSES[3] in str(e1.value)
    inet = make_imagenet(tmp_path / "inet", n_classes=3, n_per_class=2, size=16)
    cls = sorted((inet / "train").iterdir())[1]
    for f in cls.iterdir():
        f.unlink()
    with pytest.raises(DataNotFoundError) as e2:
        ImageNetDataModule(root=inet, num_workers=0, image_size=16).setup()
    assert cls.name in str(e2.value)
    record(
        "test_empty_class_folder",
        "bad input",
        "colorectal folder and ImageNet train/ with one class folder emptied",
        "empty class folder",
        2,
        "DataNotFoundError naming the folder",
    )


def _write_bad_files(folder: Path) -> dict[str, str]:
    """Four kinds of broken files in place of real tiles; returns name -> kind."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    kinds = {}
    corrupt_file(files[0], keep=64)
    kinds[files[0].name] = "truncated after 64 bytes"
    files[1].write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    kinds[files[1].name] = "random bytes"
    files[2].write_bytes(b"")
    kinds[files[2].name] = "empty file"
    return kinds


def test_corrupt_files_are_reported_skips_or_errors(tmp_path):
    crc = _colorectal(tmp_path)
    kinds = _write_bad_files(crc / KATHER_CLASSES[0])
    n_all = 8 * 3
    dm = _crc_dm(crc, on_bad_file="skip")
    dm.setup()
    reported = {Path(p).name for p, _ in dm.bad_files}
    assert reported == set(kinds)
    assert all(reason for _, reason in dm.bad_files)
    kept = sum(len(v) for v in dm.split_indices().values())
    assert kept == n_all - len(kinds)  # nothing else dropped, nothing silently
    for split in ("train", "val", "test"):  # what is kept decodes
        ds = dm.dataset(split)
        for i in range(len(ds)):
            assert torch.isfinite(ds[i][0]).all()
    with pytest.raises(BadImageError) as info:
        _crc_dm(crc, on_bad_file="error").setup()
    # the first split with unreadable files stops setup, naming them
    assert "unreadable image file" in str(info.value)
    assert any(name in str(info.value) for name in kinds)
    # ImageNet reader, verify=True
    inet = make_imagenet(tmp_path / "inet", n_classes=2, n_per_class=4, size=16)
    ikinds = _write_bad_files(sorted((inet / "train").iterdir())[0])
    idm = ImageNetDataModule(
        root=inet, num_workers=0, image_size=16, resize_size=16, verify=True, val_fraction=0.25
    )
    idm.setup()
    assert {Path(p).name for p, _ in idm.bad_files} == set(ikinds)
    record(
        "test_corrupt_files_are_reported_skips_or_errors",
        "bad input",
        f"colorectal ({n_all} tiles) and ImageNet ({2 * 4 + 2 * 4} images) with broken files",
        "truncated / random-bytes / empty image files: " + ", ".join(sorted(set(kinds.values()))),
        len(kinds) + len(ikinds),
        "on_bad_file=skip: each listed in bad_files with a reason, all other images kept; "
        "on_bad_file=error: BadImageError naming them",
    )


def test_gray_rgba_palette_and_odd_sizes_are_converted_not_dropped(tmp_path):
    crc = _colorectal(tmp_path)
    files = sorted((crc / KATHER_CLASSES[1]).iterdir())
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8), "L").save(files[0], format="TIFF")
    Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), "RGBA").save(files[1], format="TIFF")
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB").convert("P").save(
        files[2], format="TIFF"
    )
    dm = _crc_dm(crc, on_bad_file="error")
    dm.setup()
    assert dm.bad_files == []
    assert sum(len(v) for v in dm.split_indices().values()) == 8 * 3
    shapes = set()
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        for i in range(len(ds)):
            x, y = ds[i]
            shapes.add(tuple(x.shape))
            assert torch.isfinite(x).all() and 0 <= y < 8
    assert shapes == {(3, 16, 16)}
    record(
        "test_gray_rgba_palette_and_odd_sizes_are_converted_not_dropped",
        "bad input",
        "colorectal tiles: 1 grayscale, 1 RGBA, 1 palette 53x37 among 24",
        "grayscale / RGBA / palette / wrong-size images where 150x150 RGB is expected",
        3,
        "converted to RGB and resized (all 24 kept, every item [3, 16, 16], finite); documented, not an error",
    )


def test_label_out_of_range(tmp_path):
    from qbdl import metrics

    with pytest.raises(ValueError, match="outside 0..7"):
        check_labels([0, 3, 8], 8, "colorectal")
    with pytest.raises(ValueError, match="outside 0..9"):
        check_labels([-1, 2], 10, "digits")
    p = torch.full((1, 4, 3), 1 / 3)
    with pytest.raises(ValueError, match="out of range"):
        metrics.summarize(p, torch.tensor([0, 1, 2, 3]))
    record(
        "test_label_out_of_range",
        "bad input",
        "label lists checked at datamodule setup; targets given to metrics.summarize",
        "label out of range (C, -1)",
        3,
        "ValueError naming the range and the offending values",
    )


# ------------------------------------------------------------------------------------------- calibration


def test_empty_calibration_set():
    from qbdl import quant
    from qbdl.bayes import dnn_to_bnn
    from qbdl.lit.callbacks import PTQCallback
    from qbdl.models import resnet20

    bnn = dnn_to_bnn(resnet20(10, 1)).eval()
    with pytest.raises(ValueError, match="calibration set is empty"):
        quant.quantize_bnn(
            bnn, [], backend="x86", sampler="fresh", calib_batches=4, mc_samples=1, observer="minmax"
        )
    with pytest.raises(ValueError, match="calib_batches"):
        PTQCallback(
            "unused",
            quantize_dnn=False,
            backend="x86",
            sampler="fresh",
            bank_size=2,
            calib_batches=0,
            mc_samples=1,
            observer="minmax",
            seed=0,
        )
    record(
        "test_empty_calibration_set",
        "bad input",
        "quantize_bnn with no calibration batches; quant.calib_batches=0",
        "empty calibration set",
        2,
        "ValueError 'calibration set is empty' / at callback construction (start-up)",
    )


# ------------------------------------------------------------------------------------------- NaN loss


class Poison(L.Callback):
    """Test fault injection at optimizer step `step`: every weight (target=weights, after the update) or
    the batch's images (target=input, before the forward pass) become `value` (nan or inf)."""

    def __init__(self, step: int, value: float = float("nan"), target: str = "weights") -> None:
        self.step = step
        self.value = value
        self.target = target

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.target == "input" and trainer.global_step == self.step:
            batch[0].fill_(self.value)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.target == "weights" and trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(self.value)


@pytest.mark.parametrize(("value", "target"), [("nan", "weights"), ("inf", "weights"), ("nan", "input")])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, value, target):
    from qbdl.lit.module import NonFiniteLossError
    from qbdl.pipeline.run import run

    step = 2
    overrides = [
        "dnn.max_epochs=0",  # the DNN stage keeps its initial weights; the BNN fit is the one poisoned
        "trainer.limit_train_batches=6",
        "checkpoint.every_n_train_steps=1",
        "+callbacks.poison._target_=test_reliability_inputs.Poison",
        f"+callbacks.poison.step={step}",
        f"+callbacks.poison.value={value}",
        f"+callbacks.poison.target={target}",
    ]
    good_step = step - 1 if target == "weights" else step  # a poisoned update is never checkpointed
    with pytest.raises(NonFiniteLossError, match=f"global step {step}") as info:
        run(tiny_config(tmp_path, overrides))
    assert "last good checkpoint is kept" in str(info.value)
    ckpt = torch.load(tmp_path / "checkpoints" / "bnn" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == good_step
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert not (tmp_path / "results.json").exists()
    record(
        f"test_non_finite_loss_stops_and_keeps_last_good_checkpoint[{value}-{target}]",
        "bad input",
        f"BNN fit (digits, tiny): {'every weight' if target == 'weights' else 'the batch images'} set to "
        f"{value} at step {step}",
        f"{value} training loss ({target})",
        1,
        f"NonFiniteLossError naming global step {step}; last.ckpt = step {good_step}, all weights finite; "
        "no results.json",
    )


def test_truncated_tiff_png_jpeg_in_memory():
    """The PIL decoders the readers use fail loudly (never silently) on truncated bytes of each format."""
    from qbdl.data.sources import image_problem

    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB")
    n = 0
    for fmt in ("TIFF", "PNG", "JPEG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        data = buf.getvalue()
        assert image_problem(lambda d=data: Image.open(io.BytesIO(d))) is None
        for keep in (0, 8, 64, len(data) // 2, len(data) - 10):
            reason = image_problem(lambda d=data[:keep]: Image.open(io.BytesIO(d)))
            assert reason, (fmt, keep)
            n += 1
    record(
        "test_truncated_tiff_png_jpeg_in_memory",
        "bad input",
        "40x40 RGB TIFF, PNG and JPEG cut at 0, 8, 64 bytes, half, all-but-10 bytes",
        "truncated image bytes",
        n,
        "every one detected by the setup verification (image_problem returns a reason)",
    )


def test_imagenet_ptq_with_a_corrupt_jpeg_stops_before_any_download(tmp_path):
    """`+experiment=imagenet_ptq data.root=DIR` as typed (weights to download) with one non-image among the JPEGs:
    the header scan at setup names the file (exit 2, one paragraph) before the weights download is tried."""
    root = make_imagenet(tmp_path / "imagenet", n_classes=3, n_per_class=4)
    bad = sorted((root / "train").rglob("*.JPEG"))[1]
    bad.write_bytes(b"this is not a JPEG")
    rc, text = _cli(
        ["+experiment=imagenet_ptq", f"data.root={root}", "data.on_bad_file=error", "logger=none"],
        tmp_path / "out",
    )
    assert rc == 2, text[-3000:]
    _assert_one_paragraph(text)
    assert str(bad) in text and "unreadable" in text
    assert "download" not in text.lower().replace("re-download", "")  # no weights download was attempted


def test_a_file_that_breaks_after_setup_is_named_in_one_paragraph(tmp_path):
    """verify=false: the loader meets the corrupt file during the fit; the run ends with exit 2 naming it."""
    root = make_imagenet(tmp_path / "imagenet", n_classes=3, n_per_class=4)
    bad = sorted((root / "train").rglob("*.JPEG"))[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rc, text = _cli(
        [*tiny_overrides(), "data=imagenet", "model=resnet20", f"data.root={root}", "data.verify=false",
         "data.image_size=16", "data.resize_size=16", "data.num_workers=1", "data.batch_size=4", "estimate=false",
         "eval.builtin_ood=[]"],
        tmp_path / "out",
    )  # fmt: skip
    assert rc == 2, text[-3000:]
    _assert_one_paragraph(text)
    assert str(bad) in text and "verify=true" in text
