"""The INT8 kernels (oneDNN ops on plain uint8 / int8 tensors) and their plan: which activation range is exact.

Why a plan: u8 x s8 kernels without VNNI (oneDNN below AVX512_CORE_VNNI / AVX2_VNNI) add pairs of products in
int16 (`vpmaddubsw`) and saturate once two adjacent products exceed 32767, e.g. 255 * 127 * 2. Measured per
kernel on adversarial inputs (tests/test_quant_isa.py): with activations in 0..127 every kernel equals the
integer reference exactly; with 0..255 only VNNI kernels do. So on a CPU (or under an ISA cap) without VNNI a
model quantizes its activations to 0..127 ("reduced range") and clamps them there, which makes every
conv/linear exact; otherwise it keeps the full 0..255.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Both names run the same oneDNN kernels ("x86" is PyTorch's name for its x86 INT8 path).
BACKENDS = ("x86", "onednn")
_REMOVED = ("fbgemm", "qnnpack")
FULL_QMAX, REDUCED_QMAX = 255, 127
# ONEDNN_MAX_CPU_ISA values whose int8 kernels accumulate u8*s8 in int32 (VNNI); the AVX2_VNNI ones need
# the VEX AVX-VNNI instructions (flag avx_vnni), the AVX-512 ones avx512_vnni (or AMX).
_ONEDNN_VNNI_512 = ("AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                    "AVX10_2_512", "AVX10_2_512_AMX_2")  # fmt: skip
_ONEDNN_VNNI_256 = ("AVX2_VNNI", "AVX2_VNNI_2")


def onednn_ops_available() -> bool:
    """True when this torch build has oneDNN's INT8 ops (torch.ops.onednn.qconv_pointwise, x86 builds)."""
    try:
        return hasattr(torch.ops.onednn, "qconv_pointwise") and hasattr(torch.ops.onednn, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def supported_backends() -> list[str]:
    """INT8 backends this torch build runs (both names are oneDNN; none without its INT8 ops)."""
    return list(BACKENDS) if onednn_ops_available() else []


def check_backend(backend: str) -> str:
    """Validate a backend name; ValueError names the fix."""
    if backend in _REMOVED:
        raise ValueError(
            f"quantized backend {backend!r} is gone: it runs only on PyTorch's deprecated quantized tensors "
            "(torch.quint8/qint8), which qbdl no longer uses. Use backend 'x86' (oneDNN's INT8 kernels on plain "
            "integer tensors, exact on every x86 CPU); a model saved with it loads and runs on oneDNN"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantized backend {backend!r}; choose one of {BACKENDS}")
    if not onednn_ops_available():
        raise ValueError(
            f"backend {backend!r} needs oneDNN's INT8 ops (torch.ops.onednn.qconv_pointwise), which this torch "
            f"build ({torch.__version__}) lacks: use an x86 build of torch"
        )
    return backend


# -- CPU capability


@dataclass(frozen=True)
class CpuCaps:
    """What the INT8 kernels of this process can use (CPU flags, narrowed by oneDNN's ISA override)."""

    flags: frozenset[str]
    onednn_vnni: bool  # oneDNN's int8 kernels accumulate u8*s8 in int32

    @property
    def isa(self) -> list[str]:
        """The int8-relevant ISA flags (as `lscpu` spells them), sorted."""
        keep = ("avx2", "fma", "avx512", "avx_vnni", "amx")
        return sorted(f for f in self.flags if f.startswith(keep))

    def as_dict(self) -> dict:
        """JSON-able summary (results.json / bench.json)."""
        return {
            "isa": self.isa,
            "onednn_vnni": self.onednn_vnni,
            "int8_kernels": "onednn",
            "ONEDNN_MAX_CPU_ISA": _onednn_isa_env(),
        }


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux), else what torch.cpu reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    probes = {
        "avx2": "_is_avx2_supported",
        "avx512f": "_is_avx512_supported",
        "avx512_vnni": "_is_vnni_supported",
    }
    return frozenset(f for f, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)())


def _onednn_isa_env() -> str | None:
    v = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return v.upper() if v else None


def caps_from(flags: Iterable[str], onednn_isa: str | None = None) -> CpuCaps:
    """The capability the kernels get from CPU `flags` and oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA's value)."""
    flags = frozenset(flags)
    vnni512 = "avx512_vnni" in flags or "amx_int8" in flags
    vnni256 = "avx_vnni" in flags
    if onednn_isa in (None, "ALL", "DEFAULT"):
        onednn_vnni = vnni512 or vnni256
    elif onednn_isa in _ONEDNN_VNNI_256:
        onednn_vnni = vnni256
    elif onednn_isa in _ONEDNN_VNNI_512:
        onednn_vnni = vnni512 or vnni256  # oneDNN also dispatches to avx2_vnni below an avx512 cap
    else:  # SSE41, AVX, AVX2, AVX512_CORE: no VNNI
        onednn_vnni = False
    return CpuCaps(flags, onednn_vnni)


