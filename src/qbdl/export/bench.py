"""python -m qbdl.export.bench: exported models in ONNX Runtime / OpenVINO beside qbdl's own INT8 engine.

One random-weight network (MOPED BNN of it, calibrated on random images) gives every variant: qbdl's det INT8
(`qbdl_qdnn`) and QBNN (`qbdl_qbnn_fresh`, `qbdl_qbnn_flipout`; S forwards per batch), the exported det INT8
and QBNN (S samples in one session run) in ONNX Runtime (`ort_*`) and OpenVINO (`ov_*`), and the FP32 BNN in
torch (`torch_bnn`) as the memory reference. Each variant lives in its own worker process; the parent times
them round-robin (interleaved, so load from other jobs hits all alike) and reports medians. Memory: each
worker's resident memory (VmRSS) after its imports, after loading the model and two warm-up calls, and its
peak (VmHWM). Writes bench_export.json (with a `machine` field: CPU model, lscpu flags, load) and
bench_export.md. Throughput counts images: one image = S Monte Carlo samples for a QBNN.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qbdl.atomic import atomic_write_bytes, atomic_write_text

QBDL_VARIANTS = ("qbdl_qdnn", "qbdl_qbnn_fresh", "qbdl_qbnn_bank", "qbdl_qbnn_flipout", "torch_bnn")
# *_qbnn: the exact Flipout graph; *_qbnn_fast: build_onnx(exact=False), both Flipout terms QLinearConv;
# *_qbnn_bank: the bank of K constant samples (exact=False: one QLinearConv per entry), an entry per row and layer
RUNTIME_VARIANTS = ("ort_qdnn", "ort_qbnn", "ort_qbnn_fast", "ort_qbnn_bank", "ov_qdnn", "ov_qbnn", "ov_qbnn_fast",
                    "ov_qbnn_bank")  # fmt: skip
VARIANTS = QBDL_VARIANTS + RUNTIME_VARIANTS


def _status() -> dict[str, int]:
    """VmRSS / VmHWM of this process, in bytes."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


def machine() -> dict:
    """CPU model, its flags as lscpu lists them (INT8-relevant ones apart), cores and the load average."""
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:  # pragma: no cover - not Linux
        pass
    keep = ("avx", "fma", "f16c", "amx", "sse4", "ssse3")
    return {
        "cpu": model,
        "isa": sorted(f for f in flags if f.startswith(keep)),
        "vnni": any("vnni" in f for f in flags),
        "amx": any(f.startswith("amx") for f in flags),
        "lscpu_flags": flags,
        "cores": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": _versions(),
    }


