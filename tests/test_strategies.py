"""Per strategy: overfit a tiny set, save, reload, predict the same."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import tunesmith
from tiny import sentiment_rows, tiny_config

METHODS = {
    "full": {"name": "full"},
    "last_n": {"name": "last_n", "last_n_layers": 1},
    "frozen": {"name": "frozen"},
    "lora": {"name": "lora", "lora_r": 8, "lora_alpha": 16},
    "dora": {"name": "dora", "lora_r": 8, "lora_alpha": 16},
    "ia3": {"name": "ia3"},
}
# Head-only and IA3 training move fewer weights: a higher rate (and, head-only, more epochs) to overfit.
# Methods that move few weights may leave a row or two of the 64 unfitted; everything else fits all.
MIN_TRAIN_ACCURACY = {"frozen": 0.9, "ia3": 0.95, "last_n": 0.95}
LEARNING_RATES = {"frozen": 3e-2, "ia3": 1e-2, "lora": 1e-2, "dora": 1e-2, "last_n": 3e-3}


@pytest.mark.parametrize("method", list(METHODS))
def test_overfit_save_reload_predict(method, pretrained_tiny_bert, sentiment_csv, tmp_path):
    lr = LEARNING_RATES.get(method, 3e-3)
    # Overfitting means fitting the training rows: validate on the same file.
    cfg = tiny_config(
        pretrained_tiny_bert, sentiment_csv, tmp_path / "run", method=METHODS[method],
        data={"validation_file": str(sentiment_csv)}, train={"learning_rate": lr, "num_train_epochs": 25},
    )
    result = tunesmith.train(cfg, show_progress=False)

    rows = sentiment_rows(64)
    texts = [r["text"] for r in rows]
    predictions = tunesmith.predict(result.run_dir, texts)
    train_accuracy = sum(p["label"] == r["label"] for p, r in zip(predictions, rows)) / len(rows)
    assert train_accuracy >= MIN_TRAIN_ACCURACY.get(method, 1.0), f"{method} did not overfit: train accuracy {train_accuracy}"

    # Reloading gives the same predictions, through tunesmith and through plain transformers.
    again = tunesmith.load(result.run_dir)
    assert [p["label"] for p in again.predict(texts)] == [p["label"] for p in predictions]
    plain = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model").eval()
    batch = again.tokenizer(texts[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(plain(**batch).logits, -1)
    expected = torch.tensor([[p["scores"]["neg"], p["scores"]["pos"]] for p in predictions[:8]])
    assert torch.allclose(probs, expected, atol=1e-4)
    assert plain.config.id2label == {0: "neg", 1: "pos"}

    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["validation"]["accuracy"] >= 0.85
    if method in {"lora", "dora", "ia3"}:
        assert (result.run_dir / "adapter" / "adapter_config.json").exists()


def test_trainable_parameter_counts(tiny_bert):
    from tunesmith.config import method_config
    from tunesmith.methods.apply import apply_method, count_parameters

    def fresh():
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)

    total = count_parameters(fresh()).total
    head = sum(p.numel() for p in fresh().classifier.parameters())
    frozen = apply_method(fresh(), method_config("frozen"), "SEQ_CLS")
    assert count_parameters(frozen).trainable == head
    last1 = apply_method(fresh(), method_config("last_n", last_n_layers=1), "SEQ_CLS")
    model = last1
    assert all(not p.requires_grad for p in model.bert.embeddings.parameters())
    assert all(not p.requires_grad for p in model.bert.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in model.bert.encoder.layer[1].parameters())
    assert head < count_parameters(last1).trainable < total
    lora = apply_method(fresh(), method_config("lora"), "SEQ_CLS")
    assert 0 < count_parameters(lora).trainable < total / 2


def test_tied_weights_are_optimised_once():
    from transformers import BartConfig, BartForSequenceClassification

    from tunesmith.loop.optimizer import optimizer_groups

    model = BartForSequenceClassification(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                                      encoder_attention_heads=2, decoder_attention_heads=2,
                                                      encoder_ffn_dim=16, decoder_ffn_dim=16))
    params = [p for group in optimizer_groups(model, 0.01) for p in group["params"]]
    assert len(params) == len({id(p) for p in params}) == len({id(p) for p in model.parameters()})
    decay = {id(p) for p in optimizer_groups(model, 0.01)[0]["params"]}
    assert all(id(m.bias) not in decay for m in model.modules() if getattr(m, "bias", None) is not None)
