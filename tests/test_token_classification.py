"""Token classification: every input format, tag schemes, preflight errors, sub-token alignment and
windows, streaming seqeval metrics, every strategy (overfit, save, reload, predict), entity spans
equal to `transformers.pipeline`'s, the CLI, and the model-family matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline
from typer.testing import CliRunner

import tunesmith
from families import FamilyCache
from test_strategies import LEARNING_RATES, METHODS
from tiny import ner_rows, tiny_config, write_conll, write_jsonl
from tunesmith.cli import app
from tunesmith.config import parse_config
from tunesmith.data.splits import make_splits
from tunesmith.errors import DataError
from tunesmith.tasks.token_classification.metrics import TagAccumulator, entity_metrics
from tunesmith.tasks import get_task
from tunesmith.tasks.token_classification.task import convert_tags, detect_scheme, tag_spans, words_with_offsets

TASK = {"name": "token_classification", "max_length": 32}


def ner_config(model_dir, train_file, out_dir, **sections) -> dict:
    task = {**TASK, **sections.pop("task", {})}
    data = {"validation_file": str(train_file), **sections.pop("data", {})}
    return tiny_config(model_dir, train_file, out_dir, task=task, data=data, **sections)


def tables_of(tmp_path, files: dict, **task) -> tuple:
    """Preflight only: (task, cfg, tables) for files written under tmp_path."""
    data = {f"{split}_file": str(tmp_path / name) for split, name in files.items()}
    cfg = parse_config({"data": data, "task": {**TASK, **task}})
    t = get_task("token_classification")
    tables, _ = make_splits(cfg.data, 0, t.stratify_key(cfg.task), t.reader(cfg.task))
    return t, cfg, tables


def preflight_problems(tmp_path, files: dict, **task) -> list[str]:
    t, cfg, tables = tables_of(tmp_path, files, **task)
    with pytest.raises(DataError) as caught:
        t.preflight(cfg.task, tables)
    return caught.value.problems


@pytest.fixture(scope="module")
def ner_run(tiny_bert, tmp_path_factory):
    """One full fine-tune of the tiny BERT on toy NER, shared by the prediction tests."""
    work = tmp_path_factory.mktemp("ner")
    train = write_jsonl(work / "train.jsonl", ner_rows(40))
    return tunesmith.train(ner_config(tiny_bert, train, work / "run", train={"num_train_epochs": 30}), show_progress=False)


# --------------------------------------------------------------------------- formats and schemes


def test_conll_tab_and_space_docstart_and_tag_column(tmp_path):
    (tmp_path / "a.conll").write_text(
        "-DOCSTART-\tO\n\nAnna\tB-PER\nlives\tO\n\t\nin\tO\nNew\tB-LOC\nYork\tI-LOC\n", encoding="utf-8"
    )
    # Space-separated, three columns (token POS tag), blank line with spaces between sentences.
    (tmp_path / "b.txt").write_text("Anna NNP B-PER\nsings VBZ O\n   \nOslo NNP B-LOC\n", encoding="utf-8")
    t, cfg, tables = tables_of(tmp_path, {"train": "a.conll", "validation": "b.txt"})
    train, _ = t.sentences(cfg.task, tables["train"])
    assert [(s.tokens, s.tags) for s in train] == [(["Anna", "lives"], ["B-PER", "O"]), (["in", "New", "York"], ["O", "B-LOC", "I-LOC"])]
    assert train[1].where(2) == f"{tmp_path / 'a.conll'} line 8"
    valid, _ = t.sentences(cfg.task, tables["validation"])
    assert [s.tags for s in valid] == [["B-PER", "O"], ["B-LOC"]]
    state, _ = t.preflight(cfg.task, tables)
    assert state.labels == ["O", "B-LOC", "I-LOC", "B-PER"] and state.scheme == "BIO"
    # The POS column as the tag: no prefixes, scheme none (token accuracy only).
    _, cfg, tables = tables_of(tmp_path, {"train": "b.txt", "validation": "b.txt"}, conll_tag_column=1)
    state, _ = t.preflight(cfg.task, tables)
    assert state.scheme == "none" and state.labels == ["NNP", "VBZ"]


def test_tokens_and_spans_jsonl(tmp_path):
    write_jsonl(tmp_path / "tok.jsonl", [{"tokens": ["Zoë", "in", "São", "Paulo"], "tags": ["B-PER", "O", "B-LOC", "I-LOC"]}])
    text = "Zoë  visited São Paulo 🎉 with  ACME-Corp!"
    entities = [{"start": 0, "end": 3, "label": "PER"}, {"start": 13, "end": 22, "label": "LOC"}, {"start": 31, "end": 35, "label": "ORG"}]
    write_jsonl(tmp_path / "spans.jsonl", [{"text": text, "entities": entities}])
    t, cfg, tables = tables_of(tmp_path, {"train": "tok.jsonl", "validation": "spans.jsonl"})
    (tok,), _ = t.sentences(cfg.task, tables["train"])
    assert tok.tags == ["B-PER", "O", "B-LOC", "I-LOC"]
    (span,), _ = t.sentences(cfg.task, tables["validation"])
    # Entity boundaries split words ("ACME" out of "ACME-Corp"); emoji and punctuation are words of their own.
    assert span.tokens == ["Zoë", "visited", "São", "Paulo", "🎉", "with", "ACME", "-", "Corp", "!"]
    assert span.tags == ["B-PER", "O", "B-LOC", "I-LOC", "O", "O", "B-ORG", "O", "O", "O"]
    for word, start, end in words_with_offsets(text):
        assert text[start:end] == word


def test_scheme_detection_and_conversion():
    assert detect_scheme(["O", "B-X", "I-X"]) == "BIO"
    assert detect_scheme(["O", "S-X", "B-Y", "E-Y"]) == "BIOES"
    assert detect_scheme(["O", "I-X"]) == "IO"
    assert detect_scheme(["NN", "VB", "O"]) == "none"
    bio = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-LOC"]
    bioes = ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "I-LOC", "E-LOC"]
    assert convert_tags(bio, "BIOES") == bioes
    assert convert_tags(bioes, "BIO") == bio
    assert convert_tags(bio, "IO") == ["I-PER", "I-PER", "O", "I-LOC", "I-LOC", "I-LOC", "I-LOC"]
    assert convert_tags(["I-PER", "I-PER", "O", "I-LOC"], "BIO") == ["B-PER", "I-PER", "O", "B-LOC"]
    assert tag_spans(["O", "I-X", "I-Y"]) == [("X", 1, 2), ("Y", 2, 3)]


def test_convert_scheme_option(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", ner_rows(10))
    t, cfg, tables = tables_of(tmp_path, {"train": "t.jsonl", "validation": "t.jsonl"}, convert_scheme="BIOES")
    state, _ = t.preflight(cfg.task, tables)
    assert state.source_scheme == "BIO" and state.scheme == "BIOES"
    assert {"S-PER", "B-LOC", "E-LOC"} <= set(state.labels)


# --------------------------------------------------------------------------- preflight errors


def test_wrong_number_of_columns(tmp_path):
    (tmp_path / "t.conll").write_text("Anna\tB-PER\nlives\tO\nin\tO\textra\n\nOslo\tB-LOC\n", encoding="utf-8")
    (problem,) = preflight_problems(tmp_path, {"train": "t.conll", "validation": "t.conll"})
    assert problem.startswith(f"{tmp_path / 't.conll'} line 3: expected 2 columns")
    assert "found 3" in problem and "separated by a tab" in problem


def test_token_and_tag_lists_of_different_lengths(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [*ner_rows(3), {"tokens": ["a", "b", "c"], "tags": ["O", "O"]}])
    (problem,) = preflight_problems(tmp_path, {"train": "t.jsonl", "validation": "t.jsonl"})
    assert problem == (
        f"{tmp_path / 't.jsonl'} line 4: 'tokens' has 3 tokens but 'tags' has 2 tags; expected one tag per token; "
        "fix the lists so they have the same length"
    )


def test_orphan_inside_tag_is_reported_or_repaired(tmp_path):
    (tmp_path / "t.conll").write_text("Anna\tB-PER\nlives\tO\nin\tO\nNew\tI-LOC\nYork\tI-LOC\n\nOslo\tB-LOC\n", encoding="utf-8")
    (problem,) = preflight_problems(tmp_path, {"train": "t.conll", "validation": "t.conll"})
    assert problem.startswith(f"{tmp_path / 't.conll'} line 4: tag 'I-LOC' follows 'O'; expected B-LOC")
    assert "set task.repair=true" in problem
    t, cfg, tables = tables_of(tmp_path, {"train": "t.conll", "validation": "t.conll"}, repair=True)
    state, _ = t.preflight(cfg.task, tables)
    assert state.labels == ["O", "B-LOC", "I-LOC", "B-PER"]
    sentences, _ = t.sentences(cfg.task, tables["train"])
    assert t._prepare(cfg.task, sentences, state.source_scheme)[0].tags == ["B-PER", "O", "O", "B-LOC", "I-LOC"]


def test_entity_offsets_outside_the_text_and_overlapping(tmp_path):
    rows = [
        {"text": "Anna lives in Oslo", "entities": [{"start": 0, "end": 4, "label": "PER"}, {"start": 14, "end": 40, "label": "LOC"}]},
        {"text": "New York Times", "entities": [{"start": 0, "end": 8, "label": "LOC"}, {"start": 4, "end": 14, "label": "ORG"}]},
        {"text": "Bruno sings", "entities": [{"start": 0, "end": 5, "label": "PER"}]},
    ]
    write_jsonl(tmp_path / "s.jsonl", rows)
    outside, overlap = preflight_problems(tmp_path, {"train": "s.jsonl", "validation": "s.jsonl"})
    assert outside.startswith(f"{tmp_path / 's.jsonl'} line 1: entity 2 (LOC) has offsets 14..40, outside the text of 18 characters")
    assert overlap.startswith(f"{tmp_path / 's.jsonl'} line 2: entities 1 (LOC, 0..8 'New York') and 2 (ORG, 4..14 'York Times') overlap")


def test_validation_tags_unseen_in_train(tmp_path):
    write_conll(tmp_path / "train.conll", ner_rows(5))
    (tmp_path / "valid.conll").write_text("Anna\tB-PER\nat\tO\nNASA\tB-AGENCY\n", encoding="utf-8")
    (problem,) = preflight_problems(tmp_path, {"train": "train.conll", "validation": "valid.conll"})
    assert problem.startswith(f"{tmp_path / 'valid.conll'} line 3: tag 'B-AGENCY' does not occur in train (train tags: O, B-LOC")


def test_cli_reports_data_errors_with_exit_2(tmp_path, tiny_bert):
    (tmp_path / "t.conll").write_text("Anna\tB-PER\nlives\tO\nOslo\tI-LOC\n", encoding="utf-8")
    cfg = ner_config(tiny_bert, tmp_path / "t.conll", tmp_path / "run")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "-q"])
    assert result.exit_code == 2, result.output
    assert "line 3: tag 'I-LOC' follows 'O'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- alignment, windows, metrics


def test_first_subtoken_labels_and_windows(tiny_bert, tmp_path):
    """Long sentences become several windows; every word is labelled exactly once."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    long_row = {"tokens": [w for r in ner_rows(8) for w in r["tokens"]], "tags": [g for r in ner_rows(8) for g in r["tags"]]}
    write_jsonl(tmp_path / "t.jsonl", [long_row, *ner_rows(4)])
    for label_all in (False, True):
        t, cfg, tables = tables_of(tmp_path, {"train": "t.jsonl", "validation": "t.jsonl"}, max_length=12, label_all_subtokens=label_all)
        state, _ = t.preflight(cfg.task, tables)
        dataset = t.encode(cfg.task, tables["train"], tokenizer, state)
        k = len(state.labels)
        assert max(dataset["length"]) <= 12 and len(dataset) > 5
        labels = [label for row in dataset["labels"] for label in row]
        words = sum(len(r["tokens"]) for r in [long_row, *ner_rows(4)])
        assert sum(0 <= x < k for x in labels) == words  # first sub-tokens: one per word, none lost
        continuation = sum(x >= k for x in labels)
        assert (continuation > 0) == label_all


