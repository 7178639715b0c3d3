"""Choose the training precision by detection plus measurement, never by guess.

On CPUs without native bf16 (AVX2 only) bf16 matmuls were measured ~100x *slower* than fp32; on
CPUs with avx512_bf16 / AMX they were ~5x faster. So `precision: auto` uses bf16 autocast (fp32
master weights) only where the CPU advertises native bf16 *and* a short matmul benchmark confirms
it is faster. On CUDA, bf16 where supported, else fp16 with loss scaling.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
# bf16 must beat fp32 by this factor to be worth the (small) accuracy risk.
MIN_BF16_SPEEDUP = 1.3


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def accelerate_mixed_precision(self) -> str:
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.precision]


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_matmul(dtype_autocast: bool, size: tuple[int, int, int] = (1024, 384, 1536), reps: int = 4) -> float:
    m, k, n = size
    a, b = torch.randn(m, k), torch.randn(k, n)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_autocast):
        a @ b  # warm-up: first call pays for kernel selection
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        return (time.perf_counter() - start) / reps


@functools.cache
def measured_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time for a transformer-shaped matmul (~0.1 s on a slow CPU)."""
    fp32 = _time_matmul(False)
    # Abort early if bf16 is pathologically slow: one rep tells enough.
    bf16 = _time_matmul(True, reps=1 if fp32 < 0.05 else 2)
    if bf16 < 10 * fp32:
        bf16 = min(bf16, _time_matmul(True))
    return fp32 / bf16 if bf16 > 0 else 0.0


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    if device.type == "cuda":
        if requested in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "CUDA device supports bf16")
        if requested in ("auto", "fp16"):
            return PrecisionChoice("fp16", "CUDA fp16 with loss scaling")
        return PrecisionChoice(requested, f"precision: {requested} (config)")
    if requested == "fp16":
        from .errors import ConfigError

        raise ConfigError("train.precision: fp16 needs a GPU; on CPU use train.precision=bf16 or fp32 (or auto)")
    if requested in ("fp32", "bf16"):
        return PrecisionChoice(requested, f"precision: {requested} (config)")
    native = sorted(NATIVE_BF16_FLAGS & cpu_flags())
    if not native:
        return PrecisionChoice("fp32", "CPU has no native bf16 (no avx512_bf16/amx_bf16 flag): fp32")
    speedup = measured_bf16_speedup()
    if speedup >= MIN_BF16_SPEEDUP:
        return PrecisionChoice("bf16", f"CPU has {'+'.join(native)} and bf16 matmul measured {speedup:.1f}x faster: bf16 autocast")
    return PrecisionChoice("fp32", f"CPU has {'+'.join(native)} but bf16 matmul measured only {speedup:.2f}x fp32: fp32")
