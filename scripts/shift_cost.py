"""Per-image cost of each data-shift corruption (median ms over repeats) at given sizes; table + JSON.

    python scripts/shift_cost.py [--sizes 32 224] [--repeats 5] [--severity 3] [--out shift_cost.json]

The image is a resized crop of scikit-learn's sample photo (china.jpg), RGB; one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

from qbdl.data.corruptions import CORRUPTIONS, corrupt_image, item_seed  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--out", default="shift_cost.json")
    args = ap.parse_args()
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass
    photo = load_sample_images().images[0]
    rows: dict[str, dict[str, float]] = {}
    print(f"{'corruption':18s}" + "".join(f"{f'{s}x{s} ms':>12s}" for s in args.sizes), flush=True)
    for name, info in CORRUPTIONS.items():
        rows[name] = {}
        for size in args.sizes:
            x = np.asarray(Image.fromarray(photo).resize((size, size), Image.BILINEAR))
            corrupt_image(x, name, args.severity, 0)  # warm-up (imports, first-call caches)
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                corrupt_image(x, name, args.severity, item_seed(0, name, args.severity, r))
                times.append((time.perf_counter() - t0) * 1e3)
            rows[name][str(size)] = statistics.median(times)
        flag = " (slow)" if info.slow else ""
        print(f"{name:18s}" + "".join(f"{rows[name][str(s)]:12.2f}" for s in args.sizes) + flag, flush=True)
    result = {
        "cpu": cpu_name(),
        "threads": 1,
        "severity": args.severity,
        "repeats": args.repeats,
        "unit": "ms per image (median)",
        "sizes": args.sizes,
        "ms": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"CPU: {result['cpu']}; severity {args.severity}; median of {args.repeats}; wrote {args.out}")


if __name__ == "__main__":
    main()
