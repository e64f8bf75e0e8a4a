"""Quantized-engine selection and the INT8 kernel plan: which kernels run, and on which activation range.

Why a plan: u8 x s8 kernels without VNNI (fbgemm's AVX2/AVX-512 kernels, oneDNN below AVX512_CORE_VNNI /
AVX2_VNNI) add pairs of products in int16 (`vpmaddubsw`) and saturate once two adjacent products exceed
32767, e.g. 255 * 127 * 2. fbgemm's depthwise/grouped kernels do so even with VNNI. Measured per kernel on
adversarial inputs (tests/test_quant_isa.py): with activations in 0..127 every engine equals the integer
reference exactly; with 0..255 only VNNI kernels and qnnpack do. So a model whose kernels include one of the
saturating kind quantizes its activations to 0..127 ("reduced range", as PyTorch's fbgemm/x86 qconfigs do)
and clamps them there, which makes every conv/linear exact; otherwise it keeps the full 0..255.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")
FULL_QMAX, REDUCED_QMAX = 255, 127
# ONEDNN_MAX_CPU_ISA values whose int8 kernels accumulate u8*s8 in int32 (VNNI); the AVX2_VNNI ones need
# the VEX AVX-VNNI instructions (flag avx_vnni), the AVX-512 ones avx512_vnni (or AMX).
_ONEDNN_VNNI_512 = ("AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                    "AVX10_2_512", "AVX10_2_512_AMX_2")  # fmt: skip
_ONEDNN_VNNI_256 = ("AVX2_VNNI", "AVX2_VNNI_2")


def supported_backends() -> list[str]:
    """Quantized engines this torch build offers (torch.backends.quantized.supported_engines, minus 'none')."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def check_backend(backend: str) -> str:
    """Validate a backend name; ValueError lists the supported engines."""
    supported = supported_backends()
    if backend not in BACKENDS or backend not in supported:
        raise ValueError(f"unknown or unavailable quantized backend {backend!r}; supported here: {supported}")
    return backend


def set_backend(backend: str) -> str:
    """Make `backend` the active quantized engine (packing and kernels must use the same one)."""
    check_backend(backend)
    if torch.backends.quantized.engine != backend:
        torch.backends.quantized.engine = backend
    return backend


# -- CPU capability


@dataclass(frozen=True)
class CpuCaps:
    """What the INT8 kernels of this process can use (CPU flags, narrowed by the libraries' ISA overrides)."""

    flags: frozenset[str]
    onednn_vnni: bool  # oneDNN's int8 kernels accumulate u8*s8 in int32
    fbgemm_vnni: bool  # fbgemm's GEMM kernels use AVX-512 VNNI
    x86_conv_onednn: bool  # torch's x86 engine sends conv to oneDNN (it asks cpuinfo for AVX-512 VNNI)

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
            "fbgemm_vnni": self.fbgemm_vnni,
            "x86_conv_kernel": "onednn" if self.x86_conv_onednn else "fbgemm",
            "ONEDNN_MAX_CPU_ISA": _onednn_isa_env(),
            "FBGEMM_ENABLE_INSTRUCTIONS": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS"),
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


def caps_from(flags: Iterable[str], onednn_isa: str | None = None, fbgemm_isa: str | None = None) -> CpuCaps:
    """The capability the kernels get from CPU `flags` and the libraries' ISA caps (env var values)."""
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
    fbgemm_vnni = "avx512_vnni" in flags and fbgemm_isa in (None, "AVX512_E1", "AVX512_E1_256")
    return CpuCaps(flags, onednn_vnni, fbgemm_vnni, x86_conv_onednn="avx512_vnni" in flags)


