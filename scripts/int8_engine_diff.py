"""Compare the integers two qbdl checkouts' INT8 graphs compute, layer by layer, for every sampler.

    PYTHONPATH=/path/to/checkout/src python scripts/int8_engine_diff.py dump old.pt
    python scripts/int8_engine_diff.py dump new.pt
    python scripts/int8_engine_diff.py compare old.pt new.pt

`dump` builds resnet20 (32x32 inputs) and resnet18/resnet50 (64x64) from fixed seeds, converts them to BNNs
(MOPED), quantizes the DNN (qdnn) and the BNN with every sampler (mean, fresh with each kernel, bank, flipout) on
fixed calibration batches, and records the integer output of every quantize / conv / linear / add module
(in graph order) and the logits, at batch 2 and 5, two MC samples each. Only public qbdl API is used, so the
same script runs against an older checkout.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def _ints(t: torch.Tensor) -> torch.Tensor:
    return t.int_repr() if t.is_quantized else t.clone()


def _models() -> dict[str, tuple[nn.Module, int]]:
    from qbdl.models.resnet import resnet18, resnet20, resnet50

    out = {}
    for name, build, size in (
        ("resnet20", resnet20, 32),
        ("resnet18", resnet18, 64),
        ("resnet50", resnet50, 64),
    ):
        torch.manual_seed(0)
        m = build(num_classes=10)
        g = torch.Generator().manual_seed(1)
        for mod in m.modules():  # non-trivial BN statistics: folding must matter
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.data.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
        out[name] = (m.eval(), size)
    return out


def _record(q: nn.Module, x: torch.Tensor, seed: int, samples: int = 2) -> list:
    from qbdl.bayes.predict import set_mc_index
    from qbdl.quant import QAdd, Quantize, QuantLayer

    rows: list = []
    hooks = [
        m.register_forward_hook(
            lambda mod, a, y, n=n: rows[-1].append((n, type(mod).__name__, _ints(y), [_ints(t) for t in a]))
        )
        for n, m in q.named_modules()
        if isinstance(m, (QAdd, Quantize, QuantLayer))
    ]
    try:
        for s in range(samples):
            rows.append([])
            set_mc_index(q, s)
            torch.manual_seed(seed + s)
            with torch.no_grad():
                rows[-1].append(("logits", "logits", q(x), []))
    finally:
        set_mc_index(q, None)
        for h in hooks:
            h.remove()
    return rows


def dump(path: str) -> None:
    """Write every model's and sampler's integers to `path`."""
    import inspect

    import qbdl
    from qbdl.bayes.convert import dnn_to_bnn
    from qbdl.quant import quantize_bnn

    # checkouts before the rename call the sampler `mode`
    key = "sampler" if "sampler" in inspect.signature(quantize_bnn).parameters else "mode"
    g = torch.Generator().manual_seed(2)
    result = {
        "qbdl": qbdl.__file__,
        "torch": torch.__version__,
        "machine": " ".join(__import__("qbdl.quant.backend", fromlist=["x"]).cpu_caps().isa),
        "runs": {},
    }
    for name, (dnn, size) in _models().items():
        calib = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]
        tests = {b: torch.randn(b, 3, size, size, generator=g) for b in (2, 5)}
        bnn = dnn_to_bnn(dnn)
        variants = {"qdnn": (dnn, {key: "fresh"})}
        variants["mean"] = (bnn, {key: "fresh"})
        variants["fresh"] = (bnn, {key: "fresh"})
        variants["fresh_prepack"] = (bnn, {key: "fresh", "fresh_kernel": "prepack"})
        variants["bank"] = (bnn, {key: "bank", "bank_size": 4})
        variants["flipout"] = (bnn, {key: "flipout", "bank_size": 4})
        for v, (model, kw) in variants.items():
            q = quantize_bnn(model, calib, mc_samples=2, observer="histogram", seed=3, **kw)
            if v == "mean":
                for m in q.modules():
                    if getattr(m, "mode", None) == "sample":
                        m.mode = "mean"
            for b, x in tests.items():
                result["runs"][f"{name}/{v}/b{b}"] = _record(q, x, seed=10)
            print(name, v, flush=True)
    torch.save(result, path)


def compare(a_path: str, b_path: str) -> int:
    """Per run: modules whose inputs were equal in both dumps and whose outputs still differ (the kernels' own
    difference), and how far differences propagated; 0 when every module given equal inputs is exact."""
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    print(
        f"A: {a['qbdl']} torch {a['torch']} ({a['machine']})\nB: {b['qbdl']} torch {b['torch']} ({b['machine']})"
    )
    worst, totals = 0, {}
    for run, rows_a in a["runs"].items():
        rows_b = b["runs"][run]
        lines, same_in, propagated = [], 0, 0
        for s, (ra, rb) in enumerate(zip(rows_a, rows_b)):
            ra = [r for r in ra if r[0] != "logits"] + [r for r in ra if r[0] == "logits"]
            rb = [r for r in rb if r[0] != "logits"] + [r for r in rb if r[0] == "logits"]
            if [r[1] for r in ra] != [r[1] for r in rb]:
                raise SystemExit(
                    f"{run} sample {s}: the graphs differ ({[r[1] for r in ra]} vs {[r[1] for r in rb]})"
                )
            for (na, kind, ta, ia), (_, _, tb, ib) in zip(ra, rb):
                if kind == "logits":
                    d = float((ta - tb).abs().max())
                    if d:
                        lines.append(f"sample {s}: logits max |diff| {d:.3g}")
                    continue
                if not all(torch.equal(x.int(), y.int()) for x, y in zip(ia, ib)):
                    propagated += int(not torch.equal(ta.int(), tb.int()))
                    continue
                same_in += 1
                d = int((ta.int() - tb.int()).abs().max())
                key = kind
                n_diff = int((ta != tb).sum())
                t = totals.setdefault(key, [0, 0, 0])
                t[0], t[1], t[2] = t[0] + n_diff, t[1] + ta.numel(), max(t[2], d)
                if d:
                    lines.append(
                        f"sample {s}: {kind} {na} (equal inputs): {n_diff}/{ta.numel()} differ, max {d} LSB"
                    )
                    worst = max(worst, d)
        head = f"{run}: {same_in} module calls with equal inputs"
        if propagated:
            head += f", {propagated} with inputs changed upstream that differ"
        print(head + ("; all exact" if not lines else "\n  " + "\n  ".join(lines)))
    for kind, (n, tot, d) in totals.items():
        print(f"{kind} given equal inputs: {n}/{tot} integers differ ({n / max(tot, 1):.2e}), max {d} LSB")
    print(f"largest difference of a module given equal inputs: {worst} LSB")
    return 0 if worst == 0 else 1


def main() -> None:
    """CLI: dump OUT | compare A B."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("dump").add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args()
    if args.cmd == "dump":
        dump(args.out)
    else:
        raise SystemExit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
