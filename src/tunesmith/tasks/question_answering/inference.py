"""Extractive question answering with any `AutoModelForQuestionAnswering`: `tunesmith.qa.answer`.

transformers 5 removed its question-answering pipeline; this is what replaces it in tunesmith — the
predictions of trained runs, the QA task's evaluation and anyone's QA model use it::

    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from tunesmith.tasks.question_answering.inference import answer

    model = AutoModelForQuestionAnswering.from_pretrained("runs/qa/model")
    tokenizer = AutoTokenizer.from_pretrained("runs/qa/model")
    answer(model, tokenizer, ["Who wrote it?"], ["It was written by Ada Lovelace."])
    # [{'answer': 'Ada Lovelace', 'score': 0.91, 'start': 18, 'end': 30}]

How: each (question, context) pair is tokenized into windows — the tokenizer's overflow, with
`doc_stride` context tokens shared by consecutive windows, and its offset mapping. In every window
the `n_best_size` best start and the `n_best_size` best end positions inside the context are paired
into spans of at most `max_answer_length` tokens; spans are ranked by start + end logit across all
windows of a question and mapped back to character offsets in the original context (surrounding
whitespace trimmed). `score` is the span's probability within its window (softmax of start and of end
over the context positions and the no-answer position). With `handle_impossible_answer` (SQuAD v2
models) the answer is empty (`start`/`end` None) when the no-answer score — start and end on the
CLS token — beats the best span's score by more than `null_threshold`.

Windows are reduced to their candidate spans batch by batch: logits never outlive their batch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import torch

from tunesmith.errors import ConfigError, DataError, summarise

OUTSIDE = -1  # offset of a token that is not part of the context (question, special tokens, padding)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------- windows


def require_offsets(tokenizer, field: str = "model.name_or_path") -> None:
    """Question answering maps tokens to characters: only fast (Rust `tokenizers`) tokenizers can."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{field}: question answering needs a fast tokenizer (it maps every token to its characters with "
            f"return_offsets_mapping); found {type(tokenizer).__name__}, a slow Python tokenizer without offsets; "
            "load the model's fast tokenizer (a folder with tokenizer.json, AutoTokenizer.from_pretrained(path)), "
            "or convert it once: transformers.convert_slow_tokenizer.convert_slow_tokenizer(tokenizer) and save it"
        )


def question_first(tokenizer) -> bool:
    """Question then context, as for BERT; tokenizers that pad on the left (XLNet) put the context first,
    like the transformers SQuAD scripts these models were trained with."""
    return tokenizer.padding_side != "left"


def question_budget(tokenizer, max_length: int, doc_stride: int) -> int:
    """Most question tokens that leave a window room for more than `doc_stride` context tokens."""
    return max_length - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride - 1


def long_questions(tokenizer, questions: list[str], max_length: int, doc_stride: int) -> list[tuple[int, int]]:
    """(index, token count) of questions too long for a window (the tokenizer would fail on them)."""
    budget = question_budget(tokenizer, max_length, doc_stride)
    counts = [len(ids) for ids in tokenizer(list(questions), add_special_tokens=False)["input_ids"]] if questions else []
    return [(i, n) for i, n in enumerate(counts) if n > budget]


def too_long_message(where: str, tokens: int, tokenizer, max_length: int, doc_stride: int) -> str:
    budget = question_budget(tokenizer, max_length, doc_stride)
    return (
        f"{where}: the question is {tokens} tokens; expected at most {budget} (max_length {max_length} minus special "
        f"tokens minus doc_stride {doc_stride}, so that each window keeps more than doc_stride context tokens); "
        "shorten the question, raise task.max_length or lower task.doc_stride"
    )


