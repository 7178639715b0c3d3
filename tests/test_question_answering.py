"""Extractive question answering: SQuAD JSON and flat rows, windows over long contexts (an answer that
straddles two windows), unicode offsets, SQuAD v2 no-answer with a tuned threshold, every preflight
error, the official metrics, every strategy (overfit, save, reload, predict — also through plain
`transformers`), `tunesmith.qa.answer` on a model tunesmith did not train, the CLI, and the
model-family matrix."""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertConfig, BertForQuestionAnswering
from transformers.modeling_outputs import QuestionAnsweringModelOutput
from typer.testing import CliRunner

import tunesmith
from families import FamilyCache
from test_model_families import _one_thread  # noqa: F401 - autouse: one torch thread for tiny models
from test_strategies import METHODS
from tiny import ORGS, PEOPLE, PLACES, tiny_config, write_csv, write_jsonl
from tunesmith.tasks.question_answering import inference as qa
from tunesmith.cli import app
from tunesmith.config import config_reference, load_config, parse_config
from tunesmith.tasks.question_answering.config import QuestionAnsweringTaskConfig
from tunesmith.data.splits import make_splits
from tunesmith.tasks.question_answering.squad import read_squad
from tunesmith.errors import ConfigError, DataError
from tunesmith.tasks.question_answering.metrics import SpanAccumulator, best_null_threshold, exact_match, normalize_answer, squad_metrics
from tunesmith.tasks.question_answering.metrics import f1 as token_f1
from tunesmith.tasks import get_task
from tunesmith.tasks.question_answering.task import read_examples

TASK = {"name": "question_answering", "max_length": 48, "doc_stride": 16}
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- toy data


