"""Four CPU training costs beyond the model's matmuls, and how we cut them.

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
   is in `benchmarks/speed.py`'s table. This is what jemalloc/tcmalloc via
   `LD_PRELOAD` give (Intel's CPU tuning guides recommend them), without a preload. Trimming is
   off entirely (`M_TRIM_THRESHOLD` -1): with the largest threshold mallopt takes otherwise
   (2^31 - 1) glibc still gave the heap back whenever more than 2 GB lay free at its top, which
   long sequences reach — MiniLM at batch 32 x 256 tokens took 180,000-370,000 page faults per
   training step that way (1.48-1.75 s per step) and none with trimming off (1.48 s).
   The setting lasts for the run: `restore_allocator` (called when the run's speed options are restored,
   and however the run ends) sets glibc's defaults back. `train.cpu.reuse_freed_memory: false` leaves glibc's
   defaults alone; no-op on other C libraries.

2. **Dropout masks.** torch's CPU dropout draws one Bernoulli per element from its generator
   serially (~5.5 ns per element; `bernoulli_` was 20% of a MiniLM training step, more than all
   attention matmuls). `FastDropout` draws 64-bit random words instead (numpy's SFC64, seeded by
   one draw from the torch generator, so torch's seeding, reproducibility and exact resume hold) and
   makes four 16-bit uniforms of each (~0.4 ns per element). An element is kept when its 16-bit uniform is below
   `round(keep * 65536)`: the keep probability is that threshold / 65536 (0.9 becomes 0.899994),
   and kept values are scaled by its inverse (rounded to the tensor's dtype, as torch's own dropout
   rounds its scaled mask), so the expected output equals the input up to that rounding.
   Only `nn.Dropout` modules in training mode on CPU tensors take this path; GPU dropout (already a
   fast parallel generator) and evaluation are untouched. Dropout inside fused attention
   (`scaled_dot_product_attention(dropout_p=...)`) keeps torch's own.

3. **The attention kernel for short sequences.** Without attention dropout (Llama, Qwen, SmolLM and
   most decoder models; `attention_probs_dropout_prob: 0` encoders) torch's SDPA picks its CPU flash
   kernel, which is slower than the plain math kernel in *training* on short sequences: MiniLM
   with attention dropout 0, bf16, one training step, math time / flash time per sample = 0.87 at
   32 tokens, 0.69-0.74 at 64, 0.67 at 128, 1.14-1.18 at 256, 1.62 at 512 (batch 32 and 8, one
   2-core Xeon). `attention_kernel` selects the math kernel for training batches up to
   `train.cpu.math_attention_max_length` (128) tokens per sequence; longer batches and
   evaluation (where flash was faster at every length: 1.30x at 32 tokens, 3.2x at 512) keep
   torch's choice. With attention dropout SDPA already runs the math kernel on CPU.

4. **Attention with dropout.** With attention dropout (BERT, RoBERTa, ELECTRA, GPT-2: 0.1) SDPA
   runs its math kernel on CPU: q, k and v up-cast to fp32, fp32 matmuls, and the dropout mask of
   every attention-probability matrix drawn with the serial Bernoulli of point 2. `attention_forward`
   is transformers' SDPA attention with one change: in CPU training with attention dropout it runs
   `_MaskedSoftmaxAttention` — the matmuls in the inputs' dtype (bf16 under autocast, as in
   transformers' eager attention under autocast) with the scalings inside them, the softmax and its
   backward in fp32, a `keep_mask` dropout, and a hand-written backward that casts each tensor once.
   `train.cpu.attention_upcast` up-casts q, k and v first (SDPA's fp32 maths). `use_fast_attention`
   switches a model that uses transformers' attention interface from `sdpa` to it for the run
   (`restore_attention` switches back). It computes only what it knows (`_implemented`, an allow-list
   of keyword arguments, their values and mask kinds); every other case — no dropout, evaluation,
   GPUs, soft-capping, sliding windows, attention sinks, position biases, learned masks, any keyword
   argument it does not know — is handed to transformers' own SDPA function unchanged. Query rows whose keys are all masked (padding rows) get
   uniform weights instead of SDPA's zeros: no real token reads them, so losses and gradients are
   unchanged. Measured on one MiniLM attention call (bf16, [32, 12, 35, 32], forward and backward,
   Zen 5 EPYC): 5.2-6.0 ms with SDPA-style fp32 maths, 2.9-3.0 ms now; bf16 scores add ~1.5e-3 to
   the output's 2e-3 relative error against an fp32 reference (bf16 output rounding). Keeping each
   elementwise step to operands of one dtype (no mixed-dtype kernels, `_dropped`) made the call at
   128 and 512 tokens 19% faster (29.4-29.8 -> 23.6-24.0 ms, 405-414 -> 331-340 ms) and changed no value.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math

import numpy as np
import torch
from torch import nn

from tunesmith.methods.apply import transformers_model

# glibc mallopt parameters (malloc.h): what `keep_freed_memory` sets, and glibc's defaults for them (malloc.c's
# DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD; mallopt(3)), which `restore_allocator` sets back.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# M_MMAP_MAX=0: large blocks come from the heap too; M_TRIM_THRESHOLD=-1 ("disables trimming completely",
# mallopt(3)) keeps freed heap pages mapped however many there are.
_KEEP_FREED = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
_GLIBC_DEFAULTS = ((_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024))
_allocator_set = False  # whether `keep_freed_memory` changed glibc's settings and nothing has set them back since


def keep_freed_memory() -> bool:
    """Make glibc reuse freed large blocks instead of unmapping them, process-wide, until `restore_allocator`.

    Returns whether the setting is active (False where the C library is not glibc). Safe to call repeatedly."""
    global _allocator_set
    _allocator_set = _mallopt(_KEEP_FREED) or _allocator_set
    return _allocator_set


def restore_allocator() -> bool:
    """Set glibc's defaults back for every parameter `keep_freed_memory` set; returns whether it did (False when
    nothing was set). glibc has no getter, so the values are its documented defaults; its dynamic mmap threshold,
    which any mallopt call turns off for good, stays off (the threshold keeps the value it had reached)."""
    global _allocator_set
    if not _allocator_set:
        return False
    _allocator_set = False
    return _mallopt(_GLIBC_DEFAULTS)


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no glibc mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([bool(mallopt(parameter, value)) for parameter, value in settings])


# --------------------------------------------------------------------------- dropout

_UNIFORM_LEVELS = 1 << 16


def keep_mask(
    shape: torch.Size, keep: float, generator: torch.Generator | None = None, dtype: torch.dtype = torch.bool
) -> tuple[torch.Tensor, float]:
    """Mask (True or 1 = keep) with P(keep) = threshold / 65536 ~= `keep`, and the scale 1 / that probability.

    `dtype`: bool, or a floating dtype for a 0/1 mask written by the comparison itself — converting a
    bool mask to bf16 afterwards took 6x as long as the comparison (198 vs 33 us for 470,400 elements)."""
    threshold = min(_UNIFORM_LEVELS, max(1, round(keep * _UNIFORM_LEVELS)))
    if threshold == _UNIFORM_LEVELS:  # p below 2^-17: everything is kept (the shifted threshold would not fit int16)
        return torch.ones(shape, dtype=dtype), 1.0
    count = math.prod(shape)
    words = _random_words((count + 3) // 4, generator)
    # int16 lanes are uniform over [-32768, 32767]; shifting the threshold keeps the comparison in int16.
    lanes, limit = words.view(torch.int16)[:count], threshold - _UNIFORM_LEVELS // 2
    mask = lanes.lt(limit) if dtype == torch.bool else torch.lt(lanes, limit, out=torch.empty(count, dtype=dtype))
    return mask.view(shape), _UNIFORM_LEVELS / threshold


def _random_words(count: int, generator: torch.Generator | None) -> torch.Tensor:
    """`count` uniformly random 64-bit words: numpy's SFC64, seeded by one 63-bit draw from the torch
    generator, so torch's seeding, RNG state checkpoints and exact resume govern them. SFC64 made them
    in half the time of torch's mt19937 (`random_`: 161 vs 338 us for 117,600 words, Zen 5); both are
    serial, and these words were ~4% of a MiniLM training step."""
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))


class _ScaleByMask(torch.autograd.Function):
    """x * mask * scale, with the 0/1 mask in x's dtype, scaled in place and saved: one pass over the
    data forward and one backward (as many bytes as x itself). A bf16 MiniLM dropout took 0.61
    instead of 0.81 ms. A boolean mask would be smaller (1 byte per element) but puts torch's elementwise
    kernels on their unvectorised mixed-dtype path: fp32 x * bool mask took 350 us against 31 us
    with an fp32 mask, bf16 228 against 34 ([32, 35, 384], Zen 5). The result is the same either
    way: `(x * mask) * scale` and `x * (mask * scale)` both round x times the scale once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        scaled = mask.mul_(scale)
        ctx.save_for_backward(scaled)
        return x * scaled

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def keep_mask_dropout(x: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """Training-mode dropout of a floating CPU tensor with a `keep_mask` mask (0 < p < 1)."""
    mask, scale = keep_mask(x.shape, 1.0 - p, dtype=x.dtype)
    if inplace:
        return x.mul_(mask).mul_(scale)
    return _ScaleByMask.apply(x, mask, scale)


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training path draws its mask with `keep_mask` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.p >= 1.0 or not x.is_floating_point():
            return super().forward(x)
        return keep_mask_dropout(x, self.p, self.inplace)


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


# --------------------------------------------------------------------------- attention dropout

ATTENTION_IMPLEMENTATION = "tunesmith_cpu_sdpa"
# The same function with q, k and v up-cast to fp32 (`train.cpu.attention_upcast`).
ATTENTION_IMPLEMENTATION_FP32 = "tunesmith_cpu_sdpa_fp32"
FAST_ATTENTION_IMPLEMENTATIONS = (ATTENTION_IMPLEMENTATION, ATTENTION_IMPLEMENTATION_FP32)
# The keyword arguments `attention_forward` implements (beyond module, q, k, v, mask, dropout, scaling, is_causal), each
# with the test of the values it implements; a call with any other argument or value is transformers' SDPA
# function's. Taken as they are: what models pass that does not change masked softmax attention (positions and
# the cache are already in q, k, v and the mask; `deterministic` is a flash kernel's). Only off: softcapping,
# a sliding window, attention sinks, position biases, returned weights.
_ANY = lambda value: True  # noqa: E731
_OFF = lambda value: value is None or (isinstance(value, (bool, int, float)) and not value)  # noqa: E731
_IMPLEMENTED_KWARGS = {
    "position_ids": _ANY,
    "use_cache": _ANY,
    "encoder_hidden_states": _ANY,
    "deterministic": _ANY,
    "softcap": _OFF,
    "sliding_window": _OFF,
    "s_aux": _OFF,
    "position_bias": _OFF,
    "output_attentions": _OFF,
}
# Config fields of attention-probability dropout across model families.
_ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "attn_dropout")


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                      upcast: bool = False, **kwargs):
    """transformers' `sdpa_attention_forward`, except in CPU training with attention dropout (module docstring, 4)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if _one_query_row(module, query, attention_mask, is_causal):
        # A query broadcast along the sequence (`first_token.FirstPositionQuery`): every row is the
        # first one's, so compute that row and broadcast the result.
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
            attention_mask = attention_mask[:, :, :1]
        output, weights = attention_forward(module, query[:, :, :1], key, value, attention_mask, dropout, scaling,
                                            is_causal=False, upcast=upcast, **kwargs)
        return output.expand(output.shape[0], query.shape[2], *output.shape[2:]), weights
    if dropout <= 0.0 or dropout >= 1.0 or not module.training or query.device.type != "cpu" or not _implemented(
            module, query, key, value, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_length, kv_length = query.shape[2], key.shape[2]
    # The causal rule of sdpa_attention_forward (top-left aligned, as torch's `is_causal`).
    causal = q_length > 1 and attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if causal and kv_length > q_length:
        key, value, kv_length = key[:, :, :q_length], value[:, :, :q_length], q_length
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    lowest = torch.finfo(torch.float32).min
    if causal:
        mask = torch.zeros(q_length, kv_length, device=query.device).masked_fill_(
            ~torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril(), lowest)
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        mask = torch.zeros(attention_mask.shape, device=query.device).masked_fill_(~attention_mask, lowest)
    else:
        mask = None if attention_mask is None else attention_mask.float()
    out_dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        if upcast:  # SDPA's math kernel computes bf16/fp16 inputs in fp32 (torch's default); so does this.
            query, key, value = query.float(), key.float(), value.float()
        else:
            key, value = key.to(query.dtype), value.to(query.dtype)
        output = _MaskedSoftmaxAttention.apply(query, key, value, mask, scaling, dropout)
    return output.transpose(1, 2).to(out_dtype).contiguous(), None


class _MaskedSoftmaxAttention(torch.autograd.Function):
    """dropout(softmax(q kᵀ · scaling + mask)) v for [batch, heads, length, dim] tensors of one dtype.

    The matmuls run in the inputs' dtype with the scalings inside them (`baddbmm`'s alpha), the
    softmax and its backward in fp32. An fp32 softmax (and backward) was faster on CPU than a bf16 one
    (198 vs 285 us, 44 vs 84 us for [32, 12, 35, 35]) and exact. Every elementwise step takes
    operands of one dtype: with mixed operands torch's CPU kernels were slower than a vectorised
    cast plus a same-dtype op — for [32, 12, 512, 512], `bf16 scores + fp32 mask` 57 ms against
    14 + 10, `mul(fp32, bf16, out=bf16)` 140-300 ms against 11 + 10 (see `_dropped`). Saved for
    backward: q, k, v, the fp32 probabilities and the 0/1 keep mask in the inputs' dtype; the
    dropped probabilities are recomputed in backward (two passes over 16-bit data) rather than kept
    (2 bytes per score per layer)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling: float, dropout: float):
        batch, heads, q_length, _ = query.shape
        q, k = query.reshape(batch * heads, q_length, -1), key.reshape(batch * heads, key.shape[2], -1)
        v = value.reshape(batch * heads, value.shape[2], -1)
        ignored = q.new_zeros(())  # baddbmm's `input`, multiplied by beta=0
        scores = torch.baddbmm(ignored, q, k.transpose(1, 2), beta=0, alpha=scaling).view(batch, heads, q_length, -1)
        scores = scores.float()  # a new tensor for bf16 scores, the same one for fp32: either may be changed in place
        probs = torch.softmax(scores if mask is None else scores.add_(mask), dim=-1)
        del scores
        # A dropout that rounds to nothing (p < 2^-17) gets an all-ones mask and scale 1.
        keep, scale = keep_mask(probs.shape, 1.0 - dropout, dtype=q.dtype)
        dropped = _dropped(probs, keep, q.dtype).view(-1, q_length, k.shape[1])
        output = torch.baddbmm(ignored, dropped, v, beta=0, alpha=scale)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scaling, ctx.scale = scaling, scale
        return output.view(batch, heads, q_length, -1)

    @staticmethod
    def backward(ctx, grad_output):
        q, k, v, probs, keep = ctx.saved_tensors
        batch, heads, q_length, kv_length = probs.shape
        grad = grad_output.reshape(v.shape[0], q_length, v.shape[-1]).to(q.dtype)
        ignored = q.new_zeros(())
        dropped = _dropped(probs, keep, q.dtype).view(-1, q_length, kv_length)
        grad_v = torch.baddbmm(ignored, dropped.transpose(1, 2), grad, beta=0, alpha=ctx.scale)
        grad_dropped = torch.baddbmm(ignored, grad, v.transpose(1, 2), beta=0, alpha=ctx.scale).view(probs.shape)
        # A 0/1 product is exact in any dtype, so dropping before the up-cast changes no value.
        grad_probs = grad_dropped.mul_(keep).float()
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, torch.float32).to(q.dtype).view_as(dropped)
        grad_q = torch.baddbmm(ignored, grad_scores, k, beta=0, alpha=ctx.scaling)
        grad_k = torch.baddbmm(ignored, grad_scores.transpose(1, 2), q, beta=0, alpha=ctx.scaling)
        return (grad_q.view(batch, heads, q_length, -1), grad_k.view(batch, heads, kv_length, -1),
                grad_v.view(batch, heads, kv_length, -1), None, None, None)


