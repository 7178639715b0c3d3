"""Memory preflight: before a run starts, estimate its peak training memory and compare it with what
this machine has, so a run that cannot fit fails in seconds with a way out, not after an hour (or
with the machine swapping to a halt, or an out-of-memory kill with no message).

The estimate, in bytes, from the model after the method is applied (`train` calls `check_memory`
after `apply_method` and the speed options, before the run directory is created):

    weights       every parameter, as loaded (fp32)
    gradients     4 bytes per trainable parameter
    optimizer     AdamW: two fp32 moments per trainable parameter (8 bytes), plus the step's
                  temporaries (4 bytes)
    autocast      bf16/fp16: the 2-byte copies of trainable weights autocast keeps for the forward
    activations   what the forward keeps for backward, per transformer layer from the first layer
                  with a trainable parameter up (frozen layers below keep nothing):
                  b*s*h*ACT_PER_HIDDEN elements for the projections, norms and MLP, plus
                  b*heads*s*s*ACT_PER_SCORE for attention scores where they are materialised (eager
                  attention; SDPA on CPU, which falls back to the plain kernel with attention dropout;
                  not SDPA on GPU; ACT_PER_SCORE_FAST_PATH for the CPU fast path's attention function),
                  plus LoRA's dropped input copies, times the bytes per element
                  (4; 3.5 under bf16/fp16 autocast); with gradient checkpointing each layer's input is
                  kept, and one layer is recomputed (with its gradients) at a time (CHECKPOINTED_LAYERS)
    workspace     the largest transient of one layer: in training (on top of the activations), or in
                  evaluation (no activations kept, but a larger batch); the embeddings' output; on GPU
                  the CUDA context

`s` is the longest tokenized train example (capped by `task.max_length`): batches are padded to
their longest member only, so shorter data needs less. The constants were calibrated against the
peak RSS of short CPU runs of the bundled MiniLM (see docs/reliability.md).

On CPU the model is already in RAM when the check runs, so what training adds is compared with
the RAM available (psutil, and the cgroup limit of a container); on GPU the whole estimate is
compared with the free GPU memory. Over 100%: `ResourceError` with the numbers and concrete
changes (smaller batch with gradient accumulation for the same global batch, shorter
`max_length`, `method: lora`, gradient checkpointing). Over `WARN_SHARE`: a warning.
`train.memory_check: false` skips the check.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import ResourceError
from tunesmith.distributed import requested_strategy
from tunesmith.methods.apply import parameter_numel, transformers_model
from tunesmith.speed.performance import local_processes

log = logging.getLogger("tunesmith")

GiB = 1024**3
WARN_SHARE = 0.8
# Activation bytes / element size kept per token and hidden unit in one transformer layer (Q, K, V,
# attention output, projection and norm inputs/outputs, the MLP's 4h intermediate before and after its
# activation, dropout masks, and what the allocator does not hand back), and per attention score
# (probabilities, dropout mask, dropped probabilities) when scores are materialised. Fitted to the peak
# RSS of MiniLM runs at batch x length 8x128 .. 32x256 and 8x512 on CPU (docs/reliability.md).
ACT_PER_HIDDEN = 28.0
ACT_PER_SCORE = 3.0
# The CPU fast path's attention function keeps the fp32 probabilities and a 2-byte (bf16) or 4-byte keep
# mask per score and casts each tensor once in its own backward: refitted to the same runs with it (the
# SDPA and eager figure above was fitted when the fast path computed what SDPA's math kernel computes).
ACT_PER_SCORE_FAST_PATH = 1.0
# Layers' worth of activations alive at once under gradient checkpointing: the layer being recomputed,
# its gradients, and the recomputation's transients (fitted to MiniLM at 32 x 256).
CHECKPOINTED_LAYERS = 3
LORA_PER_INPUT = 1.25  # LoRA dropout: the dropped input and its mask, per adapted layer's input feature
# With `train.cpu.reuse_freed_memory` glibc serves every block from its heap and never trims it: no page faults,
# but freed activations leave holes the next step's differently sized blocks do not always fit, so the
# heap outgrows the live tensors (most at long sequences: +1.3 GiB of peak RSS for MiniLM at 8 x 512 in
# fp32, none at 32 x 32). Activations and workspace are counted this much larger on CPU then.
HEAP_FRAGMENTATION = 1.25
# Bytes per logit a vocabulary-sized output holds at the loss: its fp32 value, the softmax cross-entropy keeps for
# backward, and the gradient of the same size (a 49k vocabulary at 2 x 1024 tokens: 1.1 GiB).
LOGIT_BYTES = 12
CUDA_CONTEXT = 600 * 1024**2


@dataclass(frozen=True)
class MemoryEstimate:
    device: str
    weights: int
    gradients: int
    optimizer: int
    autocast: int
    activations: int
    workspace: int
    batch_size: int
    seq_len: int
    logits: int = 0  # the output layer's logits at their peak: fp32 values, their softmax and their gradient

    @property
    def training(self) -> int:
        """What training adds to a loaded model."""
        return self.gradients + self.optimizer + self.autocast + self.activations + self.workspace + self.logits

    @property
    def total(self) -> int:
        return self.weights + self.training

    @property
    def needed(self) -> int:
        """What must still fit in the available memory: on CPU the weights are already loaded (and so no longer
        counted as available); on GPU nothing is there yet."""
        return self.training if self.device == "cpu" else self.total

    def breakdown(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("AdamW state", self.optimizer)]
        parts += [("autocast copies", self.autocast)] if self.autocast else []
        parts += [(f"activations for batch {self.batch_size} x {self.seq_len} tokens", self.activations), ("workspace", self.workspace)]
        parts += [("logits", self.logits)] if self.logits else []
        return ", ".join(f"{name} {_gib(size)}" for name, size in parts)


def _gib(size: float) -> str:
    if size < GiB:
        return f"{size / 1024**2:.1f} MiB"
    return f"{size / GiB:.2f} GiB" if size < 100 * GiB else f"{size / GiB:,.0f} GiB"


# --------------------------------------------------------------------------- the model's shape


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _layer_stack(model: nn.Module) -> nn.ModuleList | None:
    """The transformer blocks: the longest `ModuleList` whose members hold parameters."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and any(True for _ in m[0].parameters())]
    return max(stacks, key=len) if stacks else None


