"""`speed.cpu`: the CPU speed tricks applied by one call and undone by one, `train.cpu.speedups` turning all of
them off, the allocator setting undone when the run ends, and the old flat keys of earlier configs."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

import tunesmith
from tiny import sentiment_rows, tiny_config, write_csv
from tunesmith.config import TrainConfig, parse_config
from tunesmith.errors import ConfigError
from tunesmith.speed import cpu, cpu_fastpath
from tunesmith.speed.cpu_fastpath import FastDropout
from tunesmith.speed.embedding_rows import SeenRowsEmbedding
from tunesmith.speed.performance import apply_speed_options, restore_speed_options


class _FakeLibc:
    """Stands in for glibc (`ctypes.CDLL`): records the mallopt calls; glibc has no getter to check them with."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        libc = self

        class Mallopt:  # a ctypes function: takes argtypes and restype
            def __call__(self, parameter, value):
                libc.calls.append((parameter, value))
                return 1

        self.mallopt = Mallopt()


@pytest.fixture
def libc(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(cpu_fastpath.ctypes, "CDLL", lambda name: fake)
    monkeypatch.setattr(cpu_fastpath, "_allocator_set", False)
    return fake


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h


def test_the_allocator_setting_is_undone_with_glibcs_defaults(libc):
    assert cpu_fastpath.keep_freed_memory() is True
    assert libc.calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)]
    libc.calls.clear()
    assert cpu_fastpath.restore_allocator() is True
    assert libc.calls == [(M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024)]  # malloc.c's defaults
    libc.calls.clear()
    assert cpu_fastpath.restore_allocator() is False and libc.calls == []  # nothing set: nothing to undo
    cpu.restore(None)
    assert libc.calls == []


def test_no_glibc_no_setting_and_nothing_to_restore(monkeypatch):
    def no_libc(name):
        raise OSError("not glibc")

    monkeypatch.setattr(cpu_fastpath.ctypes, "CDLL", no_libc)
    monkeypatch.setattr(cpu_fastpath, "_allocator_set", False)
    assert cpu_fastpath.keep_freed_memory() is False
    assert cpu_fastpath.restore_allocator() is False


def _model(tiny_bert):
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert).train()


def _apply(model, **cpu_keys):
    # Token ids 0-49 as the training data: most of the tiny vocabulary is unseen.
    return apply_speed_options(model, TrainConfig(cpu=cpu_keys), "full", sequence_head=True,
                               train_data=[{"input_ids": list(range(50))}], pad_token_id=0)[1]


def _tricks_on(model) -> dict:
    return {
        "fast_dropout": any(isinstance(m, FastDropout) for m in model.modules()),
        "attention": model.config._attn_implementation != "sdpa",
        "first_token": any(hasattr(type(m), "_tunesmith_all_tokens") for m in model.modules()),
        "embedding_rows": isinstance(model.get_input_embeddings(), SeenRowsEmbedding),
    }


def test_one_call_applies_every_trick_and_one_undoes_them(tiny_bert, libc):
    model = _model(tiny_bert)
    keys = set(model.state_dict())
    record = _apply(model)
    assert record["cpu_speedups"] is True and record["reuse_freed_memory"] is True
    assert record["fast_dropout"] > 0 and record["fast_attention_dropout"] is True and record["first_token_only"] is True
    assert record["skip_unseen_embedding_rows"]["trained_rows"] == 50 and record["math_attention_max_length"] == 128
    assert all(_tricks_on(model).values())
    libc.calls.clear()
    restore_speed_options(model)
    assert not any(_tricks_on(model).values()) and set(model.state_dict()) == keys
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert libc.calls == [(M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024)]


def test_speedups_false_turns_every_trick_off(tiny_bert, libc):
    model = _model(tiny_bert)
    # Every key on, the switch off: plain PyTorch.
    record = _apply(model, speedups=False, fast_dropout=True, first_token_only=True, reuse_freed_memory=True)
    assert record == {**record, "cpu_speedups": False, "reuse_freed_memory": False, "fast_dropout": 0,
                      "fast_attention_dropout": False, "first_token_only": False, "skip_unseen_embedding_rows": False,
                      "math_attention_max_length": 0}
    assert not any(_tricks_on(model).values()) and libc.calls == []
    assert cpu.math_attention_max_length(TrainConfig(cpu={"speedups": False})) == 0
    assert cpu.math_attention_max_length(TrainConfig(torch_compile=True)) == 0  # compiled graphs keep torch's choice
    assert cpu.math_attention_max_length(TrainConfig(cpu={"math_attention_max_length": 64})) == 64


def test_each_key_turns_its_own_trick_off(tiny_bert, libc):
    model = _model(tiny_bert)
    record = _apply(model, fast_dropout=False, first_token_only=False, skip_unseen_embedding_rows=False,
                    reuse_freed_memory=False, math_attention_max_length=0)
    assert (record["fast_dropout"], record["first_token_only"], record["skip_unseen_embedding_rows"],
            record["reuse_freed_memory"], record["math_attention_max_length"]) == (0, False, False, False, 0)
    assert not any(_tricks_on(model).values()) and libc.calls == []


