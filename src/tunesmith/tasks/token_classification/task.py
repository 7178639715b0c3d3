"""Token classification: named entities, part-of-speech tags, chunks.

Data comes as CoNLL files (one token per line, tag in a column, blank line between sentences), as
records with token and tag lists, or as records with raw text and character-offset entities (split
into tokens and BIO tags here). Tag schemes BIO, BIOES and IO are detected and can be converted.

Words are split into sub-tokens: the first sub-token of a word carries the word's tag, the rest are
ignored (-100), or carry it too with `label_all_subtokens` (stored as tag id + number of tags, so
metrics still count each word once). Sentences longer than `max_length` are cut into windows at word
boundaries, never truncated, and their predictions joined back. Predictions on raw text are entity
spans with character offsets, merged from sub-tokens the way `transformers.pipeline` does.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import DataCollatorForTokenClassification

from tunesmith.data.inputs import InputColumns
from tunesmith.tasks.token_classification.config import TokenClassificationTaskConfig
from tunesmith.data.loaders import CONLL_SUFFIXES, Table, read_conll, read_file
from tunesmith.data.tokenize import cached_map
from tunesmith.errors import ConfigError, DataError, shown, summarise as _summarise
from tunesmith.tasks.token_classification.metrics import TagAccumulator, entity_metrics
from tunesmith.tasks.base import CardSection, Losses, Task, TaskState
from tunesmith.export.layouts import OneForward
from tunesmith.tasks.token_classification.request import TokensRequest

IGNORE = -100
TAG = re.compile(r"^([BIES])-(.+)$")
# Words of raw text: letters/digits with their combining accents, or any other single visible character.
WORD = re.compile(r"[\w\u0300-\u036f]+|\S")
AGGREGATIONS = ("first", "average", "max")
PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]
    where: Callable[[int], str]  # where token j is, as the user finds it in the file


# --------------------------------------------------------------------------- tag schemes


def _parts(tag: str) -> tuple[str | None, str | None]:
    match = TAG.match(tag)
    return (match[1], match[2]) if match else (None, None)


def detect_scheme(tags: Iterable[str]) -> str:
    """BIOES if any E-/S- tag, BIO if any B- tag, IO if only I- tags; `none` when tags have no prefixes (POS)."""
    prefixes = set()
    for tag in set(tags):
        if tag == "O":
            continue
        prefix, _ = _parts(tag)
        if prefix is None:
            return "none"
        prefixes.add(prefix)
    if prefixes & {"E", "S"}:
        return "BIOES"
    return "IO" if prefixes == {"I"} else "BIO"


def orphan_positions(tags: list[str], scheme: str) -> list[int]:
    """Positions of I-X (or E-X) tags that continue no X entity."""
    if scheme not in ("BIO", "BIOES"):
        return []
    found, open_type = [], None
    for j, tag in enumerate(tags):
        prefix, kind = _parts(tag)
        if prefix in ("I", "E") and open_type != kind:
            found.append(j)
        open_type = kind if prefix in ("B", "I") else None
    return found


def tag_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities (type, first token, end token exclusive) of any scheme, read leniently: an I-X that
    continues nothing starts an entity."""
    spans: list[tuple[str, int, int]] = []
    kind_open, start = None, 0
    for j, tag in enumerate([*tags, "O"]):
        prefix, kind = _parts(tag)
        if kind_open is not None and (prefix is None or prefix in ("B", "S") or kind != kind_open):
            spans.append((kind_open, start, j))
            kind_open = None
        if prefix is not None and kind_open is None:
            kind_open, start = kind, j
        if prefix in ("E", "S") and kind_open is not None:
            spans.append((kind_open, start, j + 1))
            kind_open = None
    return spans


def tags_from_spans(length: int, spans: list[tuple[str, int, int]], scheme: str) -> list[str]:
    tags = ["O"] * length
    for kind, start, end in spans:
        for j in range(start, end):
            if scheme == "IO":
                prefix = "I"
            elif scheme == "BIO":
                prefix = "B" if j == start else "I"
            else:
                prefix = ("S" if end - start == 1 else "B") if j == start else ("E" if j == end - 1 else "I")
            tags[j] = f"{prefix}-{kind}"
    return tags


