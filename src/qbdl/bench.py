"""Throughput and memory benchmark: python -m qbdl.bench [arch=resnet50] ['batch_sizes=[1,8,32]'] ...

Variants side by side in one process, interleaved, medians of repeated timings: deterministic FP32 and
INT8, FP32 BNN (fresh samples; bank of pre-drawn samples), INT8 QBNN (fresh; bank), optionally BF16.
Memory as users meet it: each variant alone in a fresh subprocess (`resident_memory`), its resident memory
(VmRSS) after loading (INT8: the saved .qbdl file) or building it and two MC forwards at batch 1, minus the
resident memory after the imports; beside it the file size and the per-prediction peak.
Writes bench.json, bench.md (the paper's Table 1 shape) and plots into out_dir.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qbdl.bayes import WeightBank, dnn_to_bnn, set_mc_index
from qbdl.io import atomic_write_bytes, atomic_write_json
from qbdl.machine import machine_info
from qbdl.models.files import state_dict_bytes
from qbdl.quant import calibrate, convert, prepare, save_qbnn
from qbdl.quant.backend import int8_summary

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # inside the package: wheels carry it
ARCHS = ("resnet20", "resnet18", "resnet50")


def _int8_size(model: nn.Module, keep: Path | None = None) -> int:
    """Bytes of the model's .qbdl file (kept at `keep` when given: the resident-memory child loads it)."""
    if keep is not None:
        save_qbnn(model, str(keep))
        return keep.stat().st_size
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.qbdl"
        save_qbnn(model, str(path))
        return path.stat().st_size


class _BF16(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x)


def build_variants(
    cfg: DictConfig, save_dir: Path | None = None
) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """The requested variants of one random-weight network, and their model sizes on disk.

    save_dir: where the INT8 variants' .qbdl files are kept (<variant>.qbdl), for `resident_memory`.
    """

    def keep(name: str) -> Path | None:
        return None if save_dir is None else save_dir / f"{name}.qbdl"

    from qbdl import models

    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {ARCHS}")
    torch.manual_seed(cfg.seed)
    dnn = getattr(models, cfg.arch)(num_classes=cfg.num_classes, in_chans=cfg.in_chans).eval()
    calib = [torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size) for _ in range(cfg.calib_batches)]
    want = set(cfg.variants) | ({"dnn_bf16"} if cfg.bf16 else set())
    out: dict[str, nn.Module] = {}
    sizes: dict[str, int] = {}
    if "dnn_fp32" in want:
        out["dnn_fp32"], sizes["dnn_fp32"] = dnn, state_dict_bytes(dnn)
    if "dnn_bf16" in want:
        out["dnn_bf16"], sizes["dnn_bf16"] = _BF16(dnn), state_dict_bytes(dnn) // 2
    if "dnn_int8" in want:
        q = convert(calibrate(prepare(dnn, backend=cfg.backend), calib, mc_samples=1), backend=cfg.backend)
        out["dnn_int8"], sizes["dnn_int8"] = q, _int8_size(q, keep("dnn_int8"))
    bnn = dnn_to_bnn(dnn, moped_delta=cfg.moped_delta).eval()
    if "bnn_fp32" in want:
        out["bnn_fp32"], sizes["bnn_fp32"] = bnn, state_dict_bytes(bnn)
    if "bnn_fp32_bank" in want:
        out["bnn_fp32_bank"] = WeightBank(bnn, cfg.bank_size, seed=cfg.seed)
        sizes["bnn_fp32_bank"] = state_dict_bytes(bnn)  # the bank is redrawn from the seed, not stored
    qbnns = {  # name: (sampler, fresh_kernel); fresh_prepack: the re-packing path, for comparison
        "qbnn_int8_fresh": ("fresh", "auto"),
        "qbnn_int8_fresh_prepack": ("fresh", "prepack"),
        "qbnn_int8_bank": ("bank", "auto"),
        "qbnn_int8_flipout": ("flipout", "auto"),
    }
    if want & set(qbnns):
        per_example = "qbnn_int8_flipout" in want
        prep = prepare(bnn, backend=cfg.backend, per_example=per_example)
        prep = calibrate(prep, calib, mc_samples=1, seed=cfg.seed)
        for name, (sampler, kernel) in qbnns.items():
            if name in want:
                q = convert(
                    prep, sampler=sampler, bank_size=cfg.bank_size, seed=cfg.seed, backend=cfg.backend,
                    fresh_kernel=kernel,
                )  # fmt: skip
                out[name], sizes[name] = q, _int8_size(q, keep(name))
    unknown = want - set(out)
    if unknown:
        raise ValueError(
            f"unknown variants {sorted(unknown)}; known: dnn_fp32, dnn_bf16, dnn_int8, bnn_fp32, "
            "bnn_fp32_bank, qbnn_int8_fresh, qbnn_int8_fresh_prepack, qbnn_int8_bank, qbnn_int8_flipout"
        )
    return out, sizes


