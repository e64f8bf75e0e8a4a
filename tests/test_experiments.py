"""Each experiment end to end on a fabricated copy of its real on-disk format (real Hydra, Trainer, wilds)."""

import json

import pytest
from fabricate import make_camelyon17, make_colorectal, make_fashion_mnist, make_imagenet, make_mnist
from helpers_run import compose_config

from qbdl.pipeline.run import run

RESNET50_TINY = [
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.limit_train_batches=2",
    "dnn.max_epochs=1",
    "bnn.max_epochs=1",
]


# every variant a run with PTQ and temperature scaling produces
VARIANTS = ["dnn", "dnn_ts", "qdnn", "qdnn_ts", "bnn", "bnn_ts", "bnn_mean", "qbnn", "qbnn_ts"]


def _check(out, variants, ood_sets, num_classes):
    res = json.loads((out / "results.json").read_text())
    assert set(res["variants"]) == set(variants)
    for name, v in res["variants"].items():
        assert 0 <= v["accuracy"] <= 1 and v["nll"] > 0, name
        assert set(v["ood"]) == set(ood_sets)
    assert res["data"]["num_classes"] == num_classes
    assert (out / "report.html").exists() and (out / "predictions.npz").exists()
    return res


def _check_digits(out):
    """_check for a digits experiment: every variant, its two built-in OOD sets, ten classes."""
    return _check(out, VARIANTS, ["photos", "rotated"], 10)


RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


@pytest.fixture
def weights_download(monkeypatch):
    """The one call replaced: torchvision's download of pretrained weights (records the URLs asked for)."""
    import torchvision
    import torchvision.models._api as api

    calls = []

    def fake(url, *args, **kwargs):
        calls.append(url)
        return torchvision.models.resnet50().state_dict()  # real keys and shapes, random values

    monkeypatch.setattr(api, "load_state_dict_from_url", fake)
    return calls


def test_imagenet_ptq(tmp_path, weights_download):
    root = make_imagenet(tmp_path / "imagenet", n_classes=3, n_per_class=6, n_val_per_class=3)
    cfg = compose_config(
        tmp_path / "run",
        [
            "+experiment=imagenet_ptq",
            f"data.root={root}",
            "data.resize_size=36",
            "data.val_fraction=0.2",
            *RESNET50_TINY,
            # its ImageNet-C list, shortened: 15 x 5 sets of a ResNet-50 do not fit a test
            "shift.corruptions=[gaussian_noise]",
            "shift.severities=[2]",
        ],
    )
    assert cfg.bnn.optimizer.lr == 1e-4 and cfg.bnn.optimizer.momentum == 0.9
    assert cfg.bnn.max_epochs == 1 and cfg.model._target_.endswith("resnet50")
    assert cfg.model.weights == "IMAGENET1K_V1"  # as the experiment file says
    run(cfg)
    assert weights_download == [RESNET50_URL]
    res = _check(
        tmp_path / "run",
        VARIANTS,
        [],
        3,
    )
    assert res["variants"]["qbnn"]["size_bytes"] < 0.27 * res["variants"]["bnn"]["size_bytes"]
    assert 0 <= res["shift"]["cells"]["qbnn"]["gaussian_noise"]["2"]["accuracy"] <= 1


def test_imagenet_ptq_smoke(tmp_path, weights_download):
    """The capped laptop recipe as shipped: its caps, fine-tune and cheap corruption list, on a fabricated layout."""
    root = make_imagenet(tmp_path / "imagenet", n_classes=3, n_per_class=12, n_val_per_class=4)
    full = compose_config(tmp_path, ["+experiment=imagenet_ptq_smoke"], tiny=False)
    assert (full.data.max_train, full.data.max_val, full.data.max_test) == (512, 100, 300)
    assert full.dnn.max_epochs == 0 and full.bnn.max_epochs == 1 and full.eval.mc_samples == 4
    assert full.bnn.optimizer.lr == 1e-4 and full.model.weights == "IMAGENET1K_V1"
    from qbdl.data.corruptions import CORRUPTIONS

    assert full.shift.corruptions and not any(CORRUPTIONS[c].slow for c in full.shift.corruptions)
    # the recipe itself, only the image size shrunk (224 -> 32) and the train caps cut to the fabricated 36
    cfg = compose_config(
        tmp_path / "run",
        [
            "+experiment=imagenet_ptq_smoke",
            f"data.root={root}",
            "data.image_size=32",
            "data.resize_size=36",
            "data.val_fraction=0.2",
            "data.num_workers=0",
            "data.max_test=6",  # of the 12 fabricated val/ images: the cap bites
            "shift.max_items=4",
        ],
        tiny=False,
    )
    run(cfg)
    assert weights_download == [RESNET50_URL]
    res = _check(tmp_path / "run", VARIANTS, [], 3)
    assert res["variants"]["qbnn"]["n_test"] == 6 and res["variants"]["qbnn"]["samples"] == 4
    assert set(res["shift"]["cells"]["qbnn"]) == {"gaussian_noise", "contrast"}
    assert res["estimate"]["seconds"]["total"] > 0  # the run's own estimate, as the docs quote it


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V1", "DEFAULT"])
def test_weights_names_resolve_against_the_architecture(name, weights_download):
    from qbdl.models import resnet50

    resnet50(num_classes=3, weights=name)
    assert weights_download == [RESNET50_URL if name != "DEFAULT" else weights_download[0]]
    assert weights_download[0].startswith("https://download.pytorch.org/models/resnet50-")