def convert_tags(tags: list[str], scheme: str) -> list[str]:
    """The same entities written in `scheme` (BIO, BIOES or IO); also repairs orphan I- tags."""
    return tags_from_spans(len(tags), tag_spans(tags), scheme)


def sort_tags(tags: Iterable[str]) -> list[str]:
    """O first, then by entity type and B, I, E, S; tags without prefixes alphabetically."""

    def key(tag: str):
        prefix, kind = _parts(tag)
        if tag == "O":
            return (0, "", 0)
        return (1, kind, PREFIX_ORDER[prefix]) if prefix else (2, tag, 0)

    return sorted(set(tags), key=key)


# --------------------------------------------------------------------------- raw text <-> tokens


def words_with_offsets(text: str, cuts: Iterable[int] = ()) -> list[tuple[str, int, int]]:
    """Words of raw text with character offsets; a word never crosses a position in `cuts`."""
    bounds = sorted({0, len(text), *cuts})
    return [
        (m.group(), m.start(), m.end())
        for a, b in zip(bounds, bounds[1:])
        for m in WORD.finditer(text, a, b)
    ]


def _is_listlike(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


# --------------------------------------------------------------------------- sub-token windows


def word_windows(tokenizer, sentences: list[list[str]], max_length: int) -> list[list[tuple[int, int]]]:
    """Per sentence, word ranges [start, end) whose sub-tokens (plus special tokens) fit `max_length`."""
    budget = max(1, max_length - tokenizer.num_special_tokens_to_add(pair=False))
    if not sentences:
        return []
    encoded = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)
    windows = []
    for i, words in enumerate(sentences):
        ids = encoded.word_ids(i)
        if len(ids) <= budget:
            windows.append([(0, len(words))])
            continue
        counts = Counter(w for w in ids if w is not None)
        ranges, start, used = [], 0, 0
        for j in range(len(words)):
            if used + counts.get(j, 0) > budget and j > start:
                ranges.append((start, j))
                start, used = j, 0
            used += counts.get(j, 0)
        ranges.append((start, len(words)))
        windows.append(ranges)
    return windows


def _probabilities(model, tokenizer, features: list[dict], batch_size: int) -> list[np.ndarray]:
    """Softmax scores of every (unpadded) position of every feature, batched in length order."""
    device = next(model.parameters()).device
    names = [n for n in tokenizer.model_input_names if n in (features[0] if features else {})]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    out: list[np.ndarray] = [np.zeros((0,))] * len(features)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad([{n: features[i][n] for n in names} for i in idx], return_tensors="pt").to(device)
        probs = torch.softmax(model(**batch).logits.float(), -1).cpu().numpy()
        mask = batch["attention_mask"].cpu().numpy().astype(bool)
        for row, i in enumerate(idx):
            out[i] = probs[row][mask[row]]
    return out


def _aggregate(rows: list[np.ndarray], aggregation: str) -> tuple[int, float]:
    """A word's tag id and score from its sub-tokens' scores, as the transformers pipeline does."""
    if aggregation == "first":
        scores = rows[0]
    elif aggregation == "max":
        scores = max(rows, key=lambda r: r.max())
    else:
        scores = np.nanmean(np.stack(rows), axis=0)
    best = int(scores.argmax())
    return best, float(scores[best])


def _group_key(tag: str) -> tuple[str, str]:
    """(B or I, entity type) like the pipeline's grouping; S- starts and E- continues (BIOES)."""
    prefix, kind = _parts(tag)
    if prefix is None:
        return "I", tag
    return ("B" if prefix in ("B", "S") else "I"), kind


