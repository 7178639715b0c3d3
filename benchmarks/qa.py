"""Extractive question answering across domains (SQuAD-Shifts) with the bundled MiniLM.

Data: the SQuAD-format files of `bigbench/benchmark_tasks/squad_shifts/` (Miller et al. 2020: new
Wikipedia articles, New York Times, Reddit and Amazon reviews, each written like SQuAD v1.1) inside
the `bigbench==1.0.0` sdist. It is fetched once with `pip download --no-deps` into the tunesmith cache
(`$TUNESMITH_CACHE` or ~/.cache/tunesmith, outside the repository) and only `squad_shifts/*.json` is
extracted there; the files carry a canary string and must never be committed. pip 26 refuses this sdist
(it declares a direct URL dependency); the script then tries the other pips on PATH.

Train on a sample of one or more domains (default: new_wiki + nyt), pick the best epoch on held-out
questions of the same domains, and test on another domain (default: reddit) — a domain shift.
Questions are sampled with seed 0; offsets that miss their text (a few dozen per file) are repaired.

    python benchmarks/qa.py                                   # full fine-tuning, defaults below
    python benchmarks/qa.py --train new_wiki nyt reddit --test amazon_reviews --methods full lora

Prints the CPU, a markdown table (test exact match and F1, train samples/s, inference questions/s)
and writes JSON to benchmarks/results/qa.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tunesmith.speed.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model  # noqa: E402

SDIST = "bigbench-1.0.0.tar.gz"
SETS = {"new_wiki": "new_wiki_v1.0.json", "nyt": "nyt_v1.0.json", "reddit": "reddit_v1.0.json", "amazon_reviews": "amazon_reviews_v1.0.json"}
# Sized for about 10 minutes on 2 CPU cores (contexts average ~170 tokens: ~1.03 windows per question).
SETTINGS = {"train_samples": 1200, "validation_samples": 200, "test_samples": 500, "batch": 32, "epochs": 2,
            "max_length": 384, "doc_stride": 128, "seed": 0}
LEARNING_RATES = {"full": 2e-4, "lora": 1e-3, "dora": 1e-3, "ia3": 5e-3, "frozen": 3e-3, "last_n": 1e-4}


def cache_root() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith") / "benchmarks"


def squad_shifts() -> Path:
    """The extracted squad_shifts folder (fetched and extracted on first use)."""
    folder = cache_root() / "squad_shifts"
    if all((folder / name).exists() for name in SETS.values()):
        return folder
    sdist = cache_root() / SDIST
    if not sdist.exists():
        _download(cache_root())
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as archive:
        for member in archive:
            if "/squad_shifts/" in member.name and member.name.endswith(".json") and member.isfile():
                (folder / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    return folder


def _download(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    args = ["download", "-q", "--no-deps", "--no-binary", ":all:", "bigbench==1.0.0", "-d", str(root)]
    pips = [[sys.executable, "-m", "pip"]] + [[p] for p in dict.fromkeys(filter(None, (shutil.which("pip3"), shutil.which("pip"))))]
    for pip in pips:
        if subprocess.run([*pip, *args], check=False).returncode == 0 and (root / SDIST).exists():
            return
    sys.exit(f"could not download {SDIST} (pip >= 26 refuses it: it declares a direct URL dependency); download it with an older "
             f"pip into {root}: pip download --no-deps --no-binary :all: bigbench==1.0.0 -d {root}")


def questions_of(path: Path) -> list[tuple[dict, dict]]:
    """(article title + paragraph context, question record) for every question of a SQuAD file."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [({"title": a.get("title", ""), "context": p["context"]}, q) for a in data for p in a["paragraphs"] for q in p["qas"]]


def write_squad(path: Path, items: list[tuple[dict, dict]]) -> Path:
    """Questions back into SQuAD JSON, one paragraph per distinct context."""
    paragraphs: dict[str, dict] = {}
    for where, record in items:
        paragraphs.setdefault(where["context"], {"context": where["context"], "qas": []})["qas"].append(record)
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "sample", "paragraphs": list(paragraphs.values())}]}), encoding="utf-8")
    return path


def make_split(folder: Path, train_sets: list[str], test_set: str, settings: dict) -> tuple[dict[str, Path], dict]:
    source = squad_shifts()
    rng = random.Random(settings["seed"])
    pool = [item for name in train_sets for item in questions_of(source / SETS[name])]
    rng.shuffle(pool)
    cut = settings["validation_samples"]
    validation, train = pool[:cut], pool[cut : cut + settings["train_samples"]]
    test = questions_of(source / SETS[test_set])
    rng.shuffle(test)
    test = test[: settings["test_samples"]]
    paths = {name: write_squad(folder / f"{name}.json", items) for name, items in
             (("train", train), ("validation", validation), ("test", test))}
    counts = {name: len(items) for name, items in (("train", train), ("validation", validation), ("test", test))}
    counts["train_pool"] = len(pool) - cut
    return paths, {"questions": counts, "test_items": test}


