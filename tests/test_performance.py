"""Speed options: thread choice, gradient checkpointing (same losses), torch.compile (saving unchanged)."""

import json
import logging
import time

import pytest
import torch
from torch import nn
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

import tunesmith
from tiny import sentiment_rows, tiny_config
from tunesmith.speed import performance as performance
from tunesmith.config import TrainConfig, load_config, method_config
from tunesmith.errors import ConfigError
from tunesmith.methods.apply import apply_method, transformers_model

# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    ("requested", "cores", "processes", "omp", "current", "expected"),
    [
        ("auto", 8, 1, None, 8, 8),  # one process: all physical cores
        ("auto", 8, 2, None, 8, 4),  # DDP: each process its share
        ("auto", 8, 3, None, 8, 2),  # shares round down: never more threads than cores
        ("auto", 2, 4, None, 2, 1),  # more processes than cores: at least one thread
        ("auto", 8, 2, "3", 8, 3),  # OMP_NUM_THREADS (user or launcher) wins over the share
        ("auto", 8, 1, "many", 8, 8),  # an unreadable OMP_NUM_THREADS is ignored
        ("auto", 8, 1, None, 1, 1),  # auto never raises what the process already uses (test workers, notebooks)
        ("auto", 8, 1, "4", 2, 2),
        (6, 8, 2, "3", 1, 6),  # an explicit count is taken as is
    ],
)
def test_choose_threads(requested, cores, processes, omp, current, expected):
    threads, reason = performance.choose_threads(
        requested, cores=cores, processes=processes, omp_num_threads=omp, current=current
    )
    assert threads == expected
    assert reason


def test_configure_threads_uses_launcher_process_count(monkeypatch):
    # No global change: torch's setters are recorded, not called.
    calls = {}
    monkeypatch.setattr(performance, "physical_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # set by torchrun / accelerate launch
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    state = {"intra": 8, "inter": 8}
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["intra"])
    monkeypatch.setattr(torch, "get_num_interop_threads", lambda: state["inter"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.setdefault("intra", n), state.update(intra=n)))

    def refuse_interop(n):
        calls["inter"] = n
        raise RuntimeError("Error: cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", refuse_interop)
    choice = performance.configure_threads("auto")
    assert calls == {"intra": 2, "inter": 2}
    # torch refused the inter-op change (parallel work already ran): reported as it is, no traceback
    assert (choice.intra_op, choice.inter_op) == (2, 8)
    assert "4 processes" in choice.reason


def test_num_threads_config_values():
    base = ["data.train_file=train.csv"]
    assert load_config(None, base + ["train.num_threads=3"]).train.num_threads == 3
    assert load_config(None, base).train.num_threads == "auto"
    with pytest.raises(ConfigError, match="train.num_threads: expected 'auto' or a thread count"):
        load_config(None, base + ["train.num_threads=0"])


# --------------------------------------------------------------------------- gradient checkpointing


def _losses(model_dir, method: str, checkpointing: bool, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = apply_method(model, method_config(method, **({"last_n_layers": 1} if method == "last_n" else {})), "SEQ_CLS")
    if checkpointing:
        assert performance.enable_gradient_checkpointing(model)
        assert transformers_model(model).is_activation_checkpointing
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout masks: non-reentrant checkpointing replays the same ones in the recompute
    losses = []
    for _ in range(steps):
        ids = torch.randint(5, 60, (6, 11), generator=generator)
        mask = torch.ones_like(ids)
        mask[:3, 7:] = 0  # padding, as in real batches
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 2, (6,), generator=generator)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["full", "lora", "last_n"])
def test_gradient_checkpointing_gives_the_same_losses(tiny_bert, method):
    # Four optimizer steps: equal later losses mean equal gradients (LoRA and last_n train layers
    # whose inputs do not require grad, which reentrant checkpointing would silently not train).
    plain, checkpointed = _losses(tiny_bert, method, False), _losses(tiny_bert, method, True)
    assert plain[0] != plain[-1]  # training moved the weights
    assert torch.allclose(torch.tensor(plain), torch.tensor(checkpointed), atol=1e-5), (plain, checkpointed)


def test_gradient_checkpointing_unsupported_model_warns_and_trains_without(tiny_bert, caplog):
    class NoCheckpointing(BertForSequenceClassification):
        supports_gradient_checkpointing = False

    model = NoCheckpointing.from_pretrained(tiny_bert)
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        model, record = performance.apply_speed_options(model, TrainConfig(gradient_checkpointing=True), "full")
    assert record["gradient_checkpointing"] is False
    assert "does not support activation checkpointing" in caplog.text
    assert not model.is_activation_checkpointing


def test_frozen_method_skips_checkpointing_and_compile(tiny_bert):
    model = apply_method(AutoModelForSequenceClassification.from_pretrained(tiny_bert), method_config("frozen"), "SEQ_CLS")
    model, record = performance.apply_speed_options(model, TrainConfig(gradient_checkpointing=True, torch_compile=True), "frozen")
    assert record["gradient_checkpointing"] is False and record["torch_compile"] is False
    assert not model.is_activation_checkpointing