def group_entities(text: str, words: list[dict]) -> list[dict]:
    """Adjacent words of one type form an entity; a B- (or S-) word starts a new one; O words are dropped."""
    groups: list[list[dict]] = []
    for word in words:
        if groups:
            bi, kind = _group_key(word["tag"])
            last = groups[-1][-1]["tag"]
            _, last_kind = _group_key(last)
            if kind == last_kind and bi != "B" and not last.startswith(("E-", "S-")):
                groups[-1].append(word)
                continue
        groups.append([word])
    entities = []
    for group in groups:
        kind = group[0]["tag"].split("-", 1)[-1]
        if kind == "O":
            continue
        start, end = group[0]["start"], group[-1]["end"]
        score = float(np.nanmean([w["score"] for w in group]))
        entities.append({"label": kind, "start": start, "end": end, "text": text[start:end], "score": score})
    return entities


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class TokenClassificationState(TaskState):
    labels: list[str]  # tags in the model's output order
    source_scheme: str  # the data's tag scheme (BIO, BIOES, IO, none)
    scheme: str  # the scheme trained and predicted (after task.convert_scheme)
    aggregation: str  # how a word's sub-token scores combine at prediction (first, average, max)
    strict: bool = False  # seqeval strict mode


class TokenClassificationTask(Task):
    request_model = TokensRequest
    onnx_layout = OneForward(("logits",))
    name = "token_classification"
    auto_model_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    state_type = TokenClassificationState
    pipeline_tag = "token-classification"

    # ------------------------------------------------------------------ reading

    def reader(self, cfg: TokenClassificationTaskConfig):
        def read(path, encoding: str = "utf-8", field: str = "data.train_file") -> Table:
            conll = cfg.format == "conll" or (cfg.format == "auto" and Path(path).suffix.lower() in CONLL_SUFFIXES)
            return read_conll(path, encoding, field) if conll else read_file(path, encoding, field)

        return read

    def tokenizer_kwargs(self, cfg) -> dict:
        return {"add_prefix_space": True}

    def collator(self, tokenizer, model=None):
        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)

    def stratify_key(self, cfg):
        return lambda frame: None

    def _format(self, cfg: TokenClassificationTaskConfig, table: Table) -> str:
        columns = set(map(str, table.frame.columns))
        if "fields" in columns and "lines" in columns:
            return "conll"
        wanted = {"tokens": {cfg.tokens_column, cfg.tags_column}, "spans": {cfg.text_column, cfg.entities_column}}
        if cfg.format in wanted and not wanted[cfg.format] <= columns:
            missing = sorted(wanted[cfg.format] - columns)
            raise DataError(
                f"{table.source}: missing column(s) {', '.join(missing)} for task.format={cfg.format}; columns found: "
                f"{', '.join(sorted(columns))}; rename the columns or set task.{'tokens_column/tags_column' if cfg.format == 'tokens' else 'text_column/entities_column'}"
            )
        for fmt in ("tokens", "spans"):
            if cfg.format in (fmt, "auto") and wanted[fmt] <= columns:
                return fmt
        raise DataError(
            f"{table.source}: expected columns '{cfg.tokens_column}' + '{cfg.tags_column}' (token and tag lists) or "
            f"'{cfg.text_column}' + '{cfg.entities_column}' (text with character-offset entities), found: "
            f"{', '.join(sorted(columns)) or '(none)'}; rename the columns, set task.tokens_column/task.tags_column, "
            "or give a CoNLL file (.conll, token<TAB>tag per line)"
        )

    def sentences(self, cfg: TokenClassificationTaskConfig, table: Table) -> tuple[list[Sentence], list[str]]:
        """The table's sentences as tokens and tags, and every problem found reading them."""
        fmt = self._format(cfg, table)
        if fmt == "conll":
            return _conll_sentences(cfg, table)
        if fmt == "tokens":
            return _token_sentences(cfg, table)
        return _span_sentences(cfg, table)

    # ------------------------------------------------------------------ preflight

    def _prepare(self, cfg: TokenClassificationTaskConfig, sentences: list[Sentence], source_scheme: str) -> list[Sentence]:
        """Repair orphan I- tags and convert the scheme, as configured."""
        target = source_scheme if cfg.convert_scheme == "keep" else cfg.convert_scheme
        if source_scheme == "none" or (target == source_scheme and not cfg.repair):
            return sentences
        return [Sentence(s.tokens, convert_tags(s.tags, target), s.where) for s in sentences]

    def _tag_errors(self, cfg, sentences: list[Sentence], scheme: str, known: list[str] | None) -> list[str]:
        errors = []
        for s in sentences:
            if not cfg.repair:
                for j in orphan_positions(s.tags, scheme):
                    prefix, kind = _parts(s.tags[j])
                    previous = f"'{shown(s.tags[j - 1])}'" if j else "the sentence start"
                    errors.append(
                        f"{s.where(j)}: tag '{shown(s.tags[j])}' follows {previous}; expected B-{kind} (or {prefix}-{kind} after "
                        f"B-{kind}/I-{kind}) in scheme {scheme}; change it to B-{kind}, or set task.repair=true to do that for every such tag"
                    )
            if known is not None:
                allowed = set(known)
                for j, tag in enumerate(s.tags):
                    if tag not in allowed:
                        listed = ", ".join(map(shown, known[:20])) + (" ..." if len(known) > 20 else "")
                        errors.append(
                            f"{s.where(j)}: tag '{shown(tag)}' does not occur in train (train tags: {listed}); "
                            "fix the tag, add train sentences with it, or remove the sentence"
                        )
        return errors

    def preflight(self, cfg: TokenClassificationTaskConfig, tables: dict[str, Table]) -> tuple[dict, list[str]]:
        parsed, errors = {}, []
        for split, table in tables.items():
            parsed[split], problems = self.sentences(cfg, table)
            errors += problems
        if errors:
            raise DataError(_summarise(errors))
        all_tags = [t for sents in parsed.values() for s in sents for t in s.tags]
        scheme = cfg.scheme if cfg.scheme != "auto" else detect_scheme(all_tags)
        if scheme == "none" and cfg.convert_scheme != "keep":
            raise DataError(
                f"task.convert_scheme={cfg.convert_scheme}: the tags have no B-/I-/E-/S- prefixes (e.g. "
                f"'{shown(next(t for t in all_tags if t != 'O'))}'), so there are no entities to convert; set task.convert_scheme=keep"
            )
        errors = self._tag_errors(cfg, parsed["train"], scheme, None)
        prepared = {split: self._prepare(cfg, sents, scheme) for split, sents in parsed.items()}
        labels = sort_tags(t for s in prepared["train"] for t in s.tags)
        for split in ("validation", "test"):
            if split in prepared:
                errors += self._tag_errors(cfg, parsed[split], scheme, None)
                errors += self._tag_errors(cfg.model_copy(update={"repair": True}), prepared[split], scheme, labels)
        if len(labels) < 2 and not errors:
            errors.append(
                f"{tables['train'].source}: every train tag is '{shown(labels[0]) if labels else '(none)'}'; expected at least two "
                "different tags to learn; check task.conll_tag_column or the tags"
            )
        if errors:
            raise DataError(_summarise(errors))
        final = scheme if cfg.convert_scheme == "keep" else cfg.convert_scheme
        state = TokenClassificationState(labels=labels, source_scheme=scheme, scheme=final, aggregation=cfg.aggregation,
                                         strict=cfg.strict)
        warnings = []
        if cfg.strict and final not in ("BIO", "BIOES"):
            warnings.append(f"task.strict needs BIO or BIOES tags, found {final}; entity metrics use the default (lenient) mode")
        return state, warnings

    def preflight_eval(self, cfg: TokenClassificationTaskConfig, state: dict, table: Table) -> None:
        sentences, errors = self.sentences(cfg, table)
        if not errors:
            errors = self._tag_errors(cfg, sentences, state.source_scheme, None)
            prepared = self._prepare(cfg, sentences, state.source_scheme)
            errors += self._tag_errors(cfg.model_copy(update={"repair": True}), prepared, state.scheme, state.labels)
        if errors:
            raise DataError(_summarise(errors))

    def tokenizer_warnings(self, cfg: TokenClassificationTaskConfig, tables: dict[str, Table], tokenizer) -> list[str]:
        sentences, _ = self.sentences(cfg, tables["train"])
        if not sentences:
            return []
        encoded = tokenizer([s.tokens for s in sentences], is_split_into_words=True, add_special_tokens=True)["input_ids"]
        lengths = np.array([len(ids) for ids in encoded])
        over = int((lengths > cfg.max_length).sum())
        if not over:
            return []
        return [
            f"{over} of {len(lengths)} train sentences ({over / len(lengths):.1%}) are longer than task.max_length={cfg.max_length} "
            f"tokens (longest: {lengths.max()}); they are split into windows at word boundaries — raise task.max_length to keep more context"
        ]

    # ------------------------------------------------------------------ encoding

    def encode(self, cfg: TokenClassificationTaskConfig, table: Table, tokenizer, state: dict) -> datasets.Dataset:
        sentences, errors = self.sentences(cfg, table)
        if errors:
            raise DataError(_summarise(errors))
        sentences = self._prepare(cfg, sentences, state.source_scheme)
        index = {tag: i for i, tag in enumerate(state.labels)}
        words, tags = [], []
        for s, ranges in zip(sentences, word_windows(tokenizer, [s.tokens for s in sentences], cfg.max_length)):
            for a, b in ranges:
                words.append(s.tokens[a:b])
                tags.append([index[t] for t in s.tags[a:b]])
        raw = datasets.Dataset.from_dict({"words": words, "tags": tags})
        offset = len(state.labels) if cfg.label_all_subtokens else None

        def tokenize(batch):
            encoded = tokenizer(batch["words"], is_split_into_words=True, truncation=True, max_length=cfg.max_length)
            labels = []
            for i, row_tags in enumerate(batch["tags"]):
                row, previous = [], None
                for w in encoded.word_ids(i):
                    if w is None:
                        row.append(IGNORE)
                    elif w != previous:
                        row.append(row_tags[w])
                    else:
                        row.append(IGNORE if offset is None else row_tags[w] + offset)
                    previous = w
                labels.append(row)
            encoded["labels"] = labels
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            return encoded

        key = f"tok-{cfg.max_length}-{cfg.label_all_subtokens}"
        return cached_map(raw, tokenize, tokenizer, key_extra=key, remove_columns=["words", "tags"])

    # ------------------------------------------------------------------ model, loss, metrics

    def model_kwargs(self, state: dict) -> dict:
        labels = state.labels
        return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}

    def supports_label_smoothing(self, state) -> bool:
        return True

    def loss_fn(self, cfg, state: dict, train, label_smoothing: float = 0.0) -> Callable:
        k = len(state.labels)

        def loss(logits: torch.Tensor, labels: torch.Tensor) -> Losses:
            """Per window: the cross-entropy summed over its labelled tokens, and how many there are."""
            labels = torch.where(labels >= k, labels - k, labels)  # later sub-tokens (label_all_subtokens)
            return Losses.per_token(logits, labels, label_smoothing, IGNORE)

        return loss

    def new_accumulator(self, state: dict, references=None) -> TagAccumulator:
        return TagAccumulator(state.labels)

    def scores(self, logits: torch.Tensor, state: dict) -> torch.Tensor:
        return logits.argmax(-1)

    def compute_metrics(self, accumulator: TagAccumulator, state: dict) -> dict:
        out: dict = {"loss": accumulator.loss, "samples": accumulator.count, "accuracy": accumulator.accuracy, "tokens": accumulator.tokens}
        if state.scheme != "none":
            out.update(entity_metrics(accumulator.true, accumulator.pred, state.scheme, bool(state.strict)))
        return out

    def default_metric(self, state: dict) -> tuple[str, bool]:
        return ("accuracy", True) if state.scheme == "none" else ("f1", True)

    def summary_metrics(self, state: TokenClassificationState) -> tuple[str, ...]:
        return ("accuracy",) if state.scheme == "none" else ("precision", "recall", "f1")

    def input_columns(self, cfg: TokenClassificationTaskConfig) -> InputColumns:
        return InputColumns(cfg.text_column, tokens=cfg.tokens_column)  # texts give entity spans, token lists tags

    def card(self, state: TokenClassificationState) -> CardSection:
        return dataclasses.replace(super().card(state), kind=state.scheme, labels=state.labels)

    # ------------------------------------------------------------------ prediction

    @torch.inference_mode()
    def predict(
        self, model, tokenizer, inputs: list, state: dict, batch_size: int = 64, max_length: int = 512, aggregation: str | None = None
    ) -> list[dict]:
        """Strings give entity spans (character offsets, label, score) plus their words and tags; token
        lists give one tag (and score) per token. One dict per input, in order."""
        aggregation = aggregation or state.aggregation
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation: expected one of {', '.join(AGGREGATIONS)}, found '{aggregation}'")
        model.eval()
        results: list[dict | None] = [None] * len(inputs)
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        token_lists = [(i, [str(t) for t in x]) for i, x in enumerate(inputs) if not isinstance(x, str)]
        if token_lists:
            tagged = self._predict_tokens(model, tokenizer, [x for _, x in token_lists], state, batch_size, max_length, aggregation)
            for (i, _), result in zip(token_lists, tagged):
                results[i] = result
        if texts:
            found = self._predict_texts(model, tokenizer, [x for _, x in texts], state, batch_size, max_length, aggregation)
            for (i, _), result in zip(texts, found):
                results[i] = result
        return results  # type: ignore[return-value]

    def _predict_tokens(self, model, tokenizer, sentences, state, batch_size, max_length, aggregation) -> list[dict]:
        labels = state.labels
        owners, pieces = [], []
        nonempty = [i for i, s in enumerate(sentences) if s]
        windows = word_windows(tokenizer, [sentences[i] for i in nonempty], max_length)
        for i, ranges in zip(nonempty, windows):
            for a, b in ranges:
                owners.append((i, a))
                pieces.append(sentences[i][a:b])
        encoded = tokenizer(pieces, is_split_into_words=True, truncation=True, max_length=max_length) if pieces else None
        features = [{k: encoded[k][n] for k in encoded.keys()} for n in range(len(pieces))] if pieces else []
        probs = _probabilities(model, tokenizer, features, batch_size)
        fallback = "O" if "O" in labels else labels[0]
        results = [{"tokens": s, "tags": [fallback] * len(s), "scores": [0.0] * len(s)} for s in sentences]
        for n, (i, a) in enumerate(owners):
            rows: dict[int, list[np.ndarray]] = {}
            for position, w in enumerate(encoded.word_ids(n)):
                if w is not None:
                    rows.setdefault(w, []).append(probs[n][position])
            for w, word_rows in rows.items():
                best, score = _aggregate(word_rows, aggregation)
                results[i]["tags"][a + w] = labels[best]
                results[i]["scores"][a + w] = score
        return results

    def _predict_texts(self, model, tokenizer, texts, state, batch_size, max_length, aggregation) -> list[dict]:
        labels = state.labels
        budget = max(1, max_length - tokenizer.num_special_tokens_to_add(pair=False))
        windows: list[tuple[int, int, int]] = []  # (text, first char, end char)
        for i, text in enumerate(texts):
            plain = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(plain["input_ids"]) <= budget:
                windows.append((i, 0, len(text)))
                continue
            offsets = plain["offset_mapping"]
            subword = _subword_flags(tokenizer, text, plain["input_ids"], offsets)
            word_starts = [j for j, sub in enumerate(subword) if not sub]
            starts, used = [0], 0
            for first, after in zip(word_starts, [*word_starts[1:], len(subword)]):
                if used and used + after - first > budget:
                    starts.append(offsets[first][0])
                    used = 0
                used += after - first
            windows += [(i, a, b) for a, b in zip(starts, [*starts[1:], len(text)])]
        encoded = [
            tokenizer(texts[i][a:b], truncation=True, max_length=max_length, return_offsets_mapping=True, return_special_tokens_mask=True)
            for i, a, b in windows
        ]
        probs = _probabilities(model, tokenizer, encoded, batch_size)
        pieces: list[list[tuple]] = [[] for _ in texts]  # per text: (token id, start, end, scores)
        for (i, a, _), enc, p in zip(windows, encoded, probs):
            for position, (token_id, (s, e), special) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"])):
                if not special:
                    pieces[i].append((token_id, s + a, e + a, p[position]))
        results = []
        for text, tokens in zip(texts, pieces):
            flags = _subword_flags(tokenizer, text, [t[0] for t in tokens], [(t[1], t[2]) for t in tokens])
            words: list[dict] = []
            group: list[tuple] = []
            for token, is_sub in zip([*tokens, None], [*flags, False]):
                if group and (token is None or not is_sub):
                    best, score = _aggregate([g[3] for g in group], aggregation)
                    start, end = group[0][1], group[-1][2]
                    while start < end and text[start].isspace():
                        start += 1  # byte-level BPE offsets may include the space before a word
                    words.append({"text": text[start:end], "tag": labels[best], "score": score, "start": start, "end": end})
                    group = []
                if token is not None:
                    group.append(token)
            results.append({
                "entities": group_entities(text, words),
                "tokens": [w["text"] for w in words],
                "tags": [w["tag"] for w in words],
                "scores": [w["score"] for w in words],
            })
        return results


