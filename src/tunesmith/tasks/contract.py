"""What a family hands the contract suite (tests/contract/): a tiny model, data, a task section, predict
inputs and one file its preflight must refuse. Named by `Family.examples` ("module:function"), so a new
family gets the suite by registering. Shared code: no family names here."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ContractExamples:
    build_model: Callable[[Path], Path]  # writes a tiny random checkpoint (model + tokenizer) into a folder
    write_data: Callable[[Path], dict]  # writes train/validation files into a folder; returns the data section
    write_bad_data: Callable[[Path], dict]  # writes data that preflight must refuse; returns the data section
    task: dict  # the config's task section
    predict_inputs: list  # what Task.predict / tunesmith.predict take
    train: dict = field(default_factory=dict)  # train-section settings under which a few epochs overfit the data
    # Methods this model must refuse with a ConfigError before training (a decoder whose output layer is tied to
    # its embeddings has no head for `frozen` to train).
    refused_methods: tuple[str, ...] = ()


def tiny_checkpoint(folder: Path, words: Iterable[str], model_class: str = "AutoModelForMaskedLM") -> Path:
    """A 2-layer, 32-wide random BERT with a whole-word tokenizer over `words` (plus [UNK]), saved to
    `folder`: seconds to train, deterministic, no downloads."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    import transformers
    from transformers import BertConfig, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *(w.lower() for w in words)]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=vocab["[PAD]"], initializer_range=0.2)
    torch.manual_seed(0)
    model = getattr(transformers, model_class).from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def data_section(folder: Path, train: list[dict], validation: list[dict], stem: str = "") -> dict:
    """Writes train and validation rows as JSONL files into `folder`; returns the config's data section."""
    return {"train_file": str(write_jsonl(folder / f"{stem}train.jsonl", train)),
            "validation_file": str(write_jsonl(folder / f"{stem}validation.jsonl", validation))}


def byte_level_bpe(corpus: list[str], specials: list[str], vocab_size: int = 400):
    """A GPT-2/BART/RoBERTa-style byte-level BPE (`tokenizers.Tokenizer`, no prefix space) trained on `corpus`:
    every byte is in its alphabet, so any text (Chinese included) encodes without unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def fast_tokenizer(tok, **specials):
    """`tok` as a transformers tokenizer with the given special tokens (`eos_token="</s>"`)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"], **specials)


def save_checkpoint(model, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
