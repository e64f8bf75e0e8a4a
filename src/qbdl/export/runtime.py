"""Run an exported qbdl model in ONNX Runtime or OpenVINO, and preprocess images for it: numpy and Pillow only.

No torch import anywhere here: `python -m qbdl.predict model.onnx` fits a small container (runtime, numpy,
Pillow). The graph uses standard ONNX operators only (QDQ INT8 convolutions, no custom domain, nothing
x86-specific), so the same file runs on ARM CPUs through ONNX Runtime (not tested here: no ARM machine).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .metadata import read_onnx_metadata

RUNTIMES = ("onnxruntime", "openvino")


class RuntimeMissing(ImportError):
    """The requested inference runtime is not installed."""


class ImageError(ValueError):
    """An image that cannot be used: unreadable, or not the size the model expects."""


def _interp(name: str):
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[name]


def preprocess(path: str | os.PathLike, pre: dict) -> np.ndarray:
    """One image file as the model's float32 input [C, H, W] (metadata `preprocessing`); ImageError names why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if pre["source_size"] is not None and [im.height, im.width] != list(pre["source_size"]):
                h, w = pre["source_size"]
                raise ImageError(
                    f"wrong size {im.width}x{im.height} (width x height): the model takes {w}x{h} images"
                )
            im = im.convert(pre["mode"])
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    except Image.DecompressionBombError as exc:  # pragma: no cover - needs a huge file
        raise ImageError(f"refused ({exc})") from exc
    size, interp = pre["image_size"], _interp(pre["interpolation"])
    if pre["resize_mode"] == "square":
        if (im.width, im.height) != (pre["resize"], pre["resize"]):
            im = im.resize((pre["resize"], pre["resize"]), interp)
    else:  # shorter side to `resize`, then centre crop
        r = pre["resize"] / min(im.width, im.height)
        im = im.resize((max(1, round(im.width * r)), max(1, round(im.height * r))), interp)
    if pre["crop"] is not None:
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    a = np.asarray(im, dtype=np.float32) * np.float32(pre["scale"])
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    mean = np.asarray(pre["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((a - mean) / std)


class Model:
    """An exported model in one runtime: `run(x, seed)` -> {"probs", "entropy", "mi", ("logits")} as numpy."""

    def __init__(self, path: str | os.PathLike, runtime: str = "onnxruntime", threads: int = 0,
                 hint: str = "LATENCY") -> None:  # fmt: skip
        self.path = str(path)
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
        if not Path(self.path).is_file():
            raise FileNotFoundError(
                f"model file {self.path!r} does not exist; export one with python -m qbdl.export"
            )
        self.meta = read_onnx_metadata(self.path)
        self.runtime = runtime
        self.inputs: list[str] = []
        if runtime == "onnxruntime":
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise RuntimeMissing(
                    "ONNX Runtime is not installed: pip install onnxruntime (or qbdl[deploy]), or pass "
                    "--runtime openvino"
                ) from exc
            so = ort.SessionOptions()
            if threads:
                so.intra_op_num_threads = int(threads)
                so.inter_op_num_threads = 1
            so.log_severity_level = 3
            self._sess = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self._sess.get_inputs()]
            self.outputs = [o.name for o in self._sess.get_outputs()]
            self.version = ort.__version__
        else:
            try:
                import openvino as ov
            except ImportError as exc:
                raise RuntimeMissing(
                    "OpenVINO is not installed: pip install openvino (or qbdl[deploy]), or pass --runtime onnxruntime"
                ) from exc
            core = ov.Core()
            config = {"PERFORMANCE_HINT": hint}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            model = core.read_model(self.path)
            self._compiled = core.compile_model(model, "CPU", config)
            self._req = self._compiled.create_infer_request()
            self.inputs = [i.get_any_name() for i in self._compiled.inputs]
            wanted = ("probs", "entropy", "mi", "logits")  # a port may carry several tensor names in OpenVINO
            self._ports = {
                next((w for w in wanted if w in o.get_names()), o.get_any_name()): o
                for o in self._compiled.outputs
            }
            self.outputs = list(self._ports)
            self.version = ov.get_version()
        expected = {"qdnn": ["input"], "qbnn": ["input", "seed"] if self.meta["noise"] == "seed" else None}
        want = expected[self.meta["kind"]]
        if want is not None and sorted(self.inputs) != sorted(want):
            raise ValueError(
                f"{self.path}: the graph's inputs {self.inputs} do not match its metadata ({self.meta['kind']}, "
                f"noise {self.meta['noise']!r}: {want}); the file is corrupt or hand-edited. Export it again."
            )

    @property
    def classes(self) -> list[str]:
        """Class names, in output order."""
        return self.meta["classes"]

    def run(
        self, x: np.ndarray, seed: int = 0, noise: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """One session run on a float32 batch [N, C, H, W]: every MC sample of every image."""
        feeds = {"input": np.ascontiguousarray(x, dtype=np.float32)}
        if "seed" in self.inputs:
            if not 0 <= int(seed) < 2**24:  # the in-graph hash keeps two base-4093 digits of it
                raise ValueError(f"seed must be in 0..2**24-1, got {seed}")
            feeds["seed"] = np.array([int(seed)], np.int64)
        for k in self.inputs:
            if k not in feeds:
                if noise is None or k not in noise:
                    raise ValueError(
                        f"{self.path}: the model takes its noise as input {k!r}: pass noise={{{k!r}: ...}}"
                    )
                feeds[k] = np.ascontiguousarray(noise[k], dtype=np.int64 if k == "entries" else np.float32)
        if self.runtime == "onnxruntime":
            vals = self._sess.run(self.outputs, feeds)
        else:
            res = self._req.infer(feeds)
            vals = [np.array(res[self._ports[n]]) for n in self.outputs]
        out = dict(zip(self.outputs, vals))
        c = out["probs"].shape[-1]
        if c != len(self.classes):
            raise ValueError(
                f"{self.path}: the model outputs {c} classes but its metadata names {len(self.classes)}; the file "
                "is corrupt or hand-edited. Export it again."
            )
        return out