@functools.cache
def cpu_caps() -> CpuCaps:
    """This process's capability (read once: oneDNN reads its env var once, at start-up)."""
    return caps_from(cpu_flags(), _onednn_isa_env())


# -- kernel plan


def full_range_exact(kind: str, groups: int, caps: CpuCaps) -> bool:
    """True when oneDNN accumulates u8 x s8 products in int32 for such a layer (0..255 activations are safe)."""
    return caps.onednn_vnni


@dataclass
class KernelPlan:
    """The activation range of a model's INT8 graph and the kernels each layer runs on."""

    qmax: int
    kernels: dict[str, list[str]] = field(default_factory=dict)
    why: list[str] = field(default_factory=list)

    @property
    def reduced(self) -> bool:
        """True when activations use 0..127 (7 bits) so that int16 pair sums cannot saturate."""
        return self.qmax < FULL_QMAX

    def as_dict(self) -> dict:
        """JSON-able summary."""
        return {"activation_qmax": self.qmax, "reduced_range": self.reduced, "kernels": self.kernels,
                "why": self.why}  # fmt: skip


def kernel_plan(
    backend: str, layers: dict[str, tuple[str, int, bool]], caps: CpuCaps | None = None, probe: bool = True
) -> KernelPlan:
    """Decide the activation range for `layers` ({name: (kind, groups, bayesian)}) on `backend`.

    Full range unless a layer's kernel sums u8 x s8 pairs in int16 on `caps`. With probe (the default, real
    caps only), a kernel the rule calls safe is also tried on all-255 x 127 data and the plan falls back to
    reduced range if it saturates after all.
    """
    real = caps is None
    caps = cpu_caps() if caps is None else caps
    kernels, why = {}, []
    for name, (kind, groups, _) in layers.items():
        kernels[name] = ["onednn"]
        grouped = groups > 1 and kind != "linear"
        if not full_range_exact(kind, groups, caps):
            msg = f"onednn {kind}{' grouped' if grouped else ''} sums u8*s8 pairs in int16 here"
        elif probe and real and not probe_full_range(kind, grouped):
            msg = f"onednn {kind}{' grouped' if grouped else ''} saturated on the all-255 probe though the CPU flags say VNNI"
        else:
            continue
        if msg not in why:  # once per kernel, not once per layer
            why.append(msg)
    return KernelPlan(REDUCED_QMAX if why else FULL_QMAX, kernels, why)


@functools.cache
def probe_full_range(kind: str, depthwise: bool) -> bool:
    """Run oneDNN's `kind` kernel on all-255 activations x all-127 weights: True when the result is exact."""
    if not onednn_ops_available():
        return False
    c = 32
    if kind == "linear":
        w_shape, x_shape, groups = (16, c), (1, c), 1
    else:  # padded, 4x4: a depthwise kernel may saturate only on the padded path
        w_shape, x_shape, groups = (
            ((c, 1, 3, 3), (1, c, 4, 4), c) if depthwise else ((16, c, 3, 3), (1, c, 4, 4), 1)
        )
    wd, xd = torch.full(w_shape, 127.0, dtype=torch.double), torch.full(x_shape, 255.0, dtype=torch.double)
    exact = xd @ wd.T if kind == "linear" else F.conv2d(xd, wd, None, 1, 1, 1, groups)
    out_scale = float(exact.max()) / 250
    ones, zps = torch.ones(w_shape[0]), torch.zeros(w_shape[0], dtype=torch.int32)
    w, x = wd.to(torch.int8), xd.to(torch.uint8)
    if kind == "linear":
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, ones, zps, None, out_scale, 0, torch.uint8,
                                               "none", [], "")  # fmt: skip
    else:
        x = x.contiguous(memory_format=torch.channels_last)
        packed = torch.ops.onednn.qconv_prepack(w, ones, 1.0, 0, [1, 1], [1, 1], [1, 1], groups, None)
        y = torch.ops.onednn.qconv_pointwise(x, 1.0, 0, packed, ones, zps, None, [1, 1], [1, 1], [1, 1], groups,
                                             out_scale, 0, torch.uint8, "none", [], "")  # fmt: skip
    return bool(((y.double() - torch.round(exact / out_scale)).abs() <= 1).all())


def int8_summary(meta: dict) -> dict:
    """What an INT8 model's kernels are (from its qbdl_meta): backend, sampler, kernel families, activation range."""
    fams = sorted({f for fs in meta.get("kernels", {}).values() for f in fs})
    return {
        "backend": meta.get("backend"),
        "sampler": meta.get("sampler") if meta.get("kind") == "qbnn" else None,
        "kernel_families": fams,
        "activation_qmax": meta.get("activation_qmax", FULL_QMAX),
        "reduced_range": meta.get("activation_qmax", FULL_QMAX) < FULL_QMAX,
        "why": meta.get("why", []),
        "layers": meta.get("kernels", {}),
    }
