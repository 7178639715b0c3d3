"""Train only the input-embedding rows of tokens that occur in the training data (CPU).

A token that never occurs in the training data never receives a gradient, so AdamW's update of its
embedding row is weight decay alone: both moments stay zero, the Adam step is 0 / (0 + eps) = 0, and
the row becomes `row * (1 - lr * weight_decay)`. A full-vocabulary embedding still pays for every row
on every step: a dense gradient the size of the matrix, clipping's norm and scaling over it, and
AdamW's read of weight, gradient and both moments and write of three of them. MiniLM's embedding is
30,522 x 384 (47 MB, half the model's parameters); the Rotten Tomatoes training sentences use 12,026
of its rows.

`SeenRowsEmbedding` takes the input embedding's place for the run. The rows of tokens in the
training data (and the padding token) are its trained parameter; the other rows are a plain tensor
that `decay_unseen_rows`, an optimizer step hook, multiplies by `1 - lr * weight_decay` after each
step: the fp32 multiplication AdamW itself makes, so the whole model stays bit-identical to training
the full matrix (tested). Evaluation, reads of `.weight` and the checkpoints see the full matrix;
`restore_embedding` puts the plain `nn.Embedding` back with it before the model is saved.

It applies only where that holds: a plain, trained `nn.Embedding` (not frozen by the method, no
`max_norm`, not sparse) that no other module shares (tied output embeddings get every row's
gradient), on CPU, without FSDP2/DeepSpeed sharding. The trained batches must carry only the data's
token ids: a training batch with another id raises (the tasks' collators only pad; a task whose collator
inserts other ids, masked LM's random replacement, sets `Task.inserts_any_token` and the swap is not made).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith")

# Below this share of unseen rows the saving is too small to be worth a second code path.
MIN_UNSEEN_SHARE = 0.1
UNSEEN_ROWS = "unseen_rows"  # the key of the untrained rows in checkpoints (under the module's name)


class SeenRowsEmbedding(nn.Module):
    """An `nn.Embedding` whose training updates only `rows`; the others only decay (module docstring)."""

    def __init__(self, embedding: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        weight = embedding.weight.detach()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = embedding.padding_idx
        self.scale_grad_by_freq = embedding.scale_grad_by_freq
        seen = torch.zeros(self.num_embeddings, dtype=torch.bool)
        seen[rows] = True
        # Plain tensors, not buffers: DDP would broadcast buffers on every forward and state dicts would
        # carry them; the unseen rows travel in checkpoints through `extra_training_state`.
        self.rows = seen.nonzero().flatten()
        self.others = (~seen).nonzero().flatten()
        self.position = torch.full((self.num_embeddings,), -1, dtype=torch.long)
        self.position[self.rows] = torch.arange(len(self.rows))
        self.trained = nn.Parameter(weight[self.rows].clone())
        self.unseen = weight[self.others].clone()
        self.trained_padding = int(self.position[self.padding_idx]) if self.padding_idx is not None else None
        self.decayed_at_step: int | None = None  # AdamW's step count when the unseen rows last decayed
        self._merged: torch.Tensor | None = None
        self._merged_versions: tuple[int, int] | None = None
        # The original module, unregistered (its weight would otherwise be a parameter twice); once the
        # swap is done its storage is released for the run, and `restore_embedding` refills it.
        object.__setattr__(self, "original", embedding)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return F.embedding(input_ids, self.weight, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        self._merged = None  # training changes the rows; keep no stale copy of the full matrix
        positions = self.position[input_ids]
        if bool((positions < 0).any()):
            unseen = sorted(set(input_ids[positions < 0].tolist()))[:5]
            raise TunesmithError(
                f"a training batch holds token ids that are not in the training data ({unseen}); the embedding was "
                "set up to train only the rows of the data's tokens. Set train.cpu.skip_unseen_embedding_rows=false"
            )
        return F.embedding(positions, self.trained, self.trained_padding, scale_grad_by_freq=self.scale_grad_by_freq)

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix (a copy without gradient), rebuilt only after the rows changed."""
        versions = (self.trained._version, self.unseen._version)
        if self._merged is None or self._merged_versions != versions:
            merged = torch.empty(self.num_embeddings, self.embedding_dim, dtype=self.trained.dtype, device=self.trained.device)
            merged.index_copy_(0, self.rows, self.trained.detach())
            merged.index_copy_(0, self.others, self.unseen)
            self._merged, self._merged_versions = merged, versions
        return self._merged

    def extra_training_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the trained parameters that a checkpoint must keep (see `distributed.trainable_tensors`)."""
        return {UNSEEN_ROWS: self.unseen}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, trained rows={len(self.rows)}, padding_idx={self.padding_idx}"


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def _shared(model: nn.Module, weight: torch.Tensor) -> bool:
    """Whether a module other than the embedding holds `weight` (tied output layers)."""
    holders = {id(m) for m in model.modules() for p in m.parameters(recurse=False) if p is weight}
    return len(holders) > 1


def train_seen_rows_only(model: nn.Module, token_ids: Iterable, extra_ids: Iterable[int] = ()) -> dict | None:
    """Swap the model's input embedding for a `SeenRowsEmbedding` over the ids in `token_ids` (the
    training examples' `input_ids`) and `extra_ids` (padding). Returns what it did, or None where the
    swap does not apply (module docstring)."""
    embedding = _input_embedding(model)
    if type(embedding) is not nn.Embedding or not embedding.weight.requires_grad or embedding.weight.device.type != "cpu":
        return None
    if embedding.max_norm is not None or embedding.sparse or _shared(model, embedding.weight):
        return None
    chunks = [np.asarray(ids, dtype=np.int64).ravel() for ids in token_ids]
    extra = [i for i in list(extra_ids) + [embedding.padding_idx] if i is not None]
    seen = np.unique(np.concatenate(chunks + [np.asarray(extra, dtype=np.int64)]))
    rows = embedding.num_embeddings
    if len(seen) == 0 or seen[0] < 0 or seen[-1] >= rows:
        return None  # ids outside the vocabulary: the model's own embedding reports them
    if 1.0 - len(seen) / rows < MIN_UNSEEN_SHARE:
        return None
    try:
        model.set_input_embeddings(SeenRowsEmbedding(embedding, torch.from_numpy(seen)))
    except (NotImplementedError, AttributeError):  # a model without a setter: train every row
        return None
    embedding.weight.data = torch.empty(0, dtype=embedding.weight.dtype)
    log.info("input embedding: training the %d of %d rows whose tokens occur in the training data; the other rows "
             "only get AdamW's weight decay, applied directly (train.cpu.skip_unseen_embedding_rows)", len(seen), rows)
    return {"trained_rows": int(len(seen)), "rows": int(rows)}


def dataset_token_ids(dataset) -> Iterable:
    """The `input_ids` of a tokenized `datasets.Dataset` (or of a list of examples) as flat arrays.

    Reads the Arrow column directly: a few milliseconds for a million examples, where iterating rows
    takes minutes. The Arrow table may hold more rows than the dataset shows (after `select`): more
    ids count as seen, which costs speed, never exactness."""
    table = getattr(getattr(dataset, "data", None), "table", None)
    if table is not None and "input_ids" in table.column_names:
        return [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in table.column("input_ids").chunks]
    return [example["input_ids"] for example in dataset]


def decay_unseen_rows(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Register the hook that gives the unseen rows AdamW's decoupled weight decay after each step."""
    modules = [m for m in model.modules() if isinstance(m, SeenRowsEmbedding)]
    if not modules:
        return

    def hook(opt, args, kwargs):
        for module in modules:
            # Once per step that updated the trained rows, read from AdamW's own step count: a step
            # that skipped them (no gradient) does not decay the others either, and a hook that runs
            # twice for one step (an optimizer class whose `step` torch wrapped twice) decays once.
            count = opt.state.get(module.trained, {}).get("step")
            if count is None or int(count) == module.decayed_at_step:
                continue
            module.decayed_at_step = int(count)
            # The group is looked up at every step: accelerate's optimizer wrapper reloads the state
            # dict, which replaces the group dicts (one captured earlier keeps the first learning rate).
            group = next((g for g in opt.param_groups if any(p is module.trained for p in g["params"])), None)
            decay = float(group["lr"]) * float(group["weight_decay"]) if group is not None else 0.0
            if decay:
                module.unseen.mul_(1.0 - decay)  # AdamW: param.mul_(1 - lr * weight_decay), fp32

    optimizer.register_step_post_hook(hook)


def restore_embedding(model: nn.Module) -> None:
    """Put the plain `nn.Embedding` back, holding the full trained matrix."""
    module = _input_embedding(model)
    if not isinstance(module, SeenRowsEmbedding):
        return
    original = module.original
    original.weight.data = module.weight  # already a fresh copy, and the swapped-in module is dropped
    model.set_input_embeddings(original)
