"""Sharding-aware reads and writes of the weights (FSDP2, DeepSpeed, or neither).

Under FSDP2 every process holds a slice (a `DTensor` shard) of each parameter, and under DeepSpeed
the trained values are its (partitioned) fp32 master weights, so every read or write of the weights
is a collective that all processes reach at the same point: `gather_state` (full copies),
`load_trainable_state` (scatter from the main process), `plain_model` (the full, unsharded model for
saving). Without either they are plain copies.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.distributed.deepspeed import deepspeed_engine, deepspeed_parameters, load_deepspeed_parameters
from tunesmith.distributed.fsdp import sharding

def trainable_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what training changes: the trainable parameters, plus the tensors modules list
    in `extra_training_state()` (the embedding rows that only decay, `embedding_rows`), named under the module."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for prefix, module in model.named_modules():
        extra = getattr(module, "extra_training_state", None)
        if callable(extra):
            named += [(f"{prefix}.{key}" if prefix else key, tensor) for key, tensor in extra().items()]
    return named


def gather_state(model: nn.Module, accelerator=None, trainable_only: bool = True, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the model's `trainable_tensors`, or of its whole state dict.

    A collective under sharding: every process must call it, at the same point. Without sharding it
    is a plain copy (and needs no other process). Keys are the model's own parameter names.
    `keep=False`: take part in the gathering but keep nothing (processes that do not write; FSDP2
    only — each full tensor is dropped as soon as it is gathered)."""
    kind = sharding(model, accelerator)
    if deepspeed_engine(accelerator) is not None:
        module = accelerator.unwrap_model(model)
        full = deepspeed_parameters(module, accelerator, trainable_only, keep)
        if not trainable_only:
            full.update({k: v.detach().cpu().clone() for k, v in module.named_buffers()})
        return full if keep else {}
    if accelerator is not None and kind is None:
        model = accelerator.unwrap_model(model)
    items = trainable_tensors(model) if trainable_only else model.state_dict().items()
    if not keep and kind == "fsdp2":
        for _, value in items:
            _full(value, keep=False)
        return {}
    return {k: _full(v) for k, v in items}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor] | None, accelerator=None) -> None:
    """Copy full tensors into the (possibly sharded) `trainable_tensors`.

    Under FSDP2 only the main process needs `state` (others pass None): its values are scattered
    to every process. Under DeepSpeed every process passes it (any mapping: `TensorFile` reads it
    one tensor at a time). A collective under sharding or DeepSpeed, like `gather_state`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    kind = sharding(model, accelerator)
    if deepspeed_engine(accelerator) is not None:
        load_deepspeed_parameters(accelerator.unwrap_model(model), state, accelerator)
        return
    if accelerator is not None and kind is None:
        model = accelerator.unwrap_model(model)
    for name, param in trainable_tensors(model):
        if isinstance(param, DTensor):
            source = state[name] if state is not None else torch.empty(param.shape, dtype=param.dtype)
            # distribute_tensor scatters process 0's values; the other processes' `source` only gives the shape.
            param.copy_(distribute_tensor(source.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(state[name])


def collective_weights(model: nn.Module, accelerator=None) -> bool:
    """Whether reading or writing the weights is a collective every process must join (FSDP2, DeepSpeed)."""
    return sharding(model, accelerator) is not None or deepspeed_engine(accelerator) is not None


def plain_model(model: nn.Module, skeleton: nn.Module, main: bool, accelerator=None) -> nn.Module | None:
    """The full, unsharded model (CPU) on the main process, None on the others. A collective.

    `skeleton` is `meta_copy(model)` from before sharding (or before DeepSpeed's `prepare`): its
    parameters are replaced with the gathered ones (names are the same: FSDP2 keeps them), its buffers
    with the model's. Under DeepSpeed the trained parameters are its fp32 master weights (`gather_state`)."""
    if deepspeed_engine(accelerator) is not None:
        full = deepspeed_parameters(model, accelerator, trainable_only=False, keep=main)
    else:  # all-gather, same order everywhere
        full = {name: _full(param, keep=main) for name, param in model.named_parameters()}
    if not main:
        return None
    old = dict(skeleton.named_parameters())
    new = {id(old[name]): nn.Parameter(value, requires_grad=old[name].requires_grad) for name, value in full.items()}
    buffers = {name: b.detach().cpu().clone() for name, b in model.named_buffers()}
    for module_name, module in skeleton.named_modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                module._parameters[key] = new[id(param)]
        for key, buffer in list(module._buffers.items()):
            name = f"{module_name}.{key}" if module_name else key
            if buffer is not None and name in buffers:
                module._buffers[key] = buffers[name]
    if sharding(model, accelerator) == "zero3":
        # transformers' ZeRO-3 loader records every weight renaming it knows for the model, applied or
        # not, and save_pretrained reverts them: LayerNorm.weight would be saved as the legacy
        # LayerNorm.gamma. Without any, the model is saved under the names it has (as outside ZeRO-3).
        for module in skeleton.modules():
            if getattr(module, "_weight_conversions", None):
                module._weight_conversions = []
    return skeleton


def _full(tensor: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    # `full_tensor` is a collective (all-gather): every process reaches it for the same tensors in the same order.
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return full.detach().cpu().clone() if keep else None


class TensorFile:
    """A safetensors file read one tensor at a time (`file[name]`), for loads that need the values in
    turn (DeepSpeed): memory-mapped, so processes on one machine share the pages. A context manager."""

    def __init__(self, path):
        from safetensors import safe_open

        self._handle = safe_open(str(path), framework="pt")
        self._file = self._handle.__enter__()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.__exit__(*exc)