# --------------------------------------------------------------------------- torch.compile


def test_compile_without_cxx_compiler_is_a_config_error(tiny_bert, monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(performance, "COMPILE_BACKEND", "inductor")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    with inductor_config.patch({"cpp.cxx": ("tunesmith-no-such-compiler",)}):
        with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler.*train.torch_compile=false"):
            performance.apply_speed_options(model, TrainConfig(torch_compile=True), "full")
    assert model._compiled_call_impl is None  # refused before compiling anything


def _run(tiny_bert, tmp_path, name, **train):
    cfg = tiny_config(tiny_bert, tmp_path / "train.csv", tmp_path / name,
                      train={"num_train_epochs": 2, "logging_steps": 1, **train})
    return tunesmith.train(cfg, show_progress=False)


def _assert_plain_saved_model(run_dir):
    keys = list(load_file(str(run_dir / "model" / "model.safetensors")))
    assert keys and not [k for k in keys if "_orig_mod" in k]
    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert set(reloaded.state_dict()) >= set(keys)


def _losses_logged(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]


def test_compiled_run_saves_a_plain_model_and_records_speed_options(tiny_bert, tmp_path, monkeypatch):
    # Graph capture (dynamo) with the eager backend: the whole compile path except code generation,
    # in seconds. The slow test below runs inductor itself.
    from tiny import write_csv

    write_csv(tmp_path / "train.csv", sentiment_rows(48))
    monkeypatch.setattr(performance, "COMPILE_BACKEND", "eager")
    result = _run(tiny_bert, tmp_path, "compiled", torch_compile=True, gradient_checkpointing=True)
    _assert_plain_saved_model(result.run_dir)

    provenance = json.loads((result.run_dir / "provenance.json").read_text())
    speed = provenance["speed"]
    assert speed["torch_compile"] == {"backend": "eager", "dynamic": True}
    assert speed["gradient_checkpointing"] is True
    assert speed["threads"]["intra_op"] == provenance["cpu"]["threads"] == torch.get_num_threads()
    assert speed["threads"]["inter_op"] == provenance["cpu"]["interop_threads"]
    assert speed["threads"]["reason"]
    assert tunesmith.predict(result.run_dir, ["a wonderful film"])[0]["label"] in ("pos", "neg")


@pytest.mark.slow
def test_inductor_compiled_run_matches_uncompiled(tiny_bert, tmp_path):
    from tiny import write_csv

    write_csv(tmp_path / "train.csv", sentiment_rows(48))
    from torch._inductor import config as inductor_config

    plain = _run(tiny_bert, tmp_path, "plain", fast_dropout=False)  # compiled runs keep torch's dropout
    start = time.perf_counter()
    with inductor_config.patch(fallback_random=True):  # dropout from torch's RNG, as in the eager run
        compiled = _run(tiny_bert, tmp_path, "inductor", torch_compile=True)
    print(f"inductor run (compile included): {time.perf_counter() - start:.1f} s")
    _assert_plain_saved_model(compiled.run_dir)
    # Fused kernels round differently: close, not bit-equal.
    assert torch.allclose(torch.tensor(_losses_logged(plain.run_dir)), torch.tensor(_losses_logged(compiled.run_dir)), atol=1e-3)


@pytest.mark.parametrize("max_norm", [0.05, 1e6, float("inf")])
def test_clip_cpu_gradients_is_torchs_clipping_bit_for_bit(max_norm):
    from tunesmith.loop.step import clip_cpu_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 3))
    model(torch.randn(8, 16)).square().sum().backward()
    model[1].bias.grad = None  # a parameter without a gradient is left out, as torch does
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    expected_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in grads:
            p.grad.copy_(grads[name])
    norm = clip_cpu_gradients(model.parameters(), max_norm)
    assert torch.equal(norm, expected_norm)
    assert all(torch.equal(p.grad, expected[name]) for name, p in model.named_parameters() if p.grad is not None)
    clipped = max_norm < expected_norm
    assert clipped == any(not torch.equal(grads[name], expected[name]) for name in grads)  # the case is what it says


def test_clip_cpu_gradients_with_mixed_dtypes_and_none_uses_torch():
    from tunesmith.loop.step import clip_cpu_gradients

    a, b = torch.ones(4, requires_grad=True), torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    a.grad, b.grad = torch.full((4,), 3.0), torch.full((4,), 4.0, dtype=torch.bfloat16)
    norm = clip_cpu_gradients([a, b], 1.0)
    assert torch.isclose(norm.float(), torch.tensor(10.0)) and torch.allclose(a.grad, torch.full((4,), 0.3), atol=1e-6)
    assert clip_cpu_gradients([torch.zeros(2, requires_grad=True)], 1.0).item() == 0.0
