"""Data loaders and splits: every supported format reads the same rows, splits are carved stratified and
seeded, label maps are stable, and non-Latin text survives untouched.

Formats are checked through `make_splits` (what `train` uses) rather than one training each; one real
tiny training reads a Parquet file end to end.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

import tunesmith
from tiny import sentiment_rows, tiny_config
from tunesmith.config import DataConfig, parse_config
from tunesmith.tasks.classification.config import ClassificationTaskConfig
from tunesmith.data.loaders import read_file
from tunesmith.data.splits import make_splits
from tunesmith.errors import DataError
from tunesmith.tasks import get_task

UNICODE_TEXTS = [
    "这部电影很好看，演员也很棒",  # Chinese
    "café naïve résumé — très émouvant",  # accents
    "🎬🍿 loved it 😍",  # emoji, outside the BMP
    "ひどい映画だった",  # Japanese
    "فيلم رائع جدا",  # Arabic, right to left
    "Ünïcödé ß Ω ж",
    'quotes "inside", commas, and\ttabs',
    "NA",  # pandas reads this as missing by default: it is a text here
]


def _rows(n: int = 24) -> list[dict]:
    rows = sentiment_rows(n, seed=11)
    for row, text in zip(rows, UNICODE_TEXTS):
        row["text"] = text
    return rows


def _texts(table) -> list[str]:
    return table.frame["text"].tolist()


def _labels(table) -> list:
    return table.frame["label"].tolist()


# --------------------------------------------------------------------------- writers, one per format


def _csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _csv_bom(path: Path, rows: list[dict]) -> Path:
    # Excel writes UTF-8 with a byte-order mark; the first header must still be `text`.
    pd.DataFrame(rows).to_csv(path, index=False, encoding="utf-8-sig")
    return path


def _tsv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False, sep="\t")
    return path


def _json_records(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _json_data(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"version": 1, "data": rows}), encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(3, "")  # a blank line is skipped, and line numbers still match the file
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


# format: (suffix, writer, where row 0 is, where row 3 is)
FORMATS = {
    "csv": (".csv", _csv, "line 2", "line 5"),
    "csv_bom": (".csv", _csv_bom, "line 2", "line 5"),
    "tsv": (".tsv", _tsv, "line 2", "line 5"),
    "json_records": (".json", _json_records, "record 1", "record 4"),
    "json_data_key": (".json", _json_data, "record 1", "record 4"),
    "jsonl": (".jsonl", _jsonl, "line 1", "line 5"),  # line 4 is blank
    "parquet": (".parquet", _parquet, "row 1", "row 4"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_loads_train_and_validation(fmt, tmp_path):
    suffix, write, first_where, fourth_where = FORMATS[fmt]
    train_rows, valid_rows = _rows(24), sentiment_rows(8, seed=12)
    train = write(tmp_path / f"train{suffix}", train_rows)
    valid = write(tmp_path / f"valid{suffix}", valid_rows)

    tables, notes = make_splits(DataConfig(train_file=str(train), validation_file=str(valid)), seed=0)

    assert notes == []
    assert set(tables) == {"train", "validation"}
    assert list(tables["train"].frame.columns) == ["text", "label"]
    assert _texts(tables["train"]) == [r["text"] for r in train_rows]  # every row, in order, unicode intact
    assert _labels(tables["train"]) == [r["label"] for r in train_rows]
    assert _texts(tables["validation"]) == [r["text"] for r in valid_rows]
    assert tables["train"].where(0) == f"{train} {first_where}"
    assert tables["train"].where(3) == f"{train} {fourth_where}"
    # And preflight accepts what was loaded.
    task = get_task("classification")
    state, _ = task.preflight(ClassificationTaskConfig(), tables)
    assert state.labels == ["neg", "pos"]


def test_save_to_disk_dataset_dict(tmp_path):
    import datasets

    train_rows, valid_rows = _rows(20), sentiment_rows(6, seed=13)
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train_rows), "validation": datasets.Dataset.from_list(valid_rows)}
    ).save_to_disk(str(folder))

    tables, notes = make_splits(DataConfig(train_file=str(folder)), seed=0)

    assert notes == []  # the saved validation split is used, nothing carved
    assert _texts(tables["train"]) == [r["text"] for r in train_rows]
    assert _texts(tables["validation"]) == [r["text"] for r in valid_rows]
    assert _labels(tables["validation"]) == [r["label"] for r in valid_rows]
    assert tables["validation"].where(1) == f"{folder}[validation] row 2"
    # The same folder named as a data set works too, and a `dev` split counts as validation.
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train_rows), "dev": datasets.Dataset.from_list(valid_rows)}
    ).save_to_disk(str(tmp_path / "dev"))
    tables, _ = make_splits(DataConfig(dataset_name=str(tmp_path / "dev")), seed=0)
    assert sorted(tables) == ["train", "validation"]
    assert len(tables["validation"].frame) == 6


def test_json_mapping_of_columns(tmp_path):
    rows = _rows(10)
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}), encoding="utf-8")
    assert _texts(read_file(path)) == [r["text"] for r in rows]


def test_json_file_holding_json_lines(tmp_path):
    rows = _rows(12)
    path = tmp_path / "train.json"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert _texts(read_file(path)) == [r["text"] for r in rows]


def test_numeric_csv_labels_stay_numbers(tmp_path):
    rows = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in _rows(10)]
    table = read_file(_csv(tmp_path / "train.csv", rows))
    assert _labels(table) == [r["label"] for r in rows]
    assert pd.api.types.is_integer_dtype(table.frame["label"])
    assert table.frame["text"].tolist()[7] == "NA"


def test_unsupported_suffix_and_folder(tmp_path):
    (tmp_path / "train.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match=r"has suffix '.xlsx'; expected one of .csv .tsv .json .jsonl .parquet"):
        read_file(tmp_path / "train.xlsx")
    with pytest.raises(DataError, match="is a folder but not a dataset saved with `save_to_disk`"):
        make_splits(DataConfig(train_file=str(tmp_path)), seed=0)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=rf"{path}: cannot read as Parquet .*is the file complete\?"):
        read_file(path)


# --------------------------------------------------------------------------- carving a validation split


def _imbalanced(tmp_path: Path) -> Path:
    rows = [{"text": f"review number {i}", "label": "a" if i % 5 else "b"} for i in range(100)]  # 80 a, 20 b
    return _csv(tmp_path / "train.csv", rows)


def _carve(path: Path, seed: int, **data) -> dict:
    task = get_task("classification")
    tables, notes = make_splits(
        DataConfig(train_file=str(path), validation_split=0.2, **data), seed, task.stratify_key(ClassificationTaskConfig())
    )
    return tables


def test_validation_carve_out_is_stratified_and_seeded(tmp_path):
    path = _imbalanced(tmp_path)
    first, again, other = _carve(path, 7), _carve(path, 7), _carve(path, 8)

    valid = _texts(first["validation"])
    assert valid == _texts(again["validation"])  # same seed, same split
    assert valid != _texts(other["validation"])  # another seed, another split
    assert len(valid) == 20
    assert Counter(_labels(first["validation"])) == {"a": 16, "b": 4}  # 80:20 kept
    assert Counter(_labels(first["train"])) == {"a": 64, "b": 16}
    everything = pd.read_csv(path)["text"].tolist()
    assert sorted(valid + _texts(first["train"])) == sorted(everything)
    assert not set(valid) & set(_texts(first["train"]))
    # Carved rows still point at their line in the file.
    row = first["validation"].frame.iloc[0]
    line = int(first["validation"].where(0).rsplit(" ", 1)[1])
    assert everything[line - 2] == row["text"]


def test_test_split_is_carved_before_validation(tmp_path):
    tables = _carve(_imbalanced(tmp_path), 0, test_split=0.1)
    assert [len(tables[s].frame) for s in ("train", "validation", "test")] == [72, 18, 10]
    assert Counter(_labels(tables["test"])) == {"a": 8, "b": 2}


def test_too_few_rows_to_stratify_still_splits(tmp_path):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate("aaaaaaab")]
    tables = _carve(_csv(tmp_path / "train.csv", rows), 0)
    assert len(tables["validation"].frame) + len(tables["train"].frame) == 8


# --------------------------------------------------------------------------- label maps


def _labels_of(rows: list[dict], tmp_path: Path, name: str) -> list[str]:
    task = get_task("classification")
    table = read_file(_csv(tmp_path / name, rows))
    state, _ = task.preflight(ClassificationTaskConfig(), {"train": table})
    return state.labels


def test_label_map_is_sorted_and_independent_of_row_order(tmp_path):
    rows = [{"text": f"text {i}", "label": lab} for i, lab in enumerate(["pos", "neg", "neutral"] * 4)]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert _labels_of(rows, tmp_path, "a.csv") == ["neg", "neutral", "pos"]
    assert _labels_of(shuffled, tmp_path, "b.csv") == ["neg", "neutral", "pos"]


def test_integer_labels_sort_numerically(tmp_path):
    rows = [{"text": f"text {i}", "label": lab} for i, lab in enumerate([10, 2, 1, 0] * 3)]
    assert _labels_of(rows, tmp_path, "a.csv") == ["0", "1", "2", "10"]  # not "0", "1", "10", "2"


def test_parquet_trains_end_to_end_with_stable_label_map(tmp_path, tiny_bert):
    """The one real training of this module: integer labels 2 and 10 from Parquet, non-Latin rows included."""
    from transformers import AutoConfig

    rows = [{"text": r["text"], "label": 10 if r["label"] == "pos" else 2} for r in sentiment_rows(40, seed=21)]
    rows += [{"text": text, "label": 10 if i % 2 else 2} for i, text in enumerate(UNICODE_TEXTS)]
    path = _parquet(tmp_path / "train.parquet", rows)
    cfg = tiny_config(tiny_bert, path, tmp_path / "run", train={"num_train_epochs": 2})

    result = tunesmith.train(cfg, show_progress=False)

    saved = AutoConfig.from_pretrained(result.model_dir)
    assert saved.id2label == {0: "2", 1: "10"}
    assert saved.label2id == {"2": 0, "10": 1}
    assert json.loads((result.run_dir / "task.json").read_text())["labels"] == ["2", "10"]
    validation = result.metrics["validation"]
    assert validation["samples"] == 12  # 25% of 48 rows carved out
    assert 0.0 <= validation["accuracy"] <= 1.0
    provenance = json.loads((result.run_dir / "provenance.json").read_text())
    assert str(path) in provenance["data_files"]
    predictions = tunesmith.predict(result.run_dir, UNICODE_TEXTS[:3])
    assert [sorted(p["scores"]) for p in predictions] == [["10", "2"]] * 3
    assert parse_config(cfg).data.train_file == str(path)
