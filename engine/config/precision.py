"""`run.precision=auto`: the fastest precision this machine computes natively, chosen once when the config resolves.

- a CUDA device with bf16 (Ampere and later): `bf16`;
- a CPU with native bf16 arithmetic (AVX512-BF16 or AMX-BF16): `bf16_autocast` (fp32 weights and optimizer, bf16
  matmuls through oneDNN);
- anything else: `fp32`. On a CPU without those instructions bf16 is emulated and runs tens of times slower than
  fp32, so `auto` never picks it there.

The saved config.json holds the chosen value, so a resume on the same machine resolves to the same precision and a
resume elsewhere keeps what the run was trained in.
"""
from __future__ import annotations

import os

import torch

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU listed in `cpuinfo` (empty where the file is not there)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16_cpu(flags: set[str] | None = None) -> bool:
    return bool(set(NATIVE_BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))


def auto_precision(accelerator: str | None = None, flags: set[str] | None = None) -> str:
    """What `auto` means here; `accelerator` is DeepSpeed's (`DS_ACCELERATOR`, else CUDA when torch sees one)."""
    accelerator = accelerator or os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16_autocast" if native_bf16_cpu(flags) else "fp32"