def encode_windows(tokenizer, questions: list[str], contexts: list[str], max_length: int, doc_stride: int) -> list[dict]:
    """One feature per window: the model inputs, `example_index` (which pair it came from), `offsets`
    (each token's [start, end) characters in the context, [-1, -1] outside it) and `cls_index` (where the
    no-answer score is read: the CLS token, or the first token for tokenizers without one)."""
    first = question_first(tokenizer)
    encoded = tokenizer(
        list(questions) if first else list(contexts),
        list(contexts) if first else list(questions),
        truncation="only_second" if first else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    context_sequence = 1 if first else 0
    names = [n for n in MODEL_INPUTS if n in encoded]
    features = []
    for w, ids in enumerate(encoded["input_ids"]):
        sequence = encoded.sequence_ids(w)
        offsets = [list(o) if s == context_sequence else [OUTSIDE, OUTSIDE] for o, s in zip(encoded["offset_mapping"][w], sequence)]
        cls_id = tokenizer.cls_token_id
        feature = {n: encoded[n][w] for n in names}
        feature.update(
            example_index=int(encoded["overflow_to_sample_mapping"][w]),
            offsets=offsets,
            cls_index=ids.index(cls_id) if cls_id is not None and cls_id in ids else 0,
        )
        features.append(feature)
    return features


def answer_tokens(offsets: list[list[int]], start_char: int, end_char: int, cls_index: int) -> tuple[int, int]:
    """Token positions of the answer [start_char, end_char) in one window, or (cls, cls) when the window
    does not hold all of it (the training label: this window has no answer)."""
    inside = [t for t, (a, _) in enumerate(offsets) if a != OUTSIDE]
    if start_char < 0 or not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return cls_index, cls_index
    start = next(t for t in inside if offsets[t][1] > start_char)
    end = next(t for t in reversed(inside) if offsets[t][0] < end_char)
    return (start, end) if start <= end else (cls_index, cls_index)


class WindowCollator:
    """Pads windows into a batch on the tokenizer's side. Positions (answer tokens, CLS) move with left
    padding; `offsets` are padded with -1; `labels` are (start, end, first real position, end of the real
    positions), so the loss can leave padding out, which keeps losses equal with or without padding."""

    extra_columns = ("start_positions", "end_positions", "cls_index", "example_index", "offsets")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]) -> dict:
        names = [n for n in MODEL_INPUTS if n in features[0]]
        batch = self.tokenizer.pad([{n: f[n] for n in names} for f in features], return_tensors="pt")
        width = batch["input_ids"].shape[1]
        left = self.tokenizer.padding_side == "left"
        shifts = [width - len(f["input_ids"]) if left else 0 for f in features]
        offsets = torch.full((len(features), width, 2), OUTSIDE, dtype=torch.long)
        for row, (f, shift) in enumerate(zip(features, shifts)):
            offsets[row, shift : shift + len(f["input_ids"])] = torch.as_tensor(f["offsets"], dtype=torch.long).reshape(-1, 2)
        batch["offsets"] = offsets
        batch["cls_index"] = torch.tensor([f["cls_index"] + s for f, s in zip(features, shifts)])
        batch["example_index"] = torch.tensor([f["example_index"] for f in features])
        if "start_positions" in features[0]:
            batch["labels"] = torch.tensor([
                [f["start_positions"] + s, f["end_positions"] + s, s, s + len(f["input_ids"])] for f, s in zip(features, shifts)
            ])
        return batch


def split_batch(batch: dict) -> tuple[dict, torch.Tensor | None, dict]:
    """(model inputs, labels, window metadata) of a `WindowCollator` batch."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    extras = {k: batch[k] for k in ("offsets", "cls_index", "example_index") if k in batch}
    return inputs, batch.get("labels"), extras


def stacked_logits(outputs) -> torch.Tensor:
    """(batch, positions, 2): start and end logits."""
    return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)


def span_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per window: the mean of its start and end cross-entropies over its real (unpadded) positions."""
    positions = torch.arange(logits.shape[1], device=logits.device)
    real = (positions >= labels[:, 2:3]) & (positions < labels[:, 3:4])
    masked = logits.float().masked_fill(~real.unsqueeze(-1), torch.finfo(torch.float32).min)
    start = torch.nn.functional.cross_entropy(masked[..., 0], labels[:, 0], reduction="none")
    end = torch.nn.functional.cross_entropy(masked[..., 1], labels[:, 1], reduction="none")
    return (start + end) / 2


# --------------------------------------------------------------------------- spans


@dataclass(order=True)
class Span:
    logit: float  # start + end logit: the ranking across windows
    start: int = field(compare=False)  # characters in the context, end exclusive
    end: int = field(compare=False)
    score: float = field(compare=False)  # probability of the span within its window