def qa_rows(n: int = 24, seed: int = 0, unanswerable: bool = False) -> list[dict]:
    """Toy reading comprehension over one-sentence contexts naming a person, a place and a company: the
    question's kind (who lives in X / where does P live / who hired P) picks which one is the answer.
    With `unanswerable`, every fourth context names no company and its company question has no answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        per, loc, org = (" ".join(rng.choice(pool)) for pool in (PEOPLE, PLACES, ORGS))
        no_company = unanswerable and i % 4 == 3
        context = f"{per} lives in {loc} ." if no_company else f"{per} lives in {loc} and was hired by {org} ."
        kind = 2 if no_company else i % 3
        question, answer = [(f"who lives in {loc} ?", per), (f"where does {per} live ?", loc), (f"who hired {per} ?", org)][kind]
        answers = {"text": [], "answer_start": []} if no_company else {"text": [answer], "answer_start": [context.index(answer)]}
        rows.append({"id": f"q{i}", "question": question, "context": context, "answers": answers})
    return rows


def squad_document(rows: list[dict], v2: bool = False) -> dict:
    """The same rows as SQuAD JSON: one paragraph per distinct context."""
    paragraphs: dict[str, list] = {}
    for r in rows:
        answers = [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]
        record = {"id": r["id"], "question": r["question"], "answers": answers}
        if v2:
            record["is_impossible"] = not answers
        paragraphs.setdefault(r["context"], []).append(record)
    return {"version": "v2.0" if v2 else "1.1",
            "data": [{"title": "toy", "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}]}


def write_squad(path: Path, rows: list[dict], v2: bool = False) -> Path:
    path.write_text(json.dumps(squad_document(rows, v2), ensure_ascii=False), encoding="utf-8")
    return path


def qa_config(model_dir, train_file, out_dir, **sections) -> dict:
    task = {**TASK, **sections.pop("task", {})}
    data = {"validation_file": str(train_file), **sections.pop("data", {})}
    return tiny_config(model_dir, train_file, out_dir, task=task, data=data, **sections)


def tables_of(files: dict, **task) -> tuple:
    """Preflight only: (task, cfg, tables)."""
    cfg = parse_config({"data": {f"{split}_file": str(path) for split, path in files.items()}, "task": {**TASK, **task}})
    t = get_task("question_answering")
    tables, _ = make_splits(cfg.data, 0, t.stratify_key(cfg.task), t.reader(cfg.task))
    return t, cfg, tables


def preflight_problems(files: dict, **task) -> list[str]:
    t, cfg, tables = tables_of(files, **task)
    with pytest.raises(DataError) as caught:
        t.preflight(cfg.task, tables)
    return caught.value.problems


def answers_of(rows: list[dict]) -> list[str]:
    return [r["answers"]["text"][0] if r["answers"]["text"] else "" for r in rows]


class Oracle(torch.nn.Module):
    """A stand-in QA model that knows the answer: start and end logits peak where the answer's token ids
    occur in full in a window (so only a window holding the whole answer can answer)."""

    def __init__(self, answer_ids: list[int]):
        super().__init__()
        self.answer_ids = answer_ids
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a parameter, for the device

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        start, end = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
        n = len(self.answer_ids)
        for row, ids in enumerate(input_ids.tolist()):
            for p in range(len(ids) - n + 1):
                if ids[p : p + n] == self.answer_ids:
                    start[row, p], end[row, p + n - 1] = 10.0, 10.0
        return QuestionAnsweringModelOutput(start_logits=start, end_logits=end)


# --------------------------------------------------------------------------- reading data


def test_squad_json_and_flat_rows_read_alike(tmp_path):
    rows = qa_rows(6, unanswerable=True)
    squad = write_squad(tmp_path / "train.json", rows, v2=True)
    table = read_squad(squad, "utf-8", "data.train_file")
    assert list(table.frame["question"]) == [r["question"] for r in rows]
    assert table.where(3) == f"{squad} record 'q3' (data[0].paragraphs[3].qas[0])"
    assert table.frame["is_impossible"].tolist() == [False, False, False, True, False, False]
    # Flat JSONL, and CSV whose answers cell holds JSON; custom column names for the flat formats.
    flat = [{"q": r["question"], "passage": r["context"], "gold": r["answers"]} for r in rows]
    write_jsonl(tmp_path / "train.jsonl", flat)
    write_csv(tmp_path / "train.csv", [{**r, "gold": json.dumps(r["gold"])} for r in flat])
    names = {"question_column": "q", "context_column": "passage", "answers_column": "gold"}
    found = {}
    for name in ("train.json", "train.jsonl", "train.csv"):
        t, cfg, tables = tables_of({"train": tmp_path / name, "validation": tmp_path / name}, **names)
        state, warnings = t.preflight(cfg.task, tables)
        assert state.version_2 is True and warnings == []  # auto: an unanswerable question makes it v2
        examples, problems, mismatches, _ = read_examples(cfg.task, tables["train"])
        assert problems == mismatches == []
        found[name] = [(e.question, e.context, e.answers) for e in examples]
    assert found["train.json"] == found["train.jsonl"] == found["train.csv"]
    assert found["train.json"][0] == (rows[0]["question"], rows[0]["context"], [(rows[0]["answers"]["text"][0], 0)])
    assert found["train.json"][3][2] == []


def test_window_labels_and_an_answer_straddling_two_windows(tiny_bert, tmp_path):
    """A long context becomes overlapping windows; only a window holding the whole answer is labelled with
    it (the others point at CLS), and prediction finds the answer from that window."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    words = [w for r in qa_rows(10, seed=4) for w in r["context"].split()]
    context = " ".join(words)
    question = "who lives in paris ?"
    budget = 32 - len(tokenizer(question)["input_ids"]) - 1  # context tokens per window
    # The answer starts two tokens before the end of the first window: it straddles windows 1 and 2.
    plain = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    start_char = plain["offset_mapping"][budget - 2][0]
    end_char = plain["offset_mapping"][budget + 2][1]
    answer = context[start_char:end_char]
    features = qa.encode_windows(tokenizer, [question], [context], max_length=32, doc_stride=8)
    assert len(features) >= 3 and all(len(f["input_ids"]) <= 32 for f in features)
    labelled = []
    for f in features:
        s, e = qa.answer_tokens(f["offsets"], start_char, end_char, f["cls_index"])
        if (s, e) != (f["cls_index"], f["cls_index"]):
            labelled.append(f)
            assert context[f["offsets"][s][0] : f["offsets"][e][1]] == answer
    # Window 1 holds only the answer's beginning: CLS. Window 2 (overlapping by doc_stride) holds all of it.
    first_context = [o for o in features[0]["offsets"] if o[0] >= 0]
    assert first_context[0][0] <= start_char < first_context[-1][1] < end_char
    assert len(labelled) == 1 and labelled[0] is features[1]
    oracle = Oracle(tokenizer(answer, add_special_tokens=False)["input_ids"])
    (found,) = qa.answer(oracle, tokenizer, [question], [context], max_length=32, doc_stride=8)
    assert (found["answer"], found["start"], found["end"]) == (answer, start_char, end_char)
    assert 0.9 < found["score"] <= 1.0


