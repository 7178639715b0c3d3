"""precision: auto picks bf16 only with native bf16 flags AND a measured speed-up, measured once per machine."""

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunesmith.speed import precision as precision
from tunesmith.errors import ConfigError

CPU = torch.device("cpu")
RECHECK_HINT = "(cached; re-measure with `tunesmith doctor --recheck`)"


@pytest.fixture(autouse=True)
def _empty_precision_cache(monkeypatch, tmp_path):
    # Each test its own cache: in the session's, a speed-up an earlier test cached would answer instead of
    # the one this test mocks.
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "user-cache"))


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
        "import torch; from tunesmith.speed.precision import choose_precision; "
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


class FakeTimer:
    """Stands in for `_time_matmuls`, the timer under the real `measured_bf16_speedup`: reports `speedup`, counts calls."""

    def __init__(self, speedup):
        self.speedup, self.calls = speedup, 0

    def __call__(self, reps, size, calls):
        self.calls += 1
        return self.speedup, 1.0  # fp32 time, bf16 time


@pytest.fixture
def timer(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    fake = FakeTimer(3.4)
    monkeypatch.setattr(precision, "_time_matmuls", fake)
    precision.measured_bf16_speedup.cache_clear()
    yield fake
    precision.measured_bf16_speedup.cache_clear()  # the fake speed-up must not stay this process's measurement


def _new_process():
    # What a later run starts with: the file, but not this process's in-memory measurement.
    precision.measured_bf16_speedup.cache_clear()


def _cache():
    return json.loads(precision.precision_cache_path().read_text())


def test_later_run_reuses_the_cached_decision_though_the_measurement_differs(timer):
    first = precision.choose_precision("auto", CPU)
    assert first.precision == "bf16" and "3.4x faster: bf16" in first.reason and "cached" not in first.reason
    today = datetime.date.today().isoformat()
    assert _cache() == {precision.cache_key(): {"speedup": 3.4, "precision": "bf16", "date": today}}

    _new_process()
    timer.speedup, calls = 0.5, timer.calls
    again = precision.choose_precision("auto", CPU)
    assert timer.calls == calls, "measured again despite the cache"
    assert again.precision == "bf16"
    assert again.reason == f"CPU has avx512_bf16 and bf16 matmul measured 3.4x faster on {today} {RECHECK_HINT}: bf16 autocast"


def test_recheck_measures_again_and_replaces_the_entry(timer):
    assert precision.choose_precision("auto", CPU).precision == "bf16"
    timer.speedup, calls = 0.5, timer.calls
    # Same process, on purpose: recheck must get past the in-memory measurement too.
    rechecked = precision.choose_precision("auto", CPU, recheck=True)
    assert timer.calls > calls
    assert rechecked.precision == "fp32" and "0.50x fp32: fp32" in rechecked.reason
    assert _cache()[precision.cache_key()]["speedup"] == 0.5

    _new_process()
    later = precision.choose_precision("auto", CPU)
    assert later.precision == "fp32" and RECHECK_HINT in later.reason


@pytest.mark.parametrize("contents", [
    lambda key: b'{"truncated": ',
    lambda key: b"[1, 2]",
    lambda key: b"\xff\xfe\x00",
    lambda key: json.dumps({key: {"speedup": "fast", "date": "2026-01-01"}}).encode(),
    lambda key: json.dumps({key: {"speedup": float("nan")}}).encode(),
], ids=["truncated", "not-a-mapping", "not-utf8", "speedup-not-a-number", "speedup-nan"])
def test_corrupt_cache_is_ignored_and_rewritten(timer, contents):
    path = precision.precision_cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(contents(precision.cache_key()))
    choice = precision.choose_precision("auto", CPU)
    assert timer.calls and choice.precision == "bf16" and "cached" not in choice.reason
    assert _cache()[precision.cache_key()]["speedup"] == 3.4


def test_entries_of_other_machines_are_kept(timer):
    path = precision.precision_cache_path()
    path.parent.mkdir(parents=True)
    other = {"Other CPU | avx2 | torch 2.0.0": {"speedup": 0.01, "precision": "fp32", "date": "2026-01-01"}}
    path.write_text(json.dumps(other))
    precision.choose_precision("auto", CPU)
    assert _cache() == {**other, precision.cache_key(): {"speedup": 3.4, "precision": "bf16", "date": datetime.date.today().isoformat()}}


@pytest.mark.parametrize("change", ["cpu model", "cpu flags", "torch version", "avx2-only environment"])
def test_other_cpu_torch_or_kernels_measure_again(timer, monkeypatch, change):
    precision.choose_precision("auto", CPU)
    _new_process()
    timer.speedup, calls = 0.5, timer.calls
    if change == "cpu model":
        monkeypatch.setattr(precision, "cpu_model", lambda: "Other CPU")
    elif change == "cpu flags":
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    elif change == "torch version":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    choice = precision.choose_precision("auto", CPU)
    assert timer.calls > calls and choice.precision == "fp32" and "cached" not in choice.reason
    assert len(_cache()) == 2


def test_flags_that_do_not_change_kernels_keep_the_key(timer, monkeypatch):
    key = precision.cache_key()
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "hypervisor", "rdrand"}))
    assert precision.cache_key() == key


@pytest.mark.parametrize("blocked", ["a file where the folder goes", "a folder where the file goes"])
def test_unwritable_cache_never_fails_the_run(timer, monkeypatch, tmp_path, caplog, blocked):
    if blocked == "a file where the folder goes":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "file" / "cache"))
    else:
        precision.precision_cache_path().mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        choice = precision.choose_precision("auto", CPU)
    assert choice.precision == "bf16" and "could not save the bf16 measurement" in caplog.text
    _new_process()
    calls = timer.calls
    assert precision.choose_precision("auto", CPU).precision == "bf16" and timer.calls > calls  # measured, not cached


def test_failed_write_leaves_the_previous_cache_whole(timer, monkeypatch, caplog):
    path = precision.precision_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"Other CPU | avx2 | torch 2.0.0": {"speedup": 0.01, "date": "2026-01-01"}}))
    before = path.read_bytes()

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        assert precision.choose_precision("auto", CPU).precision == "bf16"
    assert path.read_bytes() == before, "the cache was written in place, not through a temporary file"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temporary file left behind"
    assert "No space left on device" in caplog.text


def test_cache_location(monkeypatch, tmp_path):
    assert precision.precision_cache_path() == tmp_path / "user-cache" / "precision.json"
    monkeypatch.delenv("TUNESMITH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert precision.precision_cache_path() == tmp_path / "xdg" / "tunesmith" / "precision.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert precision.precision_cache_path() == tmp_path / "home" / ".cache" / "tunesmith" / "precision.json"


def test_tests_never_use_the_users_cache(monkeypatch, tmp_path_factory):
    monkeypatch.undo()  # back to the session's environment, set by conftest.py, without this file's per-test folder
    assert Path(os.environ["TUNESMITH_CACHE"]).is_relative_to(tmp_path_factory.getbasetemp())
