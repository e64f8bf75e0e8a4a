"""Export a run's INT8 models (or one .qbdl file) to ONNX with metadata and a referral threshold fitted on val."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from qbdl.atomic import atomic_write_bytes

from . import metadata as md
from .graph import ExportError, build_onnx, noise_layout

log = logging.getLogger(__name__)

# what a run config may instantiate here: qbdl's own datamodules and models only (results.json is a file)
_TARGET_PREFIXES = ("qbdl.data.", "qbdl.models.")


def qbdl_version() -> str:
    """The installed qbdl version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qbdl")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without install
        return "0+unknown"


@dataclass
class Exported:
    """One exported model: where, its metadata, and the seconds the export took."""

    path: Path
    meta: dict
    seconds: float


def _onnx_bytes(model: fx.GraphModule, meta: dict, samples: int, perturbations: int, noise: str,
                in_shape: Sequence[int] | None, exact: bool = True) -> bytes:  # fmt: skip
    proto, _ = build_onnx(model, samples=samples, perturbations=perturbations, noise=noise, in_shape=in_shape,
                          exact=exact)  # fmt: skip
    entry = proto.metadata_props.add()
    entry.key, entry.value = md.KEY, md.dumps(meta)
    proto.doc_string = f"qbdl {meta['kind']} exported by qbdl {meta['qbdl_version']}"
    return proto.SerializeToString()


def _kind(model: fx.GraphModule) -> str:
    layout = noise_layout(model)
    return "qbnn" if layout.layers or layout.bank else "qdnn"


def preprocessing_of(dm: Any) -> dict:
    """The image preprocessing of a qbdl datamodule's test split, as the exported metadata states it."""
    spec = dm.spec
    name = type(dm).__name__
    base = {"mode": "L" if spec.in_chans == 1 else "RGB", "source_size": None, "interpolation": "bilinear",
            "scale": 1.0 / 255.0, "mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std],
            "image_size": int(spec.image_size), "crop": None, "resize": int(spec.image_size),
            "resize_mode": "square"}  # fmt: skip
    if name == "DigitsDataModule":  # 8x8 digits: PNG pixel = digit value * 255 / 16, upsampled bilinearly
        base["source_size"] = [8, 8]
    elif hasattr(dm, "resize_size"):  # ImageNet-style: shorter side to resize_size, centre crop
        base.update(resize=int(dm.resize_size), resize_mode="shorter", crop=int(spec.image_size))
    return base


