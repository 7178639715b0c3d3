"""Multi-label, regression, sentence pairs, class weights and the plain-transformers round trip."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

import tunesmith
from tiny import NEGATIVE, POSITIVE, sentiment_rows, tiny_config, write_csv

# Topic words from the tiny tokenizer's vocabulary, so each is one token.
TOPICS = {"sport": ["good", "great", "wonderful"], "music": ["bad", "awful", "boring"], "food": ["plot", "acting", "story"]}


def multi_label_rows(n=96, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = [t for t in TOPICS if rng.random() < 0.45] or [rng.choice(list(TOPICS))]
        words = [w for t in chosen for w in rng.sample(TOPICS[t], 2)] + rng.sample(["the", "a", "and", "was", "it"], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "|".join(chosen)})
    return rows


def test_multi_label_threshold_tuned_and_saved(pretrained_tiny_bert, tmp_path):
    train = write_csv(tmp_path / "ml.csv", multi_label_rows())
    cfg = tiny_config(pretrained_tiny_bert, train, tmp_path / "run", data={"validation_file": str(train)},
                      train={"learning_rate": 5e-3, "num_train_epochs": 40})
    result = tunesmith.train(cfg, show_progress=False)
    state = json.loads((result.run_dir / "task.json").read_text())
    assert state["problem_type"] == "multi_label"
    assert state["labels"] == ["food", "music", "sport"]
    val = result.metrics["validation"]
    assert val["threshold"] == state["threshold"]
    assert 0.05 <= state["threshold"] <= 0.95
    for key in ("f1_micro", "f1_macro", "subset_accuracy"):
        assert key in val
    # At lr 1e-2 for 30 epochs this toy fit was decided by the random stream (micro-F1 0.71-1.0 over seeds and
    # pre-training draws of the fixture; exact-set accuracy down to 0.26); at 5e-3 for 40 epochs seeds 0-4 all
    # reached 1.0 and 1.0. Always predicting the commonest label set scores 0.19.
    assert val["f1_micro"] >= 0.85
    rows = multi_label_rows()
    preds = tunesmith.predict(result.run_dir, [r["text"] for r in rows])
    exact = sum(set(p["labels"]) == set(r["label"].split("|")) for p, r in zip(preds, rows)) / len(rows)
    assert exact >= 0.7
    assert all(set(p["scores"]) == {"food", "music", "sport"} for p in preds)
    plain = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    assert plain.config.problem_type == "multi_label_classification"
    assert plain.config.multi_label_threshold == state["threshold"]


def test_multi_label_from_indicator_columns(pretrained_tiny_bert, tmp_path):
    rows = [{"text": r["text"], **{t: int(t in r["label"].split("|")) for t in TOPICS}} for r in multi_label_rows(48)]
    train = write_csv(tmp_path / "ind.csv", rows)
    cfg = tiny_config(pretrained_tiny_bert, train, tmp_path / "run", task={"label_columns": ["sport", "music", "food"]},
                      train={"num_train_epochs": 2})
    result = tunesmith.train(cfg, show_progress=False)
    state = json.loads((result.run_dir / "task.json").read_text())
    assert state["problem_type"] == "multi_label"
    assert state["labels"] == ["sport", "music", "food"]  # column order, as configured


def test_regression(pretrained_tiny_bert, tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(80):
        pos = rng.randint(0, 3)
        words = rng.sample(POSITIVE, pos) + rng.sample(NEGATIVE, 3 - pos) + ["the", "film"]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": pos + 0.5 * rng.random()})
    train = write_csv(tmp_path / "reg.csv", rows)
    cfg = tiny_config(pretrained_tiny_bert, train, tmp_path / "run", data={"validation_file": str(train)},
                      task={"label_column": "score"}, train={"learning_rate": 5e-3, "num_train_epochs": 15})
    result = tunesmith.train(cfg, show_progress=False)
    val = result.metrics["validation"]
    assert result.metrics["train"]["metric_for_best_model"] == "mse"
    for key in ("mse", "rmse", "mae", "pearson", "spearman"):
        assert val[key] is not None
    assert val["spearman"] > 0.8
    preds = tunesmith.predict(result.run_dir, [r["text"] for r in rows[:20]])
    assert all(set(p) == {"value"} for p in preds)
    corr = np.corrcoef([p["value"] for p in preds], [r["score"] for r in rows[:20]])[0, 1]
    assert corr > 0.8


def test_sentence_pairs(pretrained_tiny_bert, tmp_path):
    # The label depends only on the second text: a model that never saw the pair would be at chance.
    rng = random.Random(0)
    rows = []
    for i in range(80):
        positive = i % 2 == 0
        rows.append({"premise": "the film was " + " ".join(rng.sample(["plot", "story", "acting", "very"], 2)),
                     "hypothesis": "it is " + rng.choice(POSITIVE if positive else NEGATIVE),
                     "label": "positive" if positive else "negative"})
    train = write_csv(tmp_path / "pairs.csv", rows)
    cfg = tiny_config(pretrained_tiny_bert, train, tmp_path / "run", data={"validation_file": str(train)},
                      task={"text_column": "premise", "text_pair_column": "hypothesis"},
                      train={"learning_rate": 3e-3, "num_train_epochs": 15})
    result = tunesmith.train(cfg, show_progress=False)
    assert result.metrics["validation"]["accuracy"] >= 0.9, result.metrics["validation"]["accuracy"]
    preds = tunesmith.predict(result.run_dir, [(r["premise"], r["hypothesis"]) for r in rows])
    assert sum(p["label"] == r["label"] for p, r in zip(preds, rows)) >= 0.9 * len(rows)
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    encoded = tokenizer.convert_ids_to_tokens(tokenizer("the film", "it is dull")["input_ids"])
    assert encoded.count("[SEP]") == 2 and encoded[-2] == "dull"  # the pair is encoded as a second segment


def test_class_weights_balanced_changes_loss(pretrained_tiny_bert, tmp_path):
    from tunesmith.tasks.classification.config import ClassificationTaskConfig
    from tunesmith.tasks.classification.task import ClassificationState, ClassificationTask
    import datasets

    task = ClassificationTask()
    state = ClassificationState("single_label", ["neg", "pos"])
    train = datasets.Dataset.from_dict({"labels": [0] * 9 + [1]})
    weighted = task.loss_fn(ClassificationTaskConfig(class_weights="balanced"), state, train)
    plain = task.loss_fn(ClassificationTaskConfig(), state, train)
    logits = torch.tensor([[2.0, -2.0], [2.0, -2.0]])
    labels = torch.tensor([1, 0])
    # Balanced weights are n / (k * count): 10/(2*9) for neg, 10/(2*1) for pos.
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor([10 / 18, 5.0]))

    def mean(losses):  # what the loop makes of a batch's losses: the sum over its units divided by the units
        return losses.sums.sum() / losses.units.sum()

    assert torch.isclose(mean(weighted(logits, labels)), expected)
    assert not torch.isclose(mean(weighted(logits, labels)), mean(plain(logits, labels)))


def test_pipeline_matches_tunesmith(pretrained_tiny_bert, sentiment_csv, tmp_path):
    cfg = tiny_config(pretrained_tiny_bert, sentiment_csv, tmp_path / "run", train={"num_train_epochs": 3})
    result = tunesmith.train(cfg, show_progress=False)
    texts = [r["text"] for r in sentiment_rows(10, seed=3)]
    ours = tunesmith.predict(result.run_dir, texts)
    clf = pipeline("text-classification", model=str(result.run_dir / "model"), tokenizer=str(result.run_dir / "model"))
    theirs = clf(texts)
    assert [t["label"] for t in theirs] == [o["label"] for o in ours]
    assert np.allclose([t["score"] for t in theirs], [o["score"] for o in ours], atol=1e-4)
    # The run directory records provenance and a model card.
    prov = json.loads((result.run_dir / "provenance.json").read_text())
    assert prov["config_schema_version"] >= 1 and prov["seed"] == 0
    assert str(sentiment_csv) in prov["data_files"] and len(prov["data_files"][str(sentiment_csv)]["sha256"]) == 64
    assert "torch" in prov["packages"] and prov["cpu"]["flags"]
    assert (result.run_dir / "README.md").read_text().startswith("---")
    assert (result.run_dir / "config.yaml").exists()
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert any(r["type"] == "train" for r in log) and any(r["type"] == "eval" for r in log)


def test_training_is_reproducible(tiny_bert, sentiment_csv, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = tiny_config(tiny_bert, sentiment_csv, tmp_path / name, train={"num_train_epochs": 2})
        runs.append(tunesmith.train(cfg, show_progress=False))
    a = AutoModelForSequenceClassification.from_pretrained(runs[0].run_dir / "model").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(runs[1].run_dir / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_and_best_checkpoint(tiny_bert, sentiment_csv, tmp_path):
    # A huge learning rate makes validation loss blow up after the first evaluation: training stops
    # early and the saved model is the best (first) checkpoint, not the last.
    cfg = tiny_config(tiny_bert, sentiment_csv, tmp_path / "run",
                      train={"learning_rate": 0.5, "num_train_epochs": 20, "eval_strategy": "steps", "eval_steps": 2,
                             "early_stopping_patience": 2, "metric_for_best_model": "loss", "warmup_ratio": 0.0})
    result = tunesmith.train(cfg, show_progress=False)
    train = result.metrics["train"]
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r["type"] == "eval"]
    assert train["stopped_early"]
    assert train["global_step"] < 20 * 6
    best = min(evals, key=lambda r: r["loss"])
    assert train["best_step"] == best["step"]
    assert result.metrics["validation"]["loss"] == pytest.approx(best["loss"], rel=1e-4)


def test_gradient_accumulation_halves_optimizer_steps(tiny_bert, sentiment_csv, tmp_path):
    steps = {}
    for accumulation in (1, 2):
        cfg = tiny_config(tiny_bert, sentiment_csv, tmp_path / f"acc{accumulation}",
                          train={"num_train_epochs": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": accumulation})
        steps[accumulation] = tunesmith.train(cfg, show_progress=False).metrics["train"]["global_step"]
    assert steps[1] == 2 * 12 and steps[2] == 2 * 6  # 48 train rows / batch 4 = 12 batches per epoch


def _without_dropout(model_dir, folder):
    """The tiny model with dropout off: two micro-batches then draw no masks a single batch would not."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    AutoModelForSequenceClassification.from_pretrained(model_dir, config=config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


