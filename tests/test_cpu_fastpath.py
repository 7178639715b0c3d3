"""CPU fast path: dropout masks from 16-bit uniforms, and the allocator setting that reuses freed pages."""

import json
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

import tunesmith
from tiny import sentiment_rows, tiny_config, write_csv
from tunesmith.speed.cpu_fastpath import (
    ATTENTION_IMPLEMENTATION,
    ATTENTION_IMPLEMENTATION_FP32,
    FastDropout,
    attention_forward,
    attention_kernel,
    keep_freed_memory,
    keep_mask,
    restore_attention,
    restore_dropout,
    use_fast_attention,
    use_fast_dropout,
)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1, 0.99])
def test_keep_mask_frequency_and_scale(keep):
    torch.manual_seed(0)
    count = 1 << 22
    mask, scale = keep_mask(torch.Size([count]), keep)
    assert mask.dtype == torch.bool and mask.shape == (count,)
    realised = 1.0 / scale  # the keep probability the mask is drawn with
    assert abs(realised - keep) <= 2**-17
    # 5 standard deviations of a binomial mean: fails for a biased or correlated generator.
    tolerance = 5 * (realised * (1 - realised) / count) ** 0.5
    assert abs(mask.float().mean().item() - realised) < tolerance
    # Each of the four 16-bit lanes of a random word is a fair uniform on its own.
    for lane in mask.view(-1, 4).T:
        assert abs(lane.float().mean().item() - realised) < 2 * tolerance


def test_keep_mask_in_a_float_dtype_is_the_bool_mask_as_0_and_1():
    generator = torch.Generator().manual_seed(5)
    boolean, scale = keep_mask((6, 50), 0.9, generator)
    generator.manual_seed(5)
    ones, same_scale = keep_mask((6, 50), 0.9, generator, dtype=torch.bfloat16)
    assert ones.dtype == torch.bfloat16 and ones.shape == (6, 50) and scale == same_scale
    assert torch.equal(ones, boolean.to(torch.bfloat16))


def test_keep_mask_keeps_everything_when_p_rounds_to_zero():
    # keep = 1 - 1e-6 rounds to the threshold 65536, which does not fit the int16 comparison: once dropped everything.
    mask, scale = keep_mask(torch.Size([1000]), 1 - 1e-6)
    assert bool(mask.all()) and scale == 1.0
    assert torch.equal(FastDropout(1e-6).train()(torch.ones(10)), torch.ones(10))


