"""The qbdl C++ ops (torch.ops.qbdl.*), built on first use with torch.utils.cpp_extension (~10 s, cached)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "inplace.cpp", CSRC / "sample_vbmi.cpp")
OPS = (
    "packed_bytes",
    "sample_packed",
    "sample_plain",
    "sample_plain_kernel",
    "sample_isa",
    "sample_kernels",
    "flip_requant",
    "signed_add",
    "qadd",
    "max_pool2d_u8",
)
_LOADED: dict[str, bool] = {}


def build_dir() -> Path:
    """Where the ops are built: one directory per torch version and CPU capability (a library built against
    another torch's headers, or for another CPU, must never load)."""
    root = Path(os.environ.get("QBDL_BUILD_DIR", Path.home() / ".cache" / "qbdl"))
    return root / f"torch-{torch.__version__}-{torch.backends.cpu.get_cpu_capability().lower()}"


def available() -> bool:
    """True when the C++ ops are loaded; builds them the first time (False, with one warning, if that fails).

    QBDL_NATIVE=0 turns them off; QBDL_BUILD_DIR moves the build (default ~/.cache/qbdl). Without them,
    fresh INT8 sampling re-packs weights every forward (slower, same distribution).
    """
    if "ok" in _LOADED:
        return _LOADED["ok"]
    ok = False
    if os.environ.get("QBDL_NATIVE", "1") != "0":
        try:
            # cpp_extension logs a CUDA_HOME notice on import; irrelevant to a CPU-only extension
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            from torch.utils.cpp_extension import load

            # The sampling loop is int32 multiply / min / max: without AVX2 (SSE2 only) the compiler emulates
            # them and it runs ~4x slower.
            # The build directory is per capability, so a library built with AVX-512 never loads on a lesser CPU.
            cap = torch.backends.cpu.get_cpu_capability()
            flags = ["-O3", "-fno-math-errno"] + (["-mavx2", "-mfma"] if cap in ("AVX2", "AVX512") else [])
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl"] if cap == "AVX512" else []
            # at::parallel_for is inlined from the headers: without OpenMP it runs on one thread
            flags += ["-fopenmp"] if torch.backends.openmp.is_available() else []
            build = build_dir()
            build.mkdir(parents=True, exist_ok=True)
            load(
                name="qbdl_inplace",
                sources=[str(p) for p in SOURCES],
                build_directory=str(build),
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
                is_python_module=False,
                verbose=False,
            )
            ok = all(hasattr(torch.ops.qbdl, op) for op in OPS)
        except Exception as e:  # a missing compiler / ninja must not stop a run: the slow path is exact too
            warnings.warn(
                f"qbdl could not build its C++ ops ({type(e).__name__}: {str(e).strip()[:300]}). Fresh INT8 "
                "sampling falls back to re-packing every weight each forward (same distribution, ~3x slower "
                "at batch 1) and sampler='flipout' is unavailable. Fix: install a C++ compiler (g++) and "
                "`pip install ninja`, or set QBDL_NATIVE=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
    _LOADED["ok"] = ok
    return ok


def trim() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim; a no-op elsewhere).

    Why: building a layer's sampler allocates int64 temporaries of 8 bytes a weight; glibc raises its mmap
    threshold after freeing large blocks, so later ones come from the heap and stay resident once freed
    (measured: ~180 MiB for ResNet-50's in-place samplers) unless trimmed.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sample_kernel() -> str | None:
    """The fresh-sampling kernel the C++ ops run here ("avx512vbmi", "avx2" or "scalar"); None unless loaded.

    The fastest this CPU runs, at most QBDL_SAMPLE_KERNEL's (e.g. avx2, to compare kernels on one CPU).
    """
    return str(torch.ops.qbdl.sample_isa()) if _LOADED.get("ok") else None
