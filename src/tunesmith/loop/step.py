"""One training step: a micro-batch's forward and backward and, at the end of an accumulation window,
one optimizer update: the loss normalised over every unit of the window, clipping, the check for
non-finite losses and gradients, and the fp16 loss scaler's skipped steps.

The loss normalisation (transformers PR 34191). A task returns each example's loss *summed* over its
units (1 for a sequence-level loss, its target tokens for a token-level one) and the unit counts
(`Losses`). Each micro-batch's backward takes `sum / nominal`, `nominal` being the configured
per-device batch size: the same constant in every micro-batch and every process. When the window's
update is due, the gradients, which hold sum(grad of sums) / (nominal * accumulation * processes)
(accelerate divides by the accumulation steps, DDP and FSDP2 average over processes), are multiplied
by nominal * accumulation * processes / units, the units over all micro-batches and processes (one
all-reduce, together with the losses). Every unit then weighs the same however the batch is split:
batch 8 x accumulation 2 is batch 16, and two processes with different token counts are one process
with all of them. For an unweighted sequence-level loss over full batches the factor is exactly 1 and
no multiply is done. DeepSpeed's engine steps inside its backward, before the factor is known: there
each micro-batch's loss is its own mean (sum / units), as DeepSpeed users expect.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from tunesmith.config import TrainConfig
from tunesmith import distributed
from tunesmith.errors import TunesmithError
from tunesmith.loop.state import LoopResult
from tunesmith.runs.rundir import JsonlLog
from tunesmith.speed.cpu import attention_kernel

log = logging.getLogger("tunesmith")


class TrainingDiverged(TunesmithError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class LossWindow:
    """The loss sums and units of an accumulation window's micro-batches, over all processes.

    They stay on the device until the window's optimizer step is due, then are read at once: one
    all-reduce and one host sync per optimizer step, not per micro-batch (a host sync stalls the
    accelerator's queue). Checking them then still catches a NaN loss: its backward made the gradients,
    and their norm, NaN too. Only DeepSpeed reads each loss before its backward (`last_finite`)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self._pending: list[torch.Tensor] = []
        self._values: list[tuple[float, float]] = []

    def add(self, sums: torch.Tensor, units: torch.Tensor) -> None:
        """This process's micro-batch: its loss summed over its units, and the units."""
        self._pending.append(torch.stack([sums.detach().float().reshape(()), units.detach().float().reshape(())]))

    def last_finite(self) -> bool:
        self._read()
        total, units = self._values[-1]
        return math.isfinite(total / units if units else total)

    def close(self) -> list[tuple[float, float]]:
        """(loss sum, units) per micro-batch of the window, over all processes; the next window starts empty."""
        self._read()
        window, self._values = self._values, []
        return window

    def _read(self) -> None:
        if not self._pending:
            return
        stacked = torch.stack(self._pending)
        if self.accelerator.num_processes > 1:  # the global batch's, not this shard's
            stacked = self.accelerator.reduce(stacked, reduction="sum")
        self._values += [(total, units) for total, units in stacked.tolist()]
        self._pending = []


def window_loss(window: list[tuple[float, float]]) -> float:
    """The window's loss per unit; a non-finite micro-batch's sum, if any: the loss a skipped step is
    checked and logged with."""
    bad = next((total for total, _ in window if not math.isfinite(total)), None)
    if bad is not None:
        return bad
    units = sum(u for _, u in window)
    return sum(t for t, _ in window) / units if units else 0.0


def add_to_running_loss(result: LoopResult, window: list[tuple[float, float]]) -> None:
    """The logged loss is averaged per unit; a micro-batch with a non-finite loss is left out of it."""
    for total, units in window:
        if math.isfinite(total):
            result.running_loss += total
            result.running_count += units


def gradient_scale(window: list[tuple[float, float]], nominal: float, accumulation: int, processes: int) -> float:
    """What turns the accumulated gradients (each micro-batch's sum / nominal, averaged over processes and
    accumulation steps) into the gradient of the loss per unit over the whole window."""
    units = sum(u for _, u in window)
    return nominal * accumulation * processes / units if units else 0.0


# Where every process holds whole, unscaled gradients (no FSDP shards, no DeepSpeed-owned clipping).
_PLAIN_GRADIENTS = (DistributedType.NO, DistributedType.MULTI_CPU)


def clip_cpu_gradients(parameters, max_norm: float, scale: float = 1.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for CPU gradients, bit for bit, in less time: torch's foreach
    kernels (torch calls them only on accelerators; on CPU it loops over the tensors in Python, two
    calls per tensor), and no multiply when the coefficient is clamped to 1 (torch multiplies by 1.0
    anyway to spare a GPU a sync). MiniLM's 106 gradient tensors: 4.1 ms -> 3.7 ms when clipping,
    2.2 ms when not. Mixed dtypes go to torch's function (foreach kernels take one dtype).

    `scale` multiplies the gradients first (the loss's normalisation, `gradient_scale`); it is folded into
    the clipping's multiply, so the gradients are written once."""
    with_grads = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in with_grads]
    if not grads or len({g.dtype for g in grads}) > 1:
        scale_gradients(grads, scale)
        return torch.nn.utils.clip_grad_norm_(with_grads, max_norm)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    if scale != 1.0:
        total = total * scale
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1:  # False for NaN too: the update is skipped then, the gradients are left as they are
        torch._foreach_mul_(grads, coefficient * scale if scale != 1.0 else coefficient)  # torch clamps it to 1 first
    elif scale != 1.0:
        torch._foreach_mul_(grads, scale)
    return total


def scale_gradients(grads: list[torch.Tensor], scale: float) -> None:
    if scale == 1.0 or not grads:
        return
    try:
        torch._foreach_mul_(grads, scale)
    except (RuntimeError, TypeError, NotImplementedError):  # DTensors or mixed devices/dtypes
        for grad in grads:
            grad.mul_(scale)


def finite_update(accelerator: Accelerator, model: nn.Module, train_cfg: TrainConfig, loss: float, scale: float = 1.0) -> bool:
    """Normalise (`scale`) and clip the gradients; False when the loss or the gradient norm is NaN/inf (the
    update is skipped: one bad batch must not turn every weight into NaN)."""
    max_norm = train_cfg.max_grad_norm if train_cfg.max_grad_norm > 0 else float("inf")
    parameters = list(model.parameters())
    plain = accelerator.device.type == "cpu" and accelerator.scaler is None and accelerator.distributed_type in _PLAIN_GRADIENTS
    # tunesmith's own FSDP2 sharding (`train.fsdp`) runs under a plain distributed type with DTensor gradients.
    if plain and all(type(p.grad) is torch.Tensor for p in parameters if p.grad is not None):
        norm = clip_cpu_gradients(parameters, max_norm, scale)
    else:
        # Scaled before the fp16 scaler unscales them: both are linear. accelerate clips DTensor (FSDP2)
        # gradients too; their norm is then a DTensor, the same full value on every process.
        scale_gradients([p.grad for p in parameters if p.grad is not None], scale)
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
    if norm is not None:
        norm = distributed.full_value(norm)
    return math.isfinite(loss) and (norm is None or bool(torch.isfinite(torch.as_tensor(norm))))


class TrainStep:
    """A micro-batch's forward and backward; the optimizer update when its accumulation window closes."""

    def __init__(self, *, model, task, loss_fn, optimizer, scheduler, accelerator: Accelerator, train_cfg: TrainConfig,
                 logbook: JsonlLog, checkpoints_dir: Path, sharded: bool, deepspeed: bool, math_attention_max: int | None):
        self.model, self.task, self.loss_fn = model, task, loss_fn
        self.optimizer, self.scheduler, self.accelerator = optimizer, scheduler, accelerator
        self.train_cfg, self.logbook, self.checkpoints_dir = train_cfg, logbook, checkpoints_dir
        self.sharded, self.deepspeed, self.math_attention_max = sharded, deepspeed, math_attention_max
        self.scaler = getattr(accelerator, "scaler", None)
        self.nominal = float(train_cfg.per_device_train_batch_size)
        self.losses = LossWindow(accelerator)

    def __call__(self, result: LoopResult, inputs: dict, labels) -> None:
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            if self.sharded:  # FSDP2: reduce-scatter gradients only on the micro-batch that steps
                self.model.set_requires_gradient_sync(accelerator.sync_gradients)
            with accelerator.autocast(), attention_kernel(inputs, accelerator.device.type, self.math_attention_max):
                losses = self.task.training_losses(self.model, inputs, labels, self.loss_fn)
            total, units = losses.sums.sum(), losses.units.sum()
            self.losses.add(total, units)
            # DeepSpeed's engine updates the weights inside accelerate's backward, before the check below
            # could skip the update: a non-finite loss must not reach it (every process sees the same global
            # loss, so all skip together). Only there is each micro-batch's loss read before its backward.
            if not self.deepspeed:
                accelerator.backward(total / self.nominal)
            elif self.losses.last_finite():
                accelerator.backward(total / units.clamp_min(1))
            if accelerator.sync_gradients:
                self._update(result)
            self.optimizer.zero_grad(set_to_none=True)

    def _update(self, result: LoopResult) -> None:
        window = self.losses.close()
        add_to_running_loss(result, window)
        loss = window_loss(window)
        scale = 1.0 if self.deepspeed else gradient_scale(
            window, self.nominal, self.accelerator.gradient_accumulation_steps, self.accelerator.num_processes)
        finite = finite_update(self.accelerator, self.model, self.train_cfg, loss, scale)
        # The fp16 loss scaler skips non-finite updates itself and must see every step.
        if finite or self.scaler is not None:
            self.optimizer.step()
            self.scheduler.step()
        note_update(result, self.train_cfg, finite, loss, self.scaler, self.scheduler, self.logbook, self.checkpoints_dir)


def note_update(result: LoopResult, train_cfg: TrainConfig, finite: bool, loss: float, scaler, scheduler,
                 logbook: JsonlLog, checkpoints_dir: Path) -> None:
    """Count the optimizer step just taken or skipped. `train.max_nonfinite_steps` limits bad steps *in a row*:
    a run that recovers from a few isolated bad batches is healthy, however long it runs."""
    if finite:
        result.nonfinite_steps = 0
    elif _overflow_skip(scaler, loss):
        _note_overflow(result, loss, scaler, scheduler, logbook)
    else:
        _note_nonfinite(result, train_cfg, loss, scheduler, logbook, checkpoints_dir)


def _overflow_skip(scaler, loss: float) -> bool:
    """fp16: a finite loss with inf/NaN gradients is the loss scaler's overflow. The scaler skips that update
    and lowers its scale; that is its job (at the start of a run and each time the scale has grown past what
    fp16 holds), not divergence. A non-finite loss is divergence under any scaler."""
    return scaler is not None and scaler.is_enabled() and math.isfinite(loss)


def _note_overflow(result: LoopResult, loss: float, scaler, scheduler, logbook: JsonlLog) -> None:
    # Neither counted nor a reset: the update was skipped, so it shows nothing about whether training recovered.
    step = result.global_step + 1
    logbook.write({"type": "overflow", "step": step, "loss": loss, "loss_scale": scaler.get_scale(),
                   "learning_rate": scheduler.get_last_lr()[0]})
    log.info("step %d: fp16 gradient overflow; the loss scaler skipped the update (loss scale now %g)", step, scaler.get_scale())


def _note_nonfinite(result: LoopResult, train_cfg: TrainConfig, loss: float, scheduler, logbook: JsonlLog, checkpoints_dir: Path) -> None:
    result.nonfinite_steps += 1
    lr = scheduler.get_last_lr()[0]
    step = result.global_step + 1
    logbook.write({"type": "skipped", "step": step, "loss": loss if math.isfinite(loss) else str(loss), "learning_rate": lr})
    log.warning("step %d: non-finite %s (%s); update skipped (%d in a row, at most %d)", step,
                "loss" if not math.isfinite(loss) else "gradient", loss, result.nonfinite_steps, train_cfg.max_nonfinite_steps)
    if result.nonfinite_steps > train_cfg.max_nonfinite_steps:
        raise TrainingDiverged(
            f"training stopped at step {step}: {result.nonfinite_steps} consecutive steps had a NaN/inf loss or gradient "
            f"(limit train.max_nonfinite_steps={train_cfg.max_nonfinite_steps}); learning rate at the time {lr:.3g}. "
            "Likely causes: a learning rate too high (try a 10x smaller train.learning_rate or warmup_ratio 0.1), "
            "fp16 overflow (use precision bf16 or fp32), or NaN/inf values in the labels or inputs. "
            f"The last good checkpoint and the best weights are kept in '{checkpoints_dir}'"
        )