def test_unknown_weights_name_lists_the_valid_ones():
    from qbdl.models import resnet18

    with pytest.raises(ValueError, match=r"'IMAGENET1K_V1', 'DEFAULT'.*model.weights_path"):
        resnet18(weights="IMAGENET1K_V2")


_OFFLINE = """
import sys
from urllib.error import URLError
import torchvision.models._api as api

def offline(url, *args, **kwargs):  # the one call replaced: what urllib raises with no network
    raise URLError("[Errno -3] Temporary failure in name resolution")

api.load_state_dict_from_url = offline
from qbdl.run import main
sys.argv = ["qbdl.run", *sys.argv[1:]]
main()
"""


def test_offline_imagenet_ptq_names_the_file_and_weights_path(tmp_path):
    import subprocess
    import sys

    root = make_imagenet(tmp_path / "imagenet", n_classes=2, n_per_class=2, n_val_per_class=1)
    args = ["+experiment=imagenet_ptq", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE, *args], capture_output=True, text=True, timeout=300
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "resnet50-0676ba61.pth" in text and RESNET50_URL in text and "model.weights_path" in text
    assert "Traceback" not in text


def test_colorectal_ptq_with_camelyon17_ood(tmp_path, weights_download):
    root = make_colorectal(tmp_path / "colorectal", n_per_class=10, size=48, as_zip=True)
    wilds_root = make_camelyon17(tmp_path / "wilds", n_per_split=8, size=96)
    cfg = compose_config(
        tmp_path / "run",
        [
            "+experiment=colorectal_ptq",
            f"data.root={root}",
            f"eval.ood.camelyon17.datamodule.root={wilds_root}",
            "eval.ood.camelyon17.n=8",
            *RESNET50_TINY,
            "shift.corruptions=[stain]",  # of its histology list: the H&E stain shift
            "shift.severities=[3]",
        ],
    )
    run(cfg)
    assert weights_download == [RESNET50_URL]  # ImageNet-pretrained, as the experiment file says
    res = _check(
        tmp_path / "run",
        VARIANTS,
        ["camelyon17"],
        8,
    )
    assert res["config"]["eval"]["target_accuracy"] == 0.995
    assert res["variants"]["bnn"]["ood_auroc"] == res["variants"]["bnn"]["ood"]["camelyon17"]["auroc"]
    assert res["variants"]["bnn"]["ood"]["camelyon17"]["group"] == "near"
    assert set(res["shift"]["cells"]["qbnn"]["stain"]) == {"3"}


def test_mnist_ptq_with_fashion_mnist_ood(tmp_path):
    make_mnist(tmp_path / "data", n_train=120, n_test=40)
    make_fashion_mnist(tmp_path / "data", n_train=40, n_test=40)
    cfg = compose_config(
        tmp_path / "run",
        [
            "+experiment=mnist_ptq",
            f"data.root={tmp_path / 'data'}",
            f"eval.ood.fashion_mnist.datamodule.root={tmp_path / 'data'}",
            "eval.ood.fashion_mnist.n=40",
            "data.num_workers=0",
            "eval.ood.fashion_mnist.datamodule.num_workers=0",
            "shift.severities=[1]",  # its MNIST-C list (on the fly), one severity
        ],
    )
    run(cfg)
    res = _check(
        tmp_path / "run",
        VARIANTS,
        ["fashion_mnist"],
        10,
    )
    assert set(res["shift"]["cells"]["qbnn"]) == set(cfg.shift.corruptions)


def test_digits_ptq_is_the_default(tmp_path):
    a = compose_config(tmp_path, ["+experiment=digits_ptq"], tiny=False)
    b = compose_config(tmp_path, [], tiny=False)
    from omegaconf import OmegaConf

    strip = lambda c: {k: v for k, v in OmegaConf.to_container(c).items() if k != "hydra"}  # noqa: E731
    assert strip(a) == strip(b)


@pytest.mark.parametrize("name", ["imagenet_ptq", "colorectal_ptq"])
def test_missing_data_root_names_layout_and_source(tmp_path, name):
    import subprocess
    import sys
    import time

    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qbdl.run",
            f"+experiment={name}",
            "data.root=/no/such/dir",
            "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and time.time() - t0 < 60
    assert "/no/such/dir" in text and "Expected layout" in text and "How to get it" in text
    assert "Traceback" not in text


