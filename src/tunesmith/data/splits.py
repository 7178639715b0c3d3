"""Assemble train / validation / test tables from the `data` config section.

Sources: local files, a `save_to_disk` folder, a bundled data set or a hub data set. A missing
validation (or requested test) split is carved out of train, stratified by label where the task
gives one, seeded, so the same config always yields the same split.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tunesmith.assets import BUNDLED_PREFIX, bundled_dataset_frame
from tunesmith.config import DataConfig
from tunesmith.errors import DataError
from tunesmith.data.loaders import Table, is_disk_dataset, read_disk_dataset, read_file, read_hub_dataset

SPLIT_ALIASES = {"validation": ("validation", "valid", "dev", "val"), "test": ("test",)}


def _from_dataset_name(cfg: DataConfig) -> dict[str, Table]:
    name = cfg.dataset_name or ""
    if name.startswith(BUNDLED_PREFIX):
        frame = bundled_dataset_frame(name)
        return {"train": Table(frame, name, lambda i: f"row {i + 1}")}
    if is_disk_dataset(name):
        return read_disk_dataset(name)
    return read_hub_dataset(name, cfg.dataset_config_name)


Reader = Callable[[str | Path, str, str], Table]  # (path, encoding, config field) -> Table


def load_tables(cfg: DataConfig, reader: Reader = read_file) -> dict[str, Table]:
    """Read every configured source into tables keyed by split name (train, validation, test).
    `reader` reads one file (a task family may read its own formats, e.g. CoNLL)."""
    tables: dict[str, Table] = {}
    if cfg.train_file and is_disk_dataset(cfg.train_file):
        tables.update(read_disk_dataset(cfg.train_file))
    elif cfg.train_file:
        tables["train"] = reader(cfg.train_file, cfg.encoding, "data.train_file")
    elif cfg.dataset_name:
        tables.update(_from_dataset_name(cfg))
    # Normalise split names (`dev` -> validation) from disk/hub datasets.
    for canonical, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in tables and canonical not in tables:
                tables[canonical] = tables.pop(alias)
    if cfg.validation_file:
        tables["validation"] = reader(cfg.validation_file, cfg.encoding, "data.validation_file")
    if cfg.test_file:
        tables["test"] = reader(cfg.test_file, cfg.encoding, "data.test_file")
    if "train" not in tables:
        raise DataError(
            "data: no training data; set data.train_file (CSV, TSV, JSON, JSONL, Parquet) or data.dataset_name "
            "(e.g. bundled:rotten_tomatoes)"
        )
    return {k: v for k, v in tables.items() if k in ("train", "validation", "test")}


def _carve(table: Table, share: float, seed: int, stratify: np.ndarray | None, name: str) -> tuple[Table, Table]:
    indices = np.arange(len(table.frame))
    if len(indices) < 2:
        raise DataError(
            f"{table.source}: only {len(indices)} row(s); need at least 2 to carve out a {name} split; "
            f"add rows or give data.{name}_file"
        )
    use_stratify = stratify
    if stratify is not None:
        _, counts = np.unique(stratify, return_counts=True)
        n_holdout = max(1, int(round(share * len(indices))))
        if counts.min() < 2 or n_holdout < len(counts):
            use_stratify = None  # too few rows per class to stratify; a plain seeded split still works
    keep, holdout = train_test_split(indices, test_size=share, random_state=seed, stratify=use_stratify)
    keep, holdout = np.sort(keep), np.sort(holdout)
    source = table.source

    def sub(rows: np.ndarray, label: str) -> Table:
        frame = table.frame.iloc[rows].reset_index(drop=True)
        return Table(frame, f"{source}", lambda i, rows=rows: table.row_label(int(rows[i])))

    return sub(keep, "train"), sub(holdout, name)


def make_splits(
    cfg: DataConfig,
    seed: int,
    stratify_key: Callable[[pd.DataFrame], np.ndarray | None] | None = None,
    reader: Reader = read_file,
) -> tuple[dict[str, Table], list[str]]:
    """Load tables and carve out missing splits. Returns the tables and notes for the log."""
    tables = load_tables(cfg, reader)
    notes = list(dict.fromkeys(n for table in tables.values() for n in table.notes))  # e.g. a TSV named .csv
    key = stratify_key or (lambda frame: None)
    if "test" not in tables and cfg.test_split > 0:
        tables["train"], tables["test"] = _carve(tables["train"], cfg.test_split, seed, _safe_key(key, tables["train"]), "test")
        notes.append(f"carved a test split of {len(tables['test'].frame)} rows ({cfg.test_split:.0%}) out of train")
    if "validation" not in tables:
        tables["train"], tables["validation"] = _carve(
            tables["train"], cfg.validation_split, seed, _safe_key(key, tables["train"]), "validation"
        )
        notes.append(
            f"no validation set: carved {len(tables['validation'].frame)} rows ({cfg.validation_split:.0%}) "
            f"out of train, stratified, seed {seed}"
        )
    if cfg.max_train_samples and len(tables["train"].frame) > cfg.max_train_samples:
        tables["train"] = _head(tables["train"], cfg.max_train_samples, seed)
        notes.append(f"train truncated to {cfg.max_train_samples} rows (data.max_train_samples)")
    if cfg.max_eval_samples:
        for split in ("validation", "test"):
            if split in tables and len(tables[split].frame) > cfg.max_eval_samples:
                tables[split] = _head(tables[split], cfg.max_eval_samples, seed)
    return tables, notes


def _safe_key(key: Callable[[pd.DataFrame], np.ndarray | None], table: Table) -> np.ndarray | None:
    try:
        return key(table.frame)
    except Exception:  # labels are validated by preflight; stratification is best effort
        return None


def _head(table: Table, n: int, seed: int) -> Table:
    rows = np.sort(np.random.default_rng(seed).permutation(len(table.frame))[:n])
    frame = table.frame.iloc[rows].reset_index(drop=True)
    return Table(frame, table.source, lambda i, rows=rows: table.row_label(int(rows[i])))


def data_file_paths(cfg: DataConfig) -> list[Path]:
    """The files a run read its data from (provenance hashes each): a data folder (a folder of text files, a
    save_to_disk folder) counts every file in it, hidden ones (.git, .ipynb_checkpoints) left out."""
    found = []
    for given in (cfg.train_file, cfg.validation_file, cfg.test_file):
        path = Path(given) if given else None
        if path is not None and path.is_file():
            found.append(path)
        elif path is not None and path.is_dir():
            found += sorted(f for f in path.rglob("*")
                            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    return found
