"""The seq2seq family's material for the contract suite (tests/contract/): tiny random T5, BART, Marian and
bert2bert checkpoints, each with a tokenizer of its kind trained in-process on a toy corpus, and a toy
word-by-word "translation" task they overfit in a few epochs.

Special-token conventions the builders reproduce (what the family's task must respect):
- T5: Unigram over Metaspace pieces; `<pad>`=0, `</s>`=1, `<unk>`=2; the tokenizer appends `</s>` (no bos);
  `<extra_id_N>` sentinels at the end of the vocabulary (`<extra_id_0>` last); decoder_start_token_id = pad.
- BART: byte-level BPE without prefix space (a sentence's first word is `one`, later ones `Ġone`);
  `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>`=4; `<s> $A </s>`; decoder_start_token_id = eos (`</s>`);
  generation_config.forced_bos_token_id = bos, so the first generated token is `<s>`, as in the labels.
- Marian: Unigram like T5 but `</s>`=0, `<unk>`=1 and `<pad>` the last id (as in opus-mt vocabularies);
  `</s>` appended, no bos; decoder_start_token_id = pad (so the decoder starts from the last id).
- bert2bert: a BERT encoder (whole-word vocabulary, `[CLS] $A [SEP]`); the family warm-starts an EncoderDecoderModel
  from it with decoder_start_token_id = [CLS], eos_token_id = [SEP], pad_token_id = [PAD].
"""

from __future__ import annotations

import random
from pathlib import Path

from tunesmith.tasks.contract import (
    ContractExamples,
    byte_level_bpe,
    data_section,
    fast_tokenizer,
    save_checkpoint,
    tiny_checkpoint,
    write_jsonl,
)

# The toy task: word-by-word "translation", word order kept.
LEXICON = {"one": "un", "two": "deux", "red": "rouge", "blue": "bleu", "big": "grand", "small": "petit",
           "cat": "chat", "dog": "chien", "bird": "oiseau", "sees": "voit"}
PREFIX = "translate: "
HIDDEN, HEADS, FFN, POSITIONS, LAYERS = 32, 2, 64, 64, 1
# No dropout: the toy task is to be overfitted in a few epochs. BART's and Marian's default init_std (0.02) is
# meant for 1024-wide models: 32 wide, it learns the task several times slower.
DROPOUT, BART_INIT_STD, MARIAN_INIT_STD = 0.0, 0.1, 0.3
SENTINELS = 4  # T5's <extra_id_0..3>


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(list(LEXICON)) for _ in range(rng.randint(2, 5)))


def translate(source: str) -> str:
    return " ".join(LEXICON[w] for w in source.split())


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        source = _sentence(rng)
        if source not in seen:
            seen.add(source)
            rows.append({"source": source, "target": translate(source)})
    return rows


def corpus() -> list[str]:
    """What the tokenizers are trained on: source and target sentences of the toy task, and T5's prefix."""
    sources = [r["source"] for r in _rows(200, seed=1)]
    # The prefix alone too: always followed by a word, it would be learned only as pieces spanning a word
    # boundary, which are dropped (see _unigram).
    return [*sources, *(translate(s) for s in sources), *(PREFIX + s for s in sources[:50]),
            *[PREFIX.strip()] * 20]


# --------------------------------------------------------------------------- tokenizers