def test_unicode_offsets(tiny_bert):
    """Accents, emoji, CJK and repeated spaces: labels and predictions are exact character offsets."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    context = "Zoë  visited São Paulo 🎬 with 电影 friends, café naïve résumé."
    for answer in ["Zoë", "São Paulo", "电影", "café naïve", "résumé"]:
        start = context.index(answer)
        (feature,) = qa.encode_windows(tokenizer, ["what ?"], [context], max_length=64, doc_stride=8)
        s, e = qa.answer_tokens(feature["offsets"], start, start + len(answer), feature["cls_index"])
        assert context[feature["offsets"][s][0] : feature["offsets"][e][1]] == answer
        oracle = Oracle(tokenizer(answer, add_special_tokens=False)["input_ids"])
        (found,) = qa.answer(oracle, tokenizer, ["what ?"], [context], max_length=64, doc_stride=8)
        assert (found["start"], found["end"], found["answer"]) == (start, start + len(answer), answer)


def test_answer_works_on_any_qa_model(tiny_bert, tmp_path):
    """`qa.answer` on a plain, untrained transformers model: the best span is the argmax of start + end
    logits over the context, as computed here from the model's own outputs."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(1)
    model = BertForQuestionAnswering(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)).eval()
    rows = qa_rows(5, seed=2)
    found = qa.answer(model, tokenizer, [r["question"] for r in rows], [r["context"] for r in rows], max_length=64, doc_stride=16, max_answer_length=4)
    top = qa.answer(model, tokenizer, [rows[0]["question"]], [rows[0]["context"]], max_length=64, doc_stride=16, max_answer_length=4, top_k=3)
    for row, got in zip(rows, found):
        batch = tokenizer(row["question"], row["context"], return_offsets_mapping=True, return_tensors="pt")
        offsets = batch.pop("offset_mapping")[0]
        with torch.no_grad():
            out = model(**batch)
        context = [p for p, s in enumerate(batch.sequence_ids(0)) if s == 1]
        best = max(((s, e) for s in context for e in context if 0 <= e - s < 4),
                   key=lambda p: float(out.start_logits[0, p[0]] + out.end_logits[0, p[1]]))
        assert (got["start"], got["end"]) == (int(offsets[best[0]][0]), int(offsets[best[1]][1]))
        assert got["answer"] == row["context"][got["start"] : got["end"]]
    assert len(top[0]) == 3 and top[0][0] == pytest.approx(found[0]) and top[0][0]["score"] >= top[0][1]["score"] >= top[0][2]["score"]
    with pytest.raises(ConfigError, match="needs a fast tokenizer .* found BertTokenizerLegacy"):
        qa.answer(model, _legacy(tokenizer, tmp_path), ["who ?"], ["chen lives in paris ."])
    with pytest.raises(DataError, match=r"questions\[1\]: empty"):
        qa.answer(model, tokenizer, ["who ?", " "], ["a", "b"], max_length=64, doc_stride=16)


def _legacy(tokenizer, folder: Path):
    """The same vocabulary as a slow (Python) tokenizer, which has no offset mapping."""
    from transformers import BertTokenizerLegacy

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)) + "\n", encoding="utf-8")
    return BertTokenizerLegacy(vocab_file=str(vocab))


# --------------------------------------------------------------------------- preflight errors


def _write_rows(path: Path, rows: list[dict]) -> Path:
    return write_jsonl(path, rows) if path.suffix == ".jsonl" else write_squad(path, rows, v2=True)


def test_answer_start_mismatch_counted_and_repaired(tmp_path, tiny_bert):
    rows, valid = qa_rows(6), qa_rows(3, seed=9)
    rows[1]["answers"]["answer_start"] = [3]  # off by some characters
    rows[4]["answers"]["answer_start"] = [999]  # past the end of the context
    valid[0]["answers"]["answer_start"] = [1]  # validation: scored by text, so located rather than refused
    # The answer occurs twice: repair picks the occurrence nearest to the wrong offset.
    twice = "paris is in france ; chen lives in paris ."
    rows.append({"id": "twice", "question": "where does chen live ?", "context": twice, "answers": {"text": ["paris"], "answer_start": [33]}})
    files = {"train": _write_rows(tmp_path / "train.jsonl", rows), "validation": _write_rows(tmp_path / "valid.json", valid)}
    problems = preflight_problems(files)
    assert problems[0] == (
        f"3 answers have an answer_start that does not point at their text ({files['train']}: 3); "
        "set task.repair=true to move each to the nearest occurrence of its text, or fix the offsets"
    )
    text = rows[1]["answers"]["text"][0]
    context = rows[1]["context"]
    assert problems[1] == (
        f"{files['train']} line 2: answer 1 {text!r} has answer_start 3, but the context there reads {context[3:3 + len(text)]!r}; "
        f"expected the offset of the text (nearest occurrence: {context.index(text)}); fix it, or set task.repair=true"
    )
    assert not any(str(files["validation"]) in p for p in problems), problems
    t, cfg, tables = tables_of(files, repair=True)
    state, warnings = t.preflight(cfg.task, tables)
    found = valid[0]["context"].index(valid[0]["answers"]["text"][0])
    assert warnings == [
        f"located 1 evaluation answer by its text: the answer_start was missing or did not point at the text "
        f"(e.g. {files['validation']} record 'q0' (data[0].paragraphs[0].qas[0]): answer 1 {valid[0]['answers']['text'][0]!r} "
        f"has answer_start 1, found at {found}); evaluation compares answer texts only, so nothing needs fixing",
        "task.repair: moved 3 answer_start offsets to the nearest occurrence of their answer text",
    ]
    examples, _, _, _ = read_examples(cfg.task, tables["train"])
    assert examples[-1].answers == [("paris", twice.rindex("paris"))]
    assert [e.answers[0][1] for e in examples[:6]] == [r["context"].index(r["answers"]["text"][0]) for r in rows[:6]]