def _threshold(data: bytes, x: torch.Tensor, y: torch.Tensor, score: str, target: float, seed: int) -> dict:
    """The referral threshold of the exported model itself, on the validation images (ONNX Runtime)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    scores, correct = [], []
    for i in range(0, len(x), 64):
        feeds = {"input": x[i : i + 64].numpy().astype(np.float32)}
        if "seed" in names:
            feeds["seed"] = np.array([seed + i], np.int64)
        probs, ent, mi = sess.run(["probs", "entropy", "mi"], feeds)
        s = {"entropy": ent, "mi": mi, "maxprob": 1.0 - probs.max(1)}[score]
        scores += [float(v) for v in s]
        correct += list(probs.argmax(1) == y[i : i + 64].numpy())
    t, kept, referred = md.fit_threshold(scores, correct, target)
    return {"threshold": t, "val_accuracy_kept": kept, "val_referred": referred}


def export_model(model: fx.GraphModule, out: str | Path, *, classes: Sequence[str], preprocessing: Mapping,
                 samples: int = 8, perturbations: int = 1, noise: str = "seed", source_file: str = "model.qbdl",
                 val: tuple[torch.Tensor, torch.Tensor] | None = None, score: str = "entropy",
                 target_accuracy: float = 0.995, seed: int = 0, exact: bool | None = None) -> Exported:  # fmt: skip
    """Write `model` (a loaded qbdl INT8 model) as ONNX to `out` (atomically), with validated metadata.

    With `val` (normalised images, labels) the referral threshold at `target_accuracy` is fitted on the exported
    model's own predictions of them; without, it is null (predict then refers nothing and says so). exact=False:
    the faster QBNN graph that rounds where qbdl does not (graph.build_onnx); None: exact for Flipout, not for a
    bank (whose QLinearConv form is the deterministic network's).
    """
    import time

    t0 = time.perf_counter()
    kind, bank = _kind(model), noise_layout(model).bank_size
    exact = not bank if exact is None else exact
    if kind == "qdnn":
        samples, perturbations, noise = 1, 0, "none"
    elif bank:  # S <= K: more samples would repeat networks (image n's samples are entries (o_n + s) mod K)
        if samples > bank:
            log.info("a bank of %d networks: %d MC samples per image instead of %d", bank, bank, samples)
        samples, perturbations = min(samples, bank), bank
    qm = getattr(model, "qbdl_meta", {}) or {}
    fp = qm.get("fingerprint")
    meta = {
        "format": md.FORMAT,
        "kind": kind,
        "qbdl_version": qbdl_version(),
        "classes": [str(c) for c in classes],
        "preprocessing": dict(preprocessing),
        "mc_samples": int(samples),
        "perturbations": int(perturbations),
        "noise": noise,
        **({"sampling": "bank" if bank else "flipout"} if kind == "qbnn" else {}),
        "referral": {
            "score": score,
            "threshold": None,
            "target_accuracy": float(target_accuracy),
            "fitted_on": None,
        },  # fmt: skip
        "source": {"fingerprint": fp if isinstance(fp, str) else None, "file": Path(source_file).name},
        "activation_qmax": int(qm.get("activation_qmax", 255)),
        "outputs": ["probs", "entropy", "mi", "logits"],
    }
    pre = meta["preprocessing"]
    in_shape = (1 if pre["mode"] == "L" else 3, pre["image_size"], pre["image_size"])
    graph_noise = "seed" if noise == "none" else noise
    data = _onnx_bytes(model, meta, samples, max(perturbations, 1), graph_noise, in_shape, exact)
    if val is not None and noise != "input":
        meta["referral"].update(
            _threshold(data, val[0], val[1], score, target_accuracy, seed), fitted_on="val"
        )
        data = _onnx_bytes(model, meta, samples, max(perturbations, 1), graph_noise, in_shape, exact)
    path = atomic_write_bytes(out, data)
    return Exported(path, meta, time.perf_counter() - t0)


# -- a run directory


def _safe_instantiate(cfg: Mapping, **kwargs: Any) -> Any:
    from hydra.utils import instantiate

    target = str(cfg.get("_target_", ""))
    if not target.startswith(_TARGET_PREFIXES):
        raise ExportError(
            f"the run's config names {target!r} to build; the export builds only qbdl's own datamodules and models "
            f"({_TARGET_PREFIXES}): is results.json from a qbdl run?"
        )
    return instantiate(dict(cfg), **kwargs)


def run_config(run_dir: Path) -> dict:
    """The config of a finished qbdl run (its results.json); refuses anything else."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no results.json: give a finished qbdl run directory (python -m qbdl.run writes one) "
            "or a .qbdl file inside one (RUN_DIR/models/qbnn.qbdl)"
        )
    cfg = json.loads(path.read_text()).get("config")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("data", "model", "bayes")):
        raise ExportError(
            f"{path} holds no run config (data, model, bayes); re-run the experiment with qbdl.run"
        )
    return cfg


def datamodule(cfg: dict) -> Any:
    """The run's datamodule (qbdl's own only), set up for fit."""
    dm = _safe_instantiate(cfg["data"])
    dm.setup("fit")
    return dm


def val_tensors(dm: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split's (normalised images, labels), the first `limit` of them."""
    xs, ys = [], []
    for x, y in dm.val_dataloader():
        xs.append(x)
        ys.append(y)
        if limit is not None and sum(len(t) for t in xs) >= limit:
            break
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit]


SAMPLERS = ("bank", "flipout")  # the QBNN samplers the ONNX graph expresses


