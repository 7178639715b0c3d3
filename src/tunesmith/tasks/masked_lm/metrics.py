"""Masked LM metrics, streamed from per-example values: loss, perplexity, masked-token accuracy and
pseudo-perplexity (Salazar et al. 2020, "Masked Language Model Scoring": each token masked in turn)."""

from __future__ import annotations

import math

import torch

from tunesmith.tasks.masked_lm.masking import IGNORE


def token_log_likelihoods(model, original: torch.Tensor, attention: torch.Tensor, maskable: torch.Tensor,
                          mask_id: int, chunk: int = 64) -> torch.Tensor:
    """Per example: the summed log-probability of each maskable token given the others, with that token masked
    (one masked copy per token, `chunk` copies per forward pass)."""
    rows, cols = maskable.nonzero(as_tuple=True)
    total = torch.zeros(original.shape[0], dtype=torch.float64)
    for start in range(0, len(rows), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        copies = original[r].clone()
        copies[torch.arange(len(r)), c] = mask_id
        logits = model(input_ids=copies, attention_mask=attention[r]).logits
        picked = logits[torch.arange(len(r)), c].float().log_softmax(-1)
        values = picked.gather(-1, original[r, c].unsqueeze(-1)).squeeze(-1).double().cpu()
        total.index_add_(0, r.cpu(), values)
    return total


class MaskedLMAccumulator:
    def __init__(self) -> None:
        self.loss_sum = self.units = self.correct = 0.0
        self.pll_sum = self.pll_units = 0.0
        self.samples = 0

    def update(self, reduced: dict) -> None:
        self.loss_sum += float(reduced["loss_sums"].double().sum())
        self.units += float(reduced["loss_units"].double().sum())
        self.correct += float(reduced["correct"].double().sum())
        self.pll_sum += float(reduced["pll_sums"].double().sum())
        self.pll_units += float(reduced["pll_units"].double().sum())
        self.samples += len(reduced["loss_sums"])

    def metrics(self) -> dict:
        loss = self.loss_sum / self.units if self.units else 0.0
        result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                  "accuracy": self.correct / self.units if self.units else 0.0,
                  "masked_tokens": int(self.units), "samples": self.samples}
        if self.pll_units:
            result["pseudo_perplexity"] = math.exp(min(-self.pll_sum / self.pll_units, 700.0))
        return result


def masked_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    chosen = labels != IGNORE
    return ((logits.argmax(-1) == labels) & chosen).sum(-1)
