"""Write the measured tables of the README and docs from the JSON records kept in docs/data/.

    python scripts/docs_tables.py           # rewrite every table in place
    python scripts/docs_tables.py --check   # exit 1 (naming the files) if a table differs from its JSON

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in a Markdown file; NAME picks
the renderer below and its JSON record:

- ``default-run`` / ``default-run-short``: ``docs/data/results.json``, the ``results.json`` of
  ``python -m qbdl.run`` (the digits default);
- ``bench``: ``docs/data/bench.json``, the ``bench.json`` of ``python -m qbdl.bench``;
- ``estimates``: ``docs/data/estimates.json``, from ``python scripts/paper_estimates.py``;
- ``paper-vs-qbdl``: ``docs/data/paper.json`` (the paper's values, each with its source; kept by hand,
  as they come from the paper and not from a run) beside ``results.json`` and ``bench.json``;
- ``deploy`` / ``deploy-short``: ``docs/data/bench_export.json``, the ``bench_export.json`` of
  ``python -m qbdl.export.bench`` (exported models in ONNX Runtime / OpenVINO beside qbdl's engine);
- ``resident``: ``docs/data/bench_resident.json``, a ResNet-50 ``python -m qbdl.bench`` run (resident memory of
  each variant alone in a process, beside its throughput);
- ``fidelity-seeds``: ``docs/data/fidelity_seeds.json``, the gaps and MC floors of ``python -m qbdl.fidelity``
  on three seeds of the digits default run and of ``digits_hard``;
- ``speed-ab``: ``docs/data/bench_ab.json``, ``python -m qbdl.bench`` runs of two commits alternating (the fresh
  QBNN's throughput against the deterministic INT8 network's, before and after a change);
- ``fidelity-draws``: ``docs/data/fidelity_draws.json``, ``python -m qbdl.fidelity RUN_DIR --draws R`` on the
  same tasks and seeds (each metric's mean gap over R disjoint MC draws, its interval and verdict);
  ``fidelity-draws-mnist``: ``docs/data/fidelity_draws_mnist.json``, the same on three seeds of ``mnist_ptq``;
- ``baselines-seeds`` / ``baselines-claims``: ``docs/data/baselines_seeds.json``, the ``summary.json`` of
  ``python -m qbdl.report`` over the five-seed ``digits_baselines`` sweep (stats and claims kept).

Each record carries a ``provenance`` object (``command``, ``commit``, ``date``, ``note``) beside the
``machine`` and versions its producer wrote; every table says where it came from. A re-run replaces
the JSON and this script replaces the tables: no figure is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data"
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)

RUN_COLUMNS = [
    ("accuracy", "accuracy %", 100, "{:.2f}"),
    ("nll", "NLL", 1, "{:.4f}"),
    ("ece", "ECE %", 100, "{:.2f}"),
    ("uce", "UCE %", 100, "{:.2f}"),
    ("mi_mean", "mean MI", 1, "{:.4f}"),
    ("referral_rate_at_target", "referral %", 100, "{:.1f}"),
    ("augrc", "AUGRC %", 100, "{:.3f}"),
    ("ood_auroc", "OOD AUROC", 1, "{:.3f}"),
    ("ood_near_auroc", "near", 1, "{:.3f}"),
    ("ood_far_auroc", "far", 1, "{:.3f}"),
    ("size_bytes", "size MiB", 2**-20, "{:.2f}"),
]
SHORT_COLUMNS = ["accuracy", "nll", "ece", "uce", "referral_rate_at_target", "ood_auroc", "size_bytes"]


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _cpu(machine: dict) -> str:
    flags = [f for f in ("avx512_vnni", "amx") if machine.get(f)]
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else ("AVX2" if "avx2" in machine.get("isa", []) else "")
    return f"{machine.get('cpu', 'unknown CPU')}" + (f" ({isa})" if isa else "")


def provenance(rec: dict, torch_version: str, threads: int | str, verb: str = "Measured") -> str:
    """One line: command, machine, threads, torch, commit, date and the record's own note."""
    p = rec["provenance"]
    line = (
        f"{verb} with `{p['command']}` on {_cpu(rec['machine'])}, {threads} threads, torch {torch_version}, "
        f"commit `{p['commit'][:7]}`, {p['date']}"
    )
    return line + (f"; {p['note']}" if p.get("note") else "") + "."


def _cell(value, scale: float, fmt: str) -> str:
    return "-" if value is None else fmt.format(value * scale)


