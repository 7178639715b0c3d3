"""End-to-end checks with the bundled real model and data (slow: minutes on 2 cores)."""

import pytest

import tunesmith
from tunesmith.assets import installed_assets

pytestmark = pytest.mark.slow


def _require_assets():
    missing = [k for k, v in installed_assets().items() if v.startswith("not installed")]
    if missing:
        pytest.skip(f"bundled assets not installed: {missing}")


def test_bundled_minilm_learns_rotten_tomatoes(tmp_path):
    _require_assets()
    cfg = {
        "data": {"dataset_name": "bundled:rotten_tomatoes", "max_train_samples": 1500, "max_eval_samples": 300,
                 "test_split": 0.1},
        "task": {"max_length": 64},
        "train": {"num_train_epochs": 1, "learning_rate": 1e-4, "seed": 0},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = tunesmith.train(cfg, show_progress=False)
    assert result.metrics["test"]["accuracy"] > 0.7
    preds = tunesmith.predict(result.run_dir, ["a gorgeous, witty and moving film", "dull, lifeless and far too long"])
    assert [p["label"] for p in preds] == ["1", "0"]
