"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): while training, uniform
noise in [-m, m] with m = alpha / sqrt(L x d) (L the padded sequence length, d the hidden size) is added to the
input embeddings' output, as transformers' Trainer and TRL do (`neftune_noise_alpha`).

A forward hook on the model's input embeddings, active only while the module is in training mode, so evaluation,
generation and the saved weights never see noise. The noise is drawn from torch's global generator, the one dropout
draws from, whose state every checkpoint saves and resume restores: a resumed run draws the same noise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.errors import ConfigError


def neftune_magnitude(alpha: float, length: int, hidden: int) -> float:
    return alpha / math.sqrt(length * hidden)


def add_neftune(model: nn.Module, alpha: float):
    """Register the noise on `model`'s input embeddings (peft and DDP wrappers looked through); returns the hook's
    handle (`handle.remove()` takes it off)."""
    inner = getattr(model, "module", model)
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if embeddings is None:
        raise ConfigError(f"train.neftune_noise_alpha: {type(inner).__name__} has no input embeddings to add noise to; "
                          "unset train.neftune_noise_alpha")

    def noisy(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training or output.dim() != 3:
            return output
        bound = neftune_magnitude(alpha, output.size(1), output.size(2))
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return embeddings.register_forward_hook(noisy)
