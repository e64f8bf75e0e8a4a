"""python -m qbdl.predict MODEL INPUT: class, probability, entropy, MI and a referral decision per image.

MODEL is an `.onnx` file from `python -m qbdl.export` (run by ONNX Runtime or OpenVINO; no torch is imported:
the runtime, numpy and Pillow suffice) or a `.qbdl` file inside a run directory (run by qbdl's own engine, which
needs torch). INPUT is a folder of images (searched recursively) or a text file listing image paths, one a line
(relative paths are relative to the list's folder); or, with `--split train|val|test` instead of INPUT, a split of
the source run's configured datamodule (the run directory's results.json: the run the model sits in, or `--run`;
`--data KEY=VALUE` overrides its data config as `data.KEY=VALUE` would the run; needs torch and the data),
whose rows also give the label and whose summary the accuracy. Each image's row: file, class, class_index, prob (its
predictive probability), entropy, mi and refer (its uncertainty score above the model's referral threshold,
fitted at the run's target accuracy on the validation split). Unreadable or wrongly sized images are skipped and
named, in the summary and in the output (`skipped` of the JSON, `<out>.skipped.csv` beside a CSV).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from qbdl.atomic import atomic_write_text
from qbdl.export.metadata import MetadataError
from qbdl.export.runtime import RUNTIMES, ImageError, Model, RuntimeMissing, preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")
COLUMNS = ("file", "class", "class_index", "prob", "entropy", "mi", "refer")


def list_images(src: Path) -> list[Path]:
    """The images of a folder (recursive, sorted, by suffix) or of a list file (one path a line)."""
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if src.is_file():
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8", errors="replace").splitlines()]
        return [
            p if p.is_absolute() else src.parent / p
            for p in (Path(ln) for ln in lines if ln and ln[0] != "#")
        ]
    raise FileNotFoundError(
        f"input {str(src)!r} does not exist: give a folder of images or a text file of image paths"
    )


SPLITS = ("val", "test")


class Split:
    """A split of a run's configured datamodule as predict's input: normalised images, labels, row names."""

    def __init__(self, run_dir: Path, split: str, overrides: list[str] = ()) -> None:
        from omegaconf import OmegaConf

        from qbdl.export.core import datamodule, run_config

        if split not in SPLITS:
            raise ValueError(
                f"--split must be one of {SPLITS} (train is shuffled and augmented), got {split!r}"
            )
        cfg = run_config(run_dir)
        try:
            extra = OmegaConf.from_dotlist([o.removeprefix("data.") for o in overrides])
        except Exception as exc:  # omegaconf's grammar errors have no common public base
            raise ValueError(f"--data: {exc}") from exc
        if "_target_" in extra:
            raise ValueError("--data may not replace the datamodule's _target_")
        data = OmegaConf.merge(OmegaConf.create(cfg["data"]), extra)
        cfg["data"] = OmegaConf.to_container(data, resolve=True)
        dm = datamodule(cfg)
        if split == "test":
            dm.setup("test")
        xs, ys = [], []
        for x, y in getattr(dm, f"{split}_dataloader")():
            xs.append(x.numpy().astype(np.float32))
            ys.append(y.numpy())
        self.x, self.y = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
        self.names = [f"{split}[{i}]" for i in range(len(self.x))]

    def __len__(self) -> int:
        return len(self.x)


def _items(source: list[Path] | Split, pre: dict):
    """(name, input [C, H, W] or None, label or None, reason skipped or None) per image of `source`."""
    if isinstance(source, Split):
        want = (1 if pre["mode"] == "L" else 3, pre["image_size"], pre["image_size"])
        if tuple(source.x.shape[1:]) != want:
            raise ValueError(
                f"the split's images are {tuple(source.x.shape[1:])} but the model takes {want}: "
                "the datamodule config differs from the model's (see --data)"
            )
        for name, x, y in zip(source.names, source.x, source.y):
            yield name, x, int(y), None
        return
    for p in source:
        try:
            yield str(p), preprocess(p, pre), None, None
        except ImageError as exc:
            yield str(p), None, None, str(exc)
        except FileNotFoundError:
            yield str(p), None, None, "no such file"


def _cell(v: object) -> object:
    """A CSV cell that a spreadsheet will not run as a formula."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


