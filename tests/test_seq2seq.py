"""The seq2seq family beyond the contract suite: preflight messages, translation rows, the generation settings
saved with the model (plain `generate()` gives tunesmith's text), per-call overrides, generated-prediction
files, label smoothing, what `frozen` and the adapters train on a warm-started bert2bert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import tunesmith
from tunesmith.cli import app
from tunesmith.config import parse_config
from tunesmith.errors import ConfigError, DataError
from tunesmith.tasks import get_task
from tunesmith.tasks.contract import tiny_checkpoint, write_jsonl
from tunesmith.tasks.seq2seq import models

EN = "one two three four red blue cat dog".split()
FR = "un deux trois quatre rouge bleu chat chien".split()
WORDS = dict(zip(EN, FR))


def rows(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        source = [EN[(i * 3 + k) % 8] for k in range(2 + i % 3)]
        out.append({"source": " ".join(source), "target": " ".join(WORDS[w] for w in source)})
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A tiny BERT encoder: the family warm-starts a bert2bert from it."""
    return tiny_checkpoint(tmp_path_factory.mktemp("encoder"), EN + FR, "AutoModel")


def config(encoder: Path, folder: Path, train_rows=None, validation_rows=None, **sections) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"train_file": str(write_jsonl(folder / "train.jsonl", train_rows or rows(16))),
            "validation_file": str(write_jsonl(folder / "validation.jsonl", validation_rows or rows(6, 3)))}
    return {
        "model": {"name_or_path": str(encoder)}, "data": {**data, **sections.pop("data", {})},
        "task": {"name": "seq2seq", "max_source_length": 16, "max_target_length": 16, **sections.pop("task", {})},
        "method": sections.pop("method", {"name": "full"}),
        "train": {"learning_rate": 5e-3, "num_train_epochs": 2, "per_device_train_batch_size": 4, "precision": "fp32",
                  "seed": 0, **sections.pop("train", {})},
        "output": {"dir": str(folder / "run")}, **sections,
    }