def _versions() -> dict[str, str | None]:
    """Installed versions of torch, qbdl and the runtimes (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "qbdl", "onnx", "onnxruntime", "openvino"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# -- worker side (a process per variant; the runtime workers never import torch)


def _worker(variant: str, model_path: str, samples: int, threads: int, shape: list[int]) -> None:
    """Serve timed calls on stdin/stdout: 'run B' -> seconds of one call on a batch of B images."""
    rng = np.random.default_rng(0)
    if variant.startswith(("ort_", "ov_")):
        if variant.startswith("ort_"):
            import onnxruntime  # noqa: F401  (the runtime's import counts as the baseline, as torch's does)
        else:
            import openvino  # noqa: F401
        from .runtime import Model

        base = _status()

        m = Model(model_path, "onnxruntime" if variant.startswith("ort_") else "openvino", threads)
        version = f"{m.runtime} {m.version}"

        def call(x: np.ndarray, i: int) -> None:
            m.run(x, seed=i % 2**24)

    else:
        import torch

        torch.set_num_threads(threads)
        import qbdl.quant  # noqa: F401
        from qbdl.bayes import mc_logits

        base = _status()

        if variant == "torch_bnn":
            from qbdl import models
            from qbdl.bayes import dnn_to_bnn
            from qbdl.models.files import load_state

            spec = json.loads(Path(model_path).with_suffix(".json").read_text())
            net = getattr(models, spec["arch"])(num_classes=spec["num_classes"], in_chans=spec["in_chans"])
            model = dnn_to_bnn(net, moped_delta=spec["moped_delta"])
            load_state(model, model_path)
        else:
            from qbdl.quant import load_qbnn

            model = load_qbnn(model_path)
        model.eval()
        version = f"torch {torch.__version__}"
        s = 1 if variant == "qbdl_qdnn" else samples

        def call(x: np.ndarray, i: int) -> None:
            with torch.no_grad():
                mc_logits(model, torch.from_numpy(x), s)

    imports = base  # resident memory after the runtime's imports, before the model
    xs = {}
    for i in range(2):  # warm-up at batch 1 (packing, session allocations)
        call(rng.standard_normal((1, *shape), dtype=np.float32), i)
    loaded = _status()
    print(json.dumps({"ready": True, "rss_start": imports.get("VmRSS"), "rss_loaded": loaded.get("VmRSS"),
                      "version": version}), flush=True)  # fmt: skip
    i = 2
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        b = int(cmd[1])
        if b not in xs:
            xs[b] = rng.standard_normal((b, *shape), dtype=np.float32)
            call(xs[b], i)  # warm-up at this batch size
            i += 1
        t = time.perf_counter()
        call(xs[b], i)
        i += 1
        print(json.dumps({"seconds": time.perf_counter() - t, **_status()}), flush=True)


# -- parent side


def build_models(out: Path, arch: str, image_size: int, in_chans: int, num_classes: int, samples: list[int],
                 variants: list[str], bank_size: int = 4, seed: int = 0) -> dict[str, tuple[str, int]]:  # fmt: skip
    """Make every model file the variants load: {variant (with _S<n> for QBNNs): (path, S)}."""
    import torch

    from qbdl import models
    from qbdl.bayes import dnn_to_bnn
    from qbdl.models.files import save_state
    from qbdl.quant import calibrate, convert, prepare, save_qbnn

    from .graph import build_onnx

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dnn = getattr(models, arch)(num_classes=num_classes, in_chans=in_chans).eval()
    bnn = dnn_to_bnn(dnn, moped_delta=0.05).eval()
    calib = [torch.randn(2, in_chans, image_size, image_size) for _ in range(2)]
    files: dict[str, tuple[str, int]] = {}
    qdnn = convert(calibrate(prepare(dnn), calib, mc_samples=1), sampler="fresh")
    prep = calibrate(prepare(bnn, per_example=True), calib, mc_samples=2, seed=seed)
    qflip = convert(prep, sampler="flipout", bank_size=bank_size, seed=seed)
    shape = (in_chans, image_size, image_size)
    if "qbdl_qdnn" in variants or "ort_qdnn" in variants or "ov_qdnn" in variants:
        save_qbnn(qdnn, str(out / "qdnn.qbdl"))
        files["qbdl_qdnn"] = (str(out / "qdnn.qbdl"), 1)
        proto, _ = build_onnx(qdnn, samples=1, in_shape=shape)
        atomic_write_bytes(out / "qdnn.onnx", _with_meta(proto, "qdnn", 1, in_chans, image_size, num_classes))
        files["ort_qdnn"] = files["ov_qdnn"] = (str(out / "qdnn.onnx"), 1)
    if "qbdl_qbnn_fresh" in variants:
        save_qbnn(convert(prep, sampler="fresh", seed=seed), str(out / "qbnn_fresh.qbdl"))
    if "qbdl_qbnn_flipout" in variants:
        save_qbnn(qflip, str(out / "qbnn_flipout.qbdl"))
    qbank = convert(prep, sampler="bank", bank_size=bank_size, seed=seed)
    if "qbdl_qbnn_bank" in variants:
        save_qbnn(qbank, str(out / "qbnn_bank.qbdl"))
    if "torch_bnn" in variants:
        save_state(bnn, out / "bnn.safetensors")
        spec = {"arch": arch, "num_classes": num_classes, "in_chans": in_chans, "moped_delta": 0.05}
        atomic_write_text(out / "bnn.json", json.dumps(spec))
    for s in samples:
        sb = min(s, bank_size)  # a bank's image runs S <= K distinct networks (more would repeat them)
        for v in ("qbdl_qbnn_fresh", "qbdl_qbnn_bank", "qbdl_qbnn_flipout", "torch_bnn"):
            name = {"qbdl_qbnn_fresh": "qbnn_fresh.qbdl", "qbdl_qbnn_bank": "qbnn_bank.qbdl",
                    "qbdl_qbnn_flipout": "qbnn_flipout.qbdl", "torch_bnn": "bnn.safetensors"}[v]  # fmt: skip
            if v in variants:
                n = sb if v == "qbdl_qbnn_bank" else s
                files[f"{v}_S{n}"] = (str(out / name), n)
        for tag, exact, qm in (("", True, qflip), ("_fast", False, qflip), ("_bank", False, qbank)):
            names = [f"ort_qbnn{tag}", f"ov_qbnn{tag}"]
            if not any(v in variants for v in names):
                continue
            n = sb if tag == "_bank" else s
            proto, _ = build_onnx(qm, samples=n, perturbations=1, in_shape=shape, exact=exact)
            path = out / f"qbnn{tag}_S{n}.onnx"
            atomic_write_bytes(path, _with_meta(proto, "qbnn", n, in_chans, image_size, num_classes))
            for v in names:
                if v in variants:
                    files[f"{v}_S{n}"] = (str(path), n)
    return {k: v for k, v in files.items() if k.rsplit("_S", 1)[0] in variants}


def _with_meta(proto, kind: str, samples: int, in_chans: int, size: int, num_classes: int) -> bytes:
    from . import metadata as md
    from .core import qbdl_version

    meta = {
        "format": md.FORMAT, "kind": kind, "qbdl_version": qbdl_version(),
        "classes": [f"class_{i}" for i in range(num_classes)],
        "preprocessing": {"mode": "L" if in_chans == 1 else "RGB", "source_size": None, "resize": size,
                          "resize_mode": "square", "crop": None, "interpolation": "bilinear", "scale": 1 / 255,
                          "mean": [0.5] * in_chans, "std": [0.25] * in_chans, "image_size": size},
        "mc_samples": samples, "perturbations": 1 if kind == "qbnn" else 0,
        "noise": "seed" if kind == "qbnn" else "none",
        "referral": {"score": "entropy", "threshold": None, "target_accuracy": 0.995, "fitted_on": None},
        "source": {"fingerprint": None, "file": "bench (random weights)"}, "activation_qmax": 255,
        "outputs": ["probs", "entropy", "mi", "logits"],
    }  # fmt: skip
    e = proto.metadata_props.add()
    e.key, e.value = md.KEY, md.dumps(meta)
    return proto.SerializeToString()


def run_bench(files: dict[str, tuple[str, int]], batch_sizes: list[int], rounds: int, threads: int,
              shape: list[int], log=print, max_rows: int | None = None) -> dict:  # fmt: skip
    """Time every variant round-robin (each in its worker), medians; resident memory per worker.

    max_rows: skip a variant's batch size where S x batch exceeds it (all workers live at once: a ResNet-50 BNN at
    S = 8, batch 32 is 256 FP32 forwards' activations); the record has no figure there.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    workers, info = {}, {}
    for name, (path, s) in files.items():
        variant = name.rsplit("_S", 1)[0]
        cmd = [sys.executable, "-m", "qbdl.export.bench", "--worker", variant, "--model", path, "--samples", str(s),
               "--threads", str(threads), "--shape", *[str(v) for v in shape]]  # fmt: skip
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(
                f"bench worker {name} died while loading its model ({path}); run it alone to see why"
            )
        workers[name], info[name] = p, json.loads(line)
        log(
            f"  {name}: loaded, {info[name]['rss_loaded'] / 2**20:.0f} MiB resident ({info[name]['version']})"
        )
    times: dict[str, dict[int, list[float]]] = {
        n: {b: [] for b in batch_sizes if max_rows is None or files[n][1] * b <= max_rows} for n in files
    }
    peak: dict[str, int] = {}
    try:
        for r in range(rounds):
            for b in batch_sizes:
                for name, p in workers.items():
                    if b not in times[name]:
                        continue
                    p.stdin.write(f"run {b}\n")
                    p.stdin.flush()
                    line = p.stdout.readline()
                    if not line:
                        code = p.wait(timeout=60)
                        raise RuntimeError(
                            f"bench worker {name} died at batch {b} (exit {code}"
                            + ("; killed: out of memory?" if code == -9 else "")
                            + "): measure fewer variants at once or pass --max-rows"
                        )
                    res = json.loads(line)
                    times[name][b].append(res["seconds"])
                    peak[name] = max(peak.get(name, 0), res.get("VmHWM", 0))
            log(f"  round {r + 1}/{rounds} done")
    finally:
        for p in workers.values():
            try:
                p.stdin.write("quit\n")
                p.stdin.close()
            except OSError:  # pragma: no cover - the worker already died
                pass
            p.wait(timeout=60)
    results = {}
    for name, (path, s) in files.items():
        i = info[name]
        results[name] = {
            "samples": s,
            "runtime": i["version"],
            "file_mib": Path(path).stat().st_size / 2**20,
            "rss_imports_mib": i["rss_start"] / 2**20,
            "rss_loaded_mib": i["rss_loaded"] / 2**20,
            "rss_over_imports_mib": (i["rss_loaded"] - i["rss_start"]) / 2**20,
            "peak_rss_mib": peak.get(name, 0) / 2**20,
            "img_per_s": {str(b): b / statistics.median(t) for b, t in times[name].items()},
            "seconds": {str(b): t for b, t in times[name].items()},
        }
    return results


