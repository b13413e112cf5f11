"""What the numerical kernels depend on besides their inputs: the CPU, and the settings that pick
threads and code paths. No MXNet import, so that tracking's fingerprint can read it too."""

from __future__ import annotations

import functools
import os
import platform

# Variables that change how MXNet, oneDNN, OpenMP and OpenBLAS compute (threads, kernels, paths).
KERNEL_VAR_PREFIXES = ("OMP_", "MXNET_", "KMP_", "OPENBLAS_", "MKL_", "DNNL_", "ONEDNN_")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags") and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return found


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's feature flags, sorted (which vector instructions the kernels may use)."""
    return " ".join(sorted(_cpuinfo().get("flags", "").split()))


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def kernel_facts() -> dict[str, object]:
    """Everything besides the build that may change which kernel runs, or how it splits its work."""
    return {"cpu": cpu_model(), "flags": cpu_flags(), "cpus": usable_cpus(), "machine": platform.machine(),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(KERNEL_VAR_PREFIXES)}}