def _layers_keeping_activations(model: nn.Module, layers: int) -> int:
    """Layers whose activations backward needs: from the first one with a trainable parameter to the top (a
    trainable embedding means all of them; nothing trainable below the head means none)."""
    stack = _layer_stack(model)
    if stack is None:
        return layers
    trainable = [any(p.requires_grad for p in block.parameters()) for block in stack]
    stack_params = {id(p) for p in stack.parameters()}
    below = any(p.requires_grad for name, p in model.named_parameters() if id(p) not in stack_params and "embed" in name)
    if below:
        return len(stack)
    return len(stack) - trainable.index(True) if any(trainable) else 0


def _score_elements(model: nn.Module, device: str) -> float:
    """Elements kept per attention score and layer: eager attention and SDPA on CPU (its math kernel, with
    attention dropout) materialise the scores, the fast path's attention function keeps fewer, SDPA on GPU none."""
    from tunesmith.speed.cpu_fastpath import FAST_ATTENTION_IMPLEMENTATIONS

    config = getattr(transformers_model(model), "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation in FAST_ATTENTION_IMPLEMENTATIONS and device == "cpu":
        return ACT_PER_SCORE_FAST_PATH
    return ACT_PER_SCORE if implementation == "eager" or (implementation == "sdpa" and device == "cpu") else 0.0


def _lora_inputs(model: nn.Module) -> int:
    """Input features of all LoRA-adapted layers (peft `LoraLayer`s)."""
    return sum(int(getattr(m, "in_features", 0) or 0) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


# --------------------------------------------------------------------------- the estimate


def estimate_training_memory(
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    eval_batch_size: int | None = None,
    device: str = "cpu",
    heap_reuse: bool = False,
    logits_elements: int = 0,
) -> MemoryEstimate:
    """Peak memory of training `model` (method applied) on batches of `batch_size` x `seq_len` tokens.
    `heap_reuse`: `train.cpu.reuse_freed_memory` is on (see HEAP_FRAGMENTATION). `logits_elements`: how many
    logits the task's loss holds at once (`Task.logits_elements`): fp32 values, softmax and gradient each."""
    seen, total, trainable = set(), 0, 0
    weight_bytes = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        numel = parameter_numel(p)  # the full size, also of ZeRO-3's partitioned placeholders
        total += numel
        weight_bytes += numel * p.element_size()
        trainable += numel if p.requires_grad else 0
    config = getattr(model, "config", None)
    hidden = _config_value(config, "hidden_size", "d_model", "n_embd", "dim", default=768)
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers", default=12)
    heads = _config_value(config, "num_attention_heads", "n_head", "num_heads", "n_heads", default=max(1, hidden // 64))
    intermediate = _config_value(config, "intermediate_size", "n_inner", "ffn_dim", "hidden_dim", default=4 * hidden)
    mixed = precision in ("bf16", "fp16")
    element = 3.5 if mixed else 4.0  # autocast keeps matmul outputs in 2 bytes, norms and softmax in 4
    b, s, h = batch_size, seq_len, hidden
    per_hidden = ACT_PER_HIDDEN + 2 * (intermediate / h - 4)  # the MLP keeps two intermediate-sized tensors
    scores = _score_elements(model, device)
    full_layer = b * s * (h * per_hidden + heads * s * scores) * element
    kept = _layers_keeping_activations(model, layers)
    if gradient_checkpointing and kept:
        activations = kept * b * s * h * element + CHECKPOINTED_LAYERS * full_layer  # each layer's input, and the recomputed layer
    else:
        activations = kept * full_layer
    activations += b * s * _lora_inputs(model) * LORA_PER_INPUT * element
    # One layer's transients (attention scores and the MLP intermediate): in training on top of the activations,
    # in evaluation (a larger batch, nothing kept for backward) instead of them.
    transient = lambda n: n * s * (2 * heads * s + 2 * intermediate) * element  # noqa: E731
    workspace = max(transient(b), transient(eval_batch_size or b) - activations) + 2 * b * s * h * element
    if heap_reuse and device == "cpu":
        activations, workspace = activations * HEAP_FRAGMENTATION, workspace * HEAP_FRAGMENTATION
    workspace += CUDA_CONTEXT if device == "cuda" else 0
    return MemoryEstimate(
        device=device,
        weights=weight_bytes,
        gradients=4 * trainable,
        optimizer=12 * trainable,
        autocast=2 * trainable if mixed else 0,
        activations=int(activations),
        workspace=int(workspace),
        batch_size=batch_size,
        seq_len=seq_len,
        logits=LOGIT_BYTES * int(logits_elements),
    )


# --------------------------------------------------------------------------- what is available


def _cgroup_free() -> int | None:
    """Room left under a container's memory limit (cgroup v2, else v1), if there is one."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def available_memory(device: str = "cpu") -> tuple[int, str]:
    """(bytes available, what they are) on `device`."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free), f"free memory on GPU {torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    import psutil

    available = int(psutil.virtual_memory().available)
    cgroup = _cgroup_free()
    if cgroup is not None and cgroup < available:
        return cgroup, "RAM left under this container's memory limit"
    return available, "RAM available"


# --------------------------------------------------------------------------- the check


def _longest(lengths, max_length: int) -> int:
    longest = max((int(n) for n in lengths), default=max_length) if lengths is not None else max_length
    return max(1, min(longest, max_length))


def check_memory(model: nn.Module, cfg, precision: str, train_data=None, device: str | None = None,
                 logits_elements: Callable[[int, int], int] | None = None) -> list[str]:
    """Raise `ResourceError` if training `model` as configured cannot fit; return a warning if it barely does.
    `train_data`: the encoded train set (its `length` column gives the longest example); `logits_elements(batch,
    length)`: the logits the task's loss holds at once (`Task.logits_elements`)."""
    if not getattr(cfg.train, "memory_check", True):
        return []
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_length = int(cfg.task.max_length)
    lengths = train_data["length"] if train_data is not None and "length" in getattr(train_data, "column_names", ()) else None
    seq_len = _longest(lengths, max_length)
    rows = len(train_data) if train_data is not None else None  # a batch never holds more rows than the train set
    checkpointing = bool(getattr(cfg.train, "gradient_checkpointing", False))
    # FSDP2 (train.fsdp over N processes): each process keeps 1/N of the weights, gradients and AdamW state
    # (plus one gathered layer at a time, inside the workspace). On CPU the weights are counted as loaded.
    # DeepSpeed ZeRO stage 1 partitions the AdamW state over the processes, stage 2 the gradients too, stage 3
    # the weights as well.
    from accelerate.utils import get_cpu_distributed_information

    processes = max(1, get_cpu_distributed_information().world_size)  # torchrun/accelerate (WORLD_SIZE) or MPI (PMI_SIZE, ...)
    fsdp = bool(getattr(cfg.train, "fsdp", False))
    zero = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0) if requested_strategy() == "deepspeed" else 0
    split = lambda n, stage: n // processes if fsdp or zero >= stage else n  # noqa: E731

    def estimate(batch: int) -> MemoryEstimate:
        found = estimate_training_memory(
            model, batch_size=batch, seq_len=seq_len, precision=precision, gradient_checkpointing=checkpointing,
            eval_batch_size=cfg.train.per_device_eval_batch_size, device=device,
            heap_reuse=bool(cfg.train.cpu.effective("reuse_freed_memory")),
            logits_elements=logits_elements(batch, seq_len) if logits_elements else 0,
        )
        return dataclasses.replace(found, weights=split(found.weights, 3), gradients=split(found.gradients, 2),
                                   optimizer=split(found.optimizer, 1), autocast=split(found.autocast, 3))

    batch = min(cfg.train.per_device_train_batch_size, rows or cfg.train.per_device_train_batch_size)
    found = estimate(batch)
    available, what = available_memory(device)
    if device == "cpu":  # processes launched together on one machine (DDP on CPU) share its RAM
        available //= local_processes()
    share = found.needed / max(available, 1)
    summary = (
        f"estimated peak training memory {_gib(found.needed)}"
        + (f" on top of the loaded model ({found.breakdown()})" if device == "cpu" else f" ({found.breakdown()})")
    )
    if share > 1:
        raise ResourceError(f"train: {summary} exceeds the {_gib(available)} of {what}; {_suggestions(cfg, estimate, found, available, seq_len, max_length)}")
    if share > WARN_SHARE:
        warning = (
            f"memory: {summary} is {share:.0%} of the {_gib(available)} of {what}; the run may swap or be killed — "
            f"{_suggestions(cfg, estimate, found, available, seq_len, max_length)}"
        )
        log.warning(warning)
        return [warning]
    return []


def _suggestions(cfg, estimate, found: MemoryEstimate, available: int, seq_len: int, max_length: int) -> str:
    batch, accumulation = found.batch_size, cfg.train.gradient_accumulation_steps
    budget = WARN_SHARE * available
    fits = [b for b in _halvings(batch) if estimate(b).needed <= budget]
    tips = []
    if fits and fits[0] < batch:
        smaller = fits[0]
        steps = accumulation * math.ceil(batch / smaller)
        tips.append(
            f"set train.per_device_train_batch_size={smaller} with train.gradient_accumulation_steps={steps} "
            f"(global batch {smaller * steps} per device, was {batch * accumulation})"
        )
    elif not fits:
        tips.append("even batch size 1 does not fit at this length")
    if seq_len > 32:
        tips.append(f"lower task.max_length (longest train example: {seq_len} tokens, limit {max_length})")
    if cfg.method.name in ("full", "last_n"):
        tips.append("use method: lora (no gradients or AdamW state for the frozen weights)")
    if not getattr(cfg.train, "gradient_checkpointing", False) and found.activations > found.weights:
        tips.append("set train.gradient_checkpointing=true (keeps far fewer activations, about a third slower)")
    tips.append("or set train.memory_check=false to try anyway")
    return "to fit: " + "; ".join(tips)


def _halvings(batch: int):
    while batch >= 1:
        yield batch
        batch //= 2


__all__ = ["MemoryEstimate", "available_memory", "check_memory", "estimate_training_memory"]