def _subword_flags(tokenizer, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[bool]:
    """Whether each token continues the previous word — the transformers pipeline's rule: word-aware
    tokenizers (a `##`-style continuation prefix) compare token and text lengths, others look for a
    space before the token; an unknown token always starts a word."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    word_aware = bool(getattr(model, "continuing_subword_prefix", None))
    flags = []
    for n, (token_id, (start, end)) in enumerate(zip(ids, offsets)):
        if n == 0 or token_id == tokenizer.unk_token_id:
            flags.append(False)
        elif word_aware:
            flags.append(len(tokenizer.convert_ids_to_tokens(int(token_id))) != end - start)
        else:
            flags.append(start > 0 and " " not in text[start - 1 : start + 1])
    return flags


# --------------------------------------------------------------------------- readers of each format


def _conll_sentences(cfg: TokenClassificationTaskConfig, table: Table) -> tuple[list[Sentence], list[str]]:
    frame, source = table.frame, table.source
    counts = Counter(len(f) for fields in frame["fields"] for f in fields)
    expected = counts.most_common(1)[0][0]
    if expected < 2:
        return [], [
            f"{source}: lines have {expected} column; expected at least 2 (token and tag, separated by a tab or space); "
            "add the tags, or check the separator"
        ]
    tag = cfg.conll_tag_column if cfg.conll_tag_column >= 0 else expected + cfg.conll_tag_column
    token = cfg.conll_token_column
    if not (0 <= tag < expected and token < expected) or tag == token:
        return [], [
            f"{source}: lines have {expected} columns, but task.conll_token_column={token} and task.conll_tag_column="
            f"{cfg.conll_tag_column}; set them to different columns in 0..{expected - 1} (-1 is the last)"
        ]
    sentences, errors = [], []
    for fields, lines in zip(frame["fields"], frame["lines"]):
        bad = [j for j, f in enumerate(fields) if len(f) != expected]
        for j in bad:
            errors.append(
                f"{source} line {lines[j]}: expected {expected} columns like most lines (token in column {token}, tag in "
                f"column {tag}), found {len(fields[j])}: {' '.join(fields[j])!r}; put one token and its tag on the line, "
                "separated by a tab (a token with spaces needs tab separators)"
            )
        empty = [j for j, f in enumerate(fields) if len(f) == expected and not (f[token] and f[tag])]
        for j in empty:  # a stray tab: the tokenizer would drop an empty word, and its tag with it
            errors.append(
                f"{source} line {lines[j]}: the token (column {token}) or the tag (column {tag}) is empty; expected a visible "
                "token and its tag; remove the stray tab, or the line"
            )
        if not bad and not empty:
            sentences.append(Sentence([f[token] for f in fields], [f[tag] for f in fields], lambda j, ln=lines: f"{source} line {ln[j]}"))
    return sentences, errors


def _token_sentences(cfg: TokenClassificationTaskConfig, table: Table) -> tuple[list[Sentence], list[str]]:
    sentences, errors = [], []
    frame = table.frame
    for i, (tokens, tags) in enumerate(zip(frame[cfg.tokens_column], frame[cfg.tags_column])):
        where = table.where(i)
        if not _is_listlike(tokens) or not _is_listlike(tags):
            odd = tokens if not _is_listlike(tokens) else tags
            errors.append(
                f"{where}: expected lists in '{cfg.tokens_column}' and '{cfg.tags_column}' (e.g. [\"Paris\", \"is\"] and "
                f"[\"B-LOC\", \"O\"]), found {type(odd).__name__} {odd!r:.60}; write both as JSON lists"
            )
            continue
        tokens, tags = [str(t) for t in tokens], [str(t) for t in tags]
        if len(tokens) != len(tags):
            errors.append(
                f"{where}: '{cfg.tokens_column}' has {len(tokens)} tokens but '{cfg.tags_column}' has {len(tags)} tags; "
                "expected one tag per token; fix the lists so they have the same length"
            )
            continue
        if not tokens:
            errors.append(f"{where}: the sentence has no tokens; expected at least one; remove the record")
            continue
        empty = [j for j, t in enumerate(tokens) if not t.strip()]
        if empty:
            errors.append(f"{where}: token {empty[0] + 1} is empty; expected visible text in every token; remove it and its tag")
            continue
        sentences.append(Sentence(tokens, tags, lambda j, w=where, t=tokens: f"{w} token {j + 1} ({t[j]!r})"))
    return sentences, errors


def _span_sentences(cfg: TokenClassificationTaskConfig, table: Table) -> tuple[list[Sentence], list[str]]:
    sentences, errors = [], []
    frame = table.frame
    for i, (text, entities) in enumerate(zip(frame[cfg.text_column], frame[cfg.entities_column])):
        where = table.where(i)
        if not isinstance(text, str) or not text.strip():
            errors.append(f"{where}: '{cfg.text_column}' is empty; expected text; fill it in or remove the record")
            continue
        entities = [] if not _is_listlike(entities) and _missing(entities) else entities
        if not _is_listlike(entities):
            errors.append(f"{where}: '{cfg.entities_column}' is {entities!r:.60}; expected a list of {{\"start\", \"end\", \"label\"}} objects")
            continue
        spans, problems = [], []
        for k, entity in enumerate(entities, start=1):
            if not isinstance(entity, dict) or not {"start", "end", "label"} <= set(entity):
                problems.append(
                    f"{where}: entity {k} is {entity!r:.80}; expected an object with \"start\", \"end\" (character offsets) "
                    "and \"label\"; fix the entity"
                )
                continue
            start, end, label = entity["start"], entity["end"], str(entity["label"])
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, end)) or not (0 <= start < end <= len(text)):
                problems.append(
                    f"{where}: entity {k} ({label}) has offsets {start!r}..{end!r}, outside the text of {len(text)} characters; "
                    f"expected integers 0 <= start < end <= {len(text)} (characters, end exclusive); fix the offsets"
                )
                continue
            spans.append((int(start), int(end), label, k))
        spans.sort()
        for (s1, e1, l1, k1), (s2, e2, l2, k2) in zip(spans, spans[1:]):
            if s2 < e1:
                problems.append(
                    f"{where}: entities {k1} ({l1}, {s1}..{e1} {text[s1:e1]!r}) and {k2} ({l2}, {s2}..{e2} {text[s2:e2]!r}) overlap; "
                    "expected non-overlapping entities (flat NER); keep one of them"
                )
        if problems:
            errors += problems
            continue
        words = words_with_offsets(text, [p for s, e, _, _ in spans for p in (s, e)])
        tags = ["O"] * len(words)
        for start, end, label, _ in spans:
            inside = [j for j, (_, a, b) in enumerate(words) if a >= start and b <= end]
            for n, j in enumerate(inside):
                tags[j] = f"{'B' if n == 0 else 'I'}-{label}"
        tokens = [w for w, _, _ in words]
        sentences.append(Sentence(tokens, tags, lambda j, w=where, ws=words: f"{w} characters {ws[j][1]}..{ws[j][2]}"))
    return sentences, errors
