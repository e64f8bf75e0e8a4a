"""PTQ recipes compared on one trained BNN: the QBNN-vs-BNN gap of each, read against the MC noise floor.

    python scripts/calibration_study.py RUN_DIR [--out DIR] [--floor-seeds 3] [--mc-samples S]

RUN_DIR: a finished `python -m qbdl.run`. Every recipe quantizes the same BNN (calibrated on the same training
batches) and is evaluated with the run's MC samples and seed, so the gaps differ only by the recipe; the noise
floor is `qbdl.fidelity.mc_noise_floor` of the BNN under the run's seed and `--floor-seeds` others (mean
|difference| over seed pairs: the gap that MC sampling alone produces, as in the error budget). Writes DIR/calibration_study.json and .md (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from qbdl import quant
from qbdl.experiment.evaluate import Variant, evaluate_variants
from qbdl.experiment.quantize import PTQ_OPTIONS
from qbdl.fidelity import mc_noise_floor
from qbdl.io import atomic_write_bytes, atomic_write_json
from qbdl.machine import machine_info
from qbdl.pipeline.build import load_run

METRICS = ("accuracy", "nll", "uce", "ood_auroc")
# (name, overrides of the run's quant config)
RECIPES = [
    ("run's recipe", {}),
    ("observer=minmax", {"observer": "minmax"}),
    ("observer=percentile", {"observer": "percentile"}),
    ("calib_batches=32", {"calib_batches": 32}),
    ("mc_samples=16", {"mc_samples": 16}),
    ("sampler=bank", {"sampler": "bank"}),
    # not PTQ: the run's recipe, then a short QAT fine-tune of mu/sigma on the frozen ranges (finetune_qat);
    # the control makes the same steps in FP32 (no fake quant, not converted): QAT minus control is QAT's own
    # effect, the control alone is what more ELBO training does to this BNN
    ("QAT fine-tune, 3 epochs", {"qat_epochs": 3}),
    ("FP32 fine-tune control, 3 epochs", {"qat_epochs": 3, "fake_quant": False}),
]
QAT_LR = 1e-4  # a fifth of the BNN fit's default learning rate: a fine-tune, not a refit


def _metrics(model, samples: int, seed: int, test, ood, ev_cfg) -> dict[str, float]:
    res = evaluate_variants(
        [Variant("m", model, samples, 0)], test, ood, seed=seed, target_accuracy=ev_cfg["target_accuracy"],
        n_bins=ev_cfg["n_bins"], score=ev_cfg["score"],
    ).metrics["m"]  # fmt: skip
    return {k: float(res[k]) for k in METRICS}


def main(argv: list[str] | None = None) -> int:
    """CLI: evaluate each recipe's QBNN against the run's BNN; write JSON and Markdown."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None)
    ap.add_argument("--floor-seeds", type=int, default=3)
    ap.add_argument("--mc-samples", type=int, default=None, help="default: the run's eval.mc_samples")
    args = ap.parse_args(argv)
    bnn, _, dm, ood, cfg = load_run(args.run_dir).astuple()
    ev_cfg, q_cfg = cfg["eval"], cfg["quant"]
    samples, seed = args.mc_samples or ev_cfg["mc_samples"], ev_cfg["seed"]
    test = dm.test_dataloader()
    ref = _metrics(bnn, samples, seed, test, ood, ev_cfg)
    floor_runs = [_metrics(bnn, samples, seed + s, test, ood, ev_cfg) for s in range(1, args.floor_seeds + 1)]
    floor = {k: mc_noise_floor([ref[k]] + [r[k] for r in floor_runs]) for k in METRICS}
    rows = []
    for name, override in RECIPES:
        override = dict(override)
        qat_epochs, fake_quant = override.pop("qat_epochs", None), override.pop("fake_quant", True)
        opts = {k: q_cfg[k] for k in PTQ_OPTIONS} | override
        batches = list(
            itertools.islice(dm.calib_dataloader(q_cfg.get("calib_batch_size")), opts["calib_batches"])
        )
        if qat_epochs:
            train = dm.train_dataloader()
            qat = quant.finetune_qat(
                bnn, batches, train, len(train.dataset), epochs=qat_epochs,
                lr=QAT_LR, beta=float(cfg["bnn"]["beta"]), backend=opts["backend"], observer=opts["observer"],
                mc_samples=opts["mc_samples"], seed=seed, fake_quant=fake_quant,
            )  # fmt: skip
            q = qat
            if fake_quant:
                q = quant.convert_qat(qat, sampler=opts["sampler"], bank_size=opts["bank_size"], seed=seed)
            opts |= {"qat_epochs": qat_epochs, "qat_lr": QAT_LR, "fake_quant": fake_quant}
        else:
            q = quant.quantize_bnn(bnn, batches, **opts)
        m = _metrics(q, samples, seed, test, ood, ev_cfg)
        rows.append(
            {"recipe": name, "options": opts, "metrics": m, "gap": {k: m[k] - ref[k] for k in METRICS}}
        )
        print(name, {k: round(v, 4) for k, v in rows[-1]["gap"].items()}, file=sys.stderr, flush=True)
    out = Path(args.out or args.run_dir)
    result = {"run_dir": str(Path(args.run_dir).resolve()), "bnn": ref, "mc_floor": floor, "recipes": rows,
              "mc_samples": samples, "seed": seed, "machine": machine_info()}  # fmt: skip
    atomic_write_json(out / "calibration_study.json", result)
    scale = {"accuracy": 100, "nll": 1, "uce": 100, "ood_auroc": 1}
    unit = {"accuracy": "pt", "nll": "", "uce": "pt", "ood_auroc": ""}
    head = "| recipe | " + " | ".join(f"Δ{k} {unit[k]}".strip() for k in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    lines.append(
        "| MC noise floor (BNN seed vs seed) | "
        + " | ".join(f"±{floor[k] * scale[k]:.3f}" for k in METRICS)
        + " |"
    )
    for r in rows:
        lines.append(
            f"| {r['recipe']} | " + " | ".join(f"{r['gap'][k] * scale[k]:+.3f}" for k in METRICS) + " |"
        )
    text = (
        "\n".join(lines)
        + f"\n\nBNN: {json.dumps({k: round(v, 4) for k, v in ref.items()})}, {samples} MC samples\n"
    )
    atomic_write_bytes(out / "calibration_study.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