def _unigram(specials: list[str], unk: str):
    """SentencePiece-style: a Unigram model over Metaspace ("▁") pieces that never cross a word boundary.
    Trained on whole sentences (the trainer seeds pieces from repeated substrings, so fed pre-split words it
    learns little but characters); pieces with an inner "▁" are dropped, as SentencePiece's
    split_by_whitespace would. Scores are rounded and ties ordered by piece, so that the vocabulary does not
    depend on how the trainer broke ties in this process."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token=unk, max_piece_length=12,
                                      show_progress=False)
    sentences = Tokenizer(models.Unigram())
    sentences.normalizer = normalizers.NFKC()
    sentences.train_from_iterator(["▁" + line.replace(" ", "▁") for line in corpus()], trainer)
    learned = [(p, round(s, 3)) for p, s in json.loads(sentences.to_str())["model"]["vocab"]
               if p not in specials and "▁" not in p[1:]]
    # The trainer appends every character it must keep with made-up, descending scores in an order of its
    # own; here they share the lowest score, in character order.
    floor = min(s for _, s in learned)
    pieces = sorted((p, floor if len(p) == 1 else s) for p, s in learned)
    vocab = [(p, 0.0) for p in specials] + sorted(pieces, key=lambda ps: -ps[1])
    tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index(unk)))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


def _eos_appended(tok, eos: str):
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                       special_tokens=[(eos, tok.token_to_id(eos))])


# --------------------------------------------------------------------------- checkpoints


def build_t5(folder: Path) -> Path:
    import torch
    from tokenizers import AddedToken
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _unigram(["<pad>", "</s>", "<unk>"], unk="<unk>")
    _eos_appended(tok, "</s>")
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(SENTINELS))]  # T5's order: <extra_id_0> is the last id
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in sentinels])
    fast = fast_tokenizer(tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                 extra_special_tokens=sentinels[::-1])
    config = T5Config(vocab_size=len(fast), d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
                      num_decoder_layers=LAYERS, dropout_rate=DROPOUT, num_heads=HEADS,
                      relative_attention_num_buckets=8,
                      pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                      decoder_start_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    return save_checkpoint(T5ForConditionalGeneration(config), fast, folder)


def build_bart(folder: Path) -> Path:
    import torch
    from tokenizers import processors
    from transformers import BartConfig, BartForConditionalGeneration

    tok = byte_level_bpe(corpus(), ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), add_prefix_space=False)
    fast = fast_tokenizer(tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                 pad_token="<pad>", mask_token="<mask>")
    config = BartConfig(vocab_size=len(fast), d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        dropout=DROPOUT, init_std=BART_INIT_STD, encoder_attention_heads=HEADS,
                        decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                        decoder_ffn_dim=FFN, max_position_embeddings=POSITIONS, pad_token_id=fast.pad_token_id,
                        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                        decoder_start_token_id=fast.eos_token_id, forced_eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config)
    # transformers 5: BartConfig no longer keeps forced_bos_token_id (passed to it, it is dropped); hub BART
    # checkpoints carry it in generation_config.json, where generate reads it: the first generated token after
    # decoder_start (</s>) is forced to <s>, as the labels (`<s> ... </s>`) have it.
    model.generation_config.forced_bos_token_id = fast.bos_token_id
    return save_checkpoint(model, fast, folder)


def build_marian(folder: Path) -> Path:
    import torch
    from tokenizers import AddedToken
    from transformers import MarianConfig, MarianMTModel

    tok = _unigram(["</s>", "<unk>"], unk="<unk>")
    _eos_appended(tok, "</s>")
    tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])  # Marian's pad is the last id
    fast = fast_tokenizer(tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    config = MarianConfig(vocab_size=len(fast), d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                          dropout=DROPOUT, init_std=MARIAN_INIT_STD, encoder_attention_heads=HEADS,
                          decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                          decoder_ffn_dim=FFN, max_position_embeddings=POSITIONS, pad_token_id=fast.pad_token_id,
                          eos_token_id=fast.eos_token_id, decoder_start_token_id=fast.pad_token_id,
                          forced_eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    return save_checkpoint(MarianMTModel(config), fast, folder)


def build_bert_encoder(folder: Path) -> Path:
    """A 2-layer BERT encoder (AutoModel, no dropout) with contract.tiny_checkpoint's whole-word tokenizer
    (`[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4; `[CLS] $A [SEP]`) over both vocabularies and the
    T5 prefix's words. Not a trained WordPiece: that trainer breaks ties differently in every process."""
    from transformers import BertConfig

    tiny_checkpoint(folder, [*LEXICON, *LEXICON.values(), *PREFIX.replace(":", " :").split()], "AutoModel")
    config = BertConfig.from_pretrained(folder)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = DROPOUT
    config.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- data


def _data(folder: Path) -> dict:
    rows = _rows(16)
    return data_section(folder, rows, rows[:8])


def _bad_data(folder: Path) -> dict:
    rows = _rows(8)
    rows[1] = {"source": rows[1]["source"]}  # no target
    rows[5] = {**rows[5], "target": ""}  # an empty target
    return {"train_file": str(write_jsonl(folder / "bad.jsonl", rows)), "validation_split": 0.25}


TASK = {"name": "seq2seq", "source_column": "source", "target_column": "target", "max_source_length": 16,
        "max_target_length": 16}
PREDICT = ["one red cat", "two big dog sees bird"]


def contract_examples() -> dict[str, ContractExamples]:
    def examples(build, task: dict | None = None, train: dict | None = None) -> ContractExamples:
        return ContractExamples(build_model=build, write_data=_data, write_bad_data=_bad_data,
                                task={**TASK, **(task or {})}, predict_inputs=list(PREDICT), train=train or {})

    return {
        "t5": examples(build_t5, task={"source_prefix": PREFIX}, train={"num_train_epochs": 40}),
        "bart": examples(build_bart, train={"num_train_epochs": 30}),
        "marian": examples(build_marian, train={"num_train_epochs": 40}),
        "bert2bert": examples(build_bert_encoder, train={"num_train_epochs": 40}),
    }

