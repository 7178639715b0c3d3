"""precision: auto picks bf16 only with native bf16 flags AND a measured speed-up."""

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