def window_spans(
    logits: np.ndarray, offsets: np.ndarray, cls_index: int, n_best: int, max_answer_length: int
) -> tuple[list[Span], float, float]:
    """The `n_best` best candidate spans of one window, best first, and its no-answer logit and probability.

    `logits`: (positions, 2) start and end logits; `offsets`: (positions, 2), -1 outside the context."""
    start_logits, end_logits = logits[:, 0].astype(np.float64), logits[:, 1].astype(np.float64)
    context = np.flatnonzero(offsets[:, 0] != OUTSIDE)
    null_logit = float(start_logits[cls_index] + end_logits[cls_index])
    scored = np.union1d(context, [cls_index])
    log_start, log_end = _log_softmax(start_logits[scored]), _log_softmax(end_logits[scored])

    def where(position: int) -> int:  # index among the scored positions
        return int(np.searchsorted(scored, position))

    null_score = float(np.exp(log_start[where(cls_index)] + log_end[where(cls_index)]))
    if not len(context):
        return [], null_logit, null_score
    starts = context[np.argsort(-start_logits[context], kind="stable")[:n_best]][:, None]
    ends = context[np.argsort(-end_logits[context], kind="stable")[:n_best]][None, :]
    allowed = (ends >= starts) & (ends - starts + 1 <= max_answer_length)
    pair_logits = np.where(allowed, start_logits[starts] + end_logits[ends], -np.inf)
    spans = []
    for flat in np.argsort(-pair_logits, axis=None, kind="stable")[: min(n_best, int(allowed.sum()))]:
        s, e = int(starts[flat // ends.shape[1], 0]), int(ends[0, flat % ends.shape[1]])
        probability = float(np.exp(log_start[where(s)] + log_end[where(e)]))
        spans.append(Span(float(pair_logits.flat[flat]), int(offsets[s, 0]), int(offsets[e, 1]), probability))
    return spans, null_logit, null_score


def _log_softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max()
    return shifted - np.log(np.exp(shifted).sum())


class BestSpans:
    """Per question, the `k` best distinct spans over all its windows and the lowest no-answer logit (the
    window most sure there is an answer speaks for the question, as in the transformers SQuAD scripts)."""

    def __init__(self, k: int = 1):
        self.k = k
        self.spans: dict[int, list[Span]] = {}
        self.null: dict[int, tuple[float, float]] = {}  # question -> (no-answer logit, its probability)

    def add(self, question: int, spans: list[Span], null_logit: float, null_score: float) -> None:
        if question not in self.null or null_logit < self.null[question][0]:
            self.null[question] = (null_logit, null_score)
        kept = {(s.start, s.end): s for s in self.spans.get(question, [])}
        for span in spans[: self.k * 4]:  # enough to fill k after removing spans seen in other windows
            if (span.start, span.end) not in kept or kept[(span.start, span.end)].logit < span.logit:
                kept[(span.start, span.end)] = span
        self.spans[question] = heapq.nlargest(self.k, kept.values())

    def best(self, question: int) -> Span | None:
        spans = self.spans.get(question)
        return spans[0] if spans else None

    def null_margin(self, question: int) -> float:
        """No-answer logit minus the best span's logit (+inf without any span: nothing to answer with)."""
        best = self.best(question)
        return float("inf") if best is None else self.null.get(question, (float("-inf"), 0.0))[0] - best.logit


def trimmed(context: str, start: int, end: int) -> tuple[int, int]:
    """A span without surrounding whitespace (byte-level BPE offsets can include the space before a word)."""
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return start, end


def reduce_batch(
    spans: BestSpans, logits: torch.Tensor, extras: dict, n_best: int, max_answer_length: int, first_question: int = 0
) -> None:
    """Fold one batch of windows into `spans`: each window becomes its candidate spans, then is dropped."""
    values = logits.detach().float().cpu().numpy()
    offsets = extras["offsets"].cpu().numpy()
    cls = extras["cls_index"].tolist()
    questions = extras["example_index"].tolist()
    for row in range(values.shape[0]):
        candidates, null_logit, null_score = window_spans(values[row], offsets[row], cls[row], n_best, max_answer_length)
        spans.add(first_question + questions[row], candidates, null_logit, null_score)


def window_candidates(logits: torch.Tensor, extras: dict, n_best: int, max_answer_length: int, keep: int) -> dict[str, torch.Tensor]:
    """A batch of windows reduced to what `BestSpans` keeps of each (its `keep` best spans and its no-answer
    logit and probability), as tensors with one row per window: gathered across processes in place of the
    per-token logits and offsets. `spans`: (windows, keep, 4) rows of (logit, start, end, score), -inf logits
    where a window has fewer."""
    values = logits.detach().float().cpu().numpy()
    offsets = extras["offsets"].cpu().numpy()
    cls = extras["cls_index"].tolist()
    spans = torch.full((values.shape[0], keep, 4), float("-inf"), dtype=torch.float64)
    null = torch.zeros((values.shape[0], 2), dtype=torch.float64)
    for row in range(values.shape[0]):
        candidates, null_logit, null_score = window_spans(values[row], offsets[row], cls[row], n_best, max_answer_length)
        for i, span in enumerate(candidates[:keep]):
            spans[row, i] = torch.tensor([span.logit, span.start, span.end, span.score], dtype=torch.float64)
        null[row] = torch.tensor([null_logit, null_score], dtype=torch.float64)
    device = logits.device
    return {"spans": spans.to(device), "null": null.to(device), "example_index": extras["example_index"]}


def fold_candidates(spans: BestSpans, reduced: dict[str, torch.Tensor]) -> None:
    """The inverse of `window_candidates`: fold each window's spans into `spans`."""
    rows, nulls = reduced["spans"].cpu().tolist(), reduced["null"].cpu().tolist()
    for question, window, (null_logit, null_score) in zip(reduced["example_index"].tolist(), rows, nulls):
        found = [Span(logit, int(start), int(end), score) for logit, start, end, score in window if logit != float("-inf")]
        spans.add(question, found, null_logit, null_score)


# --------------------------------------------------------------------------- the public API


@torch.inference_mode()
def answer(
    model,
    tokenizer,
    questions: list[str],
    contexts: list[str],
    *,
    max_length: int = 384,
    doc_stride: int = 128,
    max_answer_length: int = 30,
    n_best_size: int = 20,
    top_k: int = 1,
    handle_impossible_answer: bool = False,
    null_threshold: float = 0.0,
    batch_size: int = 32,
) -> list[dict] | list[list[dict]]:
    """Answers to `questions`, each a span of its context: `{"answer", "score", "start", "end"}`
    (character offsets into the context, end exclusive). With `top_k` > 1, a list of up to `top_k`
    answers per question, best first. Works on any `AutoModelForQuestionAnswering` with a fast tokenizer.

    `handle_impossible_answer`: the model was trained with unanswerable questions (SQuAD v2); the answer
    is `{"answer": "", "start": None, "end": None}` when the no-answer score beats the best span by more
    than `null_threshold` (a logit margin; a tunesmith run tunes it on validation)."""
    questions, contexts = list(questions), list(contexts)
    if len(questions) != len(contexts):
        raise DataError(
            f"questions and contexts: expected one context per question, found {len(questions)} questions and {len(contexts)} contexts"
        )
    if top_k < 1 or max_answer_length < 1 or n_best_size < 1 or doc_stride < 0 or doc_stride >= max_length:
        raise ConfigError(
            f"answer(): expected top_k, max_answer_length, n_best_size >= 1 and 0 <= doc_stride < max_length, found top_k={top_k}, "
            f"max_answer_length={max_answer_length}, n_best_size={n_best_size}, doc_stride={doc_stride}, max_length={max_length}"
        )
    require_offsets(tokenizer, "tokenizer")
    problems = _input_problems(questions, contexts)
    if not problems:
        problems = [
            too_long_message(f"questions[{i}]", n, tokenizer, max_length, doc_stride)
            for i, n in long_questions(tokenizer, questions, max_length, doc_stride)
        ]
    if problems:
        raise DataError(summarise(problems))
    model.eval()
    device = next(model.parameters()).device
    collate = WindowCollator(tokenizer)
    found = BestSpans(top_k)
    chunk = max(4 * batch_size, 64)  # questions tokenized at a time: memory stays bounded on large inputs
    for first in range(0, len(questions), chunk):
        features = encode_windows(tokenizer, questions[first : first + chunk], contexts[first : first + chunk], max_length, doc_stride)
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))  # little padding per batch
        for b in range(0, len(order), batch_size):
            inputs, _, extras = split_batch(collate([features[i] for i in order[b : b + batch_size]]))
            logits = stacked_logits(model(**{k: v.to(device) for k, v in inputs.items()}))
            reduce_batch(found, logits, extras, n_best_size, max_answer_length, first_question=first)
    results = [_answers(found, i, contexts[i], handle_impossible_answer, null_threshold) for i in range(len(questions))]
    return [r[0] for r in results] if top_k == 1 else results


def _input_problems(questions: list, contexts: list) -> list[str]:
    problems = []
    for name, values, expected in (("questions", questions, "a question"), ("contexts", contexts, "the text to find the answer in")):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                problems.append(f"{name}[{i}]: expected {expected} (a string), found {type(value).__name__}; pass strings")
            elif not value.strip():
                problems.append(f"{name}[{i}]: empty; expected {expected}")
    return problems


def _answers(found: BestSpans, question: int, context: str, impossible: bool, threshold: float) -> list[dict]:
    answers = []
    for span in found.spans.get(question, []):
        start, end = trimmed(context, span.start, span.end)
        answers.append({"answer": context[start:end], "score": span.score, "start": start, "end": end})
    if impossible and found.null_margin(question) > threshold:
        answers.insert(0, {"answer": "", "score": found.null[question][1], "start": None, "end": None})
    return answers[: found.k] or [{"answer": "", "score": 0.0, "start": None, "end": None}]
