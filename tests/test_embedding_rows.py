"""Training only the embedding rows of the data's tokens gives the model that training every row gives, bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tunesmith
from tiny import sentiment_rows, tiny_config, write_csv
from tunesmith.speed.embedding_rows import SeenRowsEmbedding, decay_unseen_rows, restore_embedding, train_seen_rows_only
from tunesmith.errors import TunesmithError


class TinyModel(nn.Module):
    def __init__(self, vocab: int = 200, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8, padding_idx=0)
        self.head = nn.Linear(8, vocab if tied else 3, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def _train(model, batches, weight_decay: float):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay, fused=True)
    decay_unseen_rows(model, optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (len(batches) + 1))
    model.train()
    for ids in batches:
        model(ids).logsumexp(-1).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_same_weights_as_training_every_row(weight_decay):
    torch.manual_seed(0)
    batches = [torch.randint(0, 60, (4, 7)) for _ in range(12)]
    full, rows = TinyModel(), TinyModel()
    rows.load_state_dict(full.state_dict())
    pretrained = full.embed.weight.detach().clone()
    record = train_seen_rows_only(rows, [b.numpy() for b in batches])
    assert record == {"trained_rows": len(torch.unique(torch.cat([b.flatten() for b in batches] + [torch.tensor([0])]))),
                      "rows": 200}
    assert isinstance(rows.embed, SeenRowsEmbedding)
    assert [n for n, _ in rows.named_parameters()] == ["embed.trained", "head.weight"]
    _train(full, batches, weight_decay)
    _train(rows, batches, weight_decay)
    unseen = rows.embed.others
    # Unseen rows change by weight decay alone (or not at all), exactly as AdamW changes them.
    assert torch.equal(rows.embed.weight, full.embed.weight)
    assert torch.equal(full.embed.weight[unseen], pretrained[unseen]) == (weight_decay == 0.0)
    assert torch.equal(rows.head.weight, full.head.weight)
    probe = torch.randint(0, 200, (5, 9))  # evaluation reads any row, seen or not
    full.eval(), rows.eval()
    assert torch.equal(rows(probe), full(probe))
    restore_embedding(rows)
    assert type(rows.embed) is nn.Embedding and torch.equal(rows.embed.weight, full.embed.weight)
    assert [n for n, _ in rows.named_parameters()] == ["embed.weight", "head.weight"]


def test_weight_follows_every_update():
    torch.manual_seed(0)
    model = TinyModel()
    train_seen_rows_only(model, [torch.arange(0, 50).numpy()])
    before = model.embed.weight.clone()
    assert model.embed.weight is model.embed.weight  # cached while nothing changes
    _train(model, [torch.randint(0, 50, (2, 5))], 0.1)
    assert not torch.equal(model.embed.weight, before)
    with torch.no_grad():
        model.embed.unseen.zero_()
    assert model.embed.weight[model.embed.others].abs().sum() == 0


def test_the_unseen_rows_decay_once_per_step():
    # A step hook can run twice for one step (an optimizer class whose `step` torch wrapped twice, as
    # a test's monkeypatch does); the decay follows AdamW's step count instead.
    torch.manual_seed(0)
    model = TinyModel()
    train_seen_rows_only(model, [torch.arange(0, 50).numpy()])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    decay_unseen_rows(model, optimizer)
    model(torch.randint(0, 50, (2, 5))).sum().backward()
    before = model.embed.unseen.clone()
    optimizer.step()
    once = model.embed.unseen.clone()
    assert torch.equal(once, before * (1 - 1e-2 * 0.5))
    for hook in optimizer._optimizer_step_post_hooks.values():
        hook(optimizer, (), {})
    assert torch.equal(model.embed.unseen, once)


def test_a_training_batch_with_an_unseen_token_raises():
    model = TinyModel()
    train_seen_rows_only(model, [torch.arange(0, 50).numpy()])
    model.train()
    with pytest.raises(TunesmithError, match=r"not in the training data \(\[77\]\).*skip_unseen_embedding_rows=false"):
        model(torch.tensor([[3, 77]]))
    model.eval()
    assert model(torch.tensor([[3, 77]])).shape == (1, 3)


def test_left_alone_where_it_would_not_be_exact():
    tied = TinyModel(tied=True)
    assert train_seen_rows_only(tied, [torch.arange(10).numpy()]) is None  # the output layer trains every row
    frozen = TinyModel()
    frozen.embed.weight.requires_grad_(False)
    assert train_seen_rows_only(frozen, [torch.arange(10).numpy()]) is None
    nearly_all = TinyModel()
    assert train_seen_rows_only(nearly_all, [torch.arange(190).numpy()]) is None  # < 10% unseen: nothing to gain
    assert type(tied.embed) is type(frozen.embed) is type(nearly_all.embed) is nn.Embedding


def test_a_run_is_bit_identical_and_saves_a_plain_model(tiny_bert, tmp_path):
    write_csv(tmp_path / "train.csv", sentiment_rows(48))
    test = write_csv(tmp_path / "test.csv", sentiment_rows(12, seed=3))

    def run(name, skip):
        cfg = tiny_config(tiny_bert, tmp_path / "train.csv", tmp_path / name, data={"test_file": str(test)},
                          train={"num_train_epochs": 3, "weight_decay": 0.1, "skip_unseen_embedding_rows": skip})
        result = tunesmith.train(cfg, show_progress=False)
        return result, json.loads((result.run_dir / "provenance.json").read_text())["speed"]["skip_unseen_embedding_rows"]

    (on, record), (off, no_record) = run("on", True), run("off", False)
    vocab = len(AutoTokenizer.from_pretrained(tiny_bert))
    assert no_record is False and record["rows"] == vocab and 0 < record["trained_rows"] < 0.5 * vocab
    a, b = load_file(str(on.model_dir / "model.safetensors")), load_file(str(off.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert on.metrics["test"] == off.metrics["test"] and on.best_step == off.best_step
    name = "bert.embeddings.word_embeddings.weight"
    start = AutoModelForSequenceClassification.from_pretrained(tiny_bert).bert.embeddings.word_embeddings.weight
    assert not torch.equal(a[name], start)  # unseen rows decayed, seen rows trained
    plain = AutoModelForSequenceClassification.from_pretrained(on.model_dir)
    assert type(plain.bert.embeddings.word_embeddings) is nn.Embedding


def test_checkpoints_keep_the_unseen_rows(tiny_bert, tmp_path):
    from tunesmith import distributed

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    train_seen_rows_only(model, [torch.arange(5, 40).numpy()])
    state = distributed.gather_state(model)
    key = "bert.embeddings.word_embeddings.unseen_rows"
    assert key in state and "bert.embeddings.word_embeddings.trained" in state
    assert "bert.embeddings.word_embeddings.weight" not in state
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.unseen.mul_(0.5)
    distributed.load_trainable_state(model, state)
    assert torch.equal(model.bert.embeddings.word_embeddings.unseen, state[key])
