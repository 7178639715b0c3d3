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
# Environment that makes a process run as on an AVX2-only CPU: torch's kernels, oneDNN and MKL limited to
# AVX2, while /proc/cpuinfo still lists avx512_bf16 — the case only the measurement below can catch.
# Read when torch and oneDNN first run a kernel, so it must be set before the process starts
# (`benchmarks/speed.py --emulate-avx2`, `tests/test_precision.py`).
AVX2_ONLY_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
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


def _time_matmuls(reps: int, size: tuple[int, int, int], calls: int) -> tuple[float, float]:
    """Fastest of `reps` timings each of `calls` fp32 and bf16-autocast matmuls, interleaved so that
    load from other processes hits both alike. Each timing spans several calls because a thread
    descheduled for one time slice (~ms) would otherwise dwarf a ~1 ms bf16 matmul."""
    m, k, n = size
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = {False: float("inf"), True: float("inf")}
    for rep in range(reps + 1):
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                start = time.perf_counter()
                for _ in range(calls):
                    a @ b
                elapsed = time.perf_counter() - start
            if rep:  # rep 0 is the warm-up: the first call pays for kernel selection (and AMX set-up)
                best[bf16] = min(best[bf16], elapsed)
    return best[False], best[True]


@functools.cache
def measured_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of matmuls shaped like a training step's (1,024 tokens x 384 x 1,536).

    A small probe first: where bf16 is emulated it is ~100x slower and the full measurement would
    take many seconds, so the probe alone decides. Otherwise the training-sized shape is timed
    (~0.5 s where bf16 is native), because autocast's casting overhead makes small matmuls unrepresentative.
    """
    probe_fp32, probe_bf16 = _time_matmuls(1, (128, 384, 384), calls=1)
    if probe_bf16 > 10 * probe_fp32:
        return probe_fp32 / probe_bf16
    fp32, bf16 = _time_matmuls(4, (1024, 384, 1536), calls=8)
    return fp32 / bf16


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