def default_run(short: bool = False) -> str:
    rec = load("results.json")
    cols = [c for c in RUN_COLUMNS if not short or c[0] in SHORT_COLUMNS]
    lines = ["| variant | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, v in rec["variants"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(v.get(k), s, f) for k, _, s, f in cols) + " |")
    t = rec.get("timings", {})
    wall = rec["provenance"].get("wall_s")
    reduced = [n for n, v in rec["variants"].items() if (v.get("int8") or {}).get("reduced_range")]
    if reduced:
        lines += [
            "",
            f"INT8 activations in 0..127 (reduced range, exact without VNNI) for {', '.join(reduced)}.",
        ]
    lines += [
        "",
        provenance(rec, rec["versions"]["torch"], rec["machine"].get("threads", "?"))
        + (f" Wall time {wall:.0f} s" if wall else "")
        + (
            f" (BNN fit {t['bnn_fit']:.0f} s, evaluation {t['evaluation']:.0f} s)."
            if "bnn_fit" in t and "evaluation" in t
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def _bench_rows(rec: dict) -> tuple[list[int], dict]:
    res = rec["results"]
    return sorted({r["batch_size"] for r in res}), {(r["variant"], r["batch_size"]): r for r in res}


def bench(short: bool = False) -> str:
    rec = load("bench.json")
    batches, by = _bench_rows(rec)
    cfg = rec["config"]
    lines = []
    pairs = [("bnn_fp32", "qbnn_int8_fresh")] + ([] if short else [("bnn_fp32_bank", "qbnn_int8_bank")])
    for fp, q in pairs:
        if not all((fp, b) in by and (q, b) in by for b in batches):
            continue
        lines += [
            f"| batch size | BNN FP32 (`{fp}`) img/s | QBNN INT8 (`{q}`) img/s | speed-up |",
            "|---|---|---|---|",
        ]
        for b in batches:
            f, i = by[(fp, b)]["images_per_s"], by[(q, b)]["images_per_s"]
            lines.append(f"| {b} | {f:.1f} | {i:.1f} | {i / f:.2f}x |")
        lines.append("")
    if not short:
        variants = list(dict.fromkeys(r["variant"] for r in rec["results"]))
        lines += [
            "| variant | " + " | ".join(f"batch {b} img/s" for b in batches) + " | size MiB |",
            "|---|" + "---|" * (len(batches) + 1),
        ]
        for v in variants:
            cells = [f"{by[(v, b)]['images_per_s']:.1f}" if (v, b) in by else "-" for b in batches]
            lines.append(
                f"| `{v}` | " + " | ".join(cells) + f" | {by[(v, batches[-1])]['size_bytes'] / 2**20:.1f} |"
            )
        lines.append("")
    what = (
        f"{cfg['arch']} {cfg['image_size']}x{cfg['image_size']}, {cfg['mc_samples']} MC sample per image, "
        f"INT8 backend {cfg['backend']}, medians of up to {cfg['reps']} interleaved repetitions"
    )
    lines.append(what + ". " + provenance(rec, rec["machine"]["torch"], cfg["threads"]))
    return "\n".join(lines) + "\n"


def resident() -> str:
    """ResNet-50 resident memory (each variant alone in a process) and throughput, one qbdl.bench run."""
    rec = load("bench_resident.json")
    batches, by = _bench_rows(rec)
    cfg = rec["config"]
    variants = list(dict.fromkeys(r["variant"] for r in rec["results"]))
    lines = [
        "| variant | file / state dict MiB | resident MiB over the imports | vs FP32 BNN | vs INT8 DNN | "
        + " | ".join(f"img/s batch {b} (/ INT8 DNN)" for b in batches) + " |",
        "|---|---|---|---|---|" + "---|" * len(batches),
    ]
    for v in variants:
        last = by[(v, batches[-1])]
        res, dnn = last.get("resident_bytes"), by.get(("dnn_int8", batches[-1]), {}).get("resident_bytes")
        cells = []
        for b in batches:
            r, d = by.get((v, b)), by.get(("dnn_int8", b))
            ratio = f" ({r['images_per_s'] / d['images_per_s']:.2f})" if r and d and v != "dnn_int8" else ""
            cells.append("-" if r is None else f"{r['images_per_s']:.1f}{ratio}")
        lines.append(
            f"| `{v}` | {last['size_bytes'] / 2**20:.1f} | {_cell(res, 2**-20, '{:.0f}')} | "
            f"{_cell(last.get('resident_vs_bnn_fp32'), 1, '{:.2f}x')} | "
            f"{'-' if not (res and dnn) else f'{res / dnn:.2f}x'} | " + " | ".join(cells) + " |"
        )
    what = (
        f"\n{cfg['arch']} {cfg['image_size']}x{cfg['image_size']}, {cfg['num_classes']} classes, random weights, "
        f"MOPED delta {cfg['moped_delta']}, medians of up to {cfg['reps']} interleaved repetitions"
    )
    return "\n".join(lines) + "\n" + what + ". " + provenance(rec, rec["machine"]["torch"], cfg["threads"]) + "\n"


DEPLOY_LABELS = {
    "qbdl_qdnn": "qbdl det INT8 (`qdnn`, oneDNN)",
    "qbdl_qbnn_fresh": "qbdl QBNN (`fresh`)",
    "qbdl_qbnn_bank": "qbdl QBNN (`bank`)",
    "torch_bnn": "torch FP32 BNN",
    "ort_qdnn": "ONNX Runtime det INT8",
    "ort_qbnn": "ONNX Runtime QBNN, Flipout (exact)",
    "ort_qbnn_fast": "ONNX Runtime QBNN, Flipout (`--approximate`)",
    "ort_qbnn_bank": "ONNX Runtime QBNN, bank",
    "ov_qdnn": "OpenVINO det INT8",
    "ov_qbnn": "OpenVINO QBNN, Flipout (exact)",
    "ov_qbnn_fast": "OpenVINO QBNN, Flipout (`--approximate`)",
    "ov_qbnn_bank": "OpenVINO QBNN, bank",
}


def _deploy_det(variant: str) -> str | None:
    """The deterministic INT8 network of the same runtime (the ratio's denominator)."""
    head = variant.split("_", 1)[0]
    return {"qbdl": "qbdl_qdnn", "ort": "ort_qdnn", "ov": "ov_qdnn"}.get(head) if "qbnn" in variant else None


def _deploy_machine(rec: dict) -> str:
    m, p = rec["machine"], rec["provenance"]
    isa = ", ".join(f for f in m["isa"] if f.startswith(("avx2", "avx512f", "avx512_vnni", "amx")))
    v = m.get("versions", {})
    return (
        f"Measured with `{p['command']}` on {m['cpu']} ({m['cores']} cores; {isa}; VNNI: {'yes' if m['vnni'] else 'no'}), "
        f"{rec['threads']} threads, every variant in its own process, timed round-robin, medians of {rec['rounds']} "
        f"rounds; ONNX Runtime {v.get('onnxruntime')}, OpenVINO {v.get('openvino')}, torch {v.get('torch')}, "
        f"commit `{p['commit'][:7]}`, {p['date']}" + (f"; {p['note']}" if p.get("note") else "") + "."
    )


def deploy(short: bool = False) -> str:
    """The exported models beside qbdl's engine (docs/data/bench_export.json of python -m qbdl.export.bench)."""
    rec = load("bench_export.json")
    res, batches = rec["results"], [str(b) for b in rec["batch_sizes"]]

    def rate(name: str, b: str) -> float | None:
        return res[name]["img_per_s"].get(b) if name in res else None

    lines = [
        "| variant | S | " + " | ".join(f"img/s, batch {b}" for b in batches)
        + " | / same runtime's det INT8 | RSS over imports (MiB) | file (MiB) |",
        "|---|---|" + "---|" * len(batches) + "---|---|---|",
    ]
    for name, r in res.items():
        variant = name.rsplit("_S", 1)[0] if "_S" in name else name
        if short and (r["samples"] != 1 or variant.endswith(("_fast", "_qbnn")) or variant == "qbdl_qbnn_bank"):
            continue
        det = _deploy_det(variant)
        ratio = "-"
        if det in res:
            ratio = " / ".join(
                f"{rate(name, b) / rate(det, b):.2f}x" if rate(name, b) and rate(det, b) else "-" for b in batches
            )
        label = DEPLOY_LABELS.get(variant, variant) + (f" K={rec['bank_size']}" if variant.endswith("bank") else "")
        cells = " | ".join(f"{rate(name, b):.1f}" if rate(name, b) else "-" for b in batches)
        lines.append(f"| {label} | {r['samples']} | {cells} | {ratio} | {r['rss_over_imports_mib']:.0f} | "
                     f"{r['file_mib']:.1f} |")  # fmt: skip
    lines += ["", _deploy_machine(rec)]
    if not short:
        lines += ["", *_deploy_targets(res, batches)]
    return "\n".join(lines) + "\n"


def _deploy_targets(res: dict, batches: list[str]) -> list[str]:
    """Issue 30's targets against this record: ratios within one run, memory against torch's FP32 BNN."""
    out = ["| target | measured | met |", "|---|---|---|"]

    def r(n: str, b: str) -> float:
        return res[n]["img_per_s"][b]

    for q in ("ort_qbnn_bank_S1", "ov_qbnn_bank_S1", "ort_qbnn_fast_S1", "ov_qbnn_fast_S1"):
        det = _deploy_det(q.rsplit("_S", 1)[0])
        if q in res and det in res and {"1", "32"} <= set(batches):
            a, b = r(q, "1") / r(det, "1"), r(q, "32") / r(det, "32")
            out.append(f"| {DEPLOY_LABELS[q[:-3]]} S = 1, >= 0.5x / >= 0.8x its det INT8 at batch 1 / 32 | "
                       f"{a:.2f}x / {b:.2f}x | {'yes' if a >= 0.5 and b >= 0.8 else 'no'} |")  # fmt: skip
    qb = [n for n in res if "qbnn" in n and n.endswith("_S1")]
    if "qbdl_qdnn" in res and qb:
        for b in batches:
            best = max(qb, key=lambda n: r(n, b))
            met = r(best, b) >= r("qbdl_qdnn", b)
            out.append(f"| fastest QBNN (S = 1) >= qbdl's det INT8, batch {b} | {DEPLOY_LABELS[best[:-3]]} "
                       f"{r(best, b):.1f} vs {r('qbdl_qdnn', b):.1f} img/s | {'yes' if met else 'no'} |")  # fmt: skip
    for q in ("ort_qbnn_bank_S1", "ort_qbnn_S1"):
        if q in res and "torch_bnn_S1" in res:
            m = res[q]["rss_over_imports_mib"] / res["torch_bnn_S1"]["rss_over_imports_mib"]
            out.append(f"| {DEPLOY_LABELS[q[:-3]]} resident memory <= 0.35x the torch FP32 BNN's | "
                       f"{res[q]['rss_over_imports_mib']:.0f} / {res['torch_bnn_S1']['rss_over_imports_mib']:.0f} MiB = "
                       f"{m:.2f}x | {'yes' if m <= 0.35 else 'no'} |")  # fmt: skip
    return out


FIDELITY_METRICS = [("accuracy", "accuracy pt", 100), ("nll", "NLL", 1), ("uce", "UCE pt", 100),
                    ("brier", "Brier", 1), ("ood_auroc/photos", "AUROC photos pt", 100),
                    ("ood_auroc/rotated", "AUROC rotated pt", 100)]  # fmt: skip


def _measured_where(rec: dict) -> str:
    """'Measured with `command` on CPU (family/model; ISA), torch T, commit `c`, date' of a fidelity record."""
    m, p = rec["machine"], rec["provenance"]
    return (f"Measured with `{p['command']}` on {m['cpu']} (family/model {m.get('family_model')}; "
            f"{', '.join(_isa(m))}), torch {rec['versions']['torch']}, commit `{p['commit'][:7]}`, {p['date']}")  # fmt: skip


def fidelity_seeds() -> str:
    """Gap QBNN - BNN / MC floor per run and metric (docs/data/fidelity_seeds.json), bold beyond the floor."""
    rec = load("fidelity_seeds.json")
    lines = ["| task, seed | " + " | ".join(c[1] for c in FIDELITY_METRICS) + " |",
             "|---|" + "---|" * len(FIDELITY_METRICS)]  # fmt: skip
    for r in rec["runs"]:
        cells = []
        for key, _, k in FIDELITY_METRICS:
            g = r["gap"][key]
            text = f"{g['gap'] * k:+.2f} / {g['mc_floor'] * k:.2f}" if k != 1 else f"{g['gap']:+.3f} / {g['mc_floor']:.3f}"
            cells.append(f"**{text}**" if abs(g["gap"]) > g["mc_floor"] else text)
        lines.append(f"| {r['task']}, {r['seed']} | " + " | ".join(cells) + " |")
    lines += ["", f"{_measured_where(rec)}; {rec['provenance']['note']}."]
    return "\n".join(lines) + "\n"


def speed_ab() -> str:
    """det INT8 / fresh QBNN img/s and their ratio per batch size, runs of two commits alternating (bench_ab.json)."""
    rec = load("bench_ab.json")
    batches = sorted({r["batch_size"] for run in rec["runs"] for r in run["results"]})
    lines = ["| run | commit | " + " | ".join(f"batch {b}: det / fresh img/s (ratio)" for b in batches) + " |",
             "|---|---|" + "---|" * len(batches)]  # fmt: skip
    for run in rec["runs"]:
        ips = {(r["variant"], r["batch_size"]): r["images_per_s"] for r in run["results"]}
        cells = [f"{ips['dnn_int8', b]:.1f} / {ips['qbnn_int8_fresh', b]:.1f} "
                 f"({ips['qbnn_int8_fresh', b] / ips['dnn_int8', b]:.2f})" for b in batches]  # fmt: skip
        lines.append(f"| {run['label']} | `{run['commit'][:7]}` | " + " | ".join(cells) + " |")
    m, p = rec["machine"], rec["provenance"]
    lines += ["", f"Measured with `{p['command']}` (each run its own process, the commits in turn) on "
              f"{m['cpu']} (family/model {m.get('family_model')}; {', '.join(_isa(m))}), {m['threads']} threads, "
              f"torch {m['torch']}, {p['date']}; {p['note']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _isa(machine: dict) -> list[str]:
    keep = ("avx2", "avx512f", "avx512_vnni", "avx512vbmi", "amx_int8")
    return [f for f in keep if f in machine.get("isa", [])] or machine.get("isa", [])


def one_machine(machines: list[dict], same: tuple[str, ...], kind: str) -> dict:
    """The machine of records that must share `same` (ValueError otherwise); one naming its family/model if any."""
    if len({tuple(str(m.get(k)) for k in same) for m in machines}) > 1:
        raise ValueError(f"these {kind} files come from different machines ({', '.join(same)} differ): keep one's")
    return next((m for m in machines if m.get("family_model")), machines[0])


def import_bench_ab(specs: list[str], command: str, note: str) -> None:
    """Keep qbdl.bench runs (LABEL:COMMIT:BENCH_JSON each, in the order run) as docs/data/bench_ab.json."""
    import time

    runs, machines = [], []
    for spec in specs:
        label, commit, path = spec.split(":", 2)
        d = json.loads(Path(path).read_text())
        machines.append(d["machine"])
        keep = ("variant", "batch_size", "images_per_s", "median_s", "min_s", "max_s", "reps")
        runs.append({"label": label, "commit": commit, "results": [{k: r[k] for k in keep} for r in d["results"]]})
    machine = one_machine(machines, ("cpu", "isa", "threads"), "bench.json")
    rec = {"runs": runs, "machine": machine,
           "provenance": {"command": command, "date": time.strftime("%Y-%m-%d"), "note": note}}  # fmt: skip
    (DATA / "bench_ab.json").write_text(json.dumps(rec, indent=1) + "\n")


def _draws_columns(runs: list[dict]) -> list[tuple[str, str, int]]:
    """FIDELITY_METRICS' in-distribution columns, then one AUROC column per OOD set the runs carry."""
    cols = [c for c in FIDELITY_METRICS if not c[0].startswith("ood_auroc/")]
    ood = dict.fromkeys(k for r in runs for k in r["metrics"] if k.startswith("ood_auroc/"))
    return cols + [(k, f"AUROC {k.split('/', 1)[1]} pt", 100) for k in ood]


def fidelity_draws(name: str = "fidelity_draws.json") -> str:
    """Mean gap QBNN - BNN +- half its interval / MC floor per run and metric (docs/data/fidelity_draws*.json)."""
    rec = load(name)
    columns = _draws_columns(rec["runs"])
    lines = ["| task, seed | draws x S | " + " | ".join(c[1] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]  # fmt: skip
    counts: dict[str, int] = {}
    for r in rec["runs"]:
        cells = []
        for key, _, k in columns:
            g = r["metrics"].get(key)
            if g is None:
                cells.append("–")
                continue
            nd = 2 if k != 1 else 3
            half = (g["hi"] - g["lo"]) / 2
            text = f"{g['diff'] * k:+.{nd}f} ± {half * k:.{nd}f} / {g['floor'] * k:.{nd}f}"
            counts[g["verdict"]] = counts.get(g["verdict"], 0) + 1
            cells.append({"within": text, "undecided": f"_{text}_", "beyond": f"**{text}**"}[g["verdict"]])
        lines.append(f"| {r['task']}, {r['seed']} | {r['draws']} x {r['mc_samples']} | " + " | ".join(cells) + " |")
    tally = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("within", "undecided", "beyond"))
    lines += ["", f"Cells: {tally} (plain: the {int(100 * rec['runs'][0]['level'])}% interval lies inside the "
              "floor; _italic_: undecided; **bold**: wholly beyond it).",
              "", f"{_measured_where(rec)}; {rec['provenance']['note']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


#: The draws records in docs/data (tables fidelity-draws, fidelity-draws-mnist); the README sentence counts all.
DRAWS_RECORDS = ("fidelity_draws.json", "fidelity_draws_mnist.json")


def fidelity_draws_short() -> str:
    """One sentence for the README: how many metric gaps the draws records show within, beyond, undecided."""
    recs = [load(name) for name in DRAWS_RECORDS if (DATA / name).exists()]
    if not recs:
        load("fidelity_draws.json")  # raises: the table says how to make the record
    runs = [r for rec in recs for r in rec["runs"]]
    verdicts = [r["metrics"][k]["verdict"] for r in runs for k, _, _ in _draws_columns([r])]
    tasks = sorted({r["task"] for r in runs})
    where = "; ".join(f"{', '.join(sorted({r['task'] for r in rec['runs']}))}: {_measured_where(rec)}" for rec in recs)
    return (
        f"Fidelity, QBNN against BNN over independent MC draws ({', '.join(tasks)}; {len(runs)} runs, "
        f"{len(verdicts)} metric gaps): {verdicts.count('within')} shown within the MC floor, "
        f"{verdicts.count('undecided')} undecided, {verdicts.count('beyond')} beyond "
        f"([Memory](docs/memory.md#fidelity-over-mc-draws)). {where}.\n"
    )


def head_commit() -> str:
    """git HEAD of this checkout: the commit a record is kept at unless told otherwise."""
    import subprocess

    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def import_fidelity_draws(
    specs: list[str], command: str, commit: str | None, note: str, name: str = "fidelity_draws.json"
) -> None:
    """Keep fidelity_draws.json files (TASK:SEED:PATH each) as docs/data/NAME (one of DRAWS_RECORDS)."""
    if name not in DRAWS_RECORDS:
        raise ValueError(f"{name!r} is not a draws record; known: {DRAWS_RECORDS}")
    import time

    runs, machines = [], []
    for spec in specs:
        task, seed, path = spec.split(":", 2)
        d = json.loads(Path(path).read_text())
        machines.append(d["machine"])
        keep = ("draws", "mc_samples", "level", "n_test", "seconds", "metrics")
        runs.append({"task": task, "seed": int(seed), **{k: d[k] for k in keep}})
    machine = one_machine(machines, ("cpu", "isa"), name)
    commit = commit or head_commit()
    rec = {
        "runs": runs,
        "machine": {k: machine[k] for k in ("cpu", "family_model", "isa") if k in machine},
        "versions": {"torch": machine.get("torch")},
        "provenance": {"command": command, "commit": commit, "date": time.strftime("%Y-%m-%d"), "note": note},
    }
    (DATA / name).write_text(json.dumps(rec, indent=1) + "\n")


def _dur(s: float) -> str:
    if s >= 86400 * 365:
        return f"{s / (86400 * 365):.1f} years"
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


# ImageNet-1k at imagenet_ptq's settings, for scaling the smoke run's probe to the full run
IMAGENET_FULL = {"train": 1_268_356, "val": 12_811, "test": 50_000, "epochs": 50, "mc": 16, "shift_sets": 65}


def _scaled_imagenet(est: dict, batch: int) -> dict:
    """The full imagenet_ptq from the smoke run's probe: per-image train and forward times x real counts."""
    f = IMAGENET_FULL
    per_train = est["per_batch"]["bnn_train_step"] / batch
    fwd = est["per_image_forward"]
    n_eval = f["test"] * (1 + f["shift_sets"]) + f["val"]  # test + corrupted copies + val (for _ts)
    ev = {v: fwd[v] * (f["mc"] if v in ("bnn", "qbnn") else 1) * n_eval for v in est["seconds"]["evaluation"]}
    s = {
        "dnn_fit": 0.0,
        "bnn_fit": per_train * f["train"] * f["epochs"] + fwd["bnn"] * f["val"] * f["epochs"],
        "calibration": est["seconds"]["calibration"] * 32 / 4,  # 32 calibration batches instead of 4
        "evaluation": ev,
    }
    s["total"] = s["bnn_fit"] + s["calibration"] + sum(ev.values())
    return s


def estimates() -> str:
    rec = load("estimates.json")
    smoke = rec["experiments"]["imagenet_ptq_smoke"]
    cols = {"`imagenet_ptq_smoke` (the run's estimate)": smoke["estimate"]["seconds"]}
    cols["`imagenet_ptq` (the same probe x its sizes)"] = _scaled_imagenet(
        smoke["estimate"], smoke["batch_size"]
    )
    lines = ["| stage | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in ("dnn_fit", "bnn_fit", "calibration"):
        lines.append(f"| {k.replace('_', ' ')} | " + " | ".join(_dur(s[k]) for s in cols.values()) + " |")
    for v in smoke["estimate"]["seconds"]["evaluation"]:
        lines.append(
            f"| evaluate `{v}` | " + " | ".join(_dur(s["evaluation"][v]) for s in cols.values()) + " |"
        )
    lines.append("| **total** | " + " | ".join(f"**{_dur(s['total'])}**" for s in cols.values()) + " |")
    sz = smoke["sizes"]
    lines += [
        "",
        f"`imagenet_ptq_smoke`: {sz['train']:,} training, {sz['val']:,} validation and {sz['test']:,} test images, "
        f"{smoke['epochs']['bnn']} BNN epoch, {smoke['mc_samples']} MC samples, {smoke['shift_sets']} shifted sets "
        f"(of 100 images). `imagenet_ptq` (scaled): {IMAGENET_FULL['train']:,} / {IMAGENET_FULL['val']:,} / "
        f"{IMAGENET_FULL['test']:,} images, {IMAGENET_FULL['epochs']} BNN epochs, {IMAGENET_FULL['mc']} MC samples, "
        f"{IMAGENET_FULL['shift_sets']} shifted sets of the 50,000 test images; data loading, corruption rendering "
        "and checkpoints are not included. "
        + provenance(
            rec, rec["machine"]["torch"], rec["machine"]["threads"], verb="Estimated from a probe run"
        ),
    ]
    return "\n".join(lines) + "\n"


def paper_vs_qbdl() -> str:
    """The paper's quantities beside the nearest runs qbdl does here (README)."""
    run = load("results.json")
    v = run["variants"]
    if (DATA / "bench.json").exists():
        b = load("bench.json")
        batches, by = _bench_rows(b)
        speed = " / ".join(
            f"{by[('qbnn_int8_fresh', n)]['images_per_s'] / by[('bnn_fp32', n)]['images_per_s']:.1f}x"
            for n in batches
        )
        bench_where = (
            f"random weights, {b['config']['arch']} {b['config']['image_size']}x{b['config']['image_size']}, "
            f"batch {' / '.join(map(str, batches))} · {_cpu(b['machine'])}, "
            f"{b['config']['threads']} threads · `{b['provenance']['command']}`"
        )
    else:
        speed, bench_where = "not recorded yet", "`python -m qbdl.bench` ([Benchmark](docs/benchmark.md))"
    pt = lambda k: f"{100 * (v['qbnn'][k] - v['bnn'][k]):+.2f} pt"  # noqa: E731
    both = lambda k, s, f: f"{f.format(s * v['bnn'][k])} / {f.format(s * v['qbnn'][k])}"  # noqa: E731
    digits = f"digits 16x16, ResNet-20 · {_cpu(run['machine'])} · `{run['provenance']['command']}`"
    paper = load("paper.json")
    cell = lambda k: paper["values"][k]["cell"]  # noqa: E731
    rows = [
        ("INT8 QBNN / FP32 BNN throughput", cell("throughput_speedup"), speed, bench_where),
        ("accuracy, QBNN − BNN", cell("accuracy"), pt("accuracy"), digits),
        ("UCE, QBNN − BNN", cell("uncertainty"), pt("uce"), digits),
        (
            "referral rate to 99.5% accuracy, BNN / QBNN",
            cell("referral"),
            both("referral_rate_at_target", 100, "{:.1f}%"),
            digits,
        ),
        (
            "OOD AUROC by entropy, BNN / QBNN",
            cell("ood_auroc"),
            both("ood_auroc", 1, "{:.3f}"),
            digits + ", OOD = photo patches",
        ),
        (
            "model size, QBNN / BNN",
            cell("model_size"),
            f"{v['qbnn']['size_bytes'] / v['bnn']['size_bytes']:.2f}x",
            digits,
        ),
    ]
    lines = ["| quantity | paper (Lin et al. 2023) | qbdl | data · machine · command |", "|---|---|---|---|"]
    lines += [f"| {a} | {p} | {q} | {w} |" for a, p, q, w in rows]
    src = paper["sources"]["abstract"]["urls"][0]
    reach = (
        ""
        if paper["full_text"]["reachable"]
        else (
            "; the full text (its tables and figures) was not reachable, so no other value of the paper is given"
        )
    )
    lines += [
        "",
        f"Paper column: from the paper's [abstract]({src}){reach} "
        "([Reproduce the paper](docs/reproduce.md#the-papers-figures) lists the sources; `docs/data/paper.json` keeps them).",
    ]
    return "\n".join(lines) + "\n"


SEED_COLUMNS = [
    ("accuracy", "accuracy %", 100, "{:.2f}"),
    ("nll", "NLL", 1, "{:.4f}"),
    ("ece", "ECE %", 100, "{:.2f}"),
    ("uce", "UCE %", 100, "{:.2f}"),
    ("referral_rate_at_target", "referral %", 100, "{:.1f}"),
    ("augrc", "AUGRC %", 100, "{:.3f}"),
    ("ood_far_auroc", "far OOD AUROC", 1, "{:.3f}"),
    ("ood_near_auroc", "near OOD AUROC", 1, "{:.3f}"),
    ("resident_bytes", "mem MiB", 2**-20, "{:.2f}"),
    ("size_bytes", "file MiB", 2**-20, "{:.2f}"),
]
PASSES = {"dnn": 1, "qdnn": 1, "bnn": 8, "bnn_mean": 1, "qbnn": 8, "ens": 4, "qens": 4, "mcd": 8, "qmcd": 8,
          "lla": 1, "qlla": 1}  # fmt: skip


def baselines_seeds() -> str:
    """Mean ± sd over the seeds of the digits baselines study."""
    rec = load("baselines_seeds.json")
    cols = SEED_COLUMNS
    lines = [
        "| variant | passes | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name, stats in rec["stats"].items():
        cells = []
        for key, _, scale, fmt in cols:
            s = stats.get(key)
            cells.append(
                "-" if s is None else f"{fmt.format(s['mean'] * scale)} ± {fmt.format(s['std'] * scale)}"
            )
        passes = PASSES.get(name.removesuffix("_ts"), "-")
        lines.append(f"| {name} | {passes} | " + " | ".join(cells) + " |")
    n = len(rec["seeds"])
    lines += [
        "",
        provenance(rec, rec["versions"]["torch"], rec["machine"].get("threads", "?")) + f" {n} seeds.",
    ]
    return "\n".join(lines) + "\n"


CLAIM_METRICS = {
    "accuracy": ("accuracy", 100, "pt"),
    "nll": ("NLL", 1, ""),
    "ece": ("ECE", 100, "pt"),
    "uce": ("UCE", 100, "pt"),
    "augrc": ("AUGRC", 100, "pt"),
    "referral_rate_at_target": ("referral", 100, "pt"),
    "ood_far_auroc": ("far OOD AUROC", 1, ""),
    "ood_near_auroc": ("near OOD AUROC", 1, ""),
}


def baselines_claims() -> str:
    """The seed report's paired claims of qbnn against each INT8 baseline."""
    rec = load("baselines_seeds.json")
    lines = ["| claim | metric | qbnn - other [95% CI] | margin | p | verdict |", "|---|---|---|---|---|---|"]
    for c in rec["claims"]:
        if c["a"] != "qbnn" or c["b"] not in ("qens", "qmcd", "qlla") or c["metric"] not in CLAIM_METRICS:
            continue
        label, scale, unit = CLAIM_METRICS[c["metric"]]
        sym = {"equivalence": "≡", "difference": "≠"}.get(c["kind"], ">" if c["better"] == "higher" else "<")
        f = "{:+.2f}" if scale == 100 else "{:+.4f}"
        diff = f"{f.format(c['mean'] * scale)} [{f.format(c['lo'] * scale)}, {f.format(c['hi'] * scale)}]"
        margin = f"±{c['margin'] * scale:g}" if c.get("margin") else "-"
        lines.append(
            f"| qbnn {sym} {c['b']} | {label} | {diff}{(' ' + unit) if unit else ''} | {margin} | {c['p']:.3g} | {c['verdict']} |"
        )
    return "\n".join(lines) + "\n"


RENDERERS = {
    "paper-vs-qbdl": paper_vs_qbdl,
    "default-run": default_run,
    "default-run-short": lambda: default_run(short=True),
    "bench": bench,
    "estimates": estimates,
    "baselines-seeds": baselines_seeds,
    "baselines-claims": baselines_claims,
    "deploy": deploy,
    "fidelity-seeds": fidelity_seeds,
    "fidelity-draws": fidelity_draws,
    "fidelity-draws-mnist": lambda: fidelity_draws("fidelity_draws_mnist.json"),
    "fidelity-draws-short": fidelity_draws_short,
    "speed-ab": speed_ab,
    "deploy-short": lambda: deploy(short=True),
    "resident": resident,
}


MISSING = {
    "paper.json": "docs/data/paper.json` (the paper's values with their sources, kept by hand) in place: see `docs/reproduce.md",
    "bench.json": "python -m qbdl.bench` then `python scripts/docs_tables.py --import-bench bench/.../bench.json",
    "estimates.json": "python scripts/paper_estimates.py imagenet_ptq_smoke",
    "baselines_seeds.json": "python -m qbdl.run -m +experiment=digits_baselines seed=0,1,2,3,4` and `python -m qbdl.report DIR",
    "fidelity_seeds.json": "python -m qbdl.fidelity RUN_DIR --floor-seeds 3` on three seeds of each task (docs/memory.md",
    "bench_ab.json": "python -m qbdl.bench 'variants=[dnn_int8,qbnn_int8_fresh]'` at two commits, alternating, then `python scripts/docs_tables.py --import-bench-ab LABEL:COMMIT:bench.json ...",
    "fidelity_draws.json": "python -m qbdl.fidelity RUN_DIR --draws R` on three seeds of each task, then `python scripts/docs_tables.py --import-fidelity-draws TASK:SEED:RUN_DIR/fidelity_draws.json ...",
    "fidelity_draws_mnist.json": "python -m qbdl.fidelity RUN_DIR --draws R` on three seeds of mnist_ptq, then `python scripts/docs_tables.py --draws-record fidelity_draws_mnist.json --import-fidelity-draws mnist:SEED:RUN_DIR/fidelity_draws.json ...",
    "bench_export.json": "python -m qbdl.export.bench ...` then `python scripts/docs_tables.py --import-export-bench .../bench_export.json",
    "bench_resident.json": "python -m qbdl.bench 'variants=[dnn_int8,bnn_fp32,qbnn_int8_fresh]'` then `python scripts/docs_tables.py --import-resident-bench bench/.../bench.json",
    "results.json": "python -m qbdl.run` then `python scripts/docs_tables.py --import-results .../results.json",
}


def _missing(name: str) -> str:
    return f"No record in `docs/data/{name}` yet: run `{MISSING[name]}`.\n"


def render_file(text: str) -> str:
    """The text with every table block re-rendered from its JSON."""

    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name not in RENDERERS:
            raise ValueError(f"unknown table {name!r}; known: {sorted(RENDERERS)}")
        try:
            body = RENDERERS[name]()
        except FileNotFoundError as exc:  # a record not measured yet: the table says how to make it
            body = _missing(Path(exc.filename).name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(sub, text)


RESULTS_KEYS = (
    "variants",
    "ood_groups",
    "temperatures",
    "data",
    "machine",
    "versions",
    "timings",
    "estimate",
)


def import_record(
    src: Path, name: str, command: str, commit: str | None, note: str, wall_s: float | None
) -> None:
    """Copy a results.json / bench.json into docs/data/NAME with its provenance (commit: git HEAD by default)."""
    import time

    rec = json.loads(Path(src).read_text())
    if name == "results.json":
        rec = {k: rec[k] for k in RESULTS_KEYS if k in rec}
    commit = commit or head_commit()
    rec["provenance"] = {
        "command": command,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime(Path(src).stat().st_mtime)),
        "note": note,
    } | ({"wall_s": wall_s} if wall_s else {})
    (DATA / name).write_text(json.dumps(rec, indent=1, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a table is stale")
    ap.add_argument("--import-results", metavar="RESULTS_JSON", help="a default run's results.json to keep")
    ap.add_argument("--import-bench", metavar="BENCH_JSON", help="a python -m qbdl.bench bench.json to keep")
    ap.add_argument("--import-export-bench", metavar="JSON", help="a python -m qbdl.export.bench bench_export.json")
    ap.add_argument("--import-resident-bench", metavar="BENCH_JSON", help="a ResNet-50 qbdl.bench run (memory)")
    ap.add_argument("--import-fidelity-draws", nargs="+", metavar="TASK:SEED:JSON", help="fidelity_draws.json files")
    ap.add_argument("--draws-record", default=DRAWS_RECORDS[0], choices=DRAWS_RECORDS, help="what it writes")
    ap.add_argument("--import-bench-ab", nargs="+", metavar="LABEL:COMMIT:JSON", help="qbdl.bench runs of 2 commits")
    ap.add_argument("--command", help="the command that produced it (default: the plain one)")
    ap.add_argument("--commit", help="the commit it ran (default: git HEAD)")
    ap.add_argument("--note", default="", help="a remark printed with the table (e.g. the machine's load)")
    ap.add_argument("--wall-s", type=float, help="the run's wall time in seconds")
    args = ap.parse_args(argv)
    if args.import_results:
        cmd = args.command or "python -m qbdl.run"
        import_record(Path(args.import_results), "results.json", cmd, args.commit, args.note, args.wall_s)
    if args.import_bench:
        cmd = args.command or "python -m qbdl.bench"
        import_record(Path(args.import_bench), "bench.json", cmd, args.commit, args.note, args.wall_s)
    if args.import_resident_bench:
        cmd = args.command or "python -m qbdl.bench"
        import_record(Path(args.import_resident_bench), "bench_resident.json", cmd, args.commit, args.note, args.wall_s)
    if args.import_export_bench:
        rec = json.loads(Path(args.import_export_bench).read_text())
        cmd = args.command or rec.get("command", "python -m qbdl.export.bench")
        import_record(Path(args.import_export_bench), "bench_export.json", cmd, args.commit, args.note, args.wall_s)
    if args.import_bench_ab:
        cmd = args.command or "python -m qbdl.bench"
        import_bench_ab(args.import_bench_ab, cmd, args.note)
    if args.import_fidelity_draws:
        cmd = args.command or "python -m qbdl.fidelity RUN_DIR --draws R"
        import_fidelity_draws(args.import_fidelity_draws, cmd, args.commit, args.note, args.draws_record)
    stale = []
    for path in FILES:
        text = path.read_text()
        new = render_file(text)
        if new != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(new)
    if stale:
        print(("stale: " if args.check else "written: ") + ", ".join(stale))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
