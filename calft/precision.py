"""Which autocast dtype a run uses: bf16 where the hardware computes it natively, fp32 elsewhere.

On CUDA, bf16 autocast (the LoRA weights, the optimizer state and the loss stay fp32).
On a CPU, torch's oneDNN runs bf16 matmuls with native instructions only when the processor has
AVX512-BF16 (vdpbf16ps) or AMX-BF16 tiles; without them bf16 is emulated and slower than fp32.
docs/calibration.md measures the gain on a 2-core AVX512-BF16 CPU (a training step ~1.45x, sampling
~1.2x faster) and that the calibration metrics hold.
"""
from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_bf16_features() -> list[str]:
    """The native bf16 features of this CPU that torch detects ([] when none, or an old torch)."""
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    found = []
    for name, probe in probes.items():
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                found.append(name)
        except RuntimeError:
            pass
    return found


def autocast_dtype(device_type: str, precision: str = "auto") -> torch.dtype | None:
    """bf16 or None (fp32) for --precision on this device. auto = bf16 on CUDA and on a CPU with
    native bf16 (cpu_bf16_features), fp32 elsewhere; bf16 / fp32 force it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16" or device_type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device_type == "cpu" and cpu_bf16_features() else None


def describe(device_type: str, dtype: torch.dtype | None) -> str:
    """One line for the run's log: what computes in which precision, and why."""
    if dtype is None:
        why = " (CPU without native bf16: no AVX512-BF16 / AMX-BF16)" if device_type == "cpu" and not cpu_bf16_features() else ""
        return f"precision: fp32{why}"
    why = f" (CPU features: {', '.join(cpu_bf16_features()) or 'none: emulated, forced by --precision bf16'})" \
        if device_type == "cpu" else ""
    return f"precision: bf16 autocast{why}; LoRA weights, optimizer and loss in fp32"
