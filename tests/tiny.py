"""Tiny in-process models and data for fast tests: no network, no downloads, seconds to train."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

POSITIVE = ["good", "great", "wonderful", "superb", "lovely", "brilliant", "moving", "charming"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "lifeless", "tedious", "clumsy"]
FILLER = ["the", "film", "movie", "was", "plot", "acting", "a", "really", "story", "and", "very", "it", "is"]


def sentiment_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """Separable toy sentiment data: positive rows contain positive words, negative rows negative ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows


def corpus() -> list[str]:
    rows = [r["text"] for r in sentiment_rows(400, seed=1)]
    extra = [
        "a premise that is also a hypothesis", "entailment contradiction neutral",
        "café naïve résumé 电影 很 好 看", "emoji 🎬 and accents é à ü",
    ]
    templates = [" ".join(w for w in t if w not in ("PER", "LOC", "ORG")) for t in NER_TEMPLATES]
    return rows + extra + templates


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    """A deterministic WordPiece vocabulary: every corpus word whole, plus single characters (and
    their `##` continuations) for unseen words. The `tokenizers` WordPiece trainer breaks ties
    differently in every process, which made tiny-model tests differ from run to run."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for line in corpus() for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line))})
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789") | set(",.!?;:()\x27\"-"))
    # Entity words split into sub-tokens (a 3-letter word-start piece + characters), so sub-token
    # alignment is exercised; their first pieces are unique to one entity type.
    entity_starts = [w[:3] for pool in (PEOPLE, PLACES, ORGS) for words in pool for w in words]
    tokens = specials + chars + ["##" + c for c in chars] + [w for w in words if len(w) > 1] + entity_starts
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def build_tiny_bert(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece tokenizer over the toy corpus."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(vocab=wordpiece_vocab(specials), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    config = BertConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=fast.pad_token_id,
        initializer_range=0.2,  # random features varied enough for head-only training to fit
    )
    import torch

    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def tiny_config(model_dir: Path, train_file: Path, out_dir: Path, **sections) -> dict:
    """A fast run config on the tiny model; sections override/extend the defaults."""
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": str(train_file), "validation_split": 0.25},
        "task": {"name": "classification", "max_length": 32},
        "method": {"name": "full"},
        "train": {
            "learning_rate": 3e-3, "num_train_epochs": 12, "per_device_train_batch_size": 8, "seed": 0,
            "precision": "fp32", "logging_steps": 5,
        },
        "output": {"dir": str(out_dir)},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def build_pretrained_tiny_bert(random_bert: Path, folder: Path, work: Path) -> Path:
    """The tiny BERT after a short full fine-tune on toy sentiment, saved *without* its head.

    Stands in for a pretrained encoder: head-only and adapter methods need features that carry
    signal, which a randomly initialised encoder does not give.
    """
    import tunesmith
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train = write_csv(work / "pretrain.csv", sentiment_rows(128, seed=7))
    cfg = tiny_config(random_bert, train, work / "pretrain-run", train={"num_train_epochs": 8, "learning_rate": 3e-3})
    run = tunesmith.train(cfg, show_progress=False)
    trained = AutoModelForSequenceClassification.from_pretrained(run.run_dir / "model")
    trained.bert.save_pretrained(folder)
    AutoTokenizer.from_pretrained(run.run_dir / "model").save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- token classification

# Entity words whose first sub-token (the one that carries the tag) is unique to their tag in the tiny
# WordPiece vocabulary: head-only and adapter training on a small body can then fit every tag.
PEOPLE = [["chen"], ["maria", "silva"], ["elena"]]
PLACES = [["paris"], ["lagos"], ["oslo"], ["new", "york"], ["rio", "de", "janeiro"]]
ORGS = [["acme"], ["umbrella", "corp"]]
NER_TEMPLATES = [
    ["PER", "lives", "in", "LOC"],
    ["PER", "was", "hired", "by", "ORG", "in", "LOC"],
    ["the", "film", "by", "PER", "is", "about", "LOC"],
    ["ORG", "hired", "PER"],
    ["a", "story", "about", "LOC", "and", "PER"],
]


def ner_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Toy NER sentences (`tokens`, BIO `tags`) with one- to three-word PER, LOC and ORG entities."""
    rng = random.Random(seed)
    pools = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}
    rows = []
    for i in range(n):
        tokens, tags = [], []
        for slot in NER_TEMPLATES[i % len(NER_TEMPLATES)]:
            if slot in pools:
                words = rng.choice(pools[slot])
                tokens += words
                tags += [f"B-{slot}"] + [f"I-{slot}"] * (len(words) - 1)
            else:
                tokens.append(slot)
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_conll(path: Path, rows: list[dict], sep: str = "\t") -> Path:
    path.write_text("".join("".join(f"{t}{sep}{g}\n" for t, g in zip(r["tokens"], r["tags"])) + "\n" for r in rows), encoding="utf-8")
    return path


def train_contract_example(examples, root: Path, epochs: int, method: dict | None = None) -> Path:
    """A finished run of a family's contract example (its tiny checkpoint and data) in `root/run`; `method`
    (default: the run's default method)."""
    import tunesmith

    (root / "data").mkdir(parents=True)
    cfg = {"model": {"name_or_path": str(examples.build_model(root / "model"))}, "data": examples.write_data(root / "data"),
           "task": examples.task, "output_dir": str(root / "run"), **({"method": method} if method else {}),
           "train": {"learning_rate": 5e-3, "per_device_train_batch_size": 4, **examples.train, "num_train_epochs": epochs,
                     "seed": 0}}
    return Path(tunesmith.train(cfg, show_progress=False).run_dir)
