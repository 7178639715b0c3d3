"""Seq2seq on real data, side by side: baselines, transformers' Seq2SeqTrainer, tunesmith's seq2seq family.

Model: bert2bert warm-started from the bundled all-MiniLM-L6-v2
(`EncoderDecoderModel.from_encoder_decoder_pretrained(minilm, minilm)`, cross-attention and LM head
initialised with seed 0; decoder_start_token_id=[CLS], pad=[PAD], eos=[SEP]). Data from
`benchmarks/seq2seq_data.py` (fetched into the tunesmith cache, never into git):

- `--task simplification`: King James Version -> Bible in Basic English, verse-aligned, split by book.
- `--task translation`: King James Version -> Louis Segond 1910 (French), verse-aligned, split by book.
- `--task summarization`: GEM XSum (BIG-bench's 1,001 items), article -> one-sentence summary.

Rows, all scored on the validation split with the same metrics (`tunesmith.metrics.generation`: ROUGE-1/2/L/Lsum F,
sacreBLEU, chrF, exact match, all 0-100; plus BLEU/chrF with both sides lowercased and accents stripped, since the
uncased MiniLM cannot write capitals or French accents):

- `copy source`: the source as the prediction; `lead sentence` (summarization): its first sentence.
- `Seq2SeqTrainer (untrained)`: the warm-started model before training, generate only.
- `Seq2SeqTrainer`: plain defaults as a user copying run_summarization.py gets them (tokenize with
  truncation, DataCollatorForSeq2Seq with label_pad_token_id=-100, `predict_with_generate=True`),
  with the shared hyper-parameters below, `use_cpu=True`, `report_to=[]`, `save_strategy="no"`.
- `tunesmith seq2seq`: `tunesmith.train(config)` with the same model, data and hyper-parameters.

Shared: learning rate, batch size, epochs, max_source_length, max_target_length, label smoothing 0,
weight decay 0, seed 0, generation max_new_tokens and num_beams (the Trainer gets
`generation_max_length = max_new_tokens + 1`: its max_length counts the decoder start token, so both
generate at most max_new_tokens tokens). Train samples/s = train samples / train wall seconds (model
loading and tokenization excluded); eval seconds = the generation pass over the validation split
(`Seq2SeqTrainer.predict`, `tunesmith.evaluate`).

    python benchmarks/seq2seq.py --task simplification       # full comparison, about 15 minutes on 2 cores
    python benchmarks/seq2seq.py --task translation --quick  # smoke test, tiny sizes (~2 minutes)

Prints the CPU model and flags, torch/transformers versions and a markdown table, and writes JSON to
benchmarks/results/seq2seq.json (one entry per task, kept across runs; --quick writes to the cache).
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

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import seq2seq_data  # noqa: E402
from tunesmith.assets import bundled_model_path  # noqa: E402
from tunesmith.metrics.generation import describe_bleu, generation_metrics, split_sentences  # noqa: E402
from tunesmith.speed.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model  # noqa: E402

MODEL = "bundled:all-MiniLM-L6-v2"
COMMON = {"learning_rate": 1e-4, "batch": 16, "weight_decay": 0.0, "label_smoothing": 0.0, "num_beams": 1, "seed": 0}
# Sized for <= 15 minutes per task on 2 cores for all rows (estimated from step times: one bert2bert step at
# 16 x 64 tokens ~3 s fp32; a greedy pass over 200 validation pairs ~1-1.5 minutes when outputs run to the limit).
SETTINGS = {
    "simplification": {"train": 2000, "validation": 200, "epochs": 1, "max_source_length": 64, "max_target_length": 64,
                       "max_new_tokens": 64},
    # French in the uncased English WordPiece vocabulary: p50 45, p90 76 tokens (a fifth of the targets are over 64).
    "translation": {"train": 1600, "validation": 200, "epochs": 1, "max_source_length": 64, "max_target_length": 96,
                    "max_new_tokens": 96},
    # 601 train articles in all (p50 330 tokens: the first 256 keep the lead); summaries p99 44 tokens.
    "summarization": {"train": 601, "validation": 200, "epochs": 1, "max_source_length": 256, "max_target_length": 64,
                      "max_new_tokens": 64},
}
QUICK = {"train": 32, "validation": 16, "epochs": 1, "max_source_length": 32, "max_target_length": 32, "max_new_tokens": 16,
         "batch": 8}


# --------------------------------------------------------------------------- metrics

METRICS_IMPL = "tunesmith.metrics.generation"


def _uncased(text: str) -> str:
    """What the uncased MiniLM tokenizer can produce at best: lowercased, accents stripped."""
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")


def score(predictions: list[str], references: list[str], target_lang: str) -> dict:
    """The metrics on the references as written, plus BLEU/chrF after lowercasing and stripping accents on
    both sides (the bundled model is uncased: it cannot write capitals or French accents)."""
    metrics = generation_metrics(predictions, references, target_lang=target_lang)
    uncased = generation_metrics([_uncased(p) for p in predictions], [_uncased(r) for r in references], target_lang=target_lang)
    metrics.update({"bleu_uncased": uncased["bleu"], "chrf_uncased": uncased["chrf"]})
    metrics["mean_prediction_words"] = float(np.mean([len(p.split()) for p in predictions])) if predictions else 0.0
    return metrics


def examples(task: str, texts: list[str]) -> dict:
    """The first predictions, for a look at them: Bible tasks only (XSum carries BIG-bench's canary:
    nothing drawn from it goes into results that may be committed)."""
    return {"examples": texts[:3]} if task in seq2seq_data.BIBLE_TASKS else {}


# --------------------------------------------------------------------------- baselines


def lead_sentence(document: str) -> str:
    sentences = split_sentences(document)  # XSum articles have one sentence a line; a line may hold more
    return sentences[0] if sentences else ""


def run_baselines(task: str, validation: list[dict]) -> list[dict]:
    references = [r["target"] for r in validation]
    lang = seq2seq_data.TARGET_LANG[task]
    rows = [{"system": "copy source", **score([r["source"] for r in validation], references, lang)}]
    if task == "summarization":
        rows.append({"system": "lead sentence", **score([lead_sentence(r["source"]) for r in validation], references, lang)})
    return rows


# --------------------------------------------------------------------------- Seq2SeqTrainer


def warm_started_model(tokenizer, seed: int):
    from transformers import EncoderDecoderModel

    minilm = str(bundled_model_path(MODEL))
    transformers.set_seed(seed)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(minilm, minilm)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.cls_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.sep_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    return model


TRAINER_ARGS_SHOWN = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs",
                      "weight_decay", "label_smoothing_factor", "warmup_steps", "lr_scheduler_type", "max_grad_norm",
                      "optim", "seed", "generation_max_length", "generation_num_beams", "train_sampling_strategy")


def run_trainer(task: str, paths: dict[str, Path], settings: dict, out: Path, eval_batch: int | None) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    minilm = str(bundled_model_path(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    train_rows = seq2seq_data.read_jsonl(paths["train"])
    validation_rows = seq2seq_data.read_jsonl(paths["validation"])

    def preprocess(batch):  # as run_summarization.py does it
        inputs = tokenizer(batch["source"], max_length=settings["max_source_length"], padding=False, truncation=True)
        labels = tokenizer(text_target=batch["target"], max_length=settings["max_target_length"], padding=False, truncation=True)
        inputs["labels"] = labels["input_ids"]
        return inputs

    columns = ["id", "source", "target"]
    train_set = Dataset.from_list(train_rows).map(preprocess, batched=True, remove_columns=columns)
    validation_set = Dataset.from_list(validation_rows).map(preprocess, batched=True, remove_columns=columns)

    model = warm_started_model(tokenizer, settings["seed"])
    args = Seq2SeqTrainingArguments(
        output_dir=str(out / "seq2seq-trainer"),
        learning_rate=settings["learning_rate"],
        per_device_train_batch_size=settings["batch"],
        **({"per_device_eval_batch_size": eval_batch} if eval_batch else {}),
        num_train_epochs=settings["epochs"],
        weight_decay=settings["weight_decay"],
        label_smoothing_factor=settings["label_smoothing"],
        seed=settings["seed"],
        predict_with_generate=True,
        generation_max_length=settings["max_new_tokens"] + 1,
        generation_num_beams=settings["num_beams"],
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=not sys.stderr.isatty(),
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    references = [r["target"] for r in validation_rows]
    lang = seq2seq_data.TARGET_LANG[task]

    def generate() -> tuple[dict, float]:
        start = time.perf_counter()
        output = trainer.predict(validation_set)
        seconds = time.perf_counter() - start
        predictions = np.where(output.predictions != -100, output.predictions, tokenizer.pad_token_id)
        texts = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        return score(texts, references, lang) | examples(task, texts), seconds

    before, before_seconds = generate()
    start = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - start
    after, after_seconds = generate()
    samples = len(train_rows) * settings["epochs"]
    common = {"eval_batch_size": args.per_device_eval_batch_size, "precision": "fp32",
              "args": {k: getattr(args, k) for k in TRAINER_ARGS_SHOWN}}
    return [
        {"system": "Seq2SeqTrainer (untrained)", **before, "eval_seconds": before_seconds, **common},
        {"system": "Seq2SeqTrainer", **after, "eval_seconds": after_seconds,
         "train_samples_per_second": samples / train_seconds, "train_seconds": train_seconds,
         "trainer_reported_samples_per_second": result.metrics.get("train_samples_per_second"),
         "train_loss": result.metrics.get("train_loss"), **common},
    ]


# --------------------------------------------------------------------------- tunesmith


def seq2seq_family_available() -> bool:
    from tunesmith.tasks.registry import families

    return "seq2seq" in families()


def run_tunesmith(task: str, paths: dict[str, Path], settings: dict, out: Path, precision: str) -> list[dict]:
    """tunesmith's seq2seq family through the Python API, its defaults except the shared settings. Like the
    Trainer's default, no evaluation inside training (`eval_strategy: no`); the run still scores the validation
    split once at the end (its predictions are read from the run directory), and `tunesmith.evaluate` over the
    validation split is timed as the evaluation."""
    import tunesmith

    cfg = {
        "model": {"name_or_path": MODEL},
        "data": {"train_file": str(paths["train"]), "validation_file": str(paths["validation"])},
        "task": {"name": "seq2seq", "source_column": "source", "target_column": "target",
                 "max_source_length": settings["max_source_length"], "max_target_length": settings["max_target_length"],
                 # as configs/translation.yaml does (sacreBLEU's tokenizer; a BERT tokenizer has no language codes)
                 **({"source_lang": "en", "target_lang": "fr"} if task == "translation" else {})},
        "generation": {"max_new_tokens": settings["max_new_tokens"], "num_beams": settings["num_beams"]},
        "method": {"name": "full"},
        "train": {
            "learning_rate": settings["learning_rate"],
            "num_train_epochs": settings["epochs"],
            "per_device_train_batch_size": settings["batch"],
            "weight_decay": settings["weight_decay"],
            "label_smoothing_factor": settings["label_smoothing"],
            "seed": settings["seed"],
            "eval_strategy": "no",
            "precision": precision,
        },
        "output": {"dir": str(out / "tunesmith-seq2seq"), "overwrite": True},
    }
    start = time.perf_counter()
    result = tunesmith.train(cfg, show_progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    train = result.metrics["train"]
    validation_rows = seq2seq_data.read_jsonl(paths["validation"])
    generated = seq2seq_data.read_jsonl(Path(result.run_dir) / "validation_generated_predictions.jsonl")
    if [g["source"] for g in generated] != [r["source"] for r in validation_rows]:
        raise SystemExit("validation_generated_predictions.jsonl is not in the validation file's order")
    texts = [g["prediction"].strip() for g in generated]
    loaded = tunesmith.load(result.run_dir)
    eval_batch = loaded.config.train.per_device_eval_batch_size
    start = time.perf_counter()
    evaluated = tunesmith.evaluate(loaded, paths["validation"], batch_size=eval_batch)
    eval_seconds = time.perf_counter() - start
    metrics = score(texts, [r["target"] for r in validation_rows], seq2seq_data.TARGET_LANG[task])
    return [{
        "system": "tunesmith seq2seq",
        **metrics,
        **examples(task, texts),
        "eval_seconds": eval_seconds,
        "eval_batch_size": eval_batch,
        "tunesmith_validation_metrics": result.metrics["validation"],
        "tunesmith_evaluate_metrics": evaluated,
        "train_samples_per_second": train.get("samples_per_second"),
        "train_seconds": train.get("train_seconds"),
        "train_wall_seconds": wall,
        "padding_share": train.get("padding_share"),
        "precision": train.get("precision"),
        "warnings": result.warnings,
        "config": cfg,
    }]


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict]) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else "—"

    lines = ["| system | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | BLEU | chrF | BLEU uncased | chrF uncased | exact | "
             "train samples/s | train s | eval s | eval batch | words/pred | precision |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    columns = [("rouge1", ".1f"), ("rouge2", ".1f"), ("rougeL", ".1f"), ("rougeLsum", ".1f"), ("bleu", ".1f"), ("chrf", ".1f"),
               ("bleu_uncased", ".1f"), ("chrf_uncased", ".1f"), ("exact_match", ".1f"), ("train_samples_per_second", ".1f"),
               ("train_seconds", ".0f"), ("eval_seconds", ".1f"), ("eval_batch_size", "d"), ("mean_prediction_words", ".1f"),
               ("precision", "s")]
    for r in rows:
        lines.append(f"| {r['system']} | " + " | ".join(num(r.get(key), fmt) for key, fmt in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(SETTINGS), default="simplification")
    parser.add_argument("--systems", nargs="+", default=["baselines", "trainer", "tunesmith"],
                        choices=["baselines", "trainer", "tunesmith"])
    parser.add_argument("--limit", type=int, default=None,
                        help="Train pairs (validation keeps its size unless --validation-limit).")
    parser.add_argument("--validation-limit", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--trainer-eval-batch", type=int, default=None,
                        help="Seq2SeqTrainer's per_device_eval_batch_size (default: its own default, 8).")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="tunesmith's train.precision.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test of every row, end to end.")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    settings = {**COMMON, **SETTINGS[args.task], **(QUICK if args.quick else {})}
    for key, value in (("train", args.limit), ("validation", args.validation_limit), ("epochs", args.epochs),
                       ("learning_rate", args.learning_rate), ("batch", args.batch), ("num_beams", args.num_beams)):
        if value is not None:
            settings[key] = value
    output = args.output or (seq2seq_data.cache_dir() / "seq2seq-quick.json" if args.quick
                             else Path(__file__).parent / "results" / "seq2seq.json")

    flags = sorted(cpu_flags() & ({"avx2", "avx512f"} | NATIVE_BF16_FLAGS))
    machine = {"cpu": cpu_model(), "flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"CPU: {machine['cpu']} | flags: {', '.join(flags)} | cores {machine['cores']} | "
          f"torch threads {machine['torch_threads']}")
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | metrics: {METRICS_IMPL}")
    print(f"task: {args.task} | settings: {settings}")

    paths, info = seq2seq_data.prepare(args.task, {"train": settings["train"], "validation": settings["validation"]})
    paths = {k: v for k, v in paths.items() if k != "test"}  # scored on validation; the test split stays unseen
    validation = seq2seq_data.read_jsonl(paths["validation"])
    data = {"info": info, "used": {"train": sum(1 for _ in paths["train"].open()), "validation": len(validation)}}
    print(f"data: full splits {info['counts']} | used {data['used']}")

    rows: list[dict] = []
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "baselines" in args.systems:
            rows.extend(run_baselines(args.task, validation))
        if "trainer" in args.systems:
            rows.extend(run_trainer(args.task, paths, settings, tmp, args.trainer_eval_batch))
        if "tunesmith" in args.systems:
            if seq2seq_family_available():
                rows.extend(run_tunesmith(args.task, paths, settings, tmp, args.precision))
            else:
                skipped.append("tunesmith seq2seq: the family is not registered in this checkout")
        for row in rows:
            hidden = ("tunesmith_", "args", "config", "warnings")
            print(json.dumps({k: v for k, v in row.items() if not k.startswith(hidden)}, ensure_ascii=False))
    print()
    print(markdown(rows))
    for line in skipped:
        print(f"\nskipped: {line}")

    payload = json.loads(output.read_text()) if output.exists() else {}
    payload.setdefault("benchmark", "seq2seq")
    payload.setdefault("tasks", {})[args.task] = {
        "machine": machine, "metrics": METRICS_IMPL,
        "bleu_signature": describe_bleu(seq2seq_data.TARGET_LANG[args.task], [r["target"] for r in validation]),
        "settings": settings, "quick": args.quick, "data": data,
        "results": rows, "skipped": skipped, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