@functools.cache
def cpu_caps() -> CpuCaps:
    """This process's capability (read once: both libraries read their env vars once, at start-up)."""
    return caps_from(cpu_flags(), _onednn_isa_env(), os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS"))


# -- kernel plan


def engine_family(engine: str, kind: str, groups: int, caps: CpuCaps) -> str:
    """The kernel family `engine` runs a `kind` layer ('conv2d', 'linear', ...) with `groups` on."""
    if engine == "x86":  # torch's routing: oneDNN for convs on AVX-512 VNNI CPUs (groups <= 100), else fbgemm
        return "onednn" if kind.startswith("conv") and caps.x86_conv_onednn and groups <= 100 else "fbgemm"
    return engine


def layer_families(backend: str, kind: str, groups: int, bayesian: bool, caps: CpuCaps) -> list[str]:
    """The kernel families a layer runs on in every mode: its engine's (mean, bank and packed fresh weights)
    and, for a Bayesian conv2d/linear on x86/onednn, oneDNN's own ops (in-place fresh sampling, Flipout)."""
    fams = {engine_family(backend, kind, groups, caps)}
    if bayesian and backend in ("x86", "onednn") and kind in ("conv2d", "linear"):
        fams.add("onednn")
    return sorted(fams)


def full_range_exact(family: str, kind: str, groups: int, caps: CpuCaps) -> bool:
    """True when `family` accumulates u8 x s8 products in int32 for such a layer (0..255 activations are safe)."""
    if family == "qnnpack":
        return True
    if family == "onednn":
        return caps.onednn_vnni
    return caps.fbgemm_vnni and (
        kind == "linear" or groups == 1
    )  # fbgemm depthwise: int16 pairs even on VNNI


@dataclass
class KernelPlan:
    """The activation range of a model's INT8 graph and the kernel families each layer may run on."""

    qmax: int
    kernels: dict[str, list[str]] = field(default_factory=dict)
    why: list[str] = field(default_factory=list)
    small_batch_engine: str = "x86"  # the engine that packs fresh samples at batch <= 4

    @property
    def reduced(self) -> bool:
        """True when activations use 0..127 (7 bits) so that int16 pair sums cannot saturate."""
        return self.qmax < FULL_QMAX

    def as_dict(self) -> dict:
        """JSON-able summary."""
        return {"activation_qmax": self.qmax, "reduced_range": self.reduced, "kernels": self.kernels,
                "why": self.why, "small_batch_engine": self.small_batch_engine}  # fmt: skip


def kernel_plan(
    backend: str, layers: dict[str, tuple[str, int, bool]], caps: CpuCaps | None = None, probe: bool = True
) -> KernelPlan:
    """Decide the activation range for `layers` ({name: (kind, groups, bayesian)}) on `backend`.

    Full range unless some layer may run a kernel family that sums u8 x s8 pairs in int16 on `caps`. With
    probe (the default, real caps only), a family the rule calls safe is also tried on all-255 x 127 data
    and the plan falls back to reduced range if it saturates after all.
    """
    real = caps is None
    caps = cpu_caps() if caps is None else caps

    def exact(fam: str, kind: str, groups: int) -> bool:
        ok = full_range_exact(fam, kind, groups, caps)
        if ok and probe and real and not probe_full_range(fam, kind, groups > 1 and kind != "linear"):
            msg = f"{fam} {kind} saturated on the all-255 probe though the CPU flags say VNNI"
            if msg not in why:  # once per kernel, not once per layer
                why.append(msg)
            return False
        return ok

    kernels, why = {}, []
    for name, (kind, groups, bayesian) in layers.items():
        kernels[name] = layer_families(backend, kind, groups, bayesian, caps)
        for fam in kernels[name]:
            msg = f"{fam} {kind}{' grouped' if groups > 1 else ''} sums u8*s8 pairs in int16 here"
            if not exact(fam, kind, groups) and msg not in why:
                why.append(msg)
    qmax = REDUCED_QMAX if why else FULL_QMAX
    # fbgemm packs fresh samples faster at small batch (layers.fresh_pack_engine): only where it is exact too
    bayes = [(k, g) for k, g, b in layers.values() if b]
    fb = backend in ("x86", "onednn") and "fbgemm" in supported_backends() and bool(bayes)
    fb = fb and all(qmax < FULL_QMAX or exact(engine_family("fbgemm", k, g, caps), k, g) for k, g in bayes)
    if fb:
        for name, (kind, groups, bayesian) in layers.items():
            if bayesian:
                kernels[name] = sorted({*kernels[name], engine_family("fbgemm", kind, groups, caps)})
    return KernelPlan(qmax, kernels, why, small_batch_engine="fbgemm" if fb else backend)


@functools.cache
def probe_full_range(family: str, kind: str, depthwise: bool) -> bool:
    """Run `family`'s kernel on all-255 activations x all-127 weights: True when it returns the exact result."""
    engine = family
    if engine not in supported_backends():
        return False
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        c = 32
        if kind == "linear":
            w_shape, x_shape, groups = (16, c), (1, c), 1
        else:  # padded, 4x4: fbgemm's depthwise kernel saturates only on the padded path even with VNNI
            w_shape, x_shape, groups = (
                ((c, 1, 3, 3), (1, c, 4, 4), c) if depthwise else ((16, c, 3, 3), (1, c, 4, 4), 1)
            )
        wd, xd = (
            torch.full(w_shape, 127.0, dtype=torch.double),
            torch.full(x_shape, 255.0, dtype=torch.double),
        )
        exact = xd @ wd.T if kind == "linear" else F.conv2d(xd, wd, None, 1, 1, 1, groups)
        out_scale = float(exact.max()) / 250
        ones = torch.ones(w_shape[0], dtype=torch.double)
        w = torch._make_per_channel_quantized_tensor(
            wd.to(torch.int8), ones, torch.zeros(w_shape[0], dtype=torch.long), 0
        )
        x = torch._make_per_tensor_quantized_tensor(xd.to(torch.uint8), 1.0, 0)
        if kind == "linear":
            y = torch.ops.quantized.linear(x, torch.ops.quantized.linear_prepack(w, None), out_scale, 0)
        else:
            packed = torch.ops.quantized.conv2d_prepack(w, None, [1, 1], [1, 1], [1, 1], groups)
            y = torch.ops.quantized.conv2d(x, packed, out_scale, 0)
        return bool(((y.int_repr().double() - torch.round(exact / out_scale)).abs() <= 1).all())
    finally:
        torch.backends.quantized.engine = old


def int8_summary(meta: dict) -> dict:
    """What an INT8 model's kernels are (from its qbdl_meta): backend, mode, kernel families, activation range."""
    fams = sorted({f for fs in meta.get("kernels", {}).values() for f in fs})
    return {
        "backend": meta.get("backend"),
        "mode": meta.get("mode") if meta.get("kind") == "qbnn" else None,
        "kernel_families": fams,
        "activation_qmax": meta.get("activation_qmax", FULL_QMAX),
        "reduced_range": meta.get("activation_qmax", FULL_QMAX) < FULL_QMAX,
        "why": meta.get("why", []),
        "small_batch_engine": meta.get("small_batch_engine"),
        "layers": meta.get("kernels", {}),
    }
