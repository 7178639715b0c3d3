"""Sequence classification across model families: train, save, reload, predict.

Every family is a tiny random checkpoint with its own kind of tokenizer (see `families.py`), loaded
the way a hub checkpoint would be (`model.name_or_path: <folder>`). Each test proves that:
the run learns (validation accuracy well above chance, training loss falls), `run_dir/model` is a
plain transformers model that gives the probabilities `tunesmith.predict` gives, the label names
survive, and a text's prediction does not depend on how much padding its batch adds.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tunesmith
from families import FAMILIES, FamilyCache
from tiny import sentiment_rows, tiny_config, write_csv
from tunesmith.methods.apply import base_model, layer_stacks

ROWS = 96  # 72 train / 24 validation rows
LABELS = {0: "neg", 1: "pos"}
MIN_ACCURACY = 0.8  # chance is 0.5 on balanced validation rows

# Full fine-tuning of a random tiny model: one setting fits the toy task for every family.
FULL = {"learning_rate": 3e-3, "num_train_epochs": 8}
DECODER_ONLY = ["gpt2", "llama"]  # their tokenizers have no pad token

# Adapters go on a briefly fine-tuned body without head (`FamilyCache.pretrained`): on a random
# body they have nothing to adapt. The head starts fresh, so learning still has to happen.
LORA_FAMILIES = ["gpt2", "llama", "t5", "bart", "deberta-v2", "xlnet", "distilbert"]
LORA = {"name": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
# Peft's default targets where it has them; elsewhere every linear layer of the body.
EXPECTED_TARGETS = {
    "gpt2": {"c_attn"},
    "llama": {"q_proj", "v_proj"},
    "t5": {"q", "v"},
    "bart": {"q_proj", "v_proj"},
    "deberta-v2": {"query_proj", "value_proj"},
    "xlnet": {"layer_1", "layer_2"},  # XLNet's attention projections are bare parameters, not layers
    "distilbert": {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"},
}
ENCODER_DECODER = [name for name, f in FAMILIES.items() if f.encoder_decoder]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation, and on a busy machine (xdist workers
    # sharing few cores) their spin-waits make training ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """`family_model(name)`: folder of that family's tiny checkpoint, built on first use."""
    return FamilyCache(tmp_path_factory.mktemp("families"))


@pytest.fixture
def rows():
    return sentiment_rows(ROWS, seed=3)


@pytest.fixture
def train_csv(tmp_path, rows):
    return write_csv(tmp_path / "train.csv", rows)


def _train(model_dir, train_csv, tmp_path, method=None, **train):
    train = {"logging_steps": 1, **train}  # a loss per step: the first is the untrained model's
    cfg = tiny_config(model_dir, train_csv, tmp_path / "run", method=method or {"name": "full"}, train=train)
    return tunesmith.train(cfg, show_progress=False)


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def _assert_learned(result, min_accuracy: float = MIN_ACCURACY):
    records = _log(result.run_dir)
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) >= 20, records
    final = sum(losses[-5:]) / 5  # steps are single batches: average out their noise
    # Half the larger of the first step's loss and chance level (ln 2 for two balanced classes): a
    # pretrained body can start near-solved, and then chance level is the fair reference.
    reference = max(losses[0], math.log(2))
    assert final < 0.5 * reference, f"training loss did not fall: first step {losses[0]:.3f}, last five {final:.3f}"
    accuracy = result.metrics["validation"]["accuracy"]
    evals = [round(r["accuracy"], 3) for r in records if r["type"] == "eval"]
    assert accuracy >= min_accuracy, f"validation accuracy {accuracy} (per epoch: {evals})"