def _int8_info(model: nn.Module) -> dict:
    meta = getattr(model, "qbdl_meta", None)
    if meta is None:
        return {}
    i = int8_summary(meta)
    return {"kernel_families": i["kernel_families"], "reduced_range": i["reduced_range"]}


def _clear_peak() -> bool:
    try:  # "5" resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@torch.no_grad()
def _mc_forward(model: nn.Module, x: torch.Tensor, samples: int) -> None:
    for s in range(samples):
        set_mc_index(model, s)
        model(x)
    set_mc_index(model, None)


@torch.no_grad()
def peak_memory(model: nn.Module, x: torch.Tensor, samples: int) -> int | None:
    """Peak resident memory above the pre-call level during one MC prediction (bytes; None if unknown)."""
    if not _clear_peak():
        return None
    before = _rss("VmRSS")
    _mc_forward(model, x, samples)
    peak = _rss("VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


_CHILD = """
import gc, json, sys, warnings
warnings.filterwarnings("ignore")
import torch
from omegaconf import OmegaConf
from qbdl import bench
from qbdl.quant import load_qbnn, native
native.available()  # the C++ ops library is loaded by any INT8 model: part of the imports
cfg = OmegaConf.create(json.loads(sys.argv[1]))
name, path = sys.argv[2], sys.argv[3]
torch.set_num_threads(cfg.threads)
gc.collect()
base = bench._rss("VmRSS")
if path:  # INT8: what a deployment does, load the saved file
    model = load_qbnn(path)
else:
    cfg.variants = [name]
    cfg.bf16 = name == "dnn_bf16"
    model = bench.build_variants(cfg)[0][name]
gc.collect()
x = torch.randn(1, cfg.in_chans, cfg.image_size, cfg.image_size)
bench._mc_forward(model, x, 2)
gc.collect()
print("QBDL_RESIDENT", json.dumps({"bytes": bench._rss("VmRSS") - base, "base": base}))
"""


def resident_memory(cfg: DictConfig, name: str, path: Path | None, timeout_s: float = 900) -> int | None:
    """Resident memory (bytes) of a fresh process holding only variant `name` after two MC forwards at batch 1,
    minus its resident memory after the imports (None where /proc is missing or the child fails).

    INT8 variants are loaded from their saved .qbdl file `path`; FP32 ones are built as the bench builds them.
    """
    conf = json.dumps(OmegaConf.to_container(cfg, resolve=True))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, conf, name, "" if path is None else str(path)],
            capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("QBDL_RESIDENT "):
            return int(json.loads(line.split(" ", 1)[1])["bytes"])
    warnings.warn(f"resident memory of {name}: the child process failed: {proc.stderr[-500:]}", stacklevel=2)
    return None