@pytest.mark.parametrize(
    "broken, fragments",
    [
        ("not_in_context", ["line 2: answer 1 'tokyo' does not occur in the context", "fix the answer text"]),
        ("empty_question", ["line 2: 'question' is empty; expected the question text"]),
        ("empty_context", ["line 2: 'context' is empty; expected the context text"]),
        ("missing_column", ["missing column 'answers' (task.answers_column); columns found: id, question, context", "set task.answers_column"]),
        ("bad_answers", ["line 2: column 'answers' is {'text': 'x'}; expected {\"text\": [\"<answer>\"], \"answer_start\": [<character offset>]}"]),
        ("lengths", ["line 2: column 'answers' has 2 answer texts but 1 answer_start offsets"]),
        ("impossible_with_answer", ["record 'q1' (data[0].paragraphs[1].qas[0]): is_impossible is true but the record has 1 answer(s)"]),
        ("v1_with_unanswerable", ["line 4: the question has no answer, but task.version_2_with_negative is false"]),
        ("squad_missing_question", ["record 'q2' (data[0].paragraphs[2].qas[0]): missing field 'question'"]),
        ("squad_bad_answer", ["record 'q2' (data[0].paragraphs[2].qas[0]): answers[0]: expected {\"text\": <answer text>, \"answer_start\""]),
        ("csv_answers_not_json", ["line 3: column 'answers' is '[paris', not JSON"]),
    ],
)
def test_preflight_errors(broken, fragments, tmp_path):
    rows = qa_rows(6, unanswerable=broken == "v1_with_unanswerable")
    task, name = {}, "train.jsonl"
    if broken == "not_in_context":
        rows[1]["answers"]["text"] = ["tokyo"]
        task = {"repair": True}  # nothing to repair to
    elif broken in ("empty_question", "empty_context"):
        rows[1][broken.split("_")[1]] = "  "
    elif broken == "missing_column":
        rows = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
    elif broken == "bad_answers":
        rows[1]["answers"] = {"text": "x"}
    elif broken == "lengths":
        rows[1]["answers"] = {"text": ["a", "b"], "answer_start": [0]}
    elif broken == "v1_with_unanswerable":
        task = {"version_2_with_negative": False}
    if broken.startswith(("squad", "impossible")):
        name = "train.json"
        doc = squad_document(rows, v2=True)
        record = doc["data"][0]["paragraphs"][2 if broken.startswith("squad") else 1]["qas"][0]
        if broken == "squad_missing_question":
            del record["question"]
        elif broken == "squad_bad_answer":
            record["answers"][0] = {"text": record["answers"][0]["text"]}
        else:
            record["is_impossible"] = True
        (tmp_path / name).write_text(json.dumps(doc), encoding="utf-8")
    elif broken == "csv_answers_not_json":
        name = "train.csv"
        write_csv(tmp_path / name, [{**r, "answers": json.dumps(r["answers"])} for r in rows])
        text = (tmp_path / name).read_text(encoding="utf-8").splitlines()
        text[2] = re.sub(r'"\{.*\}"', "[paris", text[2])
        (tmp_path / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    else:
        write_jsonl(tmp_path / name, rows)
    path = tmp_path / name
    with pytest.raises(DataError) as caught:
        t, cfg, tables = tables_of({"train": path, "validation": path}, **task)
        t.preflight(cfg.task, tables)
    first = caught.value.problems[0]
    assert first.startswith(str(path)), first
    for fragment in fragments:
        assert fragment in first, f"{fragment!r} not in {first!r}"
    assert all("\n" not in p for p in caught.value.problems)


def test_slow_tokenizer_and_long_question_fail_before_the_run(tmp_path, tiny_bert):
    rows = qa_rows(8)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    _legacy(AutoTokenizer.from_pretrained(tiny_bert), legacy).save_pretrained(legacy)
    cfg = qa_config(tiny_bert, train, tmp_path / "run", model={"name_or_path": str(tiny_bert), "tokenizer_name_or_path": str(legacy)})
    with pytest.raises(ConfigError) as caught:
        tunesmith.train(cfg, show_progress=False)
    (problem,) = caught.value.problems
    assert "needs a fast tokenizer" in problem and "found BertTokenizerLegacy" in problem and "tokenizer.json" in problem
    rows[2]["question"] = " ".join(["who"] * 40) + " lives in paris ?"
    write_jsonl(train, rows)
    with pytest.raises(DataError) as caught:
        tunesmith.train(qa_config(tiny_bert, train, tmp_path / "run"), show_progress=False)
    problem = caught.value.problems[0]
    assert problem.startswith(f"{train} line 3: the question is ") and "expected at most 28 (max_length 48 minus special tokens minus doc_stride 16" in problem
    assert "raise task.max_length or lower task.doc_stride" in problem
    assert not (tmp_path / "run").exists()


def test_cli_reports_data_errors_with_exit_2(tmp_path, tiny_bert):
    rows = qa_rows(6)
    rows[2]["answers"]["answer_start"] = [0]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(qa_config(tiny_bert, tmp_path / "train.jsonl", tmp_path / "run")), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "-q"])
    assert result.exit_code == 2, result.output
    assert "1 answers have an answer_start that does not point at their text" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- metrics


