"""The causal-LM loss in chunks of tokens, so a large vocabulary's logits are never held whole.

Why: a causal LM's output layer turns every position into a vocabulary-sized row of logits. SmolLM2
(vocabulary 49,152) at batch 2 x 1024 tokens makes 2 x 1024 x 49,152 fp32 logits = 384 MiB per
forward, and the plain loss keeps them for backward, plus their softmax and their gradient of the
same size: over a GiB for one micro-batch, more than the rest of a small model's activations. The
technique of Liger's fused linear cross-entropy, torchtune's chunked cross-entropy and Apple's Cut
Cross-Entropy, in plain torch:

1. The model runs with its output embedding swapped for an identity (restored in `finally`), so its
   "logits" are the last hidden states [batch, length, hidden]. The *outermost* wrapper is called, so
   DDP's and accelerate's forward hooks (and peft's) still run.
2. Only the positions with a label are kept (labels are shifted inside: position i predicts
   labels[i + 1]; -100 is not trained), so a prompt-masked SFT batch projects only its answers.
3. They are projected with the output embedding's weight (and bias) `chunk_tokens` rows at a time,
   each chunk's logits -> fp32 cross-entropy under `torch.utils.checkpoint`: the forward keeps only
   the chunk's hidden rows, and backward recomputes one chunk's logits at a time. Peak memory for the
   loss is then about chunk_tokens x vocabulary x (logits + softmax + gradient), not batch x length x
   vocabulary. The cost is one more matmul per chunk (the recomputation).

Where the trick would change the result, `causal_lm_losses` falls back to the plain forward and
`Losses.per_token` (same numbers, full memory): a model whose forward post-processes the head's output
(Gemma2's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling: detected by reading
the forward's source after the head call; unreadable source counts as unknown), a head that is not a
plain `nn.Linear` (LoRA on lm_head, peft's modules_to_save copy), a sharded head weight (FSDP2 DTensor,
DeepSpeed ZeRO-3 placeholder: after the forward the full weight is gone) and a model with no output
embedding.

Measured (tests/test_lm_loss.py's numbers hold everywhere; timings on this machine:
`python -m tunesmith.speed.lm_loss` runs the benchmark): see MEASURED below.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.tasks.base import Losses

IGNORE_INDEX = -100
# Statements after the head's call that rebind the logits (softcapping, scaling, a bias, a vocabulary slice),
# read up to where the loss or the return starts (whose keyword arguments read `logits=logits,`).
_LOGITS_REBOUND = re.compile(r"^\s*(?:lm_)?logits\s*(?:=|\*=|/=|\+=|-=)", re.MULTILINE)
_LOSS_OR_RETURN = re.compile(r"^\s*(?:return\b|loss\b)", re.MULTILINE)

MEASURED = """\
filled in by the benchmark below (see the module docstring)
"""


def causal_lm_losses(model: nn.Module, inputs: dict, labels: torch.Tensor, *, chunk_tokens: int = 1024,
                     label_smoothing: float = 0.0, with_accuracy: bool = False) -> tuple[Losses, torch.Tensor | None]:
    """Per-example causal-LM losses (sum over labelled tokens, their count) of `model` on `inputs`; `labels`
    are aligned with `input_ids` (HF convention; shifted here). With `with_accuracy`, also each example's
    count of tokens whose argmax prediction is right (float, [batch]); else None."""
    found = _chunkable_head(model)
    if found is None:
        return _plain_losses(model, inputs, labels, label_smoothing, with_accuracy)
    parent, name, head = found
    with _head_swapped(parent, name):
        hidden = _first_output(model(**inputs))
    return _chunked_losses(hidden, head.weight, head.bias, labels, chunk_tokens, label_smoothing, with_accuracy)


# --------------------------------------------------------------------------- finding the head


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DataParallel / torch.compile / peft wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (model.module if isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else None)
        if inner is None:
            break
        model = inner
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def _chunkable_head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(the head's parent module, its attribute name, the head) when the chunked loss gives the plain result."""
    inner = _unwrapped(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or _sharded(head.weight):
        return None
    for path, module in inner.named_modules():
        for name, child in module.named_children():
            if child is head:
                return (module, name, head) if _forward_returns_head_output(type(module), name) else None
    return None


def _sharded(weight: torch.Tensor) -> bool:
    """FSDP2 keeps a DTensor shard outside the forward; DeepSpeed ZeRO-3 an empty placeholder."""
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor) or hasattr(weight, "ds_id") or weight.numel() == 0


