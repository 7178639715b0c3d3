"""`method: frozen` with the feature cache trains exactly like the uncached path, and faster."""

import json

import torch
from transformers import AutoModelForSequenceClassification

import tunesmith
from tiny import sentiment_rows, tiny_config


def _run(model_dir, train_csv, out, cache: bool):
    cfg = tiny_config(model_dir, train_csv, out, method={"name": "frozen"},
                      train={"learning_rate": 3e-2, "num_train_epochs": 4, "cache_frozen_features": cache})
    return tunesmith.train(cfg, show_progress=False)


def test_cached_and_uncached_frozen_training_agree(pretrained_tiny_bert, sentiment_csv, tmp_path):
    cached = _run(pretrained_tiny_bert, sentiment_csv, tmp_path / "cached", True)
    plain = _run(pretrained_tiny_bert, sentiment_csv, tmp_path / "plain", False)
    a = AutoModelForSequenceClassification.from_pretrained(cached.run_dir / "model").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(plain.run_dir / "model").state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    losses = lambda run: [r["loss"] for r in map(json.loads, (run.run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert torch.allclose(torch.tensor(losses(cached)), torch.tensor(losses(plain)), atol=1e-5)
    # The encoder's one pass is timed on its own; the uncached run has no such pass.
    assert cached.metrics["train"]["feature_cache_seconds"] > 0
    assert "feature_cache_seconds" not in plain.metrics["train"]
    # The saved model carries the real encoder (unchanged), not the cache.
    base = AutoModelForSequenceClassification.from_pretrained(pretrained_tiny_bert).state_dict()
    assert all(torch.equal(a[k], base[k]) for k in a if k.startswith("bert.encoder"))
    texts = [r["text"] for r in sentiment_rows(8, seed=5)]
    assert [p["label"] for p in tunesmith.predict(cached.run_dir, texts)] == [p["label"] for p in tunesmith.predict(plain.run_dir, texts)]


def test_cached_body_used_during_training(pretrained_tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    from tunesmith.methods import feature_cache as features

    calls = {"lookups": 0}
    original = features.CachedBody.forward

    def counting(self, *args, **kwargs):
        calls["lookups"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(features.CachedBody, "forward", counting)
    _run(pretrained_tiny_bert, sentiment_csv, tmp_path / "run", True)
    assert calls["lookups"] >= 4 * 6  # every training batch of 4 epochs went through the cache