def official_normalize(s: str) -> str:
    """The official SQuAD v1.1 evaluation script's normalize_answer, verbatim in behaviour."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def official_f1(prediction: str, gold: str) -> float:
    p, g = official_normalize(prediction).split(), official_normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    return 0.0 if common == 0 else 2 * (common / len(p)) * (common / len(g)) / (common / len(p) + common / len(g))


def test_metrics_follow_the_official_script_and_score_cjk_by_character():
    pairs = [("The Eiffel-Tower!", "eiffel tower"), ("an apple a day", "Apple"), ("  Théâtre  du   Soleil ", "théâtre du soleil"),
             ("1990—1995", "1990 1995"), ("U.S.A.", "usa"), ("the cat sat", "a cat sat on the mat"), ("anthem", "the anthem")]
    for prediction, gold in pairs:
        assert normalize_answer(prediction) == official_normalize(prediction)
        assert token_f1(prediction, gold) == pytest.approx(official_f1(prediction, gold))
    # Chinese has no spaces: the official tokens would make each answer one word (F1 0 for a partial answer).
    assert official_f1("北京大学", "北京") == 0.0
    assert token_f1("北京大学", "北京") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("北京，", "北京") == 1.0 and normalize_answer("「東京」です。") == "東京です"
    metrics = squad_metrics(["paris", "", "chen", "oslo"], [["Paris", "paris france"], [], ["maria"], []])
    assert metrics["exact_match"] == pytest.approx(0.5) and metrics["f1"] == pytest.approx(0.5)
    assert (metrics["has_answer_total"], metrics["no_answer_total"]) == (2, 2)
    assert metrics["has_answer_exact_match"] == 0.5 and metrics["no_answer_exact_match"] == 0.5
    assert "has_answer_f1" not in squad_metrics(["paris"], [["paris"]])


def test_null_threshold_search():
    # margins: no-answer score minus best span score; span scores: F1 of the best span.
    margins = np.array([-3.0, -1.0, 0.5, 2.0, 4.0])
    spans = np.array([1.0, 1.0, 0.0, 0.0, 1.0])
    has_answer = np.array([True, True, False, False, True])
    threshold, best = best_null_threshold(margins, spans, has_answer)
    # Answer the first two (margins <= -1), nothing for the next two, lose the last: 4 of 5 right; the
    # threshold sits in the middle between the last margin answered and the first one not answered.
    assert (threshold, best) == (-0.25, pytest.approx(4 / 5))
    # Equal margins are answered together, never split by the threshold: here answering both gains nothing.
    assert best_null_threshold(np.array([1.0, 1.0]), np.array([1.0, 0.0]), np.array([True, False])) == (0.0, 0.5)
    assert best_null_threshold(np.array([1.0, 2.0]), np.array([1.0, 1.0]), np.array([True, True])) == (3.0, 1.0)


# --------------------------------------------------------------------------- strategies

# Adapters and head-only training start from a body fine-tuned on other toy questions (`qa_body`), with a
# fresh head: a random body has nothing worth adapting. Full fine-tuning starts from the random tiny BERT.
EPOCHS = {"full": 20, "last_n": 10, "frozen": 10, "lora": 10, "dora": 10, "ia3": 10}
QA_LEARNING_RATES = {"full": 1e-2, "last_n": 1e-2, "frozen": 3e-2, "lora": 3e-2, "dora": 3e-2, "ia3": 1e-1}
MIN_F1 = {"full": 0.95, "last_n": 0.85, "frozen": 0.8, "lora": 0.9, "dora": 0.9, "ia3": 0.85}


@pytest.fixture(scope="module")
def qa_body(tiny_bert, tmp_path_factory):
    """The tiny BERT fully fine-tuned on 48 other toy questions, saved without its QA head."""
    work = tmp_path_factory.mktemp("qa-body")
    train = write_jsonl(work / "train.jsonl", qa_rows(48, seed=11))
    run = tunesmith.train(qa_config(tiny_bert, train, work / "run", train={"learning_rate": 1e-2, "num_train_epochs": 20}),
                          show_progress=False)
    assert run.metrics["validation"]["f1"] >= 0.95, run.metrics["validation"]
    AutoModelForQuestionAnswering.from_pretrained(run.run_dir / "model").bert.save_pretrained(work / "body")
    AutoTokenizer.from_pretrained(run.run_dir / "model").save_pretrained(work / "body")
    return work / "body"


def assert_plain_model_agrees(run_dir, rows, predictions, max_length=TASK["max_length"], doc_stride=TASK["doc_stride"]):
    """run_dir/model loads with plain AutoModelForQuestionAnswering and gives tunesmith's answers."""
    plain = AutoModelForQuestionAnswering.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    state = json.loads((run_dir / "task.json").read_text())
    again = qa.answer(plain, tokenizer, [r["question"] for r in rows], [r["context"] for r in rows], max_length=max_length,
                      doc_stride=doc_stride, handle_impossible_answer=state["version_2"], null_threshold=state["null_score_threshold"])
    assert [(a["answer"], a["start"], a["end"]) for a in again] == [(p["answer"], p["start"], p["end"]) for p in predictions]
    assert [a["score"] for a in again] == pytest.approx([p["score"] for p in predictions], abs=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_overfit_save_reload_predict(method, tiny_bert, qa_body, tmp_path):
    rows = qa_rows(24)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    source = tiny_bert if method == "full" else qa_body
    cfg = qa_config(source, train, tmp_path / "run", method=METHODS[method],
                    train={"learning_rate": QA_LEARNING_RATES[method], "num_train_epochs": EPOCHS[method]})
    result = tunesmith.train(cfg, show_progress=False)
    valid = result.metrics["validation"]
    assert valid["f1"] >= MIN_F1[method], valid
    assert valid["samples"] == 24 and valid["windows"] >= 24 and result.metrics["train"]["metric_for_best_model"] == "f1"

    pairs = [(r["question"], r["context"]) for r in rows]
    predictions = tunesmith.predict(result.run_dir, pairs)
    assert all(r["context"][p["start"] : p["end"]] == p["answer"] for r, p in zip(rows, predictions))
    # SQuAD's exact match compares normalised answers ("acme ." is "acme").
    exact = np.mean([exact_match(p["answer"], a) for p, a in zip(predictions, answers_of(rows))])
    # predict, evaluate (both the saved model in fp32) and the in-training evaluation agree on the train rows.
    assert exact == pytest.approx(tunesmith.evaluate(result.run_dir, train)["exact_match"])
    assert exact == pytest.approx(valid["exact_match"])
    again = tunesmith.load(result.run_dir).predict([{"question": q, "context": c} for q, c in pairs])
    assert again == predictions
    assert_plain_model_agrees(result.run_dir, rows, predictions)
    card = (result.run_dir / "README.md").read_text()
    assert "from tunesmith.qa import answer" in card and "pipeline(" not in card and "regression" not in card
    if method in {"lora", "dora", "ia3"}:
        config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "QUESTION_ANS" and "qa_outputs" in config["modules_to_save"]


def test_frozen_feature_cache_trains_like_the_encoder(qa_body, tmp_path):
    """QA heads read every position; the loss leaves padding out, so cached features (zeros at padding)
    train exactly like the real encoder."""
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(12, seed=3))
    runs = {}
    for cache in (True, False):
        cfg = qa_config(qa_body, train, tmp_path / f"run-{cache}", method={"name": "frozen"},
                        train={"learning_rate": 3e-2, "num_train_epochs": 3, "cache_frozen_features": cache})
        runs[cache] = tunesmith.train(cfg, show_progress=False)
    weights = [AutoModelForQuestionAnswering.from_pretrained(runs[c].run_dir / "model").qa_outputs.weight for c in (True, False)]
    assert torch.allclose(*weights, atol=1e-5)
    losses = [[r["loss"] for r in map(json.loads, (runs[c].run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]
              for c in (True, False)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


# --------------------------------------------------------------------------- SQuAD v2: questions without answer


@pytest.fixture(scope="module")
def v2_run(qa_body, tmp_path_factory):
    """Full fine-tuning on SQuAD v2 JSON in which every fourth question has no answer."""
    work = tmp_path_factory.mktemp("qa-v2")
    rows = qa_rows(32, seed=5, unanswerable=True)
    train = write_squad(work / "train.json", rows, v2=True)
    result = tunesmith.train(qa_config(qa_body, train, work / "run", train={"learning_rate": 1e-2, "num_train_epochs": 15}),
                             show_progress=False)
    return result, rows, train


def test_v2_no_answer_metrics_threshold_and_predictions(v2_run):
    result, rows, _ = v2_run
    valid = result.metrics["validation"]
    assert (valid["has_answer_total"], valid["no_answer_total"]) == (24, 8)
    assert valid["f1"] >= 0.9 and valid["no_answer_exact_match"] >= 0.85, valid
    state = json.loads((result.run_dir / "task.json").read_text())
    # The threshold tuned on validation is saved with the run and is the one its final metrics used.
    assert state["version_2"] is True and state["null_score_threshold"] == pytest.approx(valid["best_f1_threshold"])
    assert valid["null_score_threshold"] == pytest.approx(state["null_score_threshold"]) and valid["f1"] == pytest.approx(valid["best_f1"])
    predictions = tunesmith.predict(result.run_dir, [(r["question"], r["context"]) for r in rows])
    empty = [p for p, r in zip(predictions, rows) if not r["answers"]["text"]]
    assert sum(p["answer"] == "" and p["start"] is None and p["end"] is None for p in empty) >= 7
    assert np.mean([p["answer"] == a for p, a in zip(predictions, answers_of(rows))]) == pytest.approx(valid["exact_match"])
    assert_plain_model_agrees(result.run_dir, rows, predictions)


def test_evaluation_streams_spans_and_eval_command(v2_run, tmp_path):
    """Evaluation keeps one span (and a no-answer score) per question, never the windows' logits; `tunesmith
    eval` on the SQuAD file gives the run's validation metrics."""
    from tunesmith.api import make_accelerator
    from tunesmith.data.batching import eval_loader
    from tunesmith.loop.evaluation import run_evaluation

    result, _, train = v2_run
    loaded = tunesmith.load(result.run_dir)
    table = loaded.task.reader(loaded.config.task)(train, "utf-8", "DATA")
    dataset = loaded.task.encode(loaded.config.task, table, loaded.tokenizer, loaded.state)
    loader = eval_loader(dataset, loaded.tokenizer, 4, loaded.task.collator(loaded.tokenizer))
    references = loaded.task.references(loaded.config.task, table, loaded.state)
    loss_fn = loaded.task.loss_fn(loaded.config.task, loaded.state, None)
    metrics, accumulator = run_evaluation(loaded.model, loader, loaded.task, loaded.state, loss_fn, make_accelerator("no"), references)
    assert isinstance(accumulator, SpanAccumulator) and accumulator.windows == len(dataset) > 8
    kept = [span for spans in accumulator.spans.spans.values() for span in spans]
    assert len(kept) <= 32 and all(isinstance(span, qa.Span) for span in kept) and len(accumulator.spans.null) == 32
    assert metrics["f1"] == pytest.approx(result.metrics["validation"]["f1"])
    out = tmp_path / "metrics.json"
    cli = CliRunner().invoke(app, ["eval", str(result.run_dir), str(train), "-o", str(out)])
    assert cli.exit_code == 0, cli.output
    assert json.loads(out.read_text())["f1"] == pytest.approx(metrics["f1"])


def test_cli_predict_questions_and_files(v2_run, tmp_path):
    result, rows, train = v2_run
    run = str(result.run_dir)
    first, second = rows[0], rows[1]
    cli = CliRunner().invoke(app, ["predict", run, "--question", first["question"], "--context", first["context"],
                                   "--question", second["question"], "--context", second["context"]])
    assert cli.exit_code == 0, cli.output
    records = [json.loads(line) for line in cli.stdout.splitlines() if line.startswith("{")]
    assert [r["question"] for r in records] == [first["question"], second["question"]]
    assert [r["answer"] for r in records] == answers_of(rows[:2]) and all({"score", "start", "end"} <= set(r) for r in records)
    # One context for several questions; JSONL and SQuAD JSON files (ids are echoed).
    cli = CliRunner().invoke(app, ["predict", run, "--context", first["context"], "--question", first["question"], "--question", "where does x live ?"])
    assert cli.exit_code == 0 and len([line for line in cli.stdout.splitlines() if line.startswith("{")]) == 2, cli.output
    write_jsonl(tmp_path / "in.jsonl", [{"id": r["id"], "question": r["question"], "context": r["context"]} for r in rows[:4]])
    for source in (tmp_path / "in.jsonl", train):
        out = tmp_path / "out.jsonl"
        cli = CliRunner().invoke(app, ["predict", run, "--input", str(source), "-o", str(out)])
        assert cli.exit_code == 0, cli.output
        records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        expected = tunesmith.predict(result.run_dir, [(r["question"], r["context"]) for r in rows[:4]])
        assert [records[r["id"]]["question"] for r in rows[:4]] == [r["question"] for r in rows[:4]]
        assert [records[r["id"]]["answer"] for r in rows[:4]] == [p["answer"] for p in expected]
    cli = CliRunner().invoke(app, ["predict", run, "--question", "who ?", "--question", "what ?", "--context", "a", "--context", "b", "--context", "c"])
    assert cli.exit_code == 2 and "found 2 --question and 3 --context" in cli.output
    cli = CliRunner().invoke(app, ["predict", run, "--text", "who lives in paris ?"])
    assert cli.exit_code == 2 and "--question" in cli.output


# --------------------------------------------------------------------------- model families

FAMILY_NAMES = ["bert", "roberta", "xlnet", "bart", "deberta-v2"]
# Character-level pieces make XLNet's and DeBERTa's toy sequences long: they learn more slowly.
# XLNet at the others' 2e-2 was unstable: validation F1 0.61-0.89 across seeds and CPUs (0.61 on a
# Zen 5 EPYC); at 1e-2 for 30 epochs it measured 1.0 / 0.95 / 0.91 for seeds 0 / 1 / 2 there.
FAMILY_EPOCHS = {"xlnet": 30, "deberta-v2": 20}
FAMILY_LR = {"xlnet": 1e-2}
FAMILY_MIN_F1 = {"xlnet": 0.75, "deberta-v2": 0.65}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    return FamilyCache(tmp_path_factory.mktemp("families-qa"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_model_families(family, family_model, tmp_path):
    """Each family's tokenizer (WordPiece; byte-level BPE with `<s>` and trimmed offsets; Unigram with
    `<cls>` last and left padding; ...) gives exact answer labels in every window, the run learns, the saved
    model is a plain `AutoModelForQuestionAnswering`, and padding never changes an answer."""
    rows, max_length = qa_rows(24), 64
    source = family_model(family)
    tokenizer = AutoTokenizer.from_pretrained(source)
    features = qa.encode_windows(tokenizer, [r["question"] for r in rows], [r["context"] for r in rows], max_length, 16)
    assert len(features) >= len(rows)  # one or more windows per question (byte and character pieces need more)
    labelled = set()
    for f in features:
        row = rows[f["example_index"]]
        start = row["answers"]["answer_start"][0]
        s, e = qa.answer_tokens(f["offsets"], start, start + len(row["answers"]["text"][0]), f["cls_index"])
        assert f["input_ids"][f["cls_index"]] == (tokenizer.cls_token_id if tokenizer.cls_token_id is not None else f["input_ids"][0])
        if s != f["cls_index"]:
            assert row["context"][f["offsets"][s][0] : f["offsets"][e][1]].strip() == row["answers"]["text"][0]
            labelled.add(f["example_index"])
    assert labelled == set(range(len(rows)))
    assert qa.question_first(tokenizer) is (family != "xlnet")  # XLNet pads left: context first, <cls> last

    cfg = qa_config(source, write_jsonl(tmp_path / "train.jsonl", rows), tmp_path / "run", task={"max_length": max_length},
                    train={"learning_rate": FAMILY_LR.get(family, 2e-2), "num_train_epochs": FAMILY_EPOCHS.get(family, 10),
                           "per_device_train_batch_size": 4})
    result = tunesmith.train(cfg, show_progress=False)
    assert result.metrics["validation"]["f1"] >= FAMILY_MIN_F1.get(family, 0.8), result.metrics["validation"]
    predictions = tunesmith.predict(result.run_dir, [(r["question"], r["context"]) for r in rows])
    assert all(r["context"][p["start"] : p["end"]] == p["answer"] for r, p in zip(rows, predictions))
    assert_plain_model_agrees(result.run_dir, rows, predictions, max_length=max_length)
    plain = AutoModelForQuestionAnswering.from_pretrained(result.run_dir / "model").eval()
    saved = AutoTokenizer.from_pretrained(result.run_dir / "model")
    assert saved.padding_side == tokenizer.padding_side
    alone = qa.answer(plain, saved, [r["question"] for r in rows[:8]], [r["context"] for r in rows[:8]], max_length=max_length,
                      doc_stride=16, batch_size=1)
    assert [(a["start"], a["end"]) for a in alone] == [(p["start"], p["end"]) for p in predictions[:8]]
    assert [a["score"] for a in alone] == pytest.approx([p["score"] for p in predictions[:8]], abs=1e-4)


# --------------------------------------------------------------------------- config and docs


def test_example_config_and_reference():
    cfg = load_config(ROOT / "configs" / "qa.yaml")
    t = get_task(cfg.task.name)
    tables, _ = make_splits(cfg.data, cfg.train.seed, t.stratify_key(cfg.task), t.reader(cfg.task))
    state, warnings = t.preflight(cfg.task, tables)
    assert state.version_2 is True and warnings == []
    assert sum(len(table.frame) for table in tables.values()) >= 12
    reference = config_reference()
    assert "## `task (name: question_answering)`" in reference
    assert all(f"| `{name}` |" in reference for name in QuestionAnsweringTaskConfig.model_fields)
    with pytest.raises(ConfigError, match=r"task: doc_stride \(400\) must be less than max_length \(384\)"):
        parse_config({"task": {"name": "question_answering", "doc_stride": 400}})