def test_digits32_runs_at_its_own_size(tmp_path):
    from helpers_run import TINY

    cfg = compose_config(
        tmp_path / "run",
        [*[o for o in TINY if not o.startswith("data.image_size")], "+experiment=digits32"],
        tiny=False,
    )
    assert cfg.data.image_size == 32
    run(cfg)
    _check_digits(tmp_path / "run")


def test_every_experiment_file_has_a_test():
    from pathlib import Path

    from qbdl.run import CONF_DIR

    names = {p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")}
    here = Path(__file__).parent
    text = "".join((here / f).read_text() for f in ("test_experiments.py", "test_sweeps.py"))
    # test_baselines_experiment runs digits_baselines (which includes `baselines`) and composes the other
    # *_baselines files by name in a loop
    baselines = (here / "test_baselines_experiment.py").read_text()
    text += "experiment=baselines" if "+experiment=digits_baselines" in baselines else ""
    missing = sorted(
        n
        for n in names
        if f"experiment={n}" not in text and not (n.endswith("_baselines") and f'"{n}"' in baselines)
    )  # test_sweeps: {_plus(...)}experiment=
    assert names and not missing, missing


def test_digits_shift_is_the_default_plus_the_digits_shift_list(tmp_path):
    from omegaconf import OmegaConf

    from qbdl.data import DigitsDataModule
    from qbdl.data.corruptions import DEFAULT_LISTS
    from qbdl.data.shift import validate_shift

    a = compose_config(tmp_path, ["+experiment=digits_shift", "seed=3"], tiny=False)
    b = compose_config(tmp_path, ["seed=3"], tiny=False)
    assert list(a.shift.corruptions) == list(DEFAULT_LISTS["digits"])
    assert list(a.shift.severities) == [1, 3, 5]
    assert a.shift.seed == 3 and list(b.shift.corruptions) == []  # the default: no shift evaluation
    validate_shift(a.shift, DigitsDataModule())
    strip = lambda c: {k: v for k, v in OmegaConf.to_container(c).items() if k not in ("hydra", "shift")}  # noqa: E731
    assert strip(a) == strip(b)
    for name, listed in (
        ("mnist_ptq", "mnist_c"),
        ("colorectal_ptq", "histology"),
    ):
        cfg = compose_config(tmp_path, [f"+experiment={name}"], tiny=False)
        assert list(cfg.shift.corruptions) == list(DEFAULT_LISTS[listed]), name
    # imagenet_ptq: ImageNet-C without its slow corruptions (glass_blur, zoom_blur: opt-in, shift=imagenet_c)
    from qbdl.data.corruptions import CORRUPTIONS

    cfg = compose_config(tmp_path, ["+experiment=imagenet_ptq"], tiny=False)
    fast = [c for c in DEFAULT_LISTS["imagenet_c"] if not CORRUPTIONS[c].slow]
    assert list(cfg.shift.corruptions) == fast and len(fast) == 13
    full = compose_config(tmp_path, ["+experiment=imagenet_ptq", "shift=imagenet_c"], tiny=False)
    assert list(full.shift.corruptions) == list(DEFAULT_LISTS["imagenet_c"])


@pytest.mark.slow  # 12 shifted sets x 6 variants after a whole run: ~3 minutes on 2 cores
def test_digits_shift_runs(tmp_path):
    from helpers_run import TINY

    # its own corruption list and severities; each set cut to 128 of the 503 test digits
    cfg = compose_config(
        tmp_path / "run", [*TINY, "+experiment=digits_shift", "shift.max_items=128"], tiny=False
    )
    run(cfg)
    res = _check_digits(tmp_path / "run")
    shift = res["shift"]["cells"]
    assert set(shift["qbnn"]) == set(cfg.shift.corruptions) and set(shift["qbnn"]["rotate"]) == {
        "1",
        "3",
        "5",
    }
    assert res["shift"]["mce"]["dnn"]["mCE"] == pytest.approx(1.0)  # the baseline's own mCE
    assert (tmp_path / "run" / "plots" / "shift_accuracy.png").exists()


@pytest.mark.slow  # every variant on 1,472 test images: ~1 minute on 2 cores
def test_digits_hard_is_the_small_data_fidelity_task(tmp_path):
    full = compose_config(tmp_path, ["+experiment=digits_hard"], tiny=False)
    assert (full.data.train_fraction, full.data.test_fraction) == (0.06, 0.82)
    assert (full.dnn.max_epochs, full.bnn.max_epochs, full.eval.mc_samples) == (15, 5, 16)
    # the same task, trained briefly: a run directory that qbdl.fidelity and the calibration study read
    cfg = compose_config(tmp_path / "run", ["+experiment=digits_hard"])  # with helpers_run.TINY
    run(cfg)
    res = _check_digits(tmp_path / "run")
    assert res["data"]["n_train"] == 109  # 6% of 1,797, stratified
