"""precision: auto picks bf16 only with native bf16 flags AND a measured speed-up."""

import os
import platform
import subprocess
import sys

import pytest
import torch

from tunesmith import precision
from tunesmith.errors import ConfigError

CPU = torch.device("cpu")


def _patch(monkeypatch, flags, speedup):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(precision, "measured_bf16_speedup", lambda: speedup)


def test_avx2_only_cpu_gets_fp32_without_measuring(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))

    def boom():
        raise AssertionError("must not benchmark bf16 on a CPU without native bf16")

    monkeypatch.setattr(precision, "measured_bf16_speedup", boom)
    choice = precision.choose_precision("auto", CPU)
    assert choice.precision == "fp32" and "no native bf16" in choice.reason


def test_native_bf16_and_faster_gets_bf16(monkeypatch):
    _patch(monkeypatch, {"avx512_bf16", "amx_bf16"}, 4.0)
    choice = precision.choose_precision("auto", CPU)
    assert choice.precision == "bf16" and choice.accelerate_mixed_precision == "bf16"
    assert "4.0x" in choice.reason


def test_native_bf16_but_slow_gets_fp32(monkeypatch):
    _patch(monkeypatch, {"avx512_bf16"}, 0.9)
    assert precision.choose_precision("auto", CPU).precision == "fp32"


def test_explicit_precision_wins(monkeypatch):
    _patch(monkeypatch, set(), 0.01)
    assert precision.choose_precision("bf16", CPU).precision == "bf16"
    assert precision.choose_precision("fp32", CPU).precision == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        precision.choose_precision("fp16", CPU)


def test_real_measurement_is_positive():
    assert precision.measured_bf16_speedup() > 0


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 ISA limits")
def test_bf16_without_its_instructions_measures_slow_and_gets_fp32():
    """The case the flag check cannot see (a CPU that lists avx512_bf16 while bf16 matmuls run without
    it, as on an AVX2-only CPU): torch, oneDNN and MKL restricted to AVX2 in a child process, real
    matmuls, no mocks. On a CPU with bf16 flags the measurement must catch it; on one without, the flags."""
    script = (
        "import torch; from tunesmith.precision import choose_precision; "
        "c = choose_precision('auto', torch.device('cpu')); print(c.precision); print(c.reason); "
        "print(torch.backends.cpu.get_cpu_capability())"
    )
    env = {**os.environ, **precision.AVX2_ONLY_ENVIRONMENT}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=True)
    chosen, reason, capability = out.stdout.strip().splitlines()[-3:]
    assert capability in ("AVX2", "DEFAULT")
    assert chosen == "fp32", reason
    expected = "measured only" if precision.NATIVE_BF16_FLAGS & precision.cpu_flags() else "no native bf16"
    assert expected in reason
