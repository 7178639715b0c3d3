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
from tunesmith.cpu_fastpath import (
    FastDropout,
    attention_kernel,
    keep_freed_memory,
    keep_mask,
    restore_dropout,
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
from tunesmith.cpu_fastpath import keep_freed_memory
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
    assert speed["fast_dropout"] > 0
    assert speed["reuse_freed_memory"] is (platform.libc_ver()[0] == "glibc")
    _, again, _ = run("again")
    assert again == fast  # same seed, same masks: reproducible
    speed_off, plain, _ = run("plain", fast_dropout=False)
    assert speed_off["fast_dropout"] == 0
    assert plain != fast  # a different random stream, so the runs differ (and both train)
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    assert not [m for m in reloaded.modules() if isinstance(m, FastDropout)]
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
