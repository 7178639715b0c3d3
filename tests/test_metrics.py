"""Streaming metrics agree with scikit-learn / scipy computed on the whole set at once."""

import numpy as np
import torch
from scipy import stats
from sklearn import metrics as skm

from tunesmith.tasks.classification.metrics import (
    ScoreAccumulator,
    multi_label_metrics,
    regression_metrics,
    single_label_metrics,
    tune_threshold,
)


def _accumulate(scores, targets, batch=7):
    acc = ScoreAccumulator()
    for i in range(0, len(scores), batch):
        n = len(targets[i : i + batch])
        acc.update(torch.tensor(scores[i : i + batch]), torch.tensor(targets[i : i + batch]), torch.full((n,), 0.5), torch.ones(n))
    return acc


def test_single_label_matches_sklearn():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = rng.integers(0, 3, size=50)
    acc = _accumulate(probs, targets)
    out = single_label_metrics(acc.scores, acc.targets, ["a", "b", "c"])
    preds = probs.argmax(1)
    assert out["accuracy"] == skm.accuracy_score(targets, preds)
    assert np.isclose(out["f1_macro"], skm.f1_score(targets, preds, average="macro"))
    assert np.isclose(out["f1_weighted"], skm.f1_score(targets, preds, average="weighted"))
    assert np.isclose(out["mcc"], skm.matthews_corrcoef(targets, preds))
    assert np.isclose(out["roc_auc"], skm.roc_auc_score(targets, probs, multi_class="ovr"))
    assert out["confusion_matrix"] == skm.confusion_matrix(targets, preds).tolist()
    assert set(out["per_class"]) == {"a", "b", "c"}
    assert acc.count == 50 and np.isclose(acc.loss, 0.5)


def test_binary_roc_auc_uses_positive_class():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    targets = np.array([0, 1, 1, 0])
    out = single_label_metrics(probs, targets, ["neg", "pos"])
    assert np.isclose(out["roc_auc"], skm.roc_auc_score(targets, probs[:, 1]))


def test_roc_auc_undefined_with_one_class():
    out = single_label_metrics(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 0]), ["neg", "pos"])
    assert out["roc_auc"] is None


def test_multi_label_and_threshold_tuning():
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.4, 0.1], [0.2, 0.35], [0.45, 0.38], [0.1, 0.05]])
    out = multi_label_metrics(probs, targets, ["x", "y"], threshold=0.5)
    assert out["f1_micro"] == 0.0  # nothing reaches 0.5
    best = tune_threshold(probs, targets)
    assert 0.2 < best <= 0.35
    tuned = multi_label_metrics(probs, targets, ["x", "y"], threshold=best)
    assert tuned["f1_micro"] == 1.0 and tuned["subset_accuracy"] == 1.0


def test_regression_metrics():
    rng = np.random.default_rng(1)
    targets = rng.normal(size=40)
    preds = targets + rng.normal(scale=0.3, size=40)
    out = regression_metrics(preds, targets)
    assert np.isclose(out["mse"], np.mean((preds - targets) ** 2))
    assert np.isclose(out["pearson"], stats.pearsonr(preds, targets)[0])
    assert np.isclose(out["spearman"], stats.spearmanr(preds, targets)[0])
    assert regression_metrics(np.ones(5), targets[:5])["pearson"] is None