def run_tunesmith(paths: dict[str, Path], test_items: list, method: str, out: Path, precision: str, settings: dict, lr: float | None) -> dict:
    import tunesmith

    cfg = {
        "model": {"name_or_path": "bundled:all-MiniLM-L6-v2"},
        "data": {k + "_file": str(v) for k, v in paths.items()},
        "task": {"name": "question_answering", "max_length": settings["max_length"], "doc_stride": settings["doc_stride"],
                 "repair": True},
        "method": {"name": method},
        "train": {
            "learning_rate": lr or LEARNING_RATES.get(method, 1e-4),
            "num_train_epochs": settings["epochs"],
            "per_device_train_batch_size": settings["batch"],
            "warmup_ratio": 0.1,
            "seed": settings["seed"],
            "precision": precision,
            "logging_steps": 20,
        },
        "output": {"dir": str(out / f"tunesmith-{method}"), "overwrite": True},
    }
    start = time.perf_counter()
    result = tunesmith.train(cfg, show_progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    test, train, valid = result.metrics["test"], result.metrics["train"], result.metrics["validation"]
    # Inference as users run it (`tunesmith.predict` -> `tunesmith.qa.answer`), timed on the test questions.
    loaded = tunesmith.load(result.run_dir)
    pairs = [(record["question"], where["context"]) for where, record in test_items]
    start = time.perf_counter()
    loaded.predict(pairs, batch_size=64)
    inference = time.perf_counter() - start
    return {
        "system": f"tunesmith {method}",
        "learning_rate": cfg["train"]["learning_rate"],
        "test_exact_match": test["exact_match"],
        "test_f1": test["f1"],
        "test_windows": test["windows"],
        "validation_exact_match": valid["exact_match"],
        "validation_f1": valid["f1"],
        "train_samples_per_second": train["samples_per_second"],
        "train_seconds": train["train_seconds"],
        "inference_questions_per_second": len(pairs) / inference,
        "wall_seconds": wall,
        "precision": train["precision"],
        "warnings": result.warnings,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| system | lr | test EM | test F1 | validation F1 | train windows/s | train time (s) | inference questions/s | precision |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['learning_rate']:g} | {r['test_exact_match']:.3f} | {r['test_f1']:.3f} | {r['validation_f1']:.3f} | "
            f"{r['train_samples_per_second']:.1f} | {r['train_seconds']:.0f} | {r['inference_questions_per_second']:.1f} | {r['precision']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", default=["new_wiki", "nyt"], choices=list(SETS), help="Domains to train on.")
    parser.add_argument("--test", default="reddit", choices=list(SETS), help="Domain to test on.")
    parser.add_argument("--methods", nargs="+", default=["full"], choices=list(LEARNING_RATES))
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--epochs", type=float, default=SETTINGS["epochs"])
    parser.add_argument("--train-samples", type=int, default=SETTINGS["train_samples"])
    parser.add_argument("--test-samples", type=int, default=SETTINGS["test_samples"])
    parser.add_argument("--learning-rate", type=float, default=None, help="Override the per-method learning rates.")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "qa.json")
    args = parser.parse_args()
    if args.test in args.train:
        parser.error(f"--test {args.test} is also a training domain; choose another (the point is a domain shift)")

    flags = sorted(cpu_flags() & ({"avx2", "avx512f"} | NATIVE_BF16_FLAGS))
    machine = {"cpu": cpu_model(), "flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "python": platform.python_version(), "torch": torch.__version__}
    settings = {**SETTINGS, "epochs": args.epochs, "train_samples": args.train_samples, "test_samples": args.test_samples,
                "train_sets": args.train, "test_set": args.test}
    print(f"CPU: {machine['cpu']} | flags: {', '.join(flags)} | cores {machine['cores']} | torch threads {machine['torch_threads']}")
    print(f"settings: {settings}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths, split = make_split(tmp, args.train, args.test, settings)
        print(f"questions: {split['questions']}")
        for method in args.methods:
            rows.append(run_tunesmith(paths, split["test_items"], method, tmp, args.precision, settings, args.learning_rate))
            print(json.dumps(rows[-1]))
    print()
    print(markdown(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "settings": settings, "questions": split["questions"], "results": rows}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
