"""The encoder-decoder side of the family: loading (a seq2seq checkpoint, or bert2bert warm-started from an
encoder), special tokens, the generation settings saved with the model, and which modules `frozen` and the
adapters train."""

from __future__ import annotations

import logging

import torch
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    EncoderDecoderModel,
)

from transformers.utils import logging as transformers_logging

from tunesmith.generation import apply_settings
from tunesmith.errors import ConfigError

log = logging.getLogger("tunesmith")

WARM_STARTED = "encoder-decoder"  # the model_type of EncoderDecoderModel


def load_seq2seq(source: str, **kwargs) -> torch.nn.Module:
    """A seq2seq checkpoint as it is; an encoder-only checkpoint (BERT, MiniLM) warm-started as an
    `EncoderDecoderModel` whose decoder is the same checkpoint with causal masks and new cross-attention."""
    config = AutoConfig.from_pretrained(source, revision=kwargs.get("revision"),
                                        trust_remote_code=kwargs.get("trust_remote_code", False))
    if config.is_encoder_decoder:
        return AutoModelForSeq2SeqLM.from_pretrained(source, **kwargs)
    shared = {k: kwargs[k] for k in ("revision", "trust_remote_code", "dtype", "use_safetensors") if k in kwargs}
    sides = {f"{side}_{k}": v for side in ("encoder", "decoder") for k, v in shared.items()}
    log.info("model.name_or_path: %s is a %s encoder; warm-starting an encoder-decoder from it (bert2bert): the decoder's "
             "cross-attention is new and trains from scratch", source, config.model_type)
    # transformers prints a table of every new cross-attention weight as a warning; the line above says it once.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return EncoderDecoderModel.from_encoder_decoder_pretrained(source, source, **sides)
    finally:
        transformers_logging.set_verbosity(verbosity)


def set_languages(tokenizer, source_lang: str | None, target_lang: str | None) -> None:
    """mBART / M2M / NLLB tokenizers put language codes around the text from `src_lang` / `tgt_lang`."""
    if source_lang and hasattr(tokenizer, "src_lang"):
        tokenizer.src_lang = source_lang
    if target_lang and hasattr(tokenizer, "tgt_lang"):
        tokenizer.tgt_lang = target_lang


def language_token_id(tokenizer, lang: str | None) -> int | None:
    """The token id of a language code of a multilingual tokenizer (`fr_XX`, `fra_Latn`, M2M's `__fr__`); None
    for a tokenizer without language codes."""
    if not lang or not hasattr(tokenizer, "tgt_lang"):
        return None
    if hasattr(tokenizer, "get_lang_id"):
        return tokenizer.get_lang_id(lang)
    for token in (lang, f"__{lang}__"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return token_id
    raise ConfigError(f"task.target_lang: '{lang}' is not a language code of this tokenizer; expected one of its codes "
                      "(e.g. fr_XX for mBART-50, fra_Latn for NLLB, fr for M2M100)")


def set_special_tokens(model, tokenizer, target_lang: str | None) -> None:
    """Decoder start, end and padding ids where the checkpoint does not set them: a warm-started model starts
    from [CLS] and ends with [SEP] (BERT's tokenizer has no BOS/EOS); mBART starts from the target language."""
    config = model.config
    if config.model_type == WARM_STARTED:
        if config.decoder_start_token_id is None:
            config.decoder_start_token_id = _first_set(tokenizer.cls_token_id, tokenizer.bos_token_id)
        if getattr(config, "eos_token_id", None) is None:
            config.eos_token_id = _first_set(tokenizer.sep_token_id, tokenizer.eos_token_id)
        config.pad_token_id = tokenizer.pad_token_id
        config.vocab_size = config.decoder.vocab_size
        return
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.decoder_start_token_id is None:
        config.decoder_start_token_id = _first_set(language_token_id(tokenizer, target_lang), config.pad_token_id)


def _first_set(*ids):
    return next((i for i in ids if i is not None), None)


def set_generation(model, tokenizer, settings: dict, max_target_length: int, target_lang: str | None) -> None:
    """The run's generation settings on `model.generation_config` (saved as generation_config.json, which plain
    `generate()` reads; the model config's copies are ignored there). Settings left unset keep the checkpoint's
    own (BART-CNN's beams); `max_new_tokens` is always set, never transformers' 20-token default."""
    config = model.config
    fixed = {"decoder_start_token_id": config.decoder_start_token_id, "pad_token_id": config.pad_token_id}
    eos = (model.generation_config.eos_token_id if model.generation_config is not None else None)
    if eos is None:
        fixed["eos_token_id"] = getattr(config, "eos_token_id", None)
    forced = language_token_id(tokenizer, target_lang)
    if forced is not None:  # the first generated token is the target language (mBART-50, M2M, NLLB)
        fixed["forced_bos_token_id"] = config.forced_bos_token_id = forced
    apply_settings(model, settings, max_target_length, **fixed)


def generated_lengths(model, generated: torch.Tensor) -> torch.Tensor:
    """Tokens generated per example, end token included, the decoder start token not."""
    pad = getattr(model, "module", model).generation_config.pad_token_id
    body = generated[:, 1:]
    return (body != pad).sum(-1) if pad is not None else torch.full((len(body),), body.shape[1])


def decoder_modules(model) -> list[str]:
    """The decoder's module path (what `frozen` trains), and an output layer of its own if it is not the tied
    vocabulary table."""
    names = {id(module): name for name, module in model.named_modules()}
    decoder = model.get_decoder()
    found = [names[id(decoder)]]
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and id(output) in names and output.weight is not embeddings.weight \
            and not names[id(output)].startswith(found[0] + "."):
        found.append(names[id(output)])
    return found


def new_modules(model) -> list[str]:
    """The modules a warm-started encoder-decoder creates (cross-attention, BERT's LM-head transform when the
    checkpoint has none): an adapter run trains and saves them whole. Named by their leaf layers' ends from the
    new module on (`crossattention.self.query`): peft matches names by their ends, and merging fails on
    wrapped modules that are not leaves. A pretrained seq2seq checkpoint has none."""
    if model.config.model_type != WARM_STARTED:
        return []
    ends = set()
    for name, module in model.decoder.named_modules():
        parts = name.split(".")
        start = next((i for i, part in enumerate(parts) if "cross" in part), None)
        if start is None and ".predictions.transform." in f".{name}.":
            start = parts.index("predictions")
        if start is not None and not any(True for _ in module.children()) and any(True for _ in module.parameters()):
            ends.add(".".join(parts[start:]))
    return sorted(ends)


class Seq2SeqCollator(DataCollatorForSeq2Seq):
    """Pads sources and labels (with -100) and builds decoder inputs from the labels. A label sequence that
    starts with the decoder start token (BERT's [CLS] of a warm-started model) drops it: the decoder input
    already begins with it, and predicting it again teaches nothing."""

    extra_columns = ("example_index",)

    def __call__(self, features, return_tensors=None):
        start = getattr(getattr(self.model, "config", None), "decoder_start_token_id", None)
        if start is not None:
            features = [{**f, "labels": f["labels"][1:]} if "labels" in f and f["labels"][:1] == [start] else f
                        for f in features]
        return super().__call__(features, return_tensors)