def requantized_qbnn(run_dir: Path, cfg: dict, dm: Any, sampler: str, bank_size: int) -> fx.GraphModule:
    """The run's BNN quantized with `sampler` and `bank_size` (its other PTQ options kept; calibration on training
    data): a bank of K samples, or Flipout over K perturbations."""
    from qbdl.bayes import dnn_to_bnn
    from qbdl.experiment.quantize import PTQ_OPTIONS, calibration_batches
    from qbdl.models.files import load_state
    from qbdl.quant import quantize_bnn

    qcfg = dict(cfg.get("quant") or {})
    dnn = _safe_instantiate(cfg["model"], num_classes=dm.num_classes, in_chans=dm.spec.in_chans)
    bnn = dnn_to_bnn(dnn, **cfg["bayes"])
    load_state(bnn, run_dir / "bnn.safetensors")
    bnn.eval()
    calib = calibration_batches(dm, qcfg.get("calib_batch_size"), qcfg.get("calib_batches", 8))
    options = {k: qcfg[k] for k in PTQ_OPTIONS if k in qcfg}
    options.update(sampler=sampler, bank_size=int(bank_size), seed=int(qcfg.get("seed", cfg.get("seed", 0))))
    return quantize_bnn(bnn, calib, **options)


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, *, samples: int | None = None,
               perturbations: int = 1, noise: str = "seed", which: Sequence[str] = ("qbnn", "qdnn"),
               val_limit: int | None = None, exact: bool | None = None, sampler: str = "flipout",
               bank_size: int = 4) -> dict[str, Exported]:  # fmt: skip
    """Export a finished run's qbnn (as INT8 Flipout, or a bank of `bank_size` networks) and qdnn to `out_dir`
    (default RUN_DIR/export).

    A qbnn quantized otherwise (another sampler; for 'bank' another bank size) is quantized again from
    RUN_DIR/bnn.safetensors (same PTQ options and calibration batches) and saved beside the export as
    qbnn_<sampler>.qbdl. Flipout keeps a bank of max(bank_size, perturbations) perturbations. exact: qbdl's
    arithmetic in the sampled layers (build_onnx); None: exact for Flipout, the QLinearConv form for a bank.
    """
    if sampler not in SAMPLERS:
        raise ExportError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    k = int(bank_size) if sampler == "bank" else max(int(bank_size), int(perturbations))
    from qbdl.quant import load_qbnn, save_qbnn

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    dm = datamodule(cfg)
    ev = cfg.get("eval") or {}
    samples = int(samples if samples is not None else ev.get("mc_samples", 8))
    common = {
        "classes": list(getattr(dm, "class_names", None) or [str(i) for i in range(dm.num_classes)]),
        "preprocessing": preprocessing_of(dm),
        "val": val_tensors(dm, val_limit),
        "score": ev.get("score", "entropy"),
        "target_accuracy": float(ev.get("target_accuracy", 0.995)),
        "seed": int(ev.get("seed", 0)),
    }
    done = {}
    for name in which:
        src = run_dir / "models" / f"{name}.qbdl"
        if name == "qdnn":
            if not src.is_file():
                log.warning("%s: no qdnn (quant.quantize_dnn was off); exporting the qbnn only", run_dir)
                continue
            model = load_qbnn(str(src))
        else:
            model = load_qbnn(str(src)) if src.is_file() else None
            meta = {} if model is None else (model.qbdl_meta or {})
            if meta.get("sampler") != sampler or (sampler == "bank" and noise_layout(model).bank_size != k):
                log.info("%s: quantizing the BNN again with sampler %r (K = %d) for the export", run_dir, sampler, k)
                fp = meta.get("fingerprint")
                model = requantized_qbnn(run_dir, cfg, dm, sampler, k)
                model.qbdl_meta = {**model.qbdl_meta, **({"fingerprint": fp} if fp else {})}
                src = out_dir / f"qbnn_{sampler}.qbdl"
                out_dir.mkdir(parents=True, exist_ok=True)
                save_qbnn(model, str(src))  # atomic itself
        done[name] = export_model(model, out_dir / f"{name}.onnx", samples=samples, perturbations=perturbations,
                                  noise=noise, source_file=src.name, exact=exact, **common)  # fmt: skip
    return done


def export_file(qbdl_path: str | Path, out: str | Path | None = None, **kwargs: Any) -> Exported:
    """Export one .qbdl file that sits in a run directory (RUN_DIR/models/NAME.qbdl or RUN_DIR/export/...)."""
    from qbdl.quant import load_qbnn

    qbdl_path = Path(qbdl_path)
    run_dir = qbdl_path.resolve().parent.parent
    cfg = run_config(run_dir)
    dm = datamodule(cfg)
    ev = cfg.get("eval") or {}
    model = load_qbnn(str(qbdl_path))
    samples = kwargs.pop("samples", None) or int(ev.get("mc_samples", 8))
    out = Path(out) if out is not None else qbdl_path.with_suffix(".onnx")
    return export_model(
        model, out, classes=list(getattr(dm, "class_names", None) or [str(i) for i in range(dm.num_classes)]),
        preprocessing=preprocessing_of(dm), val=val_tensors(dm, kwargs.pop("val_limit", None)), samples=samples,
        score=ev.get("score", "entropy"), target_accuracy=float(ev.get("target_accuracy", 0.995)),
        seed=int(ev.get("seed", 0)), source_file=qbdl_path.name, **kwargs,
    )  # fmt: skip
