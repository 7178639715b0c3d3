"""The seq2seq family's tiny checkpoints (tasks/seq2seq/examples.py): each loads offline with plain
transformers, its tokenizer follows the architecture's special-token conventions and loses no corpus word
to <unk>, and a plain PyTorch loop over the 16 toy rows, for the epochs its ContractExamples name, makes
greedy generation reproduce at least 75% of the targets."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tunesmith.tasks.seq2seq import examples as ex

ARCHS = ["t5", "bart", "marian", "bert2bert"]
BUILDERS = {"t5": ex.build_t5, "bart": ex.build_bart, "marian": ex.build_marian, "bert2bert": ex.build_bert_encoder}
# eos the tokenizer appends, bos it prepends (None: none), the special ids the architecture's vocabularies have.
CONVENTIONS = {
    "t5": {"eos": "</s>", "bos": None, "ids": {"<pad>": 0, "</s>": 1, "<unk>": 2}},
    "bart": {"eos": "</s>", "bos": "<s>", "ids": {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}},
    "marian": {"eos": "</s>", "bos": None, "ids": {"</s>": 0, "<unk>": 1}},
    "bert2bert": {"eos": "[SEP]", "bos": "[CLS]", "ids": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq-tiny")
    return {arch: BUILDERS[arch](root / arch) for arch in ARCHS}


def load(arch: str, folder):
    """What the family does with each checkpoint: a seq2seq model straight from the folder, or for
    bert2bert a warm-started EncoderDecoderModel whose special ids are set on config *and* generation_config
    (transformers 5's generate reads only generation_config)."""
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, EncoderDecoderModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if arch != "bert2bert":
        return tokenizer, AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert type(AutoModel.from_pretrained(folder)).__name__ == "BertModel"
    torch.manual_seed(0)  # the decoder's cross-attention is new
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(str(folder), str(folder))
    ids = {"decoder_start_token_id": tokenizer.cls_token_id, "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.sep_token_id}
    for key, value in ids.items():
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    return tokenizer, model


def prefix(arch: str) -> str:
    return ex.contract_examples()[arch].task.get("source_prefix", "")


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_offline_with_the_architectures_special_tokens(arch, built):
    tokenizer, model = load(arch, built[arch])
    convention = CONVENTIONS[arch]
    for token, expected in convention["ids"].items():
        assert tokenizer.convert_tokens_to_ids(token) == expected, token
    configs = [model.config.encoder, model.config.decoder] if arch == "bert2bert" else [model.config]
    assert all(c.vocab_size == len(tokenizer) for c in configs)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)

    texts = [*ex.corpus(), *(prefix(arch) + s for s in ex.PREDICT), *(r["source"] for r in ex._rows(16))]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids, (text, tokenizer.convert_ids_to_tokens(ids))
        assert ids[-1] == tokenizer.convert_tokens_to_ids(convention["eos"])
        if convention["bos"]:
            assert ids[0] == tokenizer.convert_tokens_to_ids(convention["bos"])
        else:
            assert ids[0] not in tokenizer.all_special_ids
        if arch == "t5" or ":" not in text:  # WordPiece decodes "translate:" as "translate :"
            assert tokenizer.decode(ids, skip_special_tokens=True).strip() == " ".join(text.split())
    labels = tokenizer(text_target=[r["target"] for r in ex._rows(4)]).input_ids
    assert all(row[-1] == tokenizer.convert_tokens_to_ids(convention["eos"]) for row in labels)

    start = {"t5": tokenizer.pad_token_id, "marian": tokenizer.pad_token_id, "bart": tokenizer.eos_token_id,
             "bert2bert": tokenizer.cls_token_id}[arch]
    assert model.config.decoder_start_token_id == model.generation_config.decoder_start_token_id == start
    if arch == "t5":
        assert prefix(arch) == "translate: "
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(prefix(arch) + "one cat").input_ids)
        assert tokens == ["▁translate:", "▁one", "▁cat", "</s>"]
        sentinels = [f"<extra_id_{i}>" for i in range(ex.SENTINELS)]
        assert tokenizer.convert_tokens_to_ids(sentinels[0]) == len(tokenizer) - 1  # T5's order: <extra_id_0> last
        assert set(sentinels) <= set(tokenizer.all_special_tokens)
    if arch == "marian":
        assert tokenizer.pad_token_id == len(tokenizer) - 1 and tokenizer.bos_token is None
    if arch == "bart":
        assert tokenizer.convert_ids_to_tokens(tokenizer("one cat").input_ids) == ["<s>", "one", "Ġcat", "</s>"]
        assert model.generation_config.forced_bos_token_id == tokenizer.bos_token_id
        assert model.generation_config.forced_eos_token_id == tokenizer.eos_token_id


