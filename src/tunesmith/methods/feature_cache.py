"""`method: frozen` with a feature cache: the encoder runs once, only the head trains.

With the encoder frozen (and, see `methods`, kept in eval mode so dropout does not touch it), its
output for an example never changes, so running it every epoch is wasted work. `cache_body`
runs the base model once over the data and swaps it for `CachedBody`, which returns the stored
outputs; the rest of the model's forward (pooling, dropout, head) runs unchanged, so this works
for every architecture whose head reads the base model's `last_hidden_state`/`pooler_output`.

Outputs are looked up by content (the unpadded input ids, plus token type ids), so any batching
or shuffling finds them and duplicate texts share one entry. Only non-padding positions are
stored, in the autocast dtype (bf16 halves the memory); lookups re-pad with zeros, which heads
never read (they pool the first, last or masked positions).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.data import DataLoader

from tunesmith.methods.apply import base_model

log = logging.getLogger("tunesmith")

Key = tuple


def _keys(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None) -> list[Key]:
    keys = []
    for row in range(input_ids.shape[0]):
        mask = attention_mask[row].bool()
        key = tuple(input_ids[row][mask].tolist())
        if token_type_ids is not None:
            key += (-1,) + tuple(token_type_ids[row][mask].tolist())
        keys.append(key)
    return keys


class CachedBody(nn.Module):
    """Stands in for a frozen base model, returning its precomputed outputs."""

    def __init__(self, body: nn.Module, output_type: type, store: dict[Key, tuple[torch.Tensor, torch.Tensor | None]]):
        super().__init__()
        # Kept out of the module tree (a list, not an attribute module): its parameters are frozen and
        # must not be moved, counted or saved while the cache stands in for it.
        self._body = [body]
        self.output_type = output_type
        self.store = store
        self.config = getattr(body, "config", None)

    @property
    def body(self) -> nn.Module:
        return self._body[0]

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keys = _keys(input_ids, attention_mask, token_type_ids)
        if any(k not in self.store for k in keys):
            # Data the cache never saw (should not happen inside a run): fall back to the encoder.
            return self.body(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kwargs)
        first_hidden, first_pooled = self.store[keys[0]]
        batch, length = input_ids.shape
        hidden = first_hidden.new_zeros((batch, length, first_hidden.shape[-1]))
        masks = attention_mask.bool()
        for row, key in enumerate(keys):
            hidden[row, masks[row]] = self.store[key][0]
        fields = {"last_hidden_state": hidden.float()}
        if first_pooled is not None:
            fields["pooler_output"] = torch.stack([self.store[k][1] for k in keys]).float()
        return self.output_type(**fields)


@torch.inference_mode()
def cache_body(model: nn.Module, loaders: list[DataLoader], autocast) -> int:
    """Run the base model once over `loaders` and install a `CachedBody`. Returns entries cached."""
    prefix = getattr(model, "base_model_prefix", "")
    body = base_model(model)
    if not prefix or body is model:
        raise ValueError(f"{type(model).__name__}: no separate base model to cache")
    store: dict = {}
    body.eval()
    # Iterating a DataLoader draws from the global RNG (its base seed); fork it so the head's dropout
    # sees the same random stream as in an uncached run.
    with torch.random.fork_rng(devices=[]):
        _fill(body, loaders, autocast, store)
    output_type = store.pop("__type__")
    setattr(model, prefix, CachedBody(body, output_type, store))
    megabytes = sum(h.numel() * h.element_size() + (p.numel() * p.element_size() if p is not None else 0) for h, p in store.values()) / 2**20
    log.info("frozen encoder: cached outputs for %d distinct inputs (%.0f MB); only the head trains", len(store), megabytes)
    return len(store)


def _fill(body: nn.Module, loaders: list[DataLoader], autocast, store: dict) -> None:
    for loader in loaders:
        for batch in loader:
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with autocast():
                out = body(**inputs, return_dict=True)
            store["__type__"] = type(out)
            hidden, pooled = out.last_hidden_state, getattr(out, "pooler_output", None)
            masks = inputs["attention_mask"].bool()
            for row, key in enumerate(_keys(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))):
                store[key] = (hidden[row, masks[row]].clone(), None if pooled is None else pooled[row].clone())


def uncache_body(model: nn.Module) -> None:
    """Put the real encoder back (before saving or predicting)."""
    prefix = getattr(model, "base_model_prefix", "")
    cached = getattr(model, prefix, None)
    if isinstance(cached, CachedBody):
        setattr(model, prefix, cached.body)