def test_keep_mask_follows_the_torch_generator():
    torch.manual_seed(3)
    first, _ = keep_mask(torch.Size([4, 1000]), 0.9)
    torch.manual_seed(3)
    again, _ = keep_mask(torch.Size([4, 1000]), 0.9)
    other, _ = keep_mask(torch.Size([4, 1000]), 0.9)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_fast_dropout_forward_backward_and_expectation():
    torch.manual_seed(0)
    layer = FastDropout(0.25).train()
    x = torch.randn(64, 512, requires_grad=True)
    out = layer(x)
    kept = out != 0
    scale = (out[kept] / x[kept]).mean().item()
    assert abs(scale - 1 / 0.75) < 1e-3
    assert torch.allclose(out[kept], x[kept] * scale)
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    out.sum().backward()
    assert torch.allclose(x.grad, kept.float() * scale)  # gradient flows through kept elements only, scaled
    # Unbiased: the mean over many masks approaches the input.
    ones = torch.ones(256, 1024)
    assert abs(layer(ones).mean().item() - 1.0) < 0.01
    assert torch.equal(layer.eval()(x), x)  # evaluation: identity
    assert torch.equal(FastDropout(0.0).train()(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_fast_dropout_is_the_input_times_the_drawn_mask_and_scale(dtype, inplace):
    """Exactly x * keep * scale, with the mask `keep_mask` draws from the same generator state; the
    mask is applied in x's own dtype (fp32 too: an fp32 x times a boolean mask runs unvectorised)."""
    x = torch.randn(32, 35, 16).to(dtype)
    torch.manual_seed(7)
    keep, scale = keep_mask(x.shape, 0.9)
    # Out of place the mask is scaled in x's dtype (as torch's dropout does); in place x is multiplied by the scale.
    scaled = x.float() * torch.tensor(scale, dtype=torch.float32) if inplace else x * torch.tensor(scale, dtype=dtype)
    expected = torch.where(keep, scaled.to(dtype), torch.zeros((), dtype=dtype))
    torch.manual_seed(7)
    source = x.clone().requires_grad_(not inplace)
    out = FastDropout(0.1, inplace=inplace).train()(source)
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    if not inplace:
        out.backward(torch.ones_like(out))
        assert torch.equal(source.grad, torch.where(keep, torch.tensor(scale, dtype=dtype), torch.zeros((), dtype=dtype)))


def test_fast_dropout_bf16_keeps_dtype():
    layer = FastDropout(0.1).train()
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_swap_and_restore_keep_the_state_dict(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    keys = list(model.state_dict())
    plain = sum(type(m) is nn.Dropout and m.p > 0 for m in model.modules())
    assert use_fast_dropout(model) == plain > 0
    assert not [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    assert list(model.state_dict()) == keys
    restore_dropout(model)
    assert not [m for m in model.modules() if isinstance(m, FastDropout)]


_ALLOCATION_LOOP = """
import resource, sys, torch
from tunesmith.speed.cpu_fastpath import keep_freed_memory
if sys.argv[1] == "reuse":
    assert keep_freed_memory() is True
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # like the 47 MB embedding gradient of a MiniLM step
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-5:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    # Fresh interpreters: the setting is process-wide, and the heap's history decides when reuse starts.
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _ALLOCATION_LOOP, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    pages = (64 << 20) // 4096
    assert faults("system") >= 5 * pages * 0.9  # above glibc's mmap threshold: a fresh, zero-filled mapping each time
    # After a warm-up (glibc first grows the heap by a few blocks: the 64-byte-aligned request does not fit the
    # exact-size hole a freed block leaves while small objects sit above it) the freed blocks are handed out again.
    assert faults("reuse") < pages // 4


_TOP_OF_HEAP = """
import ctypes
from tunesmith.speed.cpu_fastpath import keep_freed_memory
assert keep_freed_memory() is True
libc = ctypes.CDLL("libc.so.6")
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.free(libc.malloc(9 << 28))  # 2.25 GiB at the top of the heap, freed
print(libc.mallinfo2().keepcost)  # what glibc holds at the top of the heap, releasable but not released
"""


def _glibc_at_least(major: int, minor: int) -> bool:
    name, version = platform.libc_ver()
    return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (major, minor)


@pytest.mark.skipif(not _glibc_at_least(2, 33), reason="mallopt and mallinfo2 (glibc 2.33+) are glibc's")
def test_more_than_2_gb_freed_at_once_stays_with_the_heap():
    # With M_TRIM_THRESHOLD 2^31-1 (the largest positive value) glibc gave the top of the heap back as soon as over
    # 2 GB lay free there (132 KiB kept here), and the next blocks faulted their pages in again: 180,000-370,000
    # page faults per MiniLM training step at batch 32 x 256 tokens. -1 turns trimming off.
    out = subprocess.run([sys.executable, "-c", _TOP_OF_HEAP], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) >= 9 << 28


def test_training_records_fast_dropout_and_saves_plain_dropout(tiny_bert, tmp_path):
    write_csv(tmp_path / "train.csv", sentiment_rows(32))

    def run(name, **train):
        cfg = tiny_config(tiny_bert, tmp_path / "train.csv", tmp_path / name,
                          train={"num_train_epochs": 1, "logging_steps": 1, **train})
        result = tunesmith.train(cfg, show_progress=False)
        speed = json.loads((result.run_dir / "provenance.json").read_text())["speed"]
        losses = [r["loss"] for r in map(json.loads, (result.run_dir / "log.jsonl").read_text().splitlines())
                  if r["type"] == "train"]
        return speed, losses, result

    speed, fast, result = run("fast")
    assert speed["fast_dropout"] > 0 and speed["fast_attention_dropout"] is True
    assert speed["reuse_freed_memory"] is (platform.libc_ver()[0] == "glibc")
    _, again, _ = run("again")
    assert again == fast  # same seed, same masks: reproducible
    speed_off, plain, _ = run("plain", fast_dropout=False)
    assert speed_off["fast_dropout"] == 0 and speed_off["fast_attention_dropout"] is False
    assert plain != fast  # a different random stream, so the runs differ (and both train)
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    assert not [m for m in reloaded.modules() if isinstance(m, FastDropout)]
    assert reloaded.config._attn_implementation == "sdpa"
    assert json.loads((result.model_dir / "config.json").read_text()).get("_attn_implementation") in (None, "sdpa")
    assert tunesmith.predict(result.run_dir, ["a fine film"])[0]["label"] in ("pos", "neg")


# --------------------------------------------------------------------------- attention kernel


def _flash_enabled() -> bool:
    return torch.backends.cuda.flash_sdp_enabled()  # the global SDPA switch, CPU flash included


@pytest.mark.parametrize(
    ("length", "device", "limit", "math_only"),
    [(16, "cpu", 128, True), (128, "cpu", 128, True), (129, "cpu", 128, False), (16, "cuda", 128, False), (16, "cpu", 0, False)],
)
def test_attention_kernel_choice(length, device, limit, math_only):
    inputs = {"input_ids": torch.ones(2, length, dtype=torch.long)}
    assert _flash_enabled()
    with attention_kernel(inputs, device, limit):
        assert _flash_enabled() is not math_only
    assert _flash_enabled()
    with attention_kernel({"features": torch.ones(2, 8)}, "cpu", 128):  # cached frozen features: no sequence
        assert _flash_enabled()


def test_math_attention_gives_the_same_loss_and_gradients():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, attn_implementation="sdpa")
    model = BertForSequenceClassification(config)
    inputs = {"input_ids": torch.randint(5, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    inputs["attention_mask"][2:, 9:] = 0  # padded rows
    labels = torch.tensor([0, 1, 1, 0])

    def loss_and_grads(limit):
        model.zero_grad()
        with attention_kernel(inputs, "cpu", limit):
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    flash_loss, flash_grads = loss_and_grads(0)
    math_loss, math_grads = loss_and_grads(128)
    assert abs(flash_loss - math_loss) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(flash_grads, math_grads))


# --------------------------------------------------------------------------- attention dropout


class _Attention(nn.Module):
    """Stands in for a transformers attention module (what `attention_forward` reads of it)."""

    def __init__(self, is_causal=False, groups=1):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, groups


def _qkv(batch=3, heads=4, q_len=7, kv_len=7, dim=8, kv_heads=None, dtype=torch.float32):
    torch.manual_seed(0)
    return (torch.randn(batch, heads, q_len, dim, dtype=dtype), torch.randn(batch, kv_heads or heads, kv_len, dim, dtype=dtype),
            torch.randn(batch, kv_heads or heads, kv_len, dim, dtype=dtype))


def _padding_mask(batch=3, length=7, kind="bool"):
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[1, 5:], keep[2, 2:] = False, False  # two padded rows
    mask = keep[:, None, None, :].expand(batch, 1, length, length)
    return mask if kind == "bool" else torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


# A keep probability that rounds to 1 (threshold 65536): the fast path runs, every element is kept, the scale is 1.
NO_DROP = 1e-7


def _output_and_grads(attention, module, q, k, v, *args, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, weights = attention(module, q, k, v, *args, **kwargs)
    torch.manual_seed(7)
    out.backward(torch.randn(out.shape, dtype=out.dtype))
    return out, weights, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("case", ["bool_mask", "float_mask", "no_mask", "causal", "causal_longer_kv", "gqa"])
def test_attention_forward_computes_what_sdpa_does(case):
    """Outputs and the hand-written backward's gradients of q, k and v, against SDPA with autograd."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Attention(is_causal=case.startswith("causal"), groups=2 if case == "gqa" else 1).train()
    shapes = {"causal_longer_kv": {"q_len": 7, "kv_len": 9}, "gqa": {"kv_heads": 2}}.get(case, {})
    q, k, v = _qkv(**shapes)
    mask = {"bool_mask": _padding_mask(), "float_mask": _padding_mask(kind="float")}.get(case)
    ours, weights, ours_grads = _output_and_grads(attention_forward, module, q, k, v, mask, dropout=NO_DROP, scaling=0.3)
    reference, _, reference_grads = _output_and_grads(sdpa_attention_forward, module, q, k, v, mask, dropout=0.0, scaling=0.3)
    assert weights is None and ours.shape == reference.shape == (3, 7, 4, 8)
    assert torch.allclose(ours, reference, atol=1e-6)
    for grad, expected in zip(ours_grads, reference_grads):
        assert grad.shape == expected.shape and torch.allclose(grad, expected, atol=1e-5)


def test_attention_dropout_gradients_follow_the_drawn_mask():
    """With real dropout: the same outputs and gradients as autograd through softmax * mask * scale, the
    mask being the one `keep_mask` draws from the same generator state."""
    module = _Attention().train()
    q, k, v = _qkv()
    mask = _padding_mask()
    torch.manual_seed(3)
    ours, _, ours_grads = _output_and_grads(attention_forward, module, q, k, v, mask, dropout=0.2, scaling=0.3)

    def reference_attention(module, q, k, v, mask, dropout, scaling):
        torch.manual_seed(3)
        scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~mask, torch.finfo(torch.float32).min)
        keep, scale = keep_mask(scores.shape, 1 - dropout)
        return (torch.softmax(scores, -1) * keep * scale @ v).transpose(1, 2), None

    reference, _, reference_grads = _output_and_grads(reference_attention, module, q, k, v, mask, dropout=0.2, scaling=0.3)
    assert torch.allclose(ours, reference, atol=1e-6)
    for grad, expected in zip(ours_grads, reference_grads):
        assert torch.allclose(grad, expected, atol=1e-5)


def test_attention_forward_bf16_rounds_like_eager_attention_and_upcast_keeps_sdpa_numerics():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Attention().train()
    q, k, v = _qkv(batch=4, heads=4, q_len=24, kv_len=24, dim=16, dtype=torch.bfloat16)
    mask = _padding_mask(batch=4, length=24)
    exact, _, exact_grads = _output_and_grads(sdpa_attention_forward, module, *(t.float() for t in (q, k, v)), mask, dropout=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _, ours_grads = _output_and_grads(attention_forward, module, q, k, v, mask, dropout=NO_DROP)
        upcast, _, _ = _output_and_grads(attention_forward, module, q, k, v, mask, dropout=NO_DROP, upcast=True)
        sdpa, _ = attention_forward(module, q, k, v, mask, dropout=0.0)
    assert ours.dtype == upcast.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in ours_grads)
    # upcast: SDPA's math kernel, which computes bf16 inputs in fp32 and rounds once at the end (one bf16 step apart at most).
    assert (upcast.float() - sdpa.float()).abs().max() <= 2**-7 * sdpa.float().abs().max()
    # Default: bf16 scores and probabilities as in eager attention under autocast. Measured relative errors
    # against fp32 maths: upcast 1.7e-3 (the output's rounding), default 2.8e-3; gradients 3.2-3.5e-3.
    relative = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert relative(upcast, exact) < 3e-3 and relative(ours, exact) < 5e-3
    assert all(relative(g, e) < 7e-3 for g, e in zip(ours_grads, exact_grads))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mask_kind", ["bool", "float", None])
def test_a_broadcast_query_computes_its_one_row(dropout, mask_kind, monkeypatch):
    from tunesmith.speed import cpu_fastpath as cpu_fastpath

    module = _Attention().train()
    q, k, v = _qkv()
    first = q[:, :, :1].clone().requires_grad_()
    broadcast = first.expand_as(q)  # what first_token.FirstPositionQuery hands the attention
    mask = _padding_mask(kind=mask_kind) if mask_kind else None
    shapes = []
    original = cpu_fastpath.keep_mask
    monkeypatch.setattr(cpu_fastpath, "keep_mask", lambda shape, keep, *a, **kw: shapes.append(tuple(shape)) or original(shape, keep, *a, **kw))
    torch.manual_seed(1)
    out, _ = attention_forward(module, broadcast, k, v, mask, dropout=dropout, scaling=0.3)
    torch.manual_seed(1)
    row, _ = attention_forward(module, q[:, :, :1], k, v, None if mask is None else mask[:, :, :1], dropout=dropout, scaling=0.3)
    assert out.shape == (3, 7, 4, 8) and out.stride(1) == 0  # one row, broadcast back
    assert torch.equal(out[:, :1], row)
    if dropout:
        assert shapes == [(3, 4, 1, 7)] * 2  # dropout drew masks for one query row, not seven
    full, _ = attention_forward(module, q, k, v, mask, dropout=NO_DROP, scaling=0.3)
    if not dropout:
        assert torch.allclose(out[:, 0], full[:, 0], atol=1e-6)  # the first row of the full attention
    out.sum().backward()
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_a_broadcast_query_of_a_causal_attention_without_mask_is_computed_in_full():
    module = _Attention(is_causal=True).train()
    q, k, v = _qkv()
    broadcast = q[:, :, :1].expand_as(q)
    out, _ = attention_forward(module, broadcast, k, v, None, dropout=NO_DROP, scaling=0.3)
    assert out.stride(1) != 0  # every row computed: each sees a different prefix of the keys


def test_attention_dropout_drops_probabilities_at_the_rate_and_rescales():
    module = _Attention().train()
    length = 64
    torch.manual_seed(1)
    q, k = torch.randn(8, 4, length, 16), torch.randn(8, 4, length, 16)
    v = torch.eye(length).expand(8, 4, length, length)  # one-hot values: the output rows are the dropped-out weights
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    out, _ = attention_forward(module, q, k, v, None, dropout=0.25, scaling=0.25)
    weights = out.transpose(1, 2)
    kept = weights != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    scale = 65536 / round(0.75 * 65536)
    assert torch.allclose(weights[kept], probs[kept] * scale, atol=1e-6)
    # Unbiased: averaged over draws the output approaches attention without dropout. One draw of a weight w
    # is w / keep or 0, standard deviation w * sqrt(p / keep); the largest of 131,072 z-scores stays below ~5.
    draws = 200
    mean = sum(attention_forward(module, q, k, v, None, dropout=0.25, scaling=0.25)[0] for _ in range(draws)) / draws
    z = (mean.transpose(1, 2) - probs) / (probs * (0.25 / 0.75) ** 0.5 / draws**0.5)
    assert z.abs().max() < 6 and abs(z.mean()) < 0.05


@pytest.mark.parametrize("situation", ["eval", "no_dropout", "softcap"])
def test_attention_forward_hands_other_cases_to_sdpa(situation, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or ("sdpa", None))
    module = _Attention().train(situation != "eval")
    q, k, v = _qkv()
    extra = {"softcap": 30.0} if situation == "softcap" else {}
    out, _ = attention_forward(module, q, k, v, None, dropout=0.0 if situation == "no_dropout" else 0.1, **extra)
    assert out == "sdpa" and len(calls) == 1


def _sdpa_calls(monkeypatch) -> list[dict]:
    import transformers.integrations.sdpa_attention as sdpa

    calls: list[dict] = []
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or ("sdpa", None))
    return calls


@pytest.mark.parametrize("extra", [
    {"tunesmith_made_up_option": 3},  # a keyword argument it does not know
    {"sliding_window": 4},
    {"position_bias": torch.zeros(3, 4, 7, 7)},
    {"s_aux": torch.zeros(4)},
    {"output_attentions": True},
    {"cu_seq_lens_q": torch.tensor([0, 7])},  # packed sequences for flash kernels: not in its list either
], ids=lambda extra: next(iter(extra)))
def test_attention_forward_hands_what_it_does_not_implement_to_sdpa(extra, monkeypatch):
    calls = _sdpa_calls(monkeypatch)
    q, k, v = _qkv()
    out, _ = attention_forward(_Attention().train(), q, k, v, _padding_mask(), dropout=0.1, scaling=0.3, **extra)
    assert out == "sdpa" and len(calls) == 1
    name = next(iter(extra))
    assert calls[0][name] is extra[name] and calls[0]["dropout"] == 0.1 and calls[0]["scaling"] == 0.3  # handed on as given


@pytest.mark.parametrize("mask", ["int", "3d", "learned", "wrong_length"])
def test_attention_forward_hands_masks_it_does_not_know_to_sdpa(mask, monkeypatch):
    calls = _sdpa_calls(monkeypatch)
    q, k, v = _qkv()
    given = {"int": _padding_mask().long(), "3d": _padding_mask()[:, 0], "wrong_length": _padding_mask()[..., :5],
             "learned": _padding_mask(kind="float").requires_grad_()}[mask]
    out, _ = attention_forward(_Attention().train(), q, k, v, given, dropout=0.1)
    assert out == "sdpa" and len(calls) == 1


def test_attention_forward_computes_the_arguments_it_implements(monkeypatch):
    # What BERT, GPT-2, Llama, Qwen2 and ModernBERT pass in training (transformers 5), at values that change nothing.
    calls = _sdpa_calls(monkeypatch)
    q, k, v = _qkv()
    known = {"position_ids": torch.arange(7)[None], "use_cache": True, "encoder_hidden_states": None, "deterministic": False,
             "sliding_window": None, "softcap": None, "s_aux": None, "position_bias": None, "output_attentions": False}
    out, weights = attention_forward(_Attention().train(), q, k, v, _padding_mask(), dropout=0.1, scaling=0.3, **known)
    assert not calls and weights is None and out.shape == (3, 7, 4, 8)


def test_use_fast_attention_switches_the_model_and_restores_it(tiny_bert):
    from transformers import BertConfig, BertForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    keys = list(model.state_dict())
    assert model.config._attn_implementation == "sdpa"
    assert use_fast_attention(model)
    assert model.config._attn_implementation == ATTENTION_IMPLEMENTATION and list(model.state_dict()) == keys
    inputs = {"input_ids": torch.randint(5, 50, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    model.train()(**inputs).logits.sum().backward()  # trains through attention_forward, masks included
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert use_fast_attention(model, upcast=True) and model.config._attn_implementation == ATTENTION_IMPLEMENTATION_FP32
    model.train()(**inputs).logits.sum().backward()
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"
    no_dropout = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32, attention_probs_dropout_prob=0.0,
                                                          attn_implementation="sdpa"))
    assert not use_fast_attention(no_dropout)  # nothing to draw
    eager = AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="eager")
    assert not use_fast_attention(eager) and eager.config._attn_implementation == "eager"  # the user's choice stands


def test_bert_through_attention_forward_matches_sdpa():
    """A BERT switched to attention_forward (keep probability 1) gives SDPA's loss and gradients, padding
    masks included: transformers builds the same masks for it as for `sdpa`."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        attention_probs_dropout_prob=NO_DROP, hidden_dropout_prob=0.0, attn_implementation="sdpa")
    model = BertForSequenceClassification(config).train()
    inputs = {"input_ids": torch.randint(5, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    inputs["attention_mask"][2:, 7:] = 0
    labels = torch.tensor([0, 1, 1, 0])

    def loss_and_grads():
        model.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    sdpa_loss, sdpa_grads = loss_and_grads()  # torch's math kernel, dropout_p 1e-7: keeps everything
    assert use_fast_attention(model)
    ours_loss, ours_grads = loss_and_grads()
    restore_attention(model)
    assert abs(sdpa_loss - ours_loss) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(sdpa_grads, ours_grads))