@torch.no_grad()
def time_interleaved(
    models: dict[str, nn.Module], x: torch.Tensor, samples: int, reps: int, warmup: int, budget_s: float
) -> dict[str, list[float]]:
    """Seconds per MC prediction of each model, repetitions interleaved across models."""
    for m in models.values():
        for _ in range(warmup):
            _mc_forward(m, x, samples)
    times: dict[str, list[float]] = {k: [] for k in models}
    t_end = time.perf_counter() + budget_s
    for r in range(reps):
        for k, m in models.items():
            t0 = time.perf_counter()
            _mc_forward(m, x, samples)
            times[k].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() > t_end:
            break
    return times


def bench(cfg: DictConfig) -> dict:
    """Run the benchmark; returns (and writes) the bench.json content."""
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    files = Path(tempfile.mkdtemp(prefix="qbdl-bench-"))
    t0 = time.perf_counter()
    models, sizes = build_variants(cfg, files)
    build_s = time.perf_counter() - t0
    resident: dict[str, int | None] = {}
    if cfg.get("resident", True):
        for name in models:
            path = files / f"{name}.qbdl"
            resident[name] = resident_memory(cfg, name, path if path.exists() else None)
    records = []
    for b in cfg.batch_sizes:
        x = torch.randn(b, cfg.in_chans, cfg.image_size, cfg.image_size)
        times = time_interleaved(
            models, x, cfg.mc_samples, cfg.reps, cfg.warmup, cfg.budget_s / len(cfg.batch_sizes)
        )
        for name, ts in times.items():
            med = statistics.median(ts)
            records.append(
                {
                    "variant": name,
                    "batch_size": b,
                    "mc_samples": cfg.mc_samples,
                    "images_per_s": b / med,
                    "median_s": med,
                    "min_s": min(ts),
                    "max_s": max(ts),
                    "reps": len(ts),
                    "size_bytes": sizes[name],
                    "peak_mem_bytes": peak_memory(models[name], x, cfg.mc_samples),
                    "resident_bytes": resident.get(name),
                }
                | _int8_info(models[name])
            )
    by = {(r["variant"], r["batch_size"]): r for r in records}
    for r in records:
        for ref in ("bnn_fp32", "dnn_int8"):
            if (ref, r["batch_size"]) in by:
                r[f"speedup_vs_{ref}"] = r["images_per_s"] / by[(ref, r["batch_size"])]["images_per_s"]
        bnn = by.get(("bnn_fp32", r["batch_size"]), {}).get("resident_bytes")
        if bnn and r["resident_bytes"] is not None:
            r["resident_vs_bnn_fp32"] = r["resident_bytes"] / bnn
    report = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "machine": machine_info(),
        "build_s": build_s,
        "results": records,
    }
    shutil.rmtree(files, ignore_errors=True)
    atomic_write_json(out_dir / "bench.json", report)
    atomic_write_bytes(out_dir / "bench.md", markdown(report).encode())
    plot(report, out_dir)
    return report


