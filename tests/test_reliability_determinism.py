"""Same seed, same metrics; and test data is never read during fit, model selection or calibration."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from reliability_log import record, tiny_config
from torch.utils.data import Dataset

import qbdl.data.leak as data_leak
import qbdl.data.splits as data_splits
from qbdl.bayes import dnn_to_bnn
from qbdl.data import DigitsDataModule
from qbdl.data.errors import DataLeakError
from qbdl.lit import callbacks as cb_mod
from qbdl.models import resnet20

TIMING_KEYS = {"images_per_s", "forward_images_per_s", "eval_seconds"}
PTQ = True  # these runs include PTQ: calibration is where test data could leak in, qbnn/qdnn must be reproducible
PHASE = ["setup"]  # what the pipeline is doing, as seen by the recorder


class RecordingDataset(Dataset):
    """Wraps the datamodule's underlying data: logs (phase, index) of every item read."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.reads: list[tuple[str, int]] = []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.reads.append((PHASE[0], int(i)))
        return self.base[i]


def _install_recorder(mp: pytest.MonkeyPatch) -> list[DigitsDataModule]:
    made: list[DigitsDataModule] = []
    orig_setup = DigitsDataModule._setup

    def setup(self) -> None:
        orig_setup(self)
        base = self._datasets["test"].base
        rec = RecordingDataset(base)
        for ds in [*self._datasets.values(), self._calib]:
            if ds.base is base:
                ds.base = rec
        self.recorder = rec
        made.append(self)

    def phase(name: str, fn):
        def wrapped(*a, **k):
            old, PHASE[0] = PHASE[0], name
            try:
                return fn(*a, **k)
            finally:
                PHASE[0] = old

        return wrapped

    mp.setattr(DigitsDataModule, "_setup", setup)
    mp.setattr(data_leak, "check_no_leak", phase("leak_check", data_leak.check_no_leak))
    mp.setattr(
        cb_mod.EvaluationCallback, "on_fit_end", phase("evaluation", cb_mod.EvaluationCallback.on_fit_end)
    )
    mp.setattr(cb_mod.PTQCallback, "on_fit_end", phase("calibration", cb_mod.PTQCallback.on_fit_end))
    import lightning as L

    mp.setattr(L.Trainer, "fit", phase("fit", L.Trainer.fit))
    return made


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """One tiny run with every read of the underlying digits data recorded by phase."""
    from qbdl.pipeline.run import run

    with pytest.MonkeyPatch.context() as mp:
        made = _install_recorder(mp)
        out = tmp_path_factory.mktemp("recorded")
        results = run(tiny_config(out, ["seed=7"], ptq=PTQ))
    return results, made


def _strip(variants: dict) -> dict:
    return {v: {k: x for k, x in r.items() if k not in TIMING_KEYS} for v, r in variants.items()}


def test_same_seed_gives_identical_metrics(recorded_run, tmp_path):
    """Two runs with seed 7 (the first with the read recorder in place): results.json variants equal exactly."""
    from qbdl.pipeline.run import run

    first, _ = recorded_run
    second = run(tiny_config(tmp_path, ["seed=7"], ptq=PTQ))
    a, b = _strip(first["variants"]), _strip(second["variants"])
    assert set(a) == set(b) and a
    diff = [(v, k) for v in a for k in a[v] if a[v][k] != b[v][k]]
    n_values = sum(len(r) for r in a.values())
    record(
        "test_same_seed_gives_identical_metrics",
        "determinism",
        f"2 tiny digits runs, seed 7, variants {sorted(a)} (PTQ {'on' if PTQ else 'off'})",
        "rerun with the same seed",
        2,
        f"{n_values - len(diff)}/{n_values} metric values identical (timing keys excluded)",
    )
    assert not diff, diff


def test_fit_selection_and_calibration_never_read_test_data(recorded_run):
    _, made = recorded_run
    dm = made[0]
    test_idx = set(dm.split_indices()["test"])
    train_idx = set(dm.split_indices()["train"])
    reads = dm.recorder.reads
    by_phase = Counter(p for p, _ in reads)
    test_reads = Counter(p for p, i in reads if i in test_idx)
    # non-vacuous: training read training items, evaluation read every test item
    assert by_phase["fit"] > 0
    assert {i for p, i in reads if p == "evaluation"} >= test_idx
    bad = {p: n for p, n in test_reads.items() if p not in ("evaluation", "leak_check")}
    calib = {i for p, i in reads if p == "calibration"}
    if PTQ:
        assert calib and calib <= train_idx
    record(
        "test_fit_selection_and_calibration_never_read_test_data",
        "test-data isolation",
        f"tiny digits run, every read of the underlying data recorded ({len(reads)} reads: {dict(by_phase)})",
        "test items read outside evaluation / the OOD leak check",
        len(reads),
        "none" if not bad else f"{bad}",
    )
    assert not bad, bad


def test_ptq_callback_calibrates_on_training_items_only(monkeypatch, tmp_path):
    """The PTQ callback's calibration loader yields training items only (quantization itself stubbed)."""
    made = _install_recorder(monkeypatch)
    dm = DigitsDataModule(batch_size=32, image_size=16)
    dm.setup("fit")
    seen_batches = []

    def fake_quantize(model, calib, **kw):
        for k, (_x, y) in enumerate(calib):
            seen_batches.append(len(y))
            if k + 1 >= 4:
                break
        return model

    monkeypatch.setattr(cb_mod.quant, "quantize_bnn", fake_quantize)
    monkeypatch.setattr(cb_mod.quant, "save_qbnn", lambda model, path: Path(path).write_bytes(b""))
    ptq = cb_mod.PTQCallback(
        str(tmp_path),
        quantize_dnn=False,
        backend="x86",
        sampler="fresh",
        bank_size=2,
        calib_batches=4,
        mc_samples=1,
        observer="minmax",
        seed=0,
    )
    trainer = SimpleNamespace(is_global_zero=True, datamodule=dm)
    ptq.on_fit_end(trainer, SimpleNamespace(model=dnn_to_bnn(resnet20(10, 1))))
    split = dm.split_indices()
    calib = [i for p, i in made[0].recorder.reads if p == "calibration"]
    assert len(calib) == sum(seen_batches) > 0
    assert set(calib) <= set(split["train"])
    assert not set(calib) & set(split["test"])
    record(
        "test_ptq_callback_calibrates_on_training_items_only",
        "test-data isolation",
        f"PTQCallback.on_fit_end on digits, {len(seen_batches)} calibration batches",
        "calibration items outside the training split",
        len(calib),
        "all calibration items are training items",
    )


def test_split_bug_is_caught_in_code():
    """The datamodule itself refuses a calibration or validation set that shares items with the test split."""
    dm = DigitsDataModule(image_size=16)
    dm.setup("fit")
    caught = 0
    for attr in ("calib", "val"):
        broken = copy.copy(dm)
        test = dm._datasets["test"]
        leaky = data_splits.TransformSubset(test.base, [*test.indices[:3], *dm._split_idx["train"][:10]])
        if attr == "calib":
            broken._calib = leaky
            call = broken.calib_dataloader
        else:
            broken._datasets = {**dm._datasets, "val": leaky}
            call = broken.val_dataloader
        with pytest.raises(DataLeakError, match="test item"):
            call()
        caught += 1
    record(
        "test_split_bug_is_caught_in_code",
        "test-data isolation",
        "DigitsDataModule with a calibration / validation set that includes 3 test items",
        "simulated split bug",
        caught,
        "DataLeakError from calib_dataloader() and val_dataloader()",
    )