def _first_step(model_dir, train_csv, out, monkeypatch, batch_size, accumulation):
    """Gradients reaching the first optimizer step, and the weights after it (one step only)."""
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append({id(p): p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None})
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    # No clipping, no warmup, a plain random order (length grouping orders batches of 8 and 16 differently):
    # the first 16 examples are the same, as one batch or as two micro-batches.
    cfg = tiny_config(model_dir, train_csv, out, train={
        "max_steps": 1, "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": accumulation,
        "max_grad_norm": 0.0, "warmup_ratio": 0.0, "group_by_length": False, "eval_strategy": "no"})
    result = tunesmith.train(cfg, show_progress=False)
    monkeypatch.undo()
    return list(seen[0].values()), load_file(str(result.run_dir / "model" / "model.safetensors"))


def test_gradient_accumulation_matches_one_large_batch(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    """Batch 8 x accumulation 2 is batch 16 x 1: the same gradients (Adam's update hides a wrongly scaled
    gradient, so they are compared, not only the weights) and the same weights after the step."""
    model = _without_dropout(tiny_bert, tmp_path / "no-dropout")
    grads_acc, weights_acc = _first_step(model, sentiment_csv, tmp_path / "acc", monkeypatch, 8, 2)
    grads_big, weights_big = _first_step(model, sentiment_csv, tmp_path / "big", monkeypatch, 16, 1)
    assert len(grads_acc) == len(grads_big) > 0
    for accumulated, whole in zip(grads_acc, grads_big):
        torch.testing.assert_close(accumulated, whole, rtol=0, atol=1e-6)
    assert weights_acc.keys() == weights_big.keys()
    for name in weights_acc:
        torch.testing.assert_close(weights_acc[name], weights_big[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_train_then_fp32_evaluate_in_one_process(pretrained_tiny_bert, sentiment_csv, tmp_path):
    # accelerate's process-global state once made a bf16 run followed by an fp32 evaluation fail.
    cfg = tiny_config(pretrained_tiny_bert, sentiment_csv, tmp_path / "bf16", train={"num_train_epochs": 1, "precision": "bf16"})
    result = tunesmith.train(cfg, show_progress=False)
    assert result.metrics["train"]["precision"] == "bf16"
    metrics = tunesmith.evaluate(result.run_dir, sentiment_csv)
    assert metrics["samples"] == 64
    cfg32 = tiny_config(pretrained_tiny_bert, sentiment_csv, tmp_path / "fp32", train={"num_train_epochs": 1, "precision": "fp32"})
    assert tunesmith.train(cfg32, show_progress=False).metrics["train"]["precision"] == "fp32"
