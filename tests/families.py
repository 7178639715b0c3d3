"""Tiny, randomly initialised checkpoints of ten model families, built in-process (no downloads).

Each builder trains a small tokenizer of the family's kind on the toy corpus of `tiny.py`
(WordPiece, byte-level BPE, or SentencePiece-style Unigram), wraps it in
`PreTrainedTokenizerFast` with the family's special tokens, padding side and model inputs, builds
a 2-layer, 32-wide config with that vocabulary and saves the *pretraining* model class (what hub
checkpoints ship: ...ForMaskedLM, ...ForCausalLM, ...ForConditionalGeneration) with the tokenizer
to a folder. Loading it as `AutoModelForSequenceClassification` then goes through the same path as
a real checkpoint: base weights mapped by prefix, a fresh task head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tiny import corpus

HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS = 32, 2, 2, 64, 128
VOCAB = 400

# --------------------------------------------------------------------------- tokenizers

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"


def _frozen_tokenizer(build: Callable) -> Callable:
    """The `tokenizers` trainers break ties differently in every process (random hash seeds), so a
    tokenizer trained here is saved once under tests/fixtures/tokenizers/ and loaded from there:
    every run then sees the same vocabulary. Delete the file to retrain it."""
    import functools

    @functools.wraps(build)
    def load_or_build(*args, **kwargs):
        from tokenizers import Tokenizer

        key = "-".join([build.__name__.strip("_"), *map(str, args), *(f"{k}={v}" for k, v in sorted(kwargs.items()))])
        import hashlib

        path = FIXTURES / f"{build.__name__.strip('_')}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.json"
        result = build(*args, **kwargs)
        tok, extra = (result, None) if not isinstance(result, tuple) else result
        if path.exists():
            tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
        else:
            FIXTURES.mkdir(parents=True, exist_ok=True)
            path.write_text(tok.to_str(), encoding="utf-8")
        return tok if extra is None else (tok, extra)

    return load_or_build



@_frozen_tokenizer
def _wordpiece(lowercase: bool = True):
    """BERT-style: [CLS] a [SEP] (b [SEP]) with segment ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    tok.decoder = decoders.WordPiece()
    return tok, {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}


@_frozen_tokenizer
def _byte_level_bpe(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def _roberta_bpe():
    """RoBERTa/BART-style: byte-level BPE, <s> a </s> (</s></s> b </s>)."""
    from tokenizers import processors

    tok = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
                "pad_token": "<pad>", "mask_token": "<mask>"}
    return tok, specials


