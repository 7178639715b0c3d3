"""Fine-tuning strategies, generic over tasks and architectures.

- `full`: every parameter trains.
- `last_n`: embeddings and all but the last N transformer layers of each layer stack are frozen.
- `frozen`: only the task head trains.
- `lora` / `dora` / `ia3`: `peft` adapters, with the task head in `modules_to_save` so the adapter
  folder alone restores the model.

The task head is found structurally: the children of the `...For<Task>` model other than its base
model (`model.base_model_prefix`). Layer stacks are the `nn.ModuleList`s of identical blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from tunesmith.config import MethodConfig
from tunesmith.errors import ConfigError

log = logging.getLogger("tunesmith")

PEFT_METHODS = {"lora", "dora", "ia3"}


@dataclass
class ParamCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.2f}%)"


def parameter_numel(p: torch.Tensor) -> int:
    """A parameter's full size. Under DeepSpeed ZeRO-3 the tensor itself is an empty placeholder
    (this process's partition lives in `ds_tensor`); `ds_numel` and `ds_shape` keep the full size and shape."""
    return getattr(p, "ds_numel", None) or p.numel()


def parameter_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also under ZeRO-3 (see `parameter_numel`)."""
    return getattr(p, "ds_shape", None) or p.shape


def count_parameters(model: nn.Module) -> ParamCount:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += parameter_numel(p)
        trainable += parameter_numel(p) if p.requires_grad else 0
    return ParamCount(trainable, total)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_model(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level children that belong to the task head: they have parameters, are not the base model, and are
    not an output embedding tied to the input embedding (a causal LM's `lm_head` is the vocabulary itself:
    frozen must not train it, and LoRA must not save a full copy of it). Empty for a model with no head."""
    prefix = getattr(model, "base_model_prefix", "")
    tied = tied_output_names(model)
    return [
        name
        for name, child in model.named_children()
        if name != prefix and name not in tied and any(True for _ in child.parameters())
    ]


def tied_output_names(model: nn.Module) -> set[str]:
    """Top-level children whose parameters are all the input embedding's (tied word embeddings)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return set()
    shared = {id(p) for p in embeddings.parameters()}
    return {name for name, child in model.named_children()
            if (params := list(child.parameters())) and all(id(p) in shared for p in params)
            and child is not embeddings and name != getattr(model, "base_model_prefix", "")}


def layer_stacks(module: nn.Module) -> list[nn.ModuleList]:
    """ModuleLists of >= 2 blocks of one type (or one block named as a layer): encoder.layer, h, layers, block
    (encoder and decoder)."""
    stacks = []
    for child in module.modules():
        # One block is a stack too when it is named like one (a one-layer decoder's `T5Block`, `BartDecoderLayer`).
        if not isinstance(child, nn.ModuleList) or not len(child):
            continue
        named_block = len(child) == 1 and type(child[0]).__name__.endswith(("Layer", "Block"))
        if (len(child) >= 2 or named_block) and len({type(b) for b in child}) == 1:
            if any(True for _ in child[0].parameters()) and not any(child in s.modules() for s in stacks):
                stacks.append(child)
    return stacks


def _freeze_all_but_head(model: nn.Module, heads: list[str]) -> None:
    if not heads:
        raise ConfigError(_no_head_to_train(model))
    model.requires_grad_(False)
    for name in heads:  # top-level children, or dotted paths (a seq2seq model's decoder: `model.decoder`)
        model.get_submodule(name).requires_grad_(True)
    # A head that shares the input embedding with a frozen part (a decoder reading the encoder's vocabulary
    # table) must not train it: the frozen encoder's inputs would change under it.
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    paths = [name for name, module in model.named_modules(remove_duplicate=False) if module is embeddings]
    if any(not any(path == h or path.startswith(h + ".") for h in heads) for path in paths):
        embeddings.requires_grad_(False)
    # A frozen encoder is a fixed feature extractor: keep it in eval mode (no dropout) even while the
    # head trains, so each example's features never change — which is what lets `features.cache_body`
    # compute them once and still train exactly like the uncached path.
    body = base_model(model)
    if body is not model:
        body.register_forward_pre_hook(_stay_in_eval_mode)


def _stay_in_eval_mode(module: nn.Module, args: tuple) -> None:
    if module.training:
        module.train(False)
    return None  # a pre-hook's non-None return would replace the forward's arguments


def _apply_last_n(model: nn.Module, n: int, heads: list[str]) -> None:
    body = base_model(model)
    stacks = layer_stacks(body)
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no transformer layer stack found for method last_n")
    body.requires_grad_(False)
    in_stacks = {id(p) for stack in stacks for p in stack.parameters()}
    embeddings = {id(p) for p in body.get_input_embeddings().parameters()} if hasattr(body, "get_input_embeddings") else set()
    # Every nn.Embedding outside the layer stacks is an embedding too, whatever its name: GPT-2's
    # position table is `wpe`, which the name test below misses (it would otherwise train).
    embeddings |= {id(p) for m in body.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for stack in stacks:
        # max(): with n beyond a stack's depth, a negative start would slice off all but the last blocks.
        for block in list(stack)[max(len(stack) - n, 0) :] if n > 0 else []:
            block.requires_grad_(True)
    # Parameters after the last layer (final norms, poolers) train too; embeddings never do.
    for name, p in body.named_parameters():
        if id(p) not in in_stacks and id(p) not in embeddings and "embed" not in name and "emb" not in name.split(".")[-1]:
            p.requires_grad_(True)
    for name in heads:
        model.get_submodule(name).requires_grad_(True)


def _peft_config(cfg: MethodConfig, model: nn.Module, task_type: str, saved: list[str]):
    import peft

    target = cfg.target_modules
    if target == "auto":
        target = _auto_target_modules(model, cfg.name, saved)
    common = {"task_type": task_type, "modules_to_save": saved or None}
    if cfg.name == "ia3":
        feedforward = _ia3_feedforward(model, target)
        return peft.IA3Config(target_modules=target, feedforward_modules=feedforward, **common)
    return peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target,
        use_dora=cfg.name == "dora",
        **common,
    )


def _linear_names(model: nn.Module, saved: list[str]) -> list[str]:
    """Full names of the body's linear layers (GPT-2's Conv1D counts as linear), outside the modules saved whole
    and the output layer (as peft's all-linear)."""
    outside = tuple(saved) + tuple(tied_output_names(model))

    def inside(name: str) -> bool:
        return any(name == o or name.startswith(o + ".") or f".{o}." in f".{name}." for o in outside)

    # An output layer tied to an embedding anywhere (a warm-started decoder's own LM head) is a vocabulary table.
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        name
        for name, module in model.named_modules()
        if not inside(name) and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
        and id(module.weight) not in embedding_weights
    ]