def table(results: dict, batch_sizes: list[int], mach: dict) -> str:
    """Markdown table of the results (img/s per batch size; memory)."""
    head = "| variant | S | runtime | " + " | ".join(f"img/s @ {b}" for b in batch_sizes)
    head += " | RSS over imports MiB | peak RSS MiB | file MiB |\n"
    head += "|---|---|---|" + "---|" * len(batch_sizes) + "---|---|---|\n"
    rows = []
    for name, r in results.items():
        rate = " | ".join(f"{r['img_per_s'][str(b)]:.2f}" if str(b) in r["img_per_s"] else "-" for b in batch_sizes)
        rows.append(f"| {name} | {r['samples']} | {r['runtime']} | {rate} | {r['rss_over_imports_mib']:.0f} | "
                    f"{r['peak_rss_mib']:.0f} | {r['file_mib']:.1f} |")  # fmt: skip
    isa = ", ".join(f for f in mach["isa"] if f.startswith(("avx2", "avx512", "avx_vnni", "fma", "amx")))
    foot = (
        f"\nCPU: {mach['cpu']} ({mach['cores']} cores; {isa}; VNNI: {mach['vnni']}); load average at start "
    )
    foot += f"{mach['loadavg']}.\n"
    return head + "\n".join(rows) + "\n" + foot