@pytest.fixture(scope="module")
def trained(encoder, tmp_path_factory) -> Path:
    """One run with generation settings and a test split, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("trained")
    test = write_jsonl(folder / "test.jsonl", rows(5, 20))
    cfg = config(encoder, folder, data={"test_file": str(test)}, train={"num_train_epochs": 6},
                 generation={"num_beams": 2, "max_new_tokens": 6, "no_repeat_ngram_size": 2})
    return tunesmith.train(cfg, show_progress=False).run_dir


# --------------------------------------------------------------------------- config and preflight


def test_max_source_length_is_the_shared_max_length():
    cfg = parse_config({"task": {"name": "seq2seq", "max_source_length": 64}})
    assert cfg.task.max_length == 64 and cfg.task.max_source_length == 64
    assert parse_config({"task": {"name": "seq2seq", "max_length": 32}}).task.max_source_length == 32
    with pytest.raises(ConfigError, match="max_length .32. and task.max_source_length .64. differ"):
        parse_config({"task": {"name": "seq2seq", "max_length": 32, "max_source_length": 64}})


@pytest.mark.parametrize("bad, expected", [
    ([{"text": "a b", "target": "c"}], "missing column 'source' (task.source_column); columns found: text, target"),
    ([{"source": "one", "target": "un"}, {"source": "two", "target": "  "}], "line 2: target 'target' is empty"),
    ([{"source": ["one"], "target": "un"}], "line 1: source 'source' is ['one'], not text"),
    ([{"translation": {"en": "one", "fr": "un"}}], "its `translation` rows need task.source_lang and task.target_lang"),
])
def test_preflight_names_file_row_and_field(bad, expected, encoder, tmp_path):
    cfg = config(encoder, tmp_path, train_rows=bad * 4)
    with pytest.raises(DataError) as err:
        tunesmith.train(cfg, show_progress=False)
    assert expected in str(err.value) and "train.jsonl" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_preflight_error_exits_2_without_traceback(encoder, tmp_path):
    cfg = config(encoder, tmp_path, train_rows=[{"source": "one", "target": None}] * 4)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "target 'target' is empty" in result.output


def test_translation_rows_are_read_with_the_languages(encoder, tmp_path):
    pairs = [{"translation": {"en": r["source"], "fr": r["target"], "de": "x"}} for r in rows(12)]
    cfg = config(encoder, tmp_path, train_rows=pairs, validation_rows=pairs[:4], task={"source_lang": "en", "target_lang": "fr"},
                 train={"num_train_epochs": 1})
    run = tunesmith.train(cfg, show_progress=False)
    written = [json.loads(line) for line in (run.run_dir / "validation_generated_predictions.jsonl").read_text().splitlines()]
    assert [(w["source"], w["reference"]) for w in written] == [(p["translation"]["en"], p["translation"]["fr"]) for p in pairs[:4]]
    assert "bleu" in run.metrics["validation"]
    task_state = json.loads((run.run_dir / "task.json").read_text())
    assert task_state["target_lang"] == "fr" and task_state["bleu_tokenizer"] == "13a"


def test_bleu_tokenizer_follows_a_chinese_target():
    from tunesmith.data.loaders import Table
    import pandas as pd

    cfg = parse_config({"task": {"name": "seq2seq", "target_lang": "zh"}}).task
    table = Table(pd.DataFrame({"source": ["I love Beijing"], "target": ["我爱北京"]}), "t.jsonl", lambda i: f"line {i + 1}")
    state, _ = get_task("seq2seq").preflight(cfg, {"train": table})
    assert state.bleu_tokenizer == "zh"


# --------------------------------------------------------------------------- generation settings


def test_generation_settings_are_saved_and_plain_generate_matches(trained):
    saved = json.loads((trained / "model" / "generation_config.json").read_text())
    assert (saved["num_beams"], saved["max_new_tokens"], saved["no_repeat_ngram_size"]) == (2, 6, 2)
    sources = ["one red cat", "two dog blue", "four"]
    ours = [p["generated_text"] for p in tunesmith.predict(trained, sources)]
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained / "model")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(trained / "model").eval()
    with torch.inference_mode():
        plain = [tokenizer.decode(model.generate(**tokenizer([s], return_tensors="pt"))[0], skip_special_tokens=True).strip()
                 for s in sources]
    assert plain == ours


def test_generation_overrides_per_call(trained):
    loaded = tunesmith.load(trained)
    short = loaded.predict(["one red cat dog"], max_new_tokens=1)[0]["generated_text"]
    assert len(loaded.tokenizer(short, add_special_tokens=False)["input_ids"]) <= 1
    result = CliRunner().invoke(app, ["predict", str(trained), "--text", "one red cat", "--max-new-tokens", "1", "--num-beams", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["generated_text"] == short
    with pytest.raises(ConfigError, match="temprature: not a generation setting"):
        loaded.predict(["one"], temprature=0.5)
    bad = CliRunner().invoke(app, ["predict", str(trained), "--text", "one", "--num-beams", "zero"])
    assert bad.exit_code == 2 and "num_beams (--num-beams): input should be a valid integer" in bad.output


def test_inconsistent_generation_settings_fail_before_the_run_directory(encoder, tmp_path):
    cfg = config(encoder, tmp_path, generation={"num_beams": 1, "early_stopping": True})
    with pytest.raises(ConfigError, match="generation: these settings do not fit together"):
        tunesmith.train(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()


def test_generated_predictions_for_validation_and_test(trained):
    for split, expected in (("validation", rows(6, 3)), ("test", rows(5, 20))):
        written = [json.loads(line) for line in (trained / f"{split}_generated_predictions.jsonl").read_text().splitlines()]
        assert [(w["source"], w["reference"]) for w in written] == [(r["source"], r["target"]) for r in expected]
        assert all(isinstance(w["prediction"], str) for w in written)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["test"]["samples"] == 5 and 0 < metrics["validation"]["gen_len"] <= 6


def test_language_codes_set_the_forced_first_token():
    class MultilingualTokenizer:  # the two things a language-code tokenizer (mBART-50, NLLB) offers here
        tgt_lang, unk_token_id = None, 3

        def convert_tokens_to_ids(self, token):
            return {"fr_XX": 250008}.get(token, 3)

    tokenizer = MultilingualTokenizer()
    assert models.language_token_id(tokenizer, "fr_XX") == 250008
    with pytest.raises(ConfigError, match="'fr' is not a language code of this tokenizer"):
        models.language_token_id(tokenizer, "fr")
    config = transformers.BartConfig(vocab_size=250010, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=1,
                                     decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8)
    model = transformers.BartForConditionalGeneration(config)
    models.set_generation(model, tokenizer, {}, 32, "fr_XX")
    assert model.generation_config.forced_bos_token_id == 250008 and model.generation_config.max_new_tokens == 32


# --------------------------------------------------------------------------- loss and methods


def test_label_smoothing_raises_the_loss_and_is_refused_where_ignored(encoder, tmp_path):
    task = get_task("seq2seq")
    logits, labels = torch.randn(2, 3, 5), torch.tensor([[1, 2, -100], [3, -100, -100]])
    plain, smoothed = task.loss_fn(None, None, None)(logits, labels), task.loss_fn(None, None, None, 0.2)(logits, labels)
    assert plain.units.tolist() == [2, 1] and not torch.allclose(plain.sums, smoothed.sums)
    cfg = config(encoder, tmp_path, train_rows=[{"source": r["source"], "target": i / 7} for i, r in enumerate(rows(8))],
                 validation_rows=[{"source": "one", "target": 0.5}])
    cfg["task"] = {"name": "classification", "text_column": "source", "label_column": "target"}  # regression
    cfg["train"]["label_smoothing_factor"] = 0.1
    with pytest.raises(ConfigError, match="label_smoothing_factor=0.1: the loss of this classification task"):
        tunesmith.train(cfg, show_progress=False)


def test_warm_start_special_tokens_and_labels(encoder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(encoder)
    model = models.load_seq2seq(str(encoder), False)
    models.set_special_tokens(model, tokenizer, None)
    assert (model.config.decoder_start_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    labels = tokenizer(text_target=["un deux", "chat"])["input_ids"]
    batch = get_task("seq2seq").collator(tokenizer, model)(
        [{"input_ids": [2, 5, 3], "labels": ids, "example_index": i} for i, ids in enumerate(labels)])
    # [CLS] starts the decoder input, so the labels do not predict it again; they end with [SEP].
    assert batch["labels"][0].tolist()[0] != tokenizer.cls_token_id and tokenizer.sep_token_id in batch["labels"][0].tolist()
    assert batch["decoder_input_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 2
    assert batch["labels"][1].tolist()[-1] == -100


def test_frozen_trains_the_decoder_only(encoder, tmp_path):
    run = tunesmith.train(config(encoder, tmp_path, method={"name": "frozen"}), show_progress=False)
    before = transformers.AutoModel.from_pretrained(encoder).state_dict()
    after = transformers.AutoModelForSeq2SeqLM.from_pretrained(run.run_dir / "model")
    assert all(torch.equal(before[k], v) for k, v in after.encoder.state_dict().items() if k in before)
    decoder_before = models.load_seq2seq(str(encoder), False).decoder.state_dict()
    changed = [k for k, v in after.decoder.state_dict().items() if not torch.equal(decoder_before[k], v)]
    assert any("crossattention" in k for k in changed) and any(".layer.1." in k for k in changed)


def test_adapters_train_the_new_cross_attention_whole(encoder, tmp_path):
    run = tunesmith.train(config(encoder, tmp_path, method={"name": "lora"}), show_progress=False)
    adapter = json.loads((run.run_dir / "adapter" / "adapter_config.json").read_text())
    assert "crossattention.self.query" in adapter["modules_to_save"]
    assert not any("crossattention" in t for t in adapter["target_modules"])