@_frozen_tokenizer
def _unigram(specials: list[str], unk: str):
    """SentencePiece-style: Unigram model over Metaspace ("▁") pieces that never cross a word boundary."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # The Unigram trainer seeds its pieces from substrings repeated across its input "words"; fed
    # pre-split words of a tiny corpus it sees each word once and learns almost only characters.
    # Fed whole sentences ("▁the▁film▁was...") it learns words; pieces spanning a "▁" inside are
    # then dropped, as SentencePiece's split_by_whitespace would.
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB, special_tokens=specials, unk_token=unk, max_piece_length=12, show_progress=False
    )
    sentences = Tokenizer(models.Unigram())
    sentences.normalizer = normalizers.NFKC()
    sentences.train_from_iterator(["▁" + line.replace(" ", "▁") for line in corpus()], trainer)
    vocab = [(piece, score) for piece, score in json.loads(sentences.to_str())["model"]["vocab"] if "▁" not in piece[1:]]
    tok = Tokenizer(models.Unigram(vocab, unk_id=[p for p, _ in vocab].index(unk)))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


def _template(tok, single: str, pair: str, tokens: list[str]):
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in tokens]
    )


def _fast(tok, specials: dict, inputs: list[str], **kwargs):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=inputs, **specials, **kwargs)


# Tokenizers of models with segment ids emit token_type_ids; the others do not (their models take none).
SEGMENTS = ["input_ids", "token_type_ids", "attention_mask"]
NO_SEGMENTS = ["input_ids", "attention_mask"]

# --------------------------------------------------------------------------- families


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    tok, specials = _wordpiece()
    fast = _fast(tok, specials, SEGMENTS)
    config = BertConfig(
        vocab_size=len(fast), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, pad_token_id=fast.pad_token_id,
    )
    return BertForMaskedLM(config), fast


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    tok, specials = _wordpiece()
    fast = _fast(tok, specials, NO_SEGMENTS)
    config = DistilBertConfig(
        vocab_size=len(fast), dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE,
        max_position_embeddings=POSITIONS, pad_token_id=fast.pad_token_id,
    )
    return DistilBertForMaskedLM(config), fast


def _electra():
    from transformers import ElectraConfig, ElectraForPreTraining

    tok, specials = _wordpiece()
    fast = _fast(tok, specials, SEGMENTS)
    config = ElectraConfig(
        vocab_size=len(fast), embedding_size=HIDDEN, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, pad_token_id=fast.pad_token_id,
    )
    return ElectraForPreTraining(config), fast


def _roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM

    tok, specials = _roberta_bpe()
    fast = _fast(tok, specials, NO_SEGMENTS)
    config = RobertaConfig(
        vocab_size=len(fast), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS + 2, type_vocab_size=1,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )
    return RobertaForMaskedLM(config), fast


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    tok, specials = _roberta_bpe()
    fast = _fast(tok, specials, NO_SEGMENTS)
    config = BartConfig(
        vocab_size=len(fast), d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INTERMEDIATE,
        decoder_ffn_dim=INTERMEDIATE, max_position_embeddings=POSITIONS, pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, decoder_start_token_id=fast.eos_token_id,
        forced_eos_token_id=fast.eos_token_id,
    )
    return BartForConditionalGeneration(config), fast


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _byte_level_bpe(["<|endoftext|>"])
    # Like the real GPT-2 tokenizer: no pad token, nothing added around the text.
    fast = _fast(tok, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, NO_SEGMENTS)
    config = GPT2Config(
        vocab_size=len(fast), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=POSITIONS,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )
    return GPT2LMHeadModel(config), fast


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_level_bpe(["<unk>", "<s>", "</s>"])
    _template(tok, "<s> $A", "<s> $A <s> $B:1", ["<s>"])
    # Like Llama's tokenizer: bos prepended, no pad token (tunesmith must supply one).
    fast = _fast(tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, NO_SEGMENTS)
    assert fast.pad_token is None
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=POSITIONS,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=None,
    )
    return LlamaForCausalLM(config), fast


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _unigram(["<pad>", "</s>", "<unk>"], unk="<unk>")
    _template(tok, "$A </s>", "$A </s> $B </s>", ["</s>"])
    fast = _fast(tok, {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}, NO_SEGMENTS)
    config = T5Config(
        vocab_size=len(fast), d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTERMEDIATE, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
        pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, decoder_start_token_id=fast.pad_token_id,
    )
    return T5ForConditionalGeneration(config), fast


def _xlnet():
    from transformers import XLNetConfig, XLNetLMHeadModel

    tok = _unigram(["<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>"], unk="<unk>")
    # XLNet summarises the *last* token (<cls>), so its tokenizer appends <sep> <cls> and pads on the left.
    _template(tok, "$A:0 <sep>:0 <cls>:2", "$A:0 <sep>:0 $B:1 <sep>:1 <cls>:2", ["<sep>", "<cls>"])
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "<sep>", "pad_token": "<pad>",
                "cls_token": "<cls>", "mask_token": "<mask>"}
    fast = _fast(tok, specials, SEGMENTS, padding_side="left")
    config = XLNetConfig(
        vocab_size=len(fast), d_model=HIDDEN, n_layer=LAYERS, n_head=HEADS, d_inner=INTERMEDIATE,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )
    return XLNetLMHeadModel(config), fast


def _deberta_v2():
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    tok = _unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], unk="[UNK]")
    _template(tok, "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ["[CLS]", "[SEP]"])
    fast = _fast(tok, {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
                       "mask_token": "[MASK]", "bos_token": "[CLS]", "eos_token": "[SEP]"}, SEGMENTS)
    # DeBERTa-v3 settings: relative attention (c2p + p2c) with log buckets, no absolute positions.
    config = DebertaV2Config(
        vocab_size=len(fast), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, type_vocab_size=0,
        relative_attention=True, position_buckets=16, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, pad_token_id=fast.pad_token_id,
    )
    return DebertaV2ForMaskedLM(config), fast


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable
    encoder_decoder: bool = False


FAMILIES = {
    f.name: f
    for f in [
        Family("bert", _bert),
        Family("roberta", _roberta),
        Family("distilbert", _distilbert),
        Family("xlnet", _xlnet),
        Family("electra", _electra),
        Family("deberta-v2", _deberta_v2),
        Family("gpt2", _gpt2),
        Family("llama", _llama),
        Family("bart", _bart, encoder_decoder=True),
        Family("t5", _t5, encoder_decoder=True),
    ]
}


def build_family(name: str, folder: Path) -> Path:
    """Save a tiny random checkpoint of family `name` (model + tokenizer) into `folder`."""
    import torch

    torch.manual_seed(0)
    model, tokenizer = FAMILIES[name].build()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_pretrained_family(name: str, random_dir: Path, folder: Path, work: Path) -> Path:
    """Family `name` after a short full fine-tune on toy sentiment, saved *without* its task head.

    Stands in for a pretrained checkpoint (as `tiny.build_pretrained_tiny_bert` does for BERT):
    adapters on a random body have no features worth adapting, so whether they learn is chance.
    """
    import tunesmith
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tiny import sentiment_rows, tiny_config, write_csv
    from tunesmith.methods.apply import base_model

    work.mkdir(parents=True, exist_ok=True)
    train = write_csv(work / "pretrain.csv", sentiment_rows(128, seed=7))
    cfg = tiny_config(random_dir, train, work / "run", train={"num_train_epochs": 6, "learning_rate": 3e-3})
    run = tunesmith.train(cfg, show_progress=False)
    trained = AutoModelForSequenceClassification.from_pretrained(run.run_dir / "model")
    base_model(trained).save_pretrained(folder)
    AutoTokenizer.from_pretrained(run.run_dir / "model").save_pretrained(folder)
    return folder


class FamilyCache:
    """Builds each family's checkpoint on first use, once per test session (per xdist worker).

    `cache(name)`: the random checkpoint; `cache.pretrained(name)`: the same after a short
    sentiment fine-tune, without task head.
    """

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        if name not in self._built:
            self._built[name] = build_family(name, self.root / name)
        return self._built[name]

    def pretrained(self, name: str) -> Path:
        key = name + "-pretrained"
        if key not in self._built:
            self._built[key] = build_pretrained_family(name, self(name), self.root / key, self.root / (key + "-work"))
        return self._built[key]