def test_streaming_metrics_match_seqeval_and_strict_mode():
    from seqeval.metrics import f1_score

    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    acc = TagAccumulator(labels)
    # Two batches; -100 marks special tokens and later sub-tokens, which never count.
    acc.update(torch.tensor([[0, 1, 2, 0, 3]]), torch.tensor([[-100, 1, 2, -100, 3]]))
    acc.update(torch.tensor([[2, 2, 0], [0, 3, 3]]), torch.tensor([[1, 2, 0], [0, 3, -100]]))
    assert acc.true == [["B-PER", "I-PER", "B-LOC"], ["B-PER", "I-PER", "O"], ["O", "B-LOC"]]
    assert acc.pred == [["B-PER", "I-PER", "B-LOC"], ["I-PER", "I-PER", "O"], ["O", "B-LOC"]]
    assert acc.accuracy == pytest.approx(7 / 8)
    lenient = entity_metrics(acc.true, acc.pred, "BIO", strict=False)
    strict = entity_metrics(acc.true, acc.pred, "BIO", strict=True)
    assert lenient["f1"] == pytest.approx(f1_score(acc.true, acc.pred)) == 1.0
    assert strict["f1"] < 1.0 and strict["per_type"]["PER"]["recall"] == 0.5


# --------------------------------------------------------------------------- strategies