def test_builders_are_deterministic(tmp_path):
    """Trained in-process, the tokenizers (and seeded models) come out the same every time: the `tokenizers`
    trainers break ties by hash order, which differs between hash maps (and processes), so _unigram reorders
    its pieces (BPE's ties are already broken by pair ids)."""
    from safetensors.torch import load_file

    for arch in ARCHS:
        a, b = BUILDERS[arch](tmp_path / f"{arch}-a"), BUILDERS[arch](tmp_path / f"{arch}-b")
        assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def train_and_generate(arch: str, tokenizer, model, epochs: int, lr: float, batch_size: int = 4,
                       seed: int = 0) -> list[str]:
    """The contract suite's run in plain PyTorch: AdamW (weight decay 0.01), linear decay to 0, clipping at
    1.0, shuffled batches of 4; teacher forcing with labels padded -100 and decoder inputs from
    `prepare_decoder_input_ids_from_labels`. Returns greedy generations for the training sources."""
    rows, start = ex._rows(16), prefix(arch)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * (len(rows) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for _ in range(epochs):
        order = rng.sample(range(len(rows)), len(rows))
        for i in range(0, len(rows), batch_size):
            batch = [rows[j] for j in order[i:i + batch_size]]
            enc = tokenizer([start + r["source"] for r in batch], text_target=[r["target"] for r in batch],
                            max_length=16, truncation=True, padding=True, return_tensors="pt")
            labels = enc.pop("labels")
            labels = labels.masked_fill(labels == tokenizer.pad_token_id, -100)
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
            loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         decoder_input_ids=decoder_input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        enc = tokenizer([start + r["source"] for r in rows], padding=True, return_tensors="pt")
        generated = model.generate(**enc, max_new_tokens=16, do_sample=False, num_beams=1)
    return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_the_toy_task_in_the_epochs_its_contract_examples_name(arch, built, tmp_path):
    examples = ex.contract_examples()[arch]
    train = {"learning_rate": 5e-3, **examples.train}  # the contract suite's defaults, then the overrides
    tokenizer, model = load(arch, built[arch])
    predictions = train_and_generate(arch, tokenizer, model, train["num_train_epochs"], train["learning_rate"])
    targets = [r["target"] for r in ex._rows(16)]
    exact = sum(p == t for p, t in zip(predictions, targets)) / len(targets)
    assert exact >= 0.75, list(zip(predictions, targets))
    if arch == "bert2bert":  # the warm-started model saved and reloaded keeps its generation settings
        from transformers import AutoModelForSeq2SeqLM

        model.save_pretrained(tmp_path / "bert2bert")
        reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bert2bert")
        assert type(reloaded).__name__ == "EncoderDecoderModel"
        assert reloaded.generation_config.decoder_start_token_id == tokenizer.cls_token_id
        enc = tokenizer([ex._rows(16)[0]["source"]], return_tensors="pt")
        out = reloaded.generate(**enc, max_new_tokens=16, do_sample=False)
        assert tokenizer.decode(out[0], skip_special_tokens=True).strip() == predictions[0]


def test_contract_data_and_sections(tmp_path):
    from tunesmith.tasks.contract import ContractExamples

    examples = ex.contract_examples()
    assert list(examples) == ARCHS and all(isinstance(e, ContractExamples) for e in examples.values())
    data = examples["t5"].write_data(tmp_path)
    read = {k: [json.loads(line) for line in open(v)] for k, v in data.items()}
    assert len(read["train_file"]) == 16 and len(read["validation_file"]) == 8
    assert all(r in read["train_file"] for r in read["validation_file"])
    for row in read["train_file"]:
        words = row["source"].split()
        assert 2 <= len(words) <= 5 and row["target"] == " ".join(ex.LEXICON[w] for w in words)
    assert len({r["source"] for r in read["train_file"]}) == 16
    (tmp_path / "bad").mkdir()
    bad = examples["t5"].write_bad_data(tmp_path / "bad")
    assert bad["validation_split"] == 0.25 and set(bad) == {"train_file", "validation_split"}
    bad_rows = [json.loads(line) for line in open(bad["train_file"])]
    assert any("target" not in r for r in bad_rows) and any(r.get("target") == "" for r in bad_rows)
    for name, e in examples.items():
        assert (e.task["name"], e.task["source_column"], e.task["target_column"]) == ("seq2seq", "source", "target")
        assert e.task["max_source_length"] == e.task["max_target_length"] == 16
        assert ("source_prefix" in e.task) == (name == "t5")
        assert len(e.predict_inputs) == 2 and all(w in ex.LEXICON for s in e.predict_inputs for w in s.split())
