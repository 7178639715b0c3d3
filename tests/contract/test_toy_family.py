"""CONTRIBUTING.md's "Adding a task family" is true: a family written from its steps alone, in a temporary
module outside the package, registers and passes the whole contract suite."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest

import test_contract as contract
from tunesmith.tasks import families, register, unregister

TOY = "toy_score"


@pytest.fixture(scope="module")
def toy_family(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy-family")
    shutil.copy(Path(__file__).with_name("toy_family_source.py"), folder / "toy_score_family.py")
    sys.path.insert(0, str(folder))
    module = importlib.import_module("toy_score_family")
    register(module.FAMILY)
    try:
        yield TOY
    finally:
        unregister(TOY)
        sys.path.remove(str(folder))
        sys.modules.pop("toy_score_family", None)


def test_the_toy_family_registers(toy_family):
    from tunesmith.config import parse_config

    assert TOY in families()
    assert parse_config({"task": {"name": TOY, "score_column": "y"}}).task.score_column == "y"


def test_overfits_saves_and_reloads(toy_family, checkpoints, tmp_path):
    contract.test_overfits_saves_and_reloads_with_plain_transformers(toy_family, checkpoints, tmp_path)


@pytest.mark.parametrize("method", list(contract.METHOD_CONFIGS))
def test_every_method(toy_family, method, checkpoints, tmp_path):
    contract.test_every_method_trains_and_predicts(toy_family, method, checkpoints, tmp_path)


@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_resume_is_exact(toy_family, where, checkpoints, tmp_path, monkeypatch):
    contract.test_resume_is_exact(toy_family, where, checkpoints, tmp_path, monkeypatch)


def test_streamed_metrics(toy_family, checkpoints, tmp_path):
    contract.test_streamed_metrics_equal_metrics_over_all_outputs(toy_family, checkpoints, tmp_path)


def test_preflight_error_exits_2(toy_family, checkpoints, tmp_path):
    contract.test_a_preflight_error_exits_2_without_a_traceback(toy_family, checkpoints, tmp_path)