def test_the_allocator_setting_is_undone_when_a_run_fails(tiny_bert, tmp_path, monkeypatch, libc):
    from tunesmith import pipeline

    class Boom(Exception):
        pass

    def failing_loop(**kwargs):
        raise Boom()

    monkeypatch.setattr(pipeline.fit, "train_loop", failing_loop)
    write_csv(tmp_path / "train.csv", sentiment_rows(16))
    with pytest.raises(Boom):
        tunesmith.train(tiny_config(tiny_bert, tmp_path / "train.csv", tmp_path / "run"), show_progress=False)
    assert libc.calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024)]
    assert cpu_fastpath._allocator_set is False


# --------------------------------------------------------------------------- the old flat keys

OLD_KEYS = {
    "fast_dropout": ("fast_dropout", False),
    "cpu_attention_upcast": ("attention_upcast", True),
    "first_token_only": ("first_token_only", False),
    "cpu_math_attention_max_length": ("math_attention_max_length", 64),
    "skip_unseen_embedding_rows": ("skip_unseen_embedding_rows", False),
    "reuse_freed_memory": ("reuse_freed_memory", False),
}


@pytest.mark.parametrize("old", OLD_KEYS)
def test_an_old_flat_key_is_read_as_its_train_cpu_key(old):
    new, value = OLD_KEYS[old]
    notes: list[str] = []
    cfg = parse_config({"train": {old: value}}, "cfg.yaml", notes=notes)
    assert getattr(cfg.train.cpu, new) == value
    assert notes == [f"cfg.yaml: read 'train.{old}' as 'train.cpu.{new}' (its name before schema version 2)"]
    from tunesmith.config import load_config

    assert getattr(load_config(None, [f"train.{old}={str(value).lower()}"]).train.cpu, new) == value  # an override too


def test_an_old_key_and_its_new_name_must_agree():
    with pytest.raises(ConfigError) as caught:
        parse_config({"train": {"fast_dropout": False, "cpu": {"fast_dropout": True}}}, "cfg.yaml")
    assert caught.value.problems == [
        "cfg.yaml: 'train.fast_dropout' (False) and 'train.cpu.fast_dropout' (True) are both set; 'train.fast_dropout' is "
        "the name before schema version 2 of 'train.cpu.fast_dropout'; keep one"
    ]
    assert parse_config({"train": {"fast_dropout": False, "cpu": {"fast_dropout": False}}}).train.cpu.fast_dropout is False


def test_an_old_run_directorys_config_yaml_still_loads_and_its_checkpoint_resumes(tmp_path):
    """A config.yaml written before schema version 2 (every key, flat) reads as today's config, and its
    checkpoint's fingerprint matches the same settings under their new names."""
    import yaml

    from tunesmith.config import RunConfig, read_yaml
    from tunesmith.loop import resume

    old = RunConfig().model_dump(mode="json")
    cpu_keys = old["train"].pop("cpu")
    del cpu_keys["speedups"]
    old_name = {new: old for old, (new, _) in OLD_KEYS.items()}
    old["train"].update({old_name[key]: value for key, value in cpu_keys.items()})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")
    assert parse_config(read_yaml(tmp_path / "config.yaml"), "config.yaml") == RunConfig()
    # The fingerprint a checkpoint of that run holds: the old flat names.
    saved = {"config": {k: v for k, v in resume._flatten(old).items()
                        if k.split(".")[0] != "output" and k not in resume.RESUMABLE_CHANGES}}
    assert "train.fast_dropout" in saved["config"] and "train.cpu.fast_dropout" not in saved["config"]
    assert resume._changed_keys(saved, {"config": resume._comparable(RunConfig())}) == []
    changed = parse_config({"train": {"cpu": {"fast_dropout": False}}})
    assert resume._changed_keys(saved, {"config": resume._comparable(changed)}) == ["train.cpu.fast_dropout"]


def test_train_cpu_is_a_section_not_a_switch():
    with pytest.raises(ConfigError) as caught:
        parse_config({"train": {"cpu": False}}, "cfg.yaml")
    assert caught.value.problems == [
        "cfg.yaml: train.cpu: expected a section of CPU settings (speedups, fast_dropout, ...), not false; to turn every "
        "CPU speed trick off, set train.cpu.speedups=false (found False)"
    ]


def test_attention_kernel_is_the_loops_and_honours_the_switch():
    inputs = {"input_ids": torch.ones(2, 16, dtype=torch.long)}
    with cpu.attention_kernel(inputs, "cpu", cpu.math_attention_max_length(TrainConfig())):
        assert not torch.backends.cuda.flash_sdp_enabled()  # the math kernel
    with cpu.attention_kernel(inputs, "cpu", cpu.math_attention_max_length(TrainConfig(cpu={"speedups": False}))):
        assert torch.backends.cuda.flash_sdp_enabled()  # torch's choice
