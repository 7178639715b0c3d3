"""Streaming classification metrics.

Batches are folded in as they come: only per-example scores (N x classes) and targets are kept,
never hidden states or whole-set logits of a larger shape, so ROC-AUC and Spearman stay exact while
memory stays O(N x classes).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import stats
from sklearn import metrics as skm

from tunesmith.tasks.base import LossTotal


class ScoreAccumulator:
    """Collects per-example scores (probabilities or regression outputs), targets and the loss."""

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []
        self.losses = LossTotal()
        self.count = 0

    def update(self, scores: torch.Tensor, targets: torch.Tensor, loss_sums: torch.Tensor | None = None,
               loss_units: torch.Tensor | None = None) -> None:
        self._scores.append(scores.detach().float().cpu().numpy())
        self._targets.append(targets.detach().cpu().numpy())
        self.losses.add(loss_sums, loss_units)
        self.count += len(targets)

    @property
    def scores(self) -> np.ndarray:
        return np.concatenate(self._scores) if self._scores else np.zeros((0,))

    @property
    def targets(self) -> np.ndarray:
        return np.concatenate(self._targets) if self._targets else np.zeros((0,))

    @property
    def loss(self) -> float:
        return self.losses.mean


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def single_label_metrics(probs: np.ndarray, targets: np.ndarray, labels: list[str]) -> dict:
    preds = probs.argmax(-1)
    ids = list(range(len(labels)))
    out: dict = {"accuracy": float(skm.accuracy_score(targets, preds))}
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(targets, preds, labels=ids, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    out["mcc"] = float(skm.matthews_corrcoef(targets, preds)) if len(targets) else 0.0
    out["roc_auc"] = _roc_auc(probs, targets, ids)
    out["confusion_matrix"] = skm.confusion_matrix(targets, preds, labels=ids).tolist()
    report = skm.classification_report(targets, preds, labels=ids, target_names=labels, output_dict=True, zero_division=0)
    out["per_class"] = {name: {k: float(v) for k, v in report[name].items()} for name in labels}
    return out


def _roc_auc(probs: np.ndarray, targets: np.ndarray, ids: list[int]) -> float | None:
    present = np.unique(targets)
    if len(present) < 2:
        return None  # undefined with one class in the evaluated set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(ids) == 2:
            return _clean(skm.roc_auc_score(targets, probs[:, 1]))
        if len(present) < len(ids):
            # One-vs-rest over the classes that occur; absent classes have no positive examples.
            return _clean(skm.roc_auc_score(targets, probs[:, present] / probs[:, present].sum(1, keepdims=True), multi_class="ovr", labels=present))
        return _clean(skm.roc_auc_score(targets, probs, multi_class="ovr", labels=ids))


def multi_label_metrics(probs: np.ndarray, targets: np.ndarray, labels: list[str], threshold: float) -> dict:
    preds = (probs >= threshold).astype(int)
    targets = targets.astype(int)
    out: dict = {"threshold": float(threshold), "subset_accuracy": float(skm.accuracy_score(targets, preds))}
    for avg in ("micro", "macro", "weighted", "samples"):
        p, r, f, _ = skm.precision_recall_fscore_support(targets, preds, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    out["hamming_loss"] = float(skm.hamming_loss(targets, preds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out["roc_auc"] = _clean(skm.roc_auc_score(targets, probs, average="micro"))
        except ValueError:
            out["roc_auc"] = None
    report = skm.classification_report(targets, preds, target_names=labels, output_dict=True, zero_division=0)
    out["per_class"] = {name: {k: float(v) for k, v in report[name].items()} for name in labels}
    return out


def tune_threshold(probs: np.ndarray, targets: np.ndarray) -> float:
    """The threshold in 0.05..0.95 that maximises micro-F1 (ties: closest to 0.5)."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    scores = [skm.f1_score(targets.astype(int), (probs >= t).astype(int), average="micro", zero_division=0) for t in grid]
    best = max(scores)
    candidates = [t for t, s in zip(grid, scores) if s == best]
    return float(min(candidates, key=lambda t: abs(t - 0.5)))


def regression_metrics(preds: np.ndarray, targets: np.ndarray) -> dict:
    preds, targets = preds.reshape(-1).astype(float), targets.reshape(-1).astype(float)
    mse = float(np.mean((preds - targets) ** 2)) if len(targets) else 0.0
    out = {"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(preds - targets))) if len(targets) else 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        constant = len(targets) < 2 or np.std(preds) == 0 or np.std(targets) == 0
        out["pearson"] = None if constant else _clean(stats.pearsonr(preds, targets)[0])
        out["spearman"] = None if constant else _clean(stats.spearmanr(preds, targets)[0])
        out["r2"] = _clean(skm.r2_score(targets, preds)) if len(targets) > 1 else None
    return out