def _assert_reload_matches(result, rows):
    """run_dir/model is a plain transformers model giving tunesmith.predict's probabilities."""
    texts = [r["text"] for r in rows[:12]]
    predictions = tunesmith.predict(result.run_dir, texts)

    plain = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    assert plain.config.id2label == LABELS
    assert plain.config.label2id == {v: k for k, v in LABELS.items()}
    assert tokenizer.pad_token is not None and plain.config.pad_token_id == tokenizer.pad_token_id

    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(plain(**batch).logits, -1)
    expected = torch.tensor([[p["scores"]["neg"], p["scores"]["pos"]] for p in predictions])
    assert torch.allclose(probs, expected, atol=1e-4), (probs - expected).abs().max()
    assert [p["label"] for p in predictions] == [LABELS[int(i)] for i in probs.argmax(-1)]

    # Padding is masked out: a short text scores the same alone as in a batch padded for a long one.
    short = min(texts, key=len)
    with torch.no_grad():
        alone = torch.softmax(plain(**tokenizer([short], return_tensors="pt")).logits, -1)[0]
    assert torch.allclose(alone, probs[texts.index(short)], atol=1e-4), (alone, probs[texts.index(short)])
    return plain, tokenizer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_finetune(family, family_model, train_csv, rows, tmp_path):
    source = family_model(family)
    result = _train(source, train_csv, tmp_path, **FULL)
    _assert_learned(result)
    plain, tokenizer = _assert_reload_matches(result, rows)
    if family in DECODER_ONLY:
        # No pad token in the checkpoint: tunesmith pads with eos (masked out anyway), adds no token,
        # and the saved config names the pad id the classifier uses to find each text's last token.
        assert AutoTokenizer.from_pretrained(source).pad_token is None
        assert tokenizer.pad_token == tokenizer.eos_token
        assert len(tokenizer) == plain.get_input_embeddings().num_embeddings


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_lora_auto_targets(family, family_model, train_csv, rows, tmp_path):
    result = _train(family_model.pretrained(family), train_csv, tmp_path, method=LORA, learning_rate=1e-2, num_train_epochs=8)

    adapter = result.run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == EXPECTED_TARGETS[family]
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b, sorted(weights)[:10]
    # lora_B starts at zero: non-zero values mean the adapters were in the graph and trained.
    assert all(w.abs().sum() > 0 for w in lora_b)
    _assert_learned(result)
    _assert_reload_matches(result, rows)
    # The adapter folder alone, on top of the base checkpoint, restores the merged model.
    texts = [r["text"] for r in rows[:12]]
    merged = tunesmith.predict(result.run_dir, texts)
    adapter_only = tmp_path / "adapter-only"
    shutil.copytree(result.run_dir, adapter_only)
    for path in (adapter_only / "model").iterdir():
        if path.name == "config.json" or path.suffix == ".safetensors":
            path.unlink()
    restored = tunesmith.predict(adapter_only, texts)
    for a, b in zip(merged, restored):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


@pytest.mark.parametrize("family", ENCODER_DECODER + ["gpt2"])
def test_last_n(family, family_model, train_csv, rows, tmp_path):
    """Encoder-decoders have two layer stacks: the last layer of each trains, the rest and every embedding do not."""
    source = family_model.pretrained(family)  # frozen random layers would leave little to learn from
    last_1 = {"name": "last_n", "last_n_layers": 1}
    result = _train(source, train_csv, tmp_path, method=last_1, learning_rate=1e-2, num_train_epochs=8)
    _assert_learned(result)
    plain, _ = _assert_reload_matches(result, rows)

    before = base_model(AutoModelForSequenceClassification.from_pretrained(source, num_labels=2))
    after = base_model(plain)
    stacks_before, stacks_after = layer_stacks(before), layer_stacks(after)
    assert len(stacks_after) == (2 if FAMILIES[family].encoder_decoder else 1), stacks_after

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    for old, new in zip(stacks_before, stacks_after, strict=True):
        assert all(same(o, n) for o, n in zip(old[:-1], new[:-1])), "a frozen layer changed"
        assert not same(old[-1], new[-1]), "the last layer did not train"
    embeddings = {name: module for name, module in before.named_modules() if isinstance(module, torch.nn.Embedding)}
    trained = dict(after.named_modules())
    changed = [name for name, module in embeddings.items() if name not in trained or not same(module, trained[name])]
    # An embedding inside a stack's first layer (T5's relative position bias) is frozen with that layer.
    assert embeddings and not changed, f"embeddings changed: {changed}"
