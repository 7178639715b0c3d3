"""TEMPORARY plain version (replaced by the chunked implementation from branch lmloss)."""
from __future__ import annotations

import torch

from tunesmith.tasks.base import Losses


def causal_lm_losses(model, inputs: dict, labels: torch.Tensor, *, chunk_tokens: int = 1024, label_smoothing: float = 0.0,
                     with_accuracy: bool = False):
    logits = model(**inputs).logits[:, :-1]
    targets = labels[:, 1:]
    losses = Losses.per_token(logits, targets, label_smoothing)
    correct = None
    if with_accuracy:
        correct = ((logits.argmax(-1) == targets) & (targets != -100)).sum(-1).float()
    return losses, correct