def _dropped(values: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values * keep` in `dtype` (keep's); `values` itself is never changed.

    Cast first, then multiply in place: the 0/1 product is exact, so the result equals the one-pass
    `mul(values, keep, out=<dtype>)`, which torch computes unvectorised for mixed dtypes — for
    [32, 12, 512, 512] fp32 probabilities, 140-300 ms against 11 + 10 ms for the cast and the
    bf16 multiply (Zen 5)."""
    if values.dtype == dtype:
        return values * keep
    return values.to(dtype).mul_(keep)


def _implemented(module, query, key, value, attention_mask, kwargs: dict) -> bool:
    """Whether `_MaskedSoftmaxAttention` computes this call (an allow-list: anything else is SDPA's).

    Its keyword arguments are in `_IMPLEMENTED_KWARGS` with values it implements; q, k and v are 4-d floating
    tensors of one batch, k and v with the query's heads or `num_key_value_groups` times fewer; the mask is
    none, or a boolean or additive float mask of 4 dimensions that broadcasts to the scores and is not learned
    (a mask that requires grad is a bias whose gradient would be lost here)."""
    if any(name not in _IMPLEMENTED_KWARGS or not _IMPLEMENTED_KWARGS[name](setting) for name, setting in kwargs.items()):
        return False
    if any(not torch.is_tensor(t) or t.dim() != 4 or not t.is_floating_point() for t in (query, key, value)):
        return False
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[0] != key.shape[0] or key.shape[1] * groups != query.shape[1] or query.shape[-1] != key.shape[-1]:
        return False
    if value.shape[:3] != key.shape[:3]:
        return False
    if attention_mask is None:
        return True
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 4 or attention_mask.requires_grad:
        return False
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        return False
    scores = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    try:
        return torch.broadcast_shapes(attention_mask.shape, scores) == scores
    except RuntimeError:
        return False


def _one_query_row(module, query: torch.Tensor, attention_mask, is_causal) -> bool:
    """Whether `query` is one row broadcast along the sequence (stride 0) and computing that row alone
    is the same attention: a mask gives each row its own, and without one the attention must not be causal."""
    if query.dim() != 4 or query.shape[2] <= 1 or query.stride(2) != 0:
        return False
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return attention_mask is not None or not causal


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, attention_forward)
    AttentionInterface.register(ATTENTION_IMPLEMENTATION_FP32, functools.partial(attention_forward, upcast=True))
    # Masks are built per implementation name: the same masks as for `sdpa` (an unknown name gets none).
    for name in FAST_ATTENTION_IMPLEMENTATIONS:
        AttentionMaskInterface.register(name, sdpa_mask)


def _attention_dropout(config) -> float:
    return max((float(getattr(config, f, 0.0) or 0.0) for f in _ATTENTION_DROPOUT_FIELDS), default=0.0)


def use_fast_attention(model: nn.Module, upcast: bool = False) -> bool:
    """Switch a transformers model (or the one inside a peft wrapper) from `sdpa` to `attention_forward`
    (`upcast`: its fp32 variant).

    Only models that use transformers' attention interface (`_can_set_attn_implementation`), run
    `sdpa`, and have attention dropout are switched; returns whether this one was."""
    inner = transformers_model(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or _attention_dropout(config) <= 0:
        return False
    can_set = getattr(inner, "_can_set_attn_implementation", None)
    if not callable(can_set) or not can_set():
        return False
    _register_attention()
    name = ATTENTION_IMPLEMENTATION_FP32 if upcast else ATTENTION_IMPLEMENTATION
    inner.set_attn_implementation(name)
    return inner.config._attn_implementation == name


def restore_attention(model: nn.Module) -> None:
    inner = transformers_model(model)
    if getattr(getattr(inner, "config", None), "_attn_implementation", None) in FAST_ATTENTION_IMPLEMENTATIONS:
        inner.set_attn_implementation("sdpa")
