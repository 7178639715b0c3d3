"""Two CPU training costs that have nothing to do with the model's maths, and how we remove them.

Measured on the bundled MiniLM (batch 32 x 32 tokens, bf16 autocast, 2-core Xeon; `benchmarks/speed.py`
has the end-to-end numbers):

1. **Page faults from the allocator.** glibc serves every block above its mmap threshold (at most
   32 MiB, dynamically raised from 128 KiB) with a fresh `mmap` and returns it with `munmap` on
   free. Gradients, activations and the 47 MB word-embedding gradient are freed and re-allocated
   every step, so the kernel zero-fills the same pages again: ~36,000 minor page faults per step,
   ~30 ms of a ~260 ms step. `keep_freed_memory` tells glibc (`mallopt`) to serve large blocks from
   the heap and not to trim it, so freed pages are reused: ~10 faults per step and ~13% faster
   bare steps (in the full loop, where glibc's adaptive threshold already catches part of it,
   ~8,900 fewer faults per step and a gain inside the machine's noise). The cost is glibc's heap fragmentation: torch asks for 64-byte-aligned blocks, which do
   not fit the exact-size hole a freed block of the same size leaves while small objects sit above
   it, so the heap first grows by a few such blocks before they coalesce and are reused (an
   isolated loop over one 64 MiB tensor settles after ~8 blocks); peak RSS of a whole training run
   is in `benchmarks/speed.py`'s table. Memory freed at the end of a run stays with the process
   (and is reused by the next run in it) until it exits. This is what jemalloc/tcmalloc via
   `LD_PRELOAD` give (Intel's CPU tuning guides recommend them), without a preload.
   `train.reuse_freed_memory: false` leaves glibc's defaults; no-op on other C libraries.

2. **Dropout masks.** torch's CPU dropout draws one Bernoulli per element from its generator
   serially (~5.5 ns per element; `bernoulli_` was 20% of a MiniLM training step, more than all
   attention matmuls). `FastDropout` draws 64-bit random words instead and makes four 16-bit
   uniforms of each (~0.8 ns per element) — from the same torch generator, so seeding,
   reproducibility and exact resume hold. An element is kept when its 16-bit uniform is below
   `round(keep * 65536)`: the keep probability is that threshold / 65536 (0.9 becomes 0.899994),
   and kept values are scaled by its exact inverse, so the expected output still equals the input.
   Only `nn.Dropout` modules in training mode on CPU tensors take this path; GPU dropout (already a
   fast parallel generator) and evaluation are untouched. Dropout inside fused attention
   (`scaled_dot_product_attention(dropout_p=...)`) keeps torch's own.

3. **The attention kernel for short sequences.** Without attention dropout (Llama, Qwen, SmolLM and
   most decoder models; `attention_probs_dropout_prob: 0` encoders) torch's SDPA picks its CPU flash
   kernel, which is slower than the plain math kernel in *training* on short sequences: MiniLM
   with attention dropout 0, bf16, one training step, math time / flash time per sample = 0.87 at
   32 tokens, 0.69-0.74 at 64, 0.67 at 128, 1.14-1.18 at 256, 1.62 at 512 (batch 32 and 8, one
   2-core Xeon). `attention_kernel` selects the math kernel for training batches up to
   `train.cpu_math_attention_max_length` (128) tokens per sequence; longer batches and
   evaluation (where flash was faster at every length: 1.30x at 32 tokens, 3.2x at 512) keep
   torch's choice. With attention dropout SDPA already runs the math kernel on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math

import torch
from torch import nn

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_configured: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc reuse freed large blocks instead of unmapping them (once per process).

    Returns whether the setting is active. Safe to call repeatedly; later calls return the first answer."""
    global _allocator_configured
    if _allocator_configured is None:
        _allocator_configured = _set_mallopt()
    return _allocator_configured


def _set_mallopt() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no glibc mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_MMAP_MAX=0: large blocks come from the heap too; a huge trim threshold keeps freed heap pages mapped.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


# --------------------------------------------------------------------------- dropout

_UNIFORM_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, keep: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Boolean mask (True = keep) with P(True) = threshold / 65536 ~= `keep`, and the scale 1 / that probability."""
    threshold = min(_UNIFORM_LEVELS, max(1, round(keep * _UNIFORM_LEVELS)))
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64)
    words.random_(-(2**63), None, generator=generator)  # full 64-bit range: every bit uniform
    # int16 lanes are uniform over [-32768, 32767]; shifting the threshold keeps the comparison in int16.
    mask = words.view(torch.int16)[:count].lt(threshold - _UNIFORM_LEVELS // 2).view(shape)
    return mask, _UNIFORM_LEVELS / threshold


class _ScaleByMask(torch.autograd.Function):
    """x * mask * scale, saving the boolean mask (1 byte per element) rather than a scaled float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x * mask * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask * ctx.scale, None, None


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training path draws its mask with `keep_mask` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.p >= 1.0:
            return super().forward(x)
        mask, scale = keep_mask(x.shape, 1.0 - self.p)
        if self.inplace:
            return x.mul_(mask).mul_(scale)
        return _ScaleByMask.apply(x, mask, scale)


def use_fast_dropout(model: nn.Module) -> int:
    """Turn the model's plain `nn.Dropout` modules (p > 0) into `FastDropout`, in place; returns how many.

    Only the class changes (no parameters or buffers), so state dicts, saving and DDP wrapping see
    the same model; `restore_dropout` turns them back."""
    swapped = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    for module in swapped:
        module.__class__ = FastDropout
    return len(swapped)


def restore_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is FastDropout:
            module.__class__ = nn.Dropout


# --------------------------------------------------------------------------- attention kernel


def attention_kernel(inputs: dict, device_type: str, max_length: int):
    """Context for one training forward: SDPA's math kernel for short CPU batches (see the module docstring)."""
    ids = inputs.get("input_ids", inputs.get("attention_mask"))
    if device_type != "cpu" or max_length <= 0 or not torch.is_tensor(ids) or ids.dim() < 2 or ids.shape[-1] > max_length:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