def _matches(target: str, names: list[str]) -> bool:
    return any(name == target or name.endswith("." + target) for name in names)


def _auto_target_modules(model: nn.Module, method: str, saved: list[str]) -> list[str]:
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    )

    mapping = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING if method == "ia3" else TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    model_type = getattr(model.config, "model_type", "")
    linear = _linear_names(model, saved)
    if model_type in mapping and all(_matches(t, linear) for t in mapping[model_type]):
        return list(mapping[model_type])
    # Architectures peft has no default for: every linear layer of the body, by its last name; by full names
    # where a last name also belongs to a module left out (peft matches names by their ends).
    ends = {name.split(".")[-1] for name in linear}
    chosen = set(linear)
    if any(name.split(".")[-1] in ends and name not in chosen for name, _ in model.named_modules()):
        return linear
    return sorted(ends)


FEEDFORWARD_WORDS = ("fc2", "down_proj", "wo", "lin2", "c_proj", "dense_4h_to_h", "output.dense")


def _ia3_feedforward(model: nn.Module, target: list[str] | str) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    model_type = getattr(model.config, "model_type", "")
    known = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    targets = [target] if isinstance(target, str) else list(target)
    if known and all(k in targets for k in known):
        return list(known)
    # IA3 scales the *input* of feed-forward output layers; elsewhere it scales outputs.
    return [t for t in targets if t in FEEDFORWARD_WORDS]


def apply_method(model: nn.Module, cfg: MethodConfig, task_type: str, heads: list[str] | None = None,
                 saved: list[str] | None = None) -> nn.Module:
    """Freeze or wrap `model` for the configured strategy; logs trainable vs total parameters. `heads`: the
    modules the task trains as its head (`Task.head_modules`; default: found structurally); `saved`: the
    modules an adapter trains and saves whole (`Task.adapter_saved_modules`; default: the heads)."""
    heads = head_module_names(model) if heads is None else heads
    saved = heads if saved is None else saved
    if cfg.name == "full":
        model.requires_grad_(True)
    elif cfg.name == "frozen":
        _freeze_all_but_head(model, heads)
    elif cfg.name == "last_n":
        _apply_last_n(model, cfg.last_n_layers, heads)
    elif cfg.name in PEFT_METHODS:
        import peft

        model = peft.get_peft_model(model, _peft_config(cfg, model, task_type, saved))
    counts = count_parameters(model)
    log.info("method %s: %s", cfg.name, counts)
    if counts.trainable == 0:
        raise ValueError(f"method {cfg.name}: no trainable parameters; check method settings")
    return model


def _no_head_to_train(model: nn.Module) -> str:
    tied = sorted(tied_output_names(model))
    why = (f"its output layer ({', '.join(tied)}) is tied to the input embeddings, so it is the vocabulary itself, "
           "not a head" if tied else "it has no module apart from the pretrained body")
    return (f"method frozen: nothing would train on this {type(model).__name__}: {why}; use method lora (or dora/ia3) "
            "to adapt it cheaply, or last_n / full")


def is_peft(model: nn.Module) -> bool:
    try:
        import peft

        return isinstance(model, peft.PeftModel)
    except ImportError:
        return False


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes; restoring them restores the model exactly."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
