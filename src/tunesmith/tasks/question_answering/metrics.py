"""Extractive question-answering metrics: exact match and token F1 with the official SQuAD answer
normalisation, the HasAns/NoAns split of SQuAD v2, and the no-answer threshold search of the official
v2 script.

Normalisation, as the official script: lower-case, drop ASCII punctuation, drop the articles a/an/the,
collapse whitespace; an answer's tokens are its whitespace-separated words. That would make a whole
Chinese or Japanese answer one token (a partial answer would then score F1 0), so characters of scripts
written without spaces between words — CJK ideographs, kana, Thai, Lao, Khmer, Myanmar — are tokens of
their own, and CJK/full-width punctuation is dropped like ASCII punctuation. Text without such
characters scores exactly as with the official script; Korean (Hangul) keeps its spaces and word tokens.

Scores are fractions (0..1) like every tunesmith metric; the SQuAD papers print them x100.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tunesmith.tasks.base import LossTotal
from tunesmith.tasks.question_answering.inference import BestSpans, fold_candidates, trimmed

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_SPACELESS = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\U00020000-\U0003ffff"
)
_TOKEN = re.compile(f"[{_SPACELESS}]|[^\\s{_SPACELESS}]+")
_WIDE_PUNCTUATION_BLOCKS = ((0x3000, 0x303F), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF))
_ASCII_PUNCTUATION = set(string.punctuation)


def _is_punctuation(char: str) -> bool:
    if char in _ASCII_PUNCTUATION:
        return True
    code = ord(char)
    return any(a <= code <= b for a, b in _WIDE_PUNCTUATION_BLOCKS) and unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation (plus CJK/full-width punctuation, see the module docstring)."""
    text = "".join(c for c in text.lower() if not _is_punctuation(c))
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    """Tokens of a normalised answer: words, and single characters of scripts written without spaces."""
    return _TOKEN.findall(normalize_answer(text))


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted, expected = answer_tokens(prediction), answer_tokens(gold)
    if not predicted or not expected:
        return float(predicted == expected)  # an empty answer is right only where none is expected
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(exact match, F1) against the closest of several gold answers; no gold answers means the empty answer."""
    golds = golds or [""]
    return max(exact_match(prediction, g) for g in golds), max(f1(prediction, g) for g in golds)


@dataclass
class Scored:
    """Per question: the best span's text, its exact match and F1, and whether a gold answer exists."""

    exact: np.ndarray
    f1: np.ndarray
    has_answer: np.ndarray


def score(predictions: list[str], golds: list[list[str]]) -> Scored:
    pairs = [best_over_golds(p, g) for p, g in zip(predictions, golds)]
    return Scored(
        exact=np.array([e for e, _ in pairs], dtype=float),
        f1=np.array([f for _, f in pairs], dtype=float),
        has_answer=np.array([bool(g) for g in golds], dtype=bool),
    )


def squad_metrics(predictions: list[str], golds: list[list[str]]) -> dict:
    """Exact match and F1 over questions; with unanswerable questions among them, the same for the
    answerable (`has_answer_*`) and unanswerable (`no_answer_*`) ones."""
    scored = score(predictions, golds)
    out = {"exact_match": _mean(scored.exact), "f1": _mean(scored.f1)}
    if not scored.has_answer.all():
        for name, part in (("has_answer", scored.has_answer), ("no_answer", ~scored.has_answer)):
            out[f"{name}_exact_match"] = _mean(scored.exact[part])
            out[f"{name}_f1"] = _mean(scored.f1[part])
            out[f"{name}_total"] = int(part.sum())
    return out


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else 0.0


def best_null_threshold(null_margins: np.ndarray, span_scores: np.ndarray, has_answer: np.ndarray) -> tuple[float, float]:
    """The no-answer threshold that maximises the mean score, searched like the official SQuAD v2 script.

    `null_margins`: per question, the no-answer score minus the best span's score (logits); a question is
    answered with nothing when its margin exceeds the threshold. `span_scores`: the best span's exact
    match or F1. Returns (threshold, best mean score). Every threshold between two neighbouring margins
    scores the same; the middle of the best such interval is returned (the official script returns its
    lower edge, which answers nothing for a new question just above it). Ties keep the lowest interval."""
    n = len(null_margins)
    if n == 0:
        return 0.0, 0.0
    order = np.argsort(null_margins, kind="stable")
    margins = np.asarray(null_margins, dtype=float)[order]
    # Answer the first k questions (by margin) and nothing for the rest, for every k.
    gains = np.asarray(span_scores, dtype=float)[order] - (~np.asarray(has_answer, dtype=bool)[order]).astype(float)
    totals = float((~np.asarray(has_answer, dtype=bool)).sum()) + np.concatenate([[0.0], np.cumsum(gains)])
    cuts = [k for k in range(n + 1) if k in (0, n) or margins[k - 1] < margins[k]]  # equal margins go together
    k = max(cuts, key=lambda c: (totals[c], -c))
    if k == 0:
        threshold = margins[0] - 1.0
    elif k == n or not np.isfinite(margins[k]):
        threshold = margins[k - 1] + 1.0
    else:
        threshold = (margins[k - 1] + margins[k]) / 2
    return float(threshold), float(totals[k] / n)


class SpanAccumulator:
    """One evaluation pass: each question's best span and no-answer score (from `qa.BestSpans`, fed
    batch by batch), the gold answers of the table being evaluated, and the loss over windows."""

    # What BestSpans(1) reads of a window's candidates (it keeps 4 per window for its 1 best over windows).
    spans_per_window = 4

    def __init__(self, gold) -> None:
        self.spans = BestSpans(1)
        self.gold = gold  # tasks.question_answering.task.Gold of the table evaluated
        self.losses = LossTotal()
        self.windows = 0

    def add(self, reduced: dict) -> None:
        """One gathered batch of `inference.window_candidates`, with its per-window losses."""
        fold_candidates(self.spans, reduced)
        self.losses.add(reduced.get("loss_sums"), reduced.get("loss_units"))
        self.windows += len(reduced["example_index"])

    @property
    def loss(self) -> float:
        return self.losses.mean

    def predictions(self, null_threshold: float | None) -> list[str]:
        """Each question's answer text; with a threshold (v2), empty where the no-answer score wins."""
        out = []
        for i, context in enumerate(self.gold.contexts if self.gold else []):
            best = self.spans.best(i)
            if best is None or (null_threshold is not None and self.spans.null_margin(i) > null_threshold):
                out.append("")
            else:
                start, end = trimmed(context, best.start, best.end)
                out.append(context[start:end])
        return out

    def null_margins(self) -> np.ndarray:
        return np.array([self.spans.null_margin(i) for i in range(len(self.gold.contexts) if self.gold else 0)], dtype=float)