class _QbdlEngine:
    """A .qbdl model through qbdl's engine (torch), with the run's preprocessing and classes; Model's interface."""

    def __init__(self, path: Path, samples: int | None, fit_threshold: bool = True) -> None:
        import torch

        from qbdl.bayes import mc_predict
        from qbdl.export.core import datamodule, preprocessing_of, qbdl_version, run_config
        from qbdl.quant import load_qbnn

        run_dir = path.resolve().parent.parent
        cfg = run_config(run_dir)
        dm = datamodule(cfg)
        self._torch, self._mc_predict = torch, mc_predict
        self.model = load_qbnn(str(path))
        bayes = any(getattr(m, "mode", None) == "sample" for m in self.model.modules())
        ev = cfg.get("eval") or {}
        self.samples = int(samples or ev.get("mc_samples", 8)) if bayes else 1
        self.runtime, self.version = "qbdl", qbdl_version()
        self.meta = {
            "classes": list(getattr(dm, "class_names", None) or [str(i) for i in range(dm.num_classes)]),
            "preprocessing": preprocessing_of(dm),
            "referral": {"score": ev.get("score", "entropy"), "threshold": None,
                         "target_accuracy": float(ev.get("target_accuracy", 0.995)), "fitted_on": None},
            "mc_samples": self.samples,
        }  # fmt: skip
        if fit_threshold:
            self.meta["referral"].update(self.fit_threshold(dm, int(ev.get("seed", 0))), fitted_on="val")

    def fit_threshold(self, dm, seed: int) -> dict:
        """The referral threshold at the run's target accuracy, fitted on the validation split with this engine
        (as the export fits an .onnx model's with the exported model)."""
        from qbdl.export.core import val_tensors
        from qbdl.export.metadata import fit_threshold

        ref = self.meta["referral"]
        x, y = val_tensors(dm)
        scores, correct = [], []
        for i in range(0, len(x), 64):
            out = self.run(x[i : i + 64].numpy(), seed=seed + i)
            scores += [float(v) for v in _score(out, ref["score"])]
            correct += list(out["probs"].argmax(1) == y[i : i + 64].numpy())
        t, kept, referred = fit_threshold(scores, correct, ref["target_accuracy"])
        return {"threshold": t, "val_accuracy_kept": kept, "val_referred": referred}

    @property
    def classes(self) -> list[str]:
        """Class names, in output order."""
        return self.meta["classes"]

    def run(self, x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
        """MC probabilities of qbdl's engine -> probs, entropy, mi."""
        p = self._mc_predict(self.model, self._torch.from_numpy(x), self.samples, seed=seed).double().numpy()
        pbar = p.mean(0)

        def ent(q: np.ndarray) -> np.ndarray:
            return -(q * np.log(np.maximum(q, 1e-300))).sum(-1)

        h = ent(pbar)
        return {"probs": pbar, "entropy": h, "mi": np.maximum(h - ent(p).mean(0), 0.0)}


def _score(out: dict[str, np.ndarray], score: str) -> np.ndarray:
    return {"entropy": out["entropy"], "mi": out["mi"], "maxprob": 1.0 - out["probs"].max(1)}[score]


def predict(model, images: list[Path] | Split, batch_size: int = 32, seed: int = 0, threshold: float | None = None,
            progress: bool = True) -> tuple[list[dict], list[dict], dict]:  # fmt: skip
    """(rows, skipped, summary) for `images` (files or a datamodule split): skipped = [{"file", "reason"}]."""
    pre = model.meta["preprocessing"]
    ref = model.meta["referral"]
    thr = ref.get("threshold") if threshold is None else float(threshold)
    rows, skipped = [], []
    batch_x, batch_p, batch_y = [], [], []
    t0, run_s, n_batch = time.perf_counter(), 0.0, 0

    def flush() -> None:
        nonlocal run_s, n_batch
        if not batch_x:
            return
        t = time.perf_counter()
        out = model.run(np.stack(batch_x), seed=(seed * 1_000_003 + n_batch) % 2**24)
        run_s += time.perf_counter() - t
        n_batch += 1
        score = _score(out, ref["score"])
        for i, (p, label) in enumerate(zip(batch_p, batch_y)):
            k = int(out["probs"][i].argmax())
            rows.append({
                "file": p, "class": model.classes[k], "class_index": k,
                "prob": float(out["probs"][i, k]), "entropy": float(out["entropy"][i]), "mi": float(out["mi"][i]),
                "refer": None if thr is None else bool(score[i] > thr),
                **({} if label is None else {"label": label}),
            })  # fmt: skip
        batch_x.clear()
        batch_p.clear()
        batch_y.clear()
        if progress:
            done = len(rows) + len(skipped)
            rate = len(rows) / max(time.perf_counter() - t0, 1e-9)
            print(
                f"\rpredict: {done}/{len(images)} images, {rate:.1f} img/s",
                end="",
                file=sys.stderr,
                flush=True,
            )

    for name, x, label, reason in _items(images, pre):
        if reason is not None:
            skipped.append({"file": name, "reason": reason})
            continue
        batch_x.append(x)
        batch_p.append(name)
        batch_y.append(label)
        if len(batch_x) >= batch_size:
            flush()
    flush()
    if progress:
        print(file=sys.stderr)
    wall = time.perf_counter() - t0
    referred = [r["refer"] for r in rows if r["refer"] is not None]
    summary = {
        "images": len(images), "predicted": len(rows), "skipped": len(skipped),
        "referred_share": (sum(referred) / len(referred)) if referred else None,
        "threshold": thr, "score": ref["score"], "mc_samples": model.meta["mc_samples"],
        "images_per_s": len(rows) / wall if wall > 0 else None,
        "model_images_per_s": len(rows) / run_s if run_s > 0 else None,
        "runtime": f"{model.runtime} {model.version}",
    }  # fmt: skip
    if isinstance(images, Split) and rows:  # labelled: accuracy overall and on the images kept (not referred)
        hit = [r["class_index"] == r["label"] for r in rows]
        kept = [h for h, r in zip(hit, rows) if r["refer"] is False]
        summary["accuracy"] = sum(hit) / len(hit)
        summary["accuracy_kept"] = sum(kept) / len(kept) if kept else None
    return rows, skipped, summary


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell("" if r[k] is None else r[k]) for k in columns})
    return buf.getvalue()


