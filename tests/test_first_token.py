"""The last layer computes only the first token for heads that read only it: same outputs and gradients."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

import tunesmith
from families import FamilyCache
from tiny import sentiment_rows, tiny_config, write_csv
from tunesmith.speed.first_token import keep_first_token_only, restore_all_tokens


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return FamilyCache(tmp_path_factory.mktemp("families-first-token"))


def _batch(tokenizer):
    texts = ["a gorgeous witty film about paris", "dull", "the plot is thin but the cast is great fun"]
    return tokenizer(texts, padding=True, return_tensors="pt")


def _logits_and_grads(model, batch, labels):
    model.zero_grad()
    out = model(**batch, labels=labels)
    out.loss.backward()
    return out.logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(model.config, field):
            setattr(model.config, field, 0.0)
    return model


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_same_logits_and_gradients(family, mode, families):
    source = families(family)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=3)
    model = _no_dropout(model).train(mode == "train")  # train mode: the training code paths, with nothing dropped
    batch, labels = _batch(tokenizer), torch.tensor([0, 2, 1])
    keys = list(model.state_dict())
    full_logits, full_grads = _logits_and_grads(model, batch, labels)
    assert keep_first_token_only(model)
    assert list(model.state_dict()) == keys
    short_logits, short_grads = _logits_and_grads(model, batch, labels)
    assert torch.allclose(full_logits, short_logits, atol=1e-6)
    assert full_grads.keys() == short_grads.keys()  # every weight of the last layer still gets its gradient
    assert all(torch.allclose(full_grads[n], short_grads[n], atol=1e-6) for n in full_grads)
    restore_all_tokens(model)
    again, _ = _logits_and_grads(model, batch, labels)
    assert torch.allclose(again, full_logits, atol=1e-6)
    last = model.base_model.encoder.layer[-1].attention.output
    assert type(last).__name__.endswith("SelfOutput") and not type(last).__name__.startswith("FirstTokenOnly")


def test_the_last_query_projection_runs_for_one_position(families):
    from tunesmith.speed.first_token import FirstPositionQuery

    source = families("bert")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = _no_dropout(AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)).train()
    assert keep_first_token_only(model)
    query = model.bert.encoder.layer[-1].attention.self.query
    assert type(query) is FirstPositionQuery and type(model.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    seen = []
    query.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out.shape, out.stride())))
    batch = _batch(tokenizer)
    model(**batch)
    (inputs, outputs, strides), = seen
    assert outputs == inputs[:-1] + (query.out_features,) and strides[1] == 0  # broadcast, never materialised
    restore_all_tokens(model)
    assert type(query) is torch.nn.Linear


def test_lora_model_and_copies(families):
    import peft

    source = families("bert")
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    base = _no_dropout(AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value", "dense"],
                                                      lora_dropout=0.0))
    batch, labels = _batch(tokenizer), torch.tensor([0, 1, 1])
    full, full_grads = _logits_and_grads(model, batch, labels)
    assert keep_first_token_only(model)
    short, short_grads = _logits_and_grads(model, batch, labels)
    assert torch.allclose(full, short, atol=1e-6)
    assert all(torch.allclose(full_grads[n], short_grads[n], atol=1e-6) for n in full_grads)
    clone = copy.deepcopy(model)  # FSDP's save skeleton is a deep copy: it must be restorable too
    restore_all_tokens(clone)
    assert not any(type(m).__name__.startswith("FirstTokenOnly") for m in clone.modules())


@pytest.mark.parametrize("family", ["distilbert", "gpt2", "xlnet"])
def test_other_heads_are_left_alone(family, families):
    # DistilBERT adds its residual outside the attention module; GPT-2 and XLNet read the last token.
    model = AutoModelForSequenceClassification.from_pretrained(families(family), num_labels=2)
    assert not keep_first_token_only(model)
    assert not any(type(m).__name__.startswith("FirstTokenOnly") for m in model.modules())


def test_token_classification_models_are_left_alone(families):
    assert not keep_first_token_only(AutoModelForTokenClassification.from_pretrained(families("bert"), num_labels=3))


def test_training_records_it_and_saves_a_plain_model(tiny_bert, tmp_path, monkeypatch):
    write_csv(tmp_path / "train.csv", sentiment_rows(32))
    test = write_csv(tmp_path / "test.csv", sentiment_rows(12, seed=3))

    def run(name, **train):
        cfg = tiny_config(tiny_bert, tmp_path / "train.csv", tmp_path / name, data={"test_file": str(test)},
                          train={"num_train_epochs": 1, **train})
        result = tunesmith.train(cfg, show_progress=False)
        return json.loads((result.run_dir / "provenance.json").read_text())["speed"], result

    speed, result = run("on")
    assert speed["first_token_only"] is True
    assert run("off", first_token_only=False)[0]["first_token_only"] is False
    plain = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert type(plain.bert.encoder.layer[-1].attention.output).__name__ == "BertSelfOutput"
    # The run's test metrics (computed with the first-token shortcut) are those of the plain saved model.
    loaded = tunesmith.load(result.run_dir)
    again = tunesmith.evaluate(loaded, test)
    assert again["loss"] == pytest.approx(result.metrics["test"]["loss"], abs=1e-5)
    assert again["accuracy"] == result.metrics["test"]["accuracy"]
    # predict and evaluate use the shortcut only while they run: the loaded model stays plain.
    texts = ["a fine film", "dull and slow", "great cast , thin plot"]
    from tunesmith.speed import first_token as first_token

    calls = []
    original = first_token._FirstTokenOnly.forward
    monkeypatch.setattr(first_token._FirstTokenOnly, "forward", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    shortcut = tunesmith.predict(loaded, texts)
    assert calls  # the last layer ran for the first token only
    assert not any(type(m).__name__.startswith("FirstTokenOnly") for m in loaded.model.modules())
    plain_scores = loaded.predict(texts)  # LoadedRun.predict: the plain model, every token computed
    for a, b in zip(shortcut, plain_scores):
        assert a["label"] == b["label"] and all(abs(a["scores"][k] - b["scores"][k]) < 1e-6 for k in a["scores"])


def test_frozen_with_feature_cache_keeps_every_token(tiny_bert, tmp_path):
    write_csv(tmp_path / "train.csv", sentiment_rows(16))
    cfg = tiny_config(tiny_bert, tmp_path / "train.csv", tmp_path / "frozen", method={"name": "frozen"},
                      train={"num_train_epochs": 1})
    result = tunesmith.train(cfg, show_progress=False)
    assert json.loads((result.run_dir / "provenance.json").read_text())["speed"]["first_token_only"] is False