def main(argv: list[str] | None = None) -> int:
    """Command line (parent, or a worker with --worker)."""
    ap = argparse.ArgumentParser(prog="python -m qbdl.export.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet20", choices=["resnet20", "resnet18", "resnet50"])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--in-chans", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument(
        "--samples", type=int, nargs="+", default=[1, 8], help="MC samples per image of the QBNNs"
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--bank-size", type=int, default=4, help="K of the bank QBNNs and of Flipout's bank")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-rows", type=int, default=None, help="skip batch sizes where S x batch exceeds this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_export", help="output folder (models, bench_export.json/.md)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.model, args.samples[0], args.threads, args.shape)
        return 0
    out = Path(args.out)
    mach = machine()
    t0 = time.perf_counter()
    print(f"building {args.arch} variants in {out} ...")
    files = build_models(out / "models", args.arch, args.image_size, args.in_chans, args.num_classes, args.samples,
                         args.variants, bank_size=args.bank_size)  # fmt: skip
    shape = [args.in_chans, args.image_size, args.image_size]
    print(f"timing {len(files)} variants, {args.rounds} interleaved rounds, {args.threads} threads ...")
    results = run_bench(files, args.batch_sizes, args.rounds, args.threads, shape, max_rows=args.max_rows)
    doc = {
        "arch": args.arch, "image_size": args.image_size, "threads": args.threads, "rounds": args.rounds,
        "batch_sizes": args.batch_sizes, "bank_size": args.bank_size, "max_rows": args.max_rows, "results": results,
        "machine": mach,
        "load_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": "python -m qbdl.export.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    atomic_write_text(out / "bench_export.json", json.dumps(doc, indent=1) + "\n")
    md_text = table(results, args.batch_sizes, mach)
    atomic_write_text(out / "bench_export.md", md_text)
    print(md_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