# The same strategies and learning rates as sequence classification's strategy tests.
# Adapters and head-only training move fewer weights: more epochs (learning rates as for classification).
EPOCHS = {"full": 15, "last_n": 30, "lora": 40, "dora": 40, "frozen": 40, "ia3": 25}
# A head on frozen features of a body pretrained on sentiment only: well above chance is enough.
MIN_F1 = {"lora": 0.9, "dora": 0.9, "frozen": 0.4, "ia3": 0.7}
# Token tagging needs larger steps than sentence classification for the few-weight methods.
TOKEN_LEARNING_RATES = {**LEARNING_RATES, "last_n": 1e-2, "ia3": 3e-2}


@pytest.mark.parametrize("method", list(METHODS))
def test_overfit_save_reload_predict(method, tiny_bert, pretrained_tiny_bert, tmp_path):
    rows = ner_rows(40)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    source = tiny_bert if method == "full" else pretrained_tiny_bert
    cfg = ner_config(
        source, train, tmp_path / "run", method=METHODS[method],
        train={"learning_rate": TOKEN_LEARNING_RATES.get(method, 3e-3), "num_train_epochs": EPOCHS[method],
               # Adapters start slowly (F1 ~0 for several epochs): early stopping only where learning is quick.
               "early_stopping_patience": 4 if method in ("full", "last_n") else None},
    )
    result = tunesmith.train(cfg, show_progress=False)
    assert result.metrics["validation"]["f1"] >= MIN_F1.get(method, 0.95), result.metrics["validation"]
    # Best checkpoint by entity F1 (the task's default metric), restored before the final evaluation.
    train = result.metrics["train"]
    assert train["metric_for_best_model"] == "f1" and result.metrics["validation"]["f1"] == pytest.approx(train["best_metric"])
    evals = [r for r in map(json.loads, (result.run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    assert train["best_metric"] == max(r["f1"] for r in evals)
    if train["stopped_early"]:  # four evaluations in a row without a better F1
        assert sum(r["step"] > train["best_step"] for r in evals) == 4

    tokens = [r["tokens"] for r in rows]
    predictions = tunesmith.predict(result.run_dir, tokens)
    assert [len(p["tags"]) for p in predictions] == [len(t) for t in tokens]
    again = tunesmith.load(result.run_dir).predict(tokens)
    assert [p["tags"] for p in again] == [p["tags"] for p in predictions]

    # The saved model is plain transformers: the first sub-token of each word gives the same tag
    # (on sentences that fit one window).
    plain = AutoModelForTokenClassification.from_pretrained(result.run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    short = [i for i, t in enumerate(tokens) if len(tokenizer(t, is_split_into_words=True)["input_ids"]) <= TASK["max_length"]][:8]
    batch = tokenizer([tokens[i] for i in short], is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = plain(**batch).logits.argmax(-1)
    for i, prediction in enumerate(predictions[j] for j in short):
        firsts, seen = [], set()
        for position, w in enumerate(batch.word_ids(i)):
            if w is not None and w not in seen:
                seen.add(w)
                firsts.append(plain.config.id2label[int(ids[i, position])])
        assert firsts == prediction["tags"]
    if method in {"lora", "dora", "ia3"}:
        config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "TOKEN_CLS"


# --------------------------------------------------------------------------- prediction


@pytest.mark.parametrize("aggregation", ["first", "average", "max"])
def test_entities_equal_the_transformers_pipeline(ner_run, aggregation):
    # Training sentences (which the model fits) that need no window (the pipeline has none), plus one
    # with accents, emoji and repeated spaces.
    tokenizer = AutoTokenizer.from_pretrained(ner_run.run_dir / "model")
    texts = [" ".join(r["tokens"]) for r in ner_rows(40)]
    texts = [t for t in texts if len(tokenizer(t)["input_ids"]) <= TASK["max_length"]][:4] + ["Café  🎬  maria silva   lives in   paris !"]
    ours = tunesmith.predict(ner_run.run_dir, texts, aggregation=aggregation)
    pipe = pipeline("token-classification", model=str(ner_run.run_dir / "model"), aggregation_strategy=aggregation)
    found = 0
    for text, prediction in zip(texts, ours):
        theirs = pipe(text)
        assert [(e["entity_group"], e["start"], e["end"]) for e in theirs] == [(e["label"], e["start"], e["end"]) for e in prediction["entities"]]
        assert [float(e["score"]) for e in theirs] == pytest.approx([e["score"] for e in prediction["entities"]], abs=1e-4)
        found += len(theirs)
    assert found >= 6


def test_entity_offsets_on_accents_emoji_and_repeated_spaces(ner_run):
    text = "élena  lives   in   new   york 🎬"
    (prediction,) = tunesmith.predict(ner_run.run_dir, [text])
    for entity in prediction["entities"]:
        assert text[entity["start"] : entity["end"]] == entity["text"]
    got = {(e["label"], e["text"]) for e in prediction["entities"]}
    # Offsets are what this test is about: every expected entity comes back with exact character spans
    # (a tiny model may add a spurious guess on the emoji, which is a quality matter, not an offset one).
    assert {("PER", "élena"), ("LOC", "new   york")} <= got, prediction
    spans = {(e["label"], e["start"], e["end"]) for e in prediction["entities"]}
    assert {("PER", 0, 5), ("LOC", 20, 30)} <= spans
    assert len(prediction["tokens"]) == len(prediction["tags"])


def test_long_inputs_are_windowed_and_merged(ner_run):
    loaded = tunesmith.load(ner_run.run_dir)
    loaded.config.task.max_length = 16  # several windows per input, each within the positions seen in training
    rows = ner_rows(12, seed=5)
    words = [w for r in rows for w in r["tokens"]]
    gold = [g for r in rows for g in r["tags"]]
    (prediction,) = loaded.predict([words])
    assert len(prediction["tags"]) == len(words) > 60
    assert np.mean([p == g for p, g in zip(prediction["tags"], gold)]) >= 0.85
    # Raw text: entity offsets from every window are offsets into the whole text.
    text = "  ".join(" ".join(r["tokens"]) for r in rows)
    (spans,) = loaded.predict([text])
    expected, cursor = set(), 0
    for r in rows:
        for kind, a, b in tag_spans(r["tags"]):
            start = text.index(r["tokens"][a], cursor)
            end = text.index(r["tokens"][b - 1], start) + len(r["tokens"][b - 1])
            expected.add((kind, start, end))
        cursor = text.index(r["tokens"][-1], cursor) + len(r["tokens"][-1])
    found = [(e["label"], e["start"], e["end"]) for e in spans["entities"]]
    assert all(text[e["start"] : e["end"]] == e["text"] for e in spans["entities"])
    assert found == sorted(found, key=lambda f: f[1]) and all(a[2] <= b[1] for a, b in zip(found, found[1:]))
    assert len(expected & set(found)) >= 0.8 * len(expected), (sorted(expected), found)


def test_cli_eval_and_predict_conll(ner_run, tmp_path):
    rows = ner_rows(8, seed=9)
    data = write_conll(tmp_path / "test.conll", rows)
    result = CliRunner().invoke(app, ["eval", str(ner_run.run_dir), str(data), "-o", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    # Held-out toy rows (8 sentences, ~18 entities): one or two misses are within a seed's luck.
    assert metrics["f1"] >= 0.8 and "PER" in metrics["per_type"]
    out = tmp_path / "pred.conll"
    result = CliRunner().invoke(app, ["predict", str(ner_run.run_dir), "-i", str(data), "--format", "conll", "-o", str(out)])
    assert result.exit_code == 0, result.output
    blocks = [b.splitlines() for b in out.read_text().strip().split("\n\n")]
    assert [[line.split("\t")[0] for line in b] for b in blocks] == [r["tokens"] for r in rows]
    result = CliRunner().invoke(app, ["predict", str(ner_run.run_dir), "--text", "chen lives in oslo", "--aggregation", "first"])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    entities = [(e["label"], e["text"]) for e in record["entities"]]
    assert ("PER", "chen") in entities and all(label in {"PER", "LOC", "ORG"} for label, _ in entities), entities


# --------------------------------------------------------------------------- model families

FAMILY_NAMES = ["bert", "roberta", "deberta-v2", "xlnet", "gpt2"]
# A few families also cover task options end to end: every sub-token labelled; BIO data trained as
# BIOES with strict seqeval matching.
FAMILY_TASK = {"bert": {"label_all_subtokens": True}, "deberta-v2": {"convert_scheme": "BIOES", "strict": True}}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    return FamilyCache(tmp_path_factory.mktemp("families-tok"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_model_families(family, family_model, tmp_path):
    rows = ner_rows(40, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    task = FAMILY_TASK.get(family, {})
    cfg = ner_config(family_model(family), train, tmp_path / "run", task=task, train={"num_train_epochs": 30})
    result = tunesmith.train(cfg, show_progress=False)
    assert result.metrics["validation"]["f1"] >= 0.85, result.metrics["validation"]
    tokens = [r["tokens"] for r in rows[:10]]
    predictions = tunesmith.predict(result.run_dir, tokens)
    scheme = task.get("convert_scheme", "BIO")
    gold = [convert_tags(r["tags"], scheme) for r in rows]
    assert np.mean([p == g for pr, tags in zip(predictions, gold) for p, g in zip(pr["tags"], tags)]) >= 0.95
    # Saved model and tokenizer load with plain transformers; BPE tokenizers keep add_prefix_space.
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    tokenizer(tokens[0], is_split_into_words=True)
    assert AutoModelForTokenClassification.from_pretrained(result.run_dir / "model").config.id2label[0] == "O"
    text = "chen lives in new york"
    (spans,) = tunesmith.predict(result.run_dir, [text])
    for entity in spans["entities"]:
        assert text[entity["start"] : entity["end"]] == entity["text"]
    if scheme == "BIOES":
        assert {"S-PER", "E-LOC"} <= set(json.loads((result.run_dir / "task.json").read_text())["labels"])
    if family in ("bert", "roberta"):
        theirs = pipeline("token-classification", model=str(result.run_dir / "model"), aggregation_strategy="first")(text)
        assert [(e["entity_group"], e["start"], e["end"]) for e in theirs] == [(e["label"], e["start"], e["end"]) for e in spans["entities"]]


def test_example_config_and_reference():
    from pathlib import Path

    from tunesmith.config import config_reference, load_config
    from tunesmith.tasks.token_classification.config import TokenClassificationTaskConfig

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "ner.yaml")
    t = get_task(cfg.task.name)
    tables, _ = make_splits(cfg.data, cfg.train.seed, t.stratify_key(cfg.task), t.reader(cfg.task))
    state, warnings = t.preflight(cfg.task, tables)
    assert state.labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"] and warnings == []
    reference = config_reference()
    assert "## `task (name: token_classification)`" in reference
    assert all(f"| `{name}` |" in reference for name in TokenClassificationTaskConfig.model_fields)


def test_prediction_inputs_and_outputs(tmp_path):
    from tunesmith.cli.predict_io import render_predictions
    from tunesmith.data.inputs import read_inputs

    cfg = parse_config({"task": TASK})
    write_jsonl(tmp_path / "in.jsonl", [{"tokens": ["Anna", "sings"]}, {"tokens": ["Oslo"]}])
    inputs, _ = read_inputs(cfg, tmp_path / "in.jsonl", None)
    assert inputs == [["Anna", "sings"], ["Oslo"]]
    write_conll(tmp_path / "in.conll", [{"tokens": ["Anna", "sings"], "tags": ["B-PER", "O"]}])
    assert read_inputs(cfg, tmp_path / "in.conll", None)[0] == [["Anna", "sings"]]
    (tmp_path / "in.txt").write_text("Anna sings in Oslo\n\n", encoding="utf-8")
    assert read_inputs(cfg, tmp_path / "in.txt", None)[0] == ["Anna sings in Oslo"]
    lines = render_predictions([{}], [{"tokens": ["Anna", "sings"], "tags": ["B-PER", "O"]}], "conll")
    assert lines == ["Anna\tB-PER", "sings\tO", ""]
    with pytest.raises(DataError, match="not a token classification run"):
        render_predictions([{}], [{"label": "pos", "score": 0.9}], "conll")
