"""Text-generation metrics (ROUGE, BLEU, chrF, exact match) for every script, with nothing downloaded.

ROUGE follows HF's run_summarization (F-measure, Porter stemming, rougeLsum on newline-joined
sentences) but tokenizes with `ScriptTokenizer`, because rouge-score's default tokenizer keeps
only a-z0-9 and scores Chinese, Russian or Arabic as 0.
"""

import unicodedata
from functools import lru_cache
from importlib import import_module

import regex
from nltk.stem import porter
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]

# Scripts written without spaces between words: each letter is a token. `scx` (script extensions)
# also catches shared marks such as the katakana-hiragana prolonged sound mark "ー". Hangul is
# not here: Korean puts spaces between words, so a run of Hangul stays one word.
_NO_SPACE = r"\p{scx=Han}\p{scx=Hiragana}\p{scx=Katakana}\p{scx=Thai}\p{scx=Lao}\p{scx=Khmer}\p{scx=Myanmar}"
# A no-space letter keeps its combining marks (Thai vowel signs, tone marks); any other run of
# letters, digits and marks is a word. Marks count as word characters so Devanagari vowel signs
# do not split words (Python's `\w` would split them); `_` and punctuation separate words.
_TOKEN = regex.compile(
    rf"[[\p{{L}}\p{{N}}]&&[{_NO_SPACE}]]\p{{M}}*|[[\p{{L}}\p{{N}}\p{{M}}]--[{_NO_SPACE}]]+", regex.V1
)
_STEMMER = porter.PorterStemmer()  # the stemmer rouge-score's DefaultTokenizer uses


@lru_cache(maxsize=2**16)
def _stem(word: str) -> str:
    # Like rouge-score: only words longer than 3 characters; only ASCII ones, since Porter is English.
    return _STEMMER.stem(word) if len(word) > 3 and word.isascii() else word


class ScriptTokenizer:
    """rouge-score tokenizer that keeps every script: lowercased words, one token per CJK/Thai character."""

    def tokenize(self, text: str) -> list[str]:
        # NFKC so that full-width "２００８" or "ＡＢＣ" (common in CJK text) match "2008" and "abc".
        return [_stem(token) for token in _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())]


# `.!?` end a sentence only before whitespace (so "3.5" stays whole); CJK full stops need none.
_SENTENCE_END = regex.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\n")


def split_sentences(text: str) -> list[str]:
    """Sentences on `.!?` + whitespace, on `。！？` and on newlines (a download-free stand-in for nltk punkt)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=False, tokenizer=ScriptTokenizer())
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        # One newline-joined text serves all four types: newlines are not tokens for rouge1/2/L,
        # and rougeLsum splits on them.
        scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100 * total / len(predictions) for name, total in totals.items()}


_CHINESE = {"zh", "zho", "chi", "cmn", "yue"}
_JAPANESE = {"ja", "jpn"}
_KOREAN = {"ko", "kor"}


@lru_cache(maxsize=None)
def _mecab(module: str) -> bool:
    # sacrebleu's MeCab tokenizer modules set `MeCab = None` when the optional packages are missing.
    return import_module(f"sacrebleu.tokenizers.{module}").MeCab is not None


def _japanese() -> str:
    # Without MeCab, characters are the usual fallback for Japanese (13a would see one word per sentence).
    return "ja-mecab" if _mecab("tokenizer_ja_mecab") else "char"


def _korean() -> str:
    # Korean has spaces between words, so 13a is a fair fallback when MeCab-ko is missing.
    return "ko-mecab" if _mecab("tokenizer_ko_mecab") else "13a"


def _detect(references: list[str]) -> str:
    """Guess the language from the letters of the references (spaces, punctuation and digits ignored)."""
    text = "".join(references)
    letters = len(regex.findall(r"\p{L}", text))
    han = len(regex.findall(r"\p{Han}", text))
    kana = len(regex.findall(r"[[\p{scx=Hiragana}\p{scx=Katakana}]&&\p{L}]", text, flags=regex.V1))
    hangul = len(regex.findall(r"\p{Hangul}", text))
    # Japanese prose mixes kanji (Han) with kana; Chinese has no kana. So once Han and kana make up
    # most letters, a kana share of a tenth or more says Japanese, less says Chinese.
    if han + kana > letters / 2:
        return _japanese() if kana >= (han + kana) / 10 else "zh"
    return _korean() if hangul > letters / 2 else "13a"


def bleu_tokenizer(target_lang: str | None, references: list[str] | None = None) -> str:
    """The sacrebleu tokenizer for the target language.

    Chinese (zh, zh-CN, zh_Hant, zho, chi, cmn, yue) -> "zh"; Japanese (ja, jpn) -> "ja-mecab" when
    sacrebleu's MeCab support is installed, else "char"; Korean (ko, kor) -> "ko-mecab", else "13a";
    anything else -> "13a". With no language but references, it is detected: mostly Han and kana
    letters with at least a tenth kana -> Japanese, mostly Han -> Chinese, mostly Hangul -> Korean.
    """
    if target_lang is None:
        return _detect(references) if references else "13a"
    primary = regex.split(r"[-_]", target_lang.lower())[0]
    if primary in _CHINESE:
        return "zh"
    if primary in _JAPANESE:
        return _japanese()
    if primary in _KOREAN:
        return _korean()
    return "13a"


def describe_bleu(target_lang: str | None, references: list[str] | None = None) -> str:
    """sacrebleu's signature ("nrefs:1|case:mixed|...|tok:zh|...") of the BLEU `generation_metrics` reports, for provenance."""
    bleu = BLEU(tokenize=bleu_tokenizer(target_lang, references))
    bleu.corpus_score([""], [[""]])  # sacrebleu knows the number of references only after scoring once
    return str(bleu.get_signature())


def _normalise(text: str) -> str:
    return " ".join(text.split())


def generation_metrics(predictions: list[str], references: list[str], target_lang: str | None = None,
                       tokenizer: str | None = None) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measure, corpus BLEU and chrF, and exact match, all 0-100; one reference per prediction.
    `tokenizer`: sacreBLEU's tokenizer when already chosen (a run's, from its training targets); else chosen here."""
    if not predictions:
        return dict.fromkeys([*ROUGE_TYPES, "bleu", "chrf", "exact_match"], 0.0)
    bleu = BLEU(tokenize=tokenizer or bleu_tokenizer(target_lang, references))
    matches = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references))
    return {
        **_rouge(predictions, references),
        "bleu": bleu.corpus_score(predictions, [references]).score,
        "chrf": CHRF().corpus_score(predictions, [references]).score,
        "exact_match": 100 * matches / len(predictions),
    }
