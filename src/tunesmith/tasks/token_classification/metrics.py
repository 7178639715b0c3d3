"""Streaming token-classification metrics: seqeval entity-level precision, recall and F1 (micro and per
entity type, default or strict mode) and token accuracy.

Each batch of predicted tag ids becomes tag sequences in the accumulator straight away (the first
sub-token of every word only); logits never outlive their batch.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from tunesmith.tasks.base import LossTotal


class TagAccumulator:
    """Gold and predicted tag sequences (one per window), token accuracy counts and the loss."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = list(labels)
        self.true: list[list[str]] = []
        self.pred: list[list[str]] = []
        self.correct = 0
        self.tokens = 0
        self.losses = LossTotal()
        self.count = 0

    def update(self, predictions: torch.Tensor, targets: torch.Tensor, loss_sums: torch.Tensor | None = None,
               loss_units: torch.Tensor | None = None) -> None:
        """`predictions`: tag ids (batch x positions); `targets`: gold ids, -100 (or >= number of tags,
        for the later sub-tokens of a word) where no word starts."""
        predicted, gold = predictions.detach().cpu().numpy(), targets.detach().cpu().numpy()
        names = np.asarray(self.labels, dtype=object)
        for p_row, g_row in zip(predicted, gold):
            keep = (g_row >= 0) & (g_row < len(self.labels))
            g, p = g_row[keep], p_row[keep]
            self.true.append(names[g].tolist())
            self.pred.append(names[p].tolist())
            self.correct += int((g == p).sum())
            self.tokens += len(g)
        self.losses.add(loss_sums, loss_units)
        self.count += len(gold)

    @property
    def loss(self) -> float:
        """Per labelled token (each word's first sub-token, or every sub-token with `label_all_subtokens`)."""
        return self.losses.mean

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else 0.0


def entity_metrics(true: list[list[str]], pred: list[list[str]], scheme: str, strict: bool) -> dict:
    """seqeval micro precision/recall/F1 and per-type scores. `strict` uses seqeval's strict mode
    (an entity counts only with exactly the scheme's tags), for BIO (IOB2) and BIOES."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2, IOBES

    options: dict = {}
    if strict and scheme in ("BIO", "BIOES"):
        options = {"mode": "strict", "scheme": IOB2 if scheme == "BIO" else IOBES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no predicted samples" and friends: zero_division covers them
        report = classification_report(true, pred, output_dict=True, zero_division=0, **options) if true else {}
    micro = report.pop("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
    for key in ("macro avg", "weighted avg"):
        report.pop(key, None)
    per_type = {
        name: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]), "support": int(v["support"])}
        for name, v in sorted(report.items())
    }
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "entities": int(micro["support"]),
        "per_type": per_type,
    }