def write_outputs(out: Path, rows: list[dict], skipped: list[dict], summary: dict) -> list[Path]:
    """Write the predictions (CSV or JSON by the suffix of `out`) atomically; returns the files written."""
    if out.suffix.lower() == ".json":
        doc = {"predictions": rows, "skipped": skipped, "summary": summary}
        return [atomic_write_text(out, json.dumps(doc, indent=1, allow_nan=False) + "\n")]
    columns = COLUMNS + (("label",) if rows and "label" in rows[0] else ())
    written = [atomic_write_text(out, _csv(rows, columns))]
    side = out.with_name(out.stem + ".skipped.csv")
    if skipped:
        written.append(atomic_write_text(side, _csv(skipped, ("file", "reason"))))
    elif side.exists():  # from an earlier run on other images: it would name files this run did not skip
        side.unlink()
    return written


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status (0: every image predicted or named as skipped)."""
    ap = argparse.ArgumentParser(prog="python -m qbdl.predict", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="an exported .onnx (no torch needed) or a .qbdl inside a run directory")
    ap.add_argument("input", nargs="?", help="a folder of images, or a text file with one image path a line")
    ap.add_argument(
        "--split", choices=SPLITS, help="instead of INPUT: this split of the run's configured datamodule"
    )
    ap.add_argument("--run", default=None, help="run directory of --split (default: the one MODEL sits in)")
    ap.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the run's data config for --split (repeatable; e.g. --data batch_size=64)",
    )
    ap.add_argument(
        "--out", default="predictions.csv", help="output file: .csv (default predictions.csv) or .json"
    )
    ap.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES, help="runtime of an .onnx model")
    ap.add_argument("--threads", type=int, default=0, help="runtime threads (0: the runtime's default)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per session run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo samples")
    ap.add_argument(
        "--samples", type=int, default=None, help="MC samples of a .qbdl model (an .onnx has its own)"
    )
    ap.add_argument("--threshold", type=float, default=None, help="referral threshold instead of the model's")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if (args.input is None) == (args.split is None):
        ap.error("give INPUT (a folder or a list of images) or --split, not both")
    if args.data and args.split is None:
        ap.error("--data overrides the datamodule of --split")
    path = Path(args.model)
    try:
        if path.suffix == ".qbdl":
            model = _QbdlEngine(path, args.samples)
        else:
            model = Model(path, args.runtime, args.threads)
        if args.split is not None:
            images = Split(
                Path(args.run) if args.run else path.resolve().parent.parent, args.split, args.data
            )
        else:
            images = list_images(Path(args.input))
    except (MetadataError, RuntimeMissing, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not images:
        print(f"error: no images in {args.input} (suffixes {', '.join(IMAGE_SUFFIXES)})", file=sys.stderr)
        return 2
    try:
        rows, skipped, summary = predict(
            model, images, args.batch_size, args.seed, args.threshold, not args.quiet
        )
    except ValueError as exc:  # a split whose images are not the model's shape
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = write_outputs(Path(args.out), rows, skipped, summary)
    s = summary
    print(f"{s['predicted']} of {s['images']} images predicted ({s['runtime']}, S={s['mc_samples']}, "
          f"{_fmt(s['images_per_s'], '.1f')} img/s overall, {_fmt(s['model_images_per_s'], '.1f')} in the model)")  # fmt: skip
    if s["threshold"] is None:
        print("referral: the model has no threshold (exported without a validation split); pass --threshold")
    else:
        print(f"referred: {_fmt(s['referred_share'] and 100 * s['referred_share'], '.1f')}% "
              f"({s['score']} > {s['threshold']:.4g})")  # fmt: skip
    if "accuracy" in s:
        print(f"accuracy: {_fmt(100 * s['accuracy'], '.2f')}% of all, "
              f"{_fmt(s['accuracy_kept'] and 100 * s['accuracy_kept'], '.2f')}% of those kept")  # fmt: skip
    if skipped:
        print(f"skipped {len(skipped)} image(s):")
        for k in skipped:
            print(f"  {k['file']}: {k['reason']}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