def markdown(report: dict) -> str:
    """Table 1 shape (batch, BNN FP32, QBNN INT8, speedup) and the full table of every variant."""
    res = report["results"]
    by = {(r["variant"], r["batch_size"]): r for r in res}
    batches = sorted({r["batch_size"] for r in res})
    variants = list(dict.fromkeys(r["variant"] for r in res))
    m = report["machine"]
    lines = [
        f"# qbdl bench: {report['config']['arch']} {report['config']['image_size']}x{report['config']['image_size']}, "
        f"{report['config']['mc_samples']} MC sample(s), {m['threads']} threads, {m['cpu']}",
        "",
        f"ISA: {', '.join(m['isa'])}; torch {m['torch']}; INT8 backend {report['config']['backend']}. "
        "Images/s are medians of interleaved repetitions. Resident: each variant alone in a fresh process, VmRSS "
        "after loading it (INT8: its .qbdl file) and two MC forwards at batch 1, minus VmRSS after the imports.",
        "",
    ]
    for fp, q in (("bnn_fp32", "qbnn_int8_fresh"), ("bnn_fp32_bank", "qbnn_int8_bank")):
        if any((fp, b) in by and (q, b) in by for b in batches):
            lines += [
                f"| batch size | BNN FP32 ({fp}) img/s | QBNN INT8 ({q}) img/s | speedup |",
                "|---|---|---|---|",
            ]
            for b in batches:
                if (fp, b) in by and (q, b) in by:
                    f, i = by[(fp, b)]["images_per_s"], by[(q, b)]["images_per_s"]
                    lines.append(f"| {b} | {f:.1f} | {i:.1f} | {i / f:.2f}x |")
            lines.append("")
    lines += [
        "| variant | "
        + " | ".join(f"b={b} img/s (vs int8)" for b in batches)
        + " | size MiB | peak MiB | resident MiB (vs FP32 BNN) |",
        "|---|" + "---|" * (len(batches) + 3),
    ]
    for v in variants:
        cells = []
        for b in batches:
            r = by.get((v, b))
            cells.append(
                "-" if r is None else f"{r['images_per_s']:.1f} ({r.get('speedup_vs_dnn_int8', 0):.2f}x)"
            )
        last = by[(v, batches[-1])]
        peak = "-" if last["peak_mem_bytes"] is None else f"{last['peak_mem_bytes'] / 2**20:.0f}"
        res = last.get("resident_bytes")
        res = "-" if res is None else f"{res / 2**20:.0f}"
        if "resident_vs_bnn_fp32" in last:
            res += f" ({last['resident_vs_bnn_fp32']:.2f}x)"
        lines.append(
            f"| {v} | " + " | ".join(cells) + f" | {last['size_bytes'] / 2**20:.1f} | {peak} | {res} |"
        )
    kernels = {v: by[(v, batches[-1])] for v in variants if "kernel_families" in by[(v, batches[-1])]}
    if kernels:
        lines += ["", "INT8 kernels: " + "; ".join(
            f"{v} {', '.join(r['kernel_families'])}" + (" (activations 0..127, reduced range)" if r["reduced_range"] else "")
            for v, r in kernels.items()
        ) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(report: dict, out_dir: Path) -> None:
    """Throughput vs batch size, and speedup bars of the QBNN over the FP32 BNN (paper fig. 5)."""
    from matplotlib.figure import Figure

    from qbdl.report.plots import save_figure

    res = report["results"]
    variants = list(dict.fromkeys(r["variant"] for r in res))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for v in variants:
        pts = sorted((r["batch_size"], r["images_per_s"]) for r in res if r["variant"] == v)
        ax.plot(*zip(*pts), marker="o", label=v)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images/s", title="Throughput")
    ax.legend(fontsize="small")
    save_figure(fig, out_dir / "throughput.png")
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    pairs = [("qbnn_int8_fresh", "fresh"), ("qbnn_int8_bank", "bank")]
    batches = sorted({r["batch_size"] for r in res})
    width = 0.8 / len(pairs)
    for i, (v, label) in enumerate(pairs):
        sp = [
            next((r.get("speedup_vs_bnn_fp32") for r in res if r["variant"] == v and r["batch_size"] == b), 0)
            or 0
            for b in batches
        ]
        ax.bar([j + i * width for j in range(len(batches))], sp, width, label=f"QBNN INT8 {label}")
    ax.set_xticks([j + width / 2 for j in range(len(batches))], [str(b) for b in batches])
    ax.axhline(1, color="grey", lw=0.8)
    ax.set(xlabel="batch size", ylabel="speedup vs FP32 BNN", title="INT8 QBNN speedup")
    ax.legend(fontsize="small")
    save_figure(fig, out_dir / "speedup.png")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    report = bench(cfg)
    print(markdown(report))
    print(f"written: {Path(cfg.out_dir) / 'bench.json'}")


if __name__ == "__main__":
    main()
