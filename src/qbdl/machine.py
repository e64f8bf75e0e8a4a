"""What machine a figure came from: CPU model, the ISA flags that matter for INT8/BF16, threads, versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .quant import native
from .quant.backend import cpu_caps


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_family_model() -> str | None:
    """'family/model' of an x86 CPU (/proc/cpuinfo: e.g. '25/17', AMD Zen 4): the model name alone may not tell
    CPU generations apart (a VM's 'AMD EPYC'); None where it is not known."""
    try:
        fields = dict(
            (k.strip(), v.strip())
            for k, _, v in (line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines())
            if k.strip() in ("cpu family", "model")
        )
    except OSError:
        return None
    return f"{fields['cpu family']}/{fields['model']}" if len(fields) == 2 else None


def machine_info() -> dict:
    """CPU model, ISA flags, what the INT8 kernels can use here, threads and library versions."""
    caps = cpu_caps()
    return {
        "cpu": cpu_model(),
        "family_model": cpu_family_model(),
        "isa": caps.isa,
        "avx512_vnni": "avx512_vnni" in caps.flags,
        "amx": any(f.startswith("amx") for f in caps.flags),
        "int8_kernels": caps.as_dict(),
        "sample_kernel": native.sample_kernel(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
