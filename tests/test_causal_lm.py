"""The causal-LM family: packing without cross-contamination, labels, generation settings saved with the model,
prediction and chat, defaults (LoRA above 100M parameters, frozen refused on a tied output layer)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.tasks.causal_lm import examples
from tunesmith.tasks.causal_lm.packing import IGNORE, CausalLMCollator, block_rows, pack_examples, packed_row


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return examples.build_llama3(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return examples.build_gpt2(tmp_path_factory.mktemp("gpt2"))


def _token_losses(model, batch: dict) -> torch.Tensor:
    """Each position's next-token loss (nan where unlabelled)."""
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                               reduction="none")
    return torch.where(labels[:, 1:] == IGNORE, torch.nan, losses)


@pytest.mark.parametrize("build", ["llama", "gpt2"])
def test_a_token_s_loss_is_the_same_packed_as_alone(build, request):
    folder = request.getfixturevalue(build)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    docs = [tok(text)["input_ids"] + [tok.eos_token_id] for text in ("one red cat sees two dog", "big bird", "un chat bleu voit")]
    collate = CausalLMCollator(pad_token_id=0)
    (row,) = list(block_rows(docs, block_size=sum(map(len, docs))))
    packed = _token_losses(model, collate([row]))[0]
    alone = [_token_losses(model, collate([next(block_rows([doc], 64))]))[0] for doc in docs]
    # Packed, each document's first token is not a target (the previous document's last token cannot predict it);
    # every other token's loss is what it is alone.
    expected = torch.cat([torch.cat([torch.tensor([torch.nan]), a]) for a in alone])[1:]
    assert torch.allclose(packed, expected, atol=1e-5, equal_nan=True), (packed, expected)
    starts = [sum(map(len, docs[:i])) for i in range(1, len(docs))]
    assert all(torch.isnan(packed[s - 1]) for s in starts)  # position s-1 predicts token s: not trained


def test_without_restarted_positions_documents_would_read_each_other(llama):
    # The check above can fail: the same packed row with plain positions (one long sequence) gives other losses.
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    tok = AutoTokenizer.from_pretrained(llama)
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in ("one red cat", "two big dog")]
    (row,) = list(block_rows(docs, 64))
    batch = CausalLMCollator(0)([row])
    plain = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
    assert not torch.allclose(_token_losses(model, dict(batch)), _token_losses(model, plain), equal_nan=True)


def test_blocks_cut_long_documents_and_restart_positions():
    rows = list(block_rows([[1, 2, 3, 4, 5], [6, 7], [8]], block_size=4))
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3], [0, 0, 1, 0]]
    assert [r["labels"] for r in rows] == [[IGNORE, 2, 3, 4], [IGNORE, IGNORE, 7, IGNORE]]


def test_examples_pack_best_fit_and_keep_their_labels():
    examples_ = [([1] * 5, [IGNORE] * 3 + [1, 1]), ([2] * 3, [2] * 3), ([3] * 2, [IGNORE, 3]), ([4] * 4, [4] * 4)]
    rows = pack_examples(examples_, max_length=7)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3]
    assert all(sum(len(examples_[i][0]) for i in r) <= 7 for r in rows)
    assert len(rows) == 2  # 5+2 and 4+3: best fit fills both rows
    row = packed_row([examples_[i] for i in rows[0]])
    assert row["position_ids"] == [0, 1, 2, 3, 4, 0, 1] and row["labels"] == [IGNORE, IGNORE, IGNORE, 1, 1, IGNORE, 3]


def test_the_collator_pads_packed_rows_as_their_own_sequence():
    batch = CausalLMCollator(pad_token_id=9)([{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "position_ids": [0, 1, 0]},
                                              {"input_ids": [4], "labels": [IGNORE], "position_ids": [0]}])
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    unpacked = CausalLMCollator(9)([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}])
    assert unpacked["attention_mask"].tolist() == [[1, 1], [1, 0]] and "position_ids" not in unpacked