@functools.cache
def _forward_returns_head_output(cls: type, name: str) -> bool:
    """Whether `cls.forward` returns the head's output as the logits unchanged (read from its source)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    call = f"self.{name}("
    if source.count(call) != 1:
        return False
    after = source.split(call, 1)[1].split("\n", 1)[-1]
    after = _LOSS_OR_RETURN.split(after, maxsplit=1)[0]
    return _LOGITS_REBOUND.search(after) is None


@contextlib.contextmanager
def _head_swapped(parent: nn.Module, name: str):
    head = getattr(parent, name)
    setattr(parent, name, nn.Identity())
    try:
        yield
    finally:
        setattr(parent, name, head)


def _first_output(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


# --------------------------------------------------------------------------- the losses


def _chunked_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    chunk_tokens: int, label_smoothing: float, with_accuracy: bool) -> tuple[Losses, torch.Tensor | None]:
    batch = hidden.shape[0]
    targets = labels[:, 1:].to(hidden.device)
    example, position = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    states = hidden[:, :-1][example, position]  # [tokens, hidden]: only the labelled positions
    tokens = targets[example, position]
    losses, correct = [], []
    for start in range(0, len(tokens), max(1, chunk_tokens)):
        part = slice(start, start + chunk_tokens)
        loss, right = _chunk(states[part], weight, bias, tokens[part], label_smoothing, with_accuracy)
        losses.append(loss)
        correct.append(right)
    sums = torch.zeros(batch, dtype=torch.float32, device=hidden.device)
    if losses:
        sums = sums.index_add(0, example, torch.cat(losses))
    else:  # every parameter still gets a (zero) gradient, as DDP expects
        sums = sums + 0.0 * (hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0.0)).float()
    units = torch.bincount(example, minlength=batch).to(torch.float32)
    accuracy = None
    if with_accuracy:
        accuracy = torch.zeros(batch, dtype=torch.float32, device=hidden.device)
        accuracy = accuracy.index_add(0, example, torch.cat(correct)) if correct else accuracy
    return Losses(sums, units), accuracy


def _chunk(states, weight, bias, tokens, label_smoothing: float, with_accuracy: bool):
    """One chunk's fp32 token losses (and 0/1 argmax hits); under autograd, checkpointed so backward recomputes
    its logits instead of keeping them."""
    run = functools.partial(_chunk_loss, label_smoothing=label_smoothing, with_accuracy=with_accuracy)
    if torch.is_grad_enabled() and (states.requires_grad or weight.requires_grad):
        return checkpoint(run, states, weight, bias, tokens, use_reentrant=False)
    return run(states, weight, bias, tokens)


def _chunk_loss(states, weight, bias, tokens, *, label_smoothing: float, with_accuracy: bool):
    logits = nn.functional.linear(states, weight, bias)
    loss = nn.functional.cross_entropy(logits.float(), tokens, reduction="none", label_smoothing=label_smoothing)
    right = (logits.detach().argmax(-1) == tokens).float() if with_accuracy else None
    return loss, right


def _plain_losses(model, inputs: dict, labels: torch.Tensor, label_smoothing: float,
                  with_accuracy: bool) -> tuple[Losses, torch.Tensor | None]:
    """The full-logits computation: for models the chunked loss cannot reproduce, and as the reference."""
    logits = _first_output(model(**inputs))[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    losses = Losses.per_token(logits, targets, label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX)
    accuracy = None
    if with_accuracy:
        accuracy = ((logits.detach().argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum(-1).float()
    return losses, accuracy


__all__ = ["causal_lm_losses"]
