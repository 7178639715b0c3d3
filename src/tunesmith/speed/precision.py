"""Choose the training precision by detection plus measurement, never by guess.

On CPUs without native bf16 (AVX2 only) bf16 matmuls were measured ~100x *slower* than fp32; on
CPUs with avx512_bf16 / AMX they were ~5x faster. So `precision: auto` uses bf16 autocast (fp32
master weights) only where the CPU advertises native bf16 *and* a short matmul benchmark confirms
it is faster. On CUDA, bf16 where supported, else fp16 with loss scaling.

The measurement is noisy on a busy machine (the same config chose fp32 for one run and bf16 for the next),
so it is made once per CPU model, kernel-relevant CPU flags, torch version and ISA-limiting environment
(`cache_key`) and kept in `precision_cache_path()`; later runs reuse it and say so, until
`choose_precision(..., recheck=True)` (`tunesmith doctor --recheck`) measures again.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("tunesmith")

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
# Flags that change which matmul kernels torch and oneDNN pick, hence the measured speed-up: part of the
# cache key, so that a cached measurement is reused only on a CPU that runs the same kernels.
KERNEL_FLAGS = NATIVE_BF16_FLAGS | {
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_int8",
}
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


def precision_cache_path() -> Path:
    """`precision.json` in tunesmith's cache folder (`paths.cache_root`)."""
    from tunesmith.paths import cache_root

    return cache_root() / "precision.json"


def cache_key() -> str:
    """What a measurement holds for, readable in the cache file: anything that changes the matmul kernels."""
    flags = " ".join(sorted(KERNEL_FLAGS & cpu_flags())) or "no simd flags"
    env = " ".join(f"{name}={os.environ[name]}" for name in sorted(AVX2_ONLY_ENVIRONMENT) if name in os.environ)
    return " | ".join([cpu_model(), flags, f"torch {torch.__version__}", *([env] if env else [])])


def _read_cache(path: Path) -> dict:
    # Missing, unreadable or corrupt (a crash, a hand edit): as if empty, so the run measures instead of failing.
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if not isinstance(err, FileNotFoundError):
            log.debug("ignoring precision cache %s: %s", path, err)
        return {}
    return entries if isinstance(entries, dict) else {}


def _cached_speedup(entry: object) -> tuple[float, str] | None:
    if not isinstance(entry, dict):
        return None
    speedup, date = entry.get("speedup"), entry.get("date")
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not math.isfinite(speedup) or speedup <= 0:
        return None
    return float(speedup), date if isinstance(date, str) else "an unknown date"


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Adds or replaces one entry. Through a temporary file and os.replace, because parallel processes (DDP ranks,
    pytest-xdist workers) share the file: a reader sees the old file or the new one, never half of one. Two
    writers racing can still lose one's entry (the last replace wins); that key is then measured again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)  # read again just before writing: another process may have added its key
        entries[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(entries, file, indent=2, sort_keys=True)
                file.write("\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        # Never fails a run, but each run will measure afresh, so the choice can vary again: worth a warning.
        log.warning("could not save the bf16 measurement to %s (%s): later runs will measure again", path, err)


def _bf16_speedup(recheck: bool) -> tuple[float, str | None]:
    """The bf16 speed-up and the date it was measured on if it came from the cache (None: measured now)."""
    path, key = precision_cache_path(), cache_key()
    if not recheck and (cached := _cached_speedup(_read_cache(path).get(key))):
        return cached
    if recheck and hasattr(measured_bf16_speedup, "cache_clear"):
        measured_bf16_speedup.cache_clear()  # else a re-check would return this process's earlier measurement
    speedup = measured_bf16_speedup()
    # The exact float, not rounded: a cached 1.2999 must not become a bf16 choice by rounding to 1.3.
    # "precision" is for whoever reads the file; a later run decides again from the speed-up (see choose_precision).
    entry = {"speedup": speedup, "precision": "bf16" if speedup >= MIN_BF16_SPEEDUP else "fp32",
             "date": datetime.date.today().isoformat()}
    _write_cache(path, key, entry)
    return speedup, None


def choose_precision(requested: str, device: torch.device, recheck: bool = False) -> PrecisionChoice:
    """`recheck`: measure bf16 again (where the choice depends on it) and replace the cached measurement."""
    if device.type == "cuda":
        if requested in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "CUDA device supports bf16")
        if requested in ("auto", "fp16"):
            return PrecisionChoice("fp16", "CUDA fp16 with loss scaling")
        return PrecisionChoice(requested, f"precision: {requested} (config)")
    if requested == "fp16":
        from tunesmith.errors import ConfigError

        raise ConfigError("train.precision: fp16 needs a GPU; on CPU use train.precision=bf16 or fp32 (or auto)")
    if requested in ("fp32", "bf16"):
        return PrecisionChoice(requested, f"precision: {requested} (config)")
    native = sorted(NATIVE_BF16_FLAGS & cpu_flags())
    if not native:
        return PrecisionChoice("fp32", "CPU has no native bf16 (no avx512_bf16/amx_bf16 flag): fp32")
    speedup, measured_on = _bf16_speedup(recheck)
    # Decided from the (cached) speed-up, not a cached choice: the reason then always matches the threshold in force.
    when = "" if measured_on is None else f" on {measured_on} (cached; re-measure with `tunesmith doctor --recheck`)"
    if speedup >= MIN_BF16_SPEEDUP:
        return PrecisionChoice("bf16", f"CPU has {'+'.join(native)} and bf16 matmul measured {speedup:.1f}x faster{when}: bf16 autocast")
    return PrecisionChoice("fp32", f"CPU has {'+'.join(native)} but bf16 matmul measured only {speedup:.2f}x fp32{when}: fp32")
