"""Training speed, side by side in one run: plain Trainer, Trainer at its best, tunesmith defaults.

Same model (bundled MiniLM), same data (Rotten Tomatoes sentences, split 80/10/10 with seed 0),
same hyper-parameters (batch 32, lr 5e-5, max_length 128), same machine, one process tree — each
system runs in its own child process so peak RSS is its own:

  (a) `transformers.Trainer` with its defaults (fp32, random batches)
  (b) `transformers.Trainer` at its best for this machine: length-grouped sampling
      (`train_sampling_strategy="group_by_length"`) and `bf16=True` only where bf16 measures faster
  (b+) (b) with tunesmith's allocator setting (`reuse_freed_memory`), which any PyTorch loop can
      take (jemalloc or tcmalloc via LD_PRELOAD do the same): how much of (c)'s lead is the allocator
  (c) tunesmith defaults
  (f) tunesmith `method: frozen` with its feature cache (default on), for `--frozen-epochs` epochs:
      the encoder runs once, then only the head trains; compared per epoch with (c)
  (d) tunesmith defaults + `train.torch_compile` (with `--compile`; the first steps include the
      compile, which is part of the cost of compiling a one-epoch run)

Reports train samples/s, wall time, peak RSS, test accuracy and ratios, model FLOPs utilisation
against this machine's measured GEMM peak for the precision used, how step time grows with
sequence length, and how training time grows with data size: tunesmith on 25%, 50% and 100% of the
train rows (same precision as (c), no evaluation inside the loop), which should be linear
(constant seconds per sample). Prints the CPU model and flags.

    python benchmarks/speed.py --epochs 1            # about 15 minutes on 2 cores (20 with --compile)
    python benchmarks/speed.py --quick               # smoke test: a few hundred rows, short sequences
    python benchmarks/speed.py --emulate-avx2 ...     # as on a CPU without native bf16 (see AVX2_ONLY_ENVIRONMENT)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tunesmith.speed.precision import (  # noqa: E402
    AVX2_ONLY_ENVIRONMENT,
    NATIVE_BF16_FLAGS,
    cpu_flags,
    cpu_model,
    measured_bf16_speedup,
)

BATCH, LR, MAX_LENGTH, SEED = 32, 5e-5, 128, 0
# `--emulate-avx2` (`AVX2_ONLY_ENVIRONMENT`): bf16 matmuls lose their native instructions (~300x slower
# here) while /proc/cpuinfo still lists avx512_bf16. It runs an AVX2-only CPU's code paths, not at its
# speed (this machine's fp32 matmuls stay as fast).
LABELS = {"trainer-defaults": "(a)", "trainer-best": "(b)", "trainer-best-allocator": "(b+)", "tunesmith": "(c)",
          "tunesmith-compile": "(d)", "tunesmith-frozen": "(f)", "tunesmith-no-first-token": "(c-)",
          "tunesmith-no-fast-dropout": "(c-)", "tunesmith-every-embedding-row": "(c-)",
          "tunesmith-no-fast-path": "(c-)", "tunesmith-attention-upcast": "(c-)", "tunesmith-plain": "(c0)"}
# tunesmith with train options changed: (d), and ablations of (c) that show what each fast-path option is worth
# (`train.cpu` keys; `tunesmith-plain` turns every CPU speed trick off with the one switch).
TUNESMITH_OPTIONS = {
    "tunesmith-compile": {"torch_compile": True},
    "tunesmith-no-first-token": {"cpu": {"first_token_only": False}},
    "tunesmith-no-fast-dropout": {"cpu": {"fast_dropout": False}},
    "tunesmith-every-embedding-row": {"cpu": {"skip_unseen_embedding_rows": False}},
    "tunesmith-attention-upcast": {"cpu": {"attention_upcast": True}},
    "tunesmith-no-fast-path": {"cpu": {"first_token_only": False, "fast_dropout": False, "reuse_freed_memory": False,
                                       "skip_unseen_embedding_rows": False}},
    "tunesmith-plain": {"cpu": {"speedups": False}},
}


def _option_names(options: dict) -> str:
    """`{"cpu": {"fast_dropout": False}}` -> `fast_dropout=False`, as the rows of earlier results name them."""
    return " ".join(_option_names(v) if isinstance(v, dict) else f"{k}={v}" for k, v in options.items())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(system: str, split_dir: Path, epochs: float, out: Path) -> None:
    """Runs one system in this (child) process and writes its result JSON.

    `tunesmith-scaling:<precision>`: tunesmith without evaluation inside the loop, so that train
    time is training alone, at the precision (c) chose (a new measurement could choose otherwise)."""
    from classification import run_tunesmith

    import classification

    paths = {k: split_dir / f"{k}.csv" for k in ("train", "validation", "test")}
    classification.SETTINGS["seed"] = int(os.environ.get("SPEED_BENCH_SEED", SEED))
    if system.startswith("tunesmith"):
        classification.SETTINGS["epochs"] = epochs
        name, _, precision = system.partition(":")
        extra = {**TUNESMITH_OPTIONS, "tunesmith-scaling": {"eval_strategy": "no"}}.get(name)
        method = "frozen" if name == "tunesmith-frozen" else "full"
        row = run_tunesmith(paths, method, split_dir / "runs", precision or "auto", extra)
        if name in TUNESMITH_OPTIONS:
            row["system"] += " + " + _option_names(extra)
    else:
        from classification import run_trainer

        if system == "trainer-best-allocator":
            from tunesmith.speed.cpu_fastpath import keep_freed_memory

            keep_freed_memory()  # the part of tunesmith's CPU fast path any training loop can take
        row = run_trainer(paths, split_dir / "runs", epochs, best=system != "trainer-defaults")
        if system == "trainer-best-allocator":
            row["system"] += " + reuse_freed_memory"
    row["peak_rss_mb"] = peak_rss_mb()
    row["seed"] = classification.SETTINGS["seed"]
    out.write_text(json.dumps(row))


def summarise(systems: list[str], rows: list[dict]) -> list[dict]:
    """One row per system: means over seeds, with `mean ± std` texts (sample std; plain value for one seed)."""
    import statistics

    def text(values: list[float], digits: int) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    summary = []
    for system in systems:
        runs = [r for r in rows if r["system_key"] == system]
        acc, sps = [r["test_accuracy"] for r in runs], [r["train_samples_per_second"] for r in runs]
        summary.append({
            "system": runs[0]["system"], "key": system, "seeds": [r["seed"] for r in runs],
            "test_accuracy": statistics.mean(acc), "train_samples_per_second": statistics.mean(sps),
            "accuracy_text": text(acc, 4), "sps_text": text(sps, 1),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "precision": runs[0]["precision"],
        })
    return summary


def gemm_peak(precision: str) -> float:
    """Measured GFLOP/s of a 2048^3 matmul in the given precision (this machine's own ceiling): bf16
    operands for bf16 (no autocast casts inside the timing), best of 5."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def sequence_scaling(precision: str, lengths: tuple[int, ...] = (64, 128, 256, 512)) -> list[dict]:
    """Time of one tunesmith training step (batch 32, every position a real token) at fixed sequence lengths.

    The step is the loop's: `apply_speed_options` (CPU speed tricks, first-token shortcut), the embedding
    training only the rows of the batches' tokens (`embedding_rows`), fused AdamW with
    no decay on biases and norms, the attention-kernel choice, clipping. Two FLOP counts per step:
    model FLOPs, the usual MFU numerator (6 x non-embedding parameters x tokens, plus the attention
    matmuls, 12 x layers x hidden x sequence length per token), which the first-token shortcut does not
    change; and the FLOPs the step actually executes (the last layer's query and attention output
    projections, attention row and feed-forward run for one token per sequence)."""
    from transformers import AutoModelForSequenceClassification

    from tunesmith.assets import bundled_model_path
    from tunesmith.config import TrainConfig
    from tunesmith.speed.cpu import attention_kernel, math_attention_max_length
    from tunesmith.speed.embedding_rows import decay_unseen_rows, train_seen_rows_only
    from tunesmith.speed.performance import apply_speed_options
    from tunesmith.loop.loop import make_optimizer

    model = AutoModelForSequenceClassification.from_pretrained(str(bundled_model_path("bundled:all-MiniLM-L6-v2")), num_labels=2)
    train_cfg = TrainConfig(learning_rate=LR)
    model, speed = apply_speed_options(model.train(), train_cfg, "full", sequence_head=True)
    # The batches draw ids 1000-19999: as in a run, only those embedding rows train (19,000 of 30,522,
    # more than the 12,026 of the Rotten Tomatoes sentences).
    low, high = 1000, 20000
    train_seen_rows_only(model, [np.arange(low, high)], [model.config.pad_token_id])
    optimizer = make_optimizer(model, train_cfg)
    decay_unseen_rows(model, optimizer)
    config = model.config
    hidden, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)

    def skippable(length: int) -> int:
        """FLOPs per token of the last layer's query and attention output projections, feed-forward block
        and attention row (12 x hidden x length), which the first-token shortcut runs for the first token only."""
        return 6 * (2 * hidden * hidden + 2 * hidden * inner) + 12 * hidden * length if speed["first_token_only"] else 0

    rows = []
    for length in lengths:
        batch = {"input_ids": torch.randint(low, high, (BATCH, length)), "attention_mask": torch.ones(BATCH, length, dtype=torch.long),
                 "labels": torch.randint(0, 2, (BATCH,))}
        times = []
        for _ in range(4):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), attention_kernel(
                    batch, "cpu", math_attention_max_length(train_cfg)):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        step = min(times[1:])
        tokens = BATCH * length
        model_flops = (6 * params + 12 * layers * hidden * length) * tokens
        executed = model_flops - skippable(length) * (tokens - BATCH)
        # The ceiling is measured again next to each step timing: this machine's speed drifts by 20% over minutes.
        peak = gemm_peak(precision)
        rows.append({"seq_len": length, "step_seconds": step, "tokens_per_second": tokens / step,
                     "achieved_gflops": model_flops / step / 1e9, "executed_gflops": executed / step / 1e9,
                     "gemm_peak_gflops": peak, "mfu": model_flops / step / 1e9 / peak, "executed_utilisation": executed / step / 1e9 / peak})
    return rows


def frozen_speedup(rows: list[dict]) -> dict | None:
    """Seconds per training epoch of (c) full fine-tuning against (f) frozen with the feature cache.

    Training alone on both sides (in-loop evaluation taken out). `per_epoch`: once the features are
    cached, the issue's measure; `first_epoch`: (f)'s first epoch carries the encoder's one pass over
    train, validation and test; `amortised`: that pass spread over (f)'s epochs."""
    import statistics

    def per_epoch(r: dict) -> float:
        return (r["train_seconds"] - r["eval_seconds"]) / r["epochs"]

    full = [per_epoch(r) for r in rows if r["system_key"] == "tunesmith"]
    frozen = [r for r in rows if r["system_key"] == "tunesmith-frozen"]
    if not full or not frozen:
        return None
    full_epoch = statistics.mean(full)
    head_epoch = statistics.mean(per_epoch(r) for r in frozen)
    cache = statistics.mean(r["feature_cache_seconds"] for r in frozen)
    epochs = frozen[0]["epochs"]
    return {"full_epoch_seconds": full_epoch, "frozen_head_epoch_seconds": head_epoch, "feature_cache_seconds": cache,
            "frozen_epochs": epochs, "per_epoch": full_epoch / head_epoch, "first_epoch": full_epoch / (head_epoch + cache),
            "amortised": full_epoch / (head_epoch + cache / epochs),
            "frozen_test_accuracy": statistics.mean(r["test_accuracy"] for r in frozen)}


def run_child(system: str, split_dir: Path, epochs: float, seed: int = SEED) -> dict:
    out = split_dir / f"{system.replace(':', '-')}-seed{seed}.json"
    start = time.perf_counter()
    env = {**os.environ, "SPEED_BENCH_SEED": str(seed)}
    subprocess.run([sys.executable, __file__, "--epochs", str(epochs), "--child", system, str(split_dir), str(out)], check=True, env=env)
    row = json.loads(out.read_text())
    row["process_wall_seconds"] = time.perf_counter() - start
    row["system_key"] = system
    return row


def data_scaling(split_dir: Path, epochs: float, precision: str, fractions: list[float]) -> list[dict]:
    """Train time on the first 25/50/100% of the (shuffled) train rows; validation and test stay whole."""
    import pandas as pd

    train = pd.read_csv(split_dir / "train.csv")
    rows = []
    for fraction in fractions:
        folder = split_dir / f"fraction-{fraction:g}"
        folder.mkdir(exist_ok=True)
        train.iloc[: max(1, round(fraction * len(train)))].to_csv(folder / "train.csv", index=False)
        for name in ("validation", "test"):
            shutil.copy(split_dir / f"{name}.csv", folder / f"{name}.csv")
        row = run_child(f"tunesmith-scaling:{precision}", folder, epochs)
        rows.append({"fraction": fraction, "train_rows": round(fraction * len(train)), "train_seconds": row["train_seconds"],
                     "train_samples_per_second": row["train_samples_per_second"], "precision": row["precision"]})
        print(json.dumps(rows[-1]))
    full = max(rows, key=lambda r: r["fraction"])
    for r in rows:  # 1.0 = exactly linear: this share of the data took this share of the time
        r["time_vs_linear"] = (r["train_seconds"] / full["train_seconds"]) / (r["fraction"] / full["fraction"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--systems", nargs="+", default=None, choices=list(LABELS),
                        help="default: (a), (b), (b+), (c), (f); (c) and (f) only with --quick")
    parser.add_argument("--compile", action="store_true", help="Also run (d): tunesmith with train.torch_compile.")
    parser.add_argument("--frozen-epochs", type=float, default=3.0, help="Epochs of (f), frozen with the feature cache.")
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.25, 0.5, 1.0],
                        help="Shares of the train rows for the data-size scaling (none: skip it).")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N shuffled rows (smoke test).")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke test: 240 rows, (c) only, sequence lengths 32 and 64; "
                        "writes to a temporary file unless --output.")
    parser.add_argument("--output", type=Path, default=None, help="default: benchmarks/results/speed.json")
    parser.add_argument("--seeds", nargs="+", type=int, default=[SEED],
                        help="Training seeds (the split stays seed 0); with several, the table shows mean ± std.")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="Restrict torch, oneDNN and MKL to AVX2 in this process tree (a CPU without native bf16).")
    parser.add_argument("--child", nargs=3, metavar=("SYSTEM", "SPLIT_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emulate_avx2 and any(os.environ.get(k) != v for k, v in AVX2_ONLY_ENVIRONMENT.items()):
        # The ISA limits are read when torch and oneDNN first run a kernel: start again with them set.
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **AVX2_ONLY_ENVIRONMENT})
    if args.child:
        child(args.child[0], Path(args.child[1]), args.epochs, Path(args.child[2]))
        return
    systems = args.systems or (["tunesmith", "tunesmith-frozen"] if args.quick else
                               ["trainer-defaults", "trainer-best", "trainer-best-allocator", "tunesmith", "tunesmith-frozen"])
    if args.compile and "tunesmith-compile" not in systems:
        systems.append("tunesmith-compile")
    limit = args.limit or (240 if args.quick else None)
    lengths = (32, 64) if args.quick else (64, 128, 256, 512)
    results = Path(tempfile.gettempdir()) if args.quick else Path(__file__).parent / "results"
    default_output = results / ("speed-quick.json" if args.quick else "speed.json")
    output = args.output or default_output

    from classification import make_split

    flags = sorted(cpu_flags() & ({"avx2", "avx512f"} | NATIVE_BF16_FLAGS))
    speedup = measured_bf16_speedup()
    isa = {k: os.environ[k] for k in AVX2_ONLY_ENVIRONMENT if k in os.environ}
    print(f"CPU: {cpu_model()} | flags: {', '.join(flags)} | cores {os.cpu_count()} | bf16 matmul speed-up {speedup:.2f}x"
          f" | torch kernels {torch.backends.cpu.get_cpu_capability()}" + (f" | ISA limits {isa}" if isa else ""))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        split_dir = Path(tmp)
        make_split(split_dir, limit)
        for seed in args.seeds:
            for system in systems:
                epochs = args.frozen_epochs if system == "tunesmith-frozen" else args.epochs
                rows.append(run_child(system, split_dir, epochs, seed))
                print(json.dumps(rows[-1]))
        precision = next((r["precision"] for r in rows if r["system"].startswith("tunesmith")), "fp32")
        scaling_data = data_scaling(split_dir, args.epochs, precision, args.fractions) if args.fractions else []
    summary = summarise(systems, rows)
    base = {r["system"].replace("transformers.", ""): r["train_samples_per_second"] for r in summary}
    peak = gemm_peak(precision)
    scaling = sequence_scaling(precision, lengths)
    print(f"\nseeds {args.seeds}; mean ± std over seeds where several")
    print("| system | test accuracy | train samples/s | vs (a) | vs (b) | train s | peak RSS MB | precision |")
    print("|---|---|---|---|---|---|---|---|")
    for system, r in zip(systems, summary):
        a, b = base.get("Trainer (defaults)"), base.get("Trainer (best)")
        ratio = lambda ref: f"{r['train_samples_per_second'] / ref:.2f}x" if ref else "—"
        print(f"| {LABELS[system]} {r['system']} | {r['accuracy_text']} | {r['sps_text']} | {ratio(a)} | "
              f"{ratio(b)} | {r['train_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['precision']} |")
    frozen = frozen_speedup(rows)
    if frozen:
        print(f"\n(f) frozen + feature cache vs (c) full fine-tuning, seconds per training epoch (in-loop evaluation "
              f"excluded): full {frozen['full_epoch_seconds']:.2f} s, frozen head {frozen['frozen_head_epoch_seconds']:.3f} s "
              f"-> {frozen['per_epoch']:.0f}x per epoch; the encoder's one pass {frozen['feature_cache_seconds']:.1f} s "
              f"(first epoch with it: {frozen['first_epoch']:.1f}x; spread over {frozen['frozen_epochs']:g} epochs: "
              f"{frozen['amortised']:.1f}x); (f) test accuracy {frozen['frozen_test_accuracy']:.3f}")
    print(f"\nGEMM peak ({precision}, 2048^3): {peak:.0f} GFLOP/s (and again next to each step timing below)")
    print("| seq len | step s (batch 32) | tokens/s | GEMM peak GFLOP/s | MFU (model FLOPs) | executed FLOPs / peak |")
    print("|---|---|---|---|---|---|")
    for s in scaling:
        print(f"| {s['seq_len']} | {s['step_seconds']:.3f} | {s['tokens_per_second']:.0f} | {s['gemm_peak_gflops']:.0f} | "
              f"{s['mfu']:.0%} | {s['executed_utilisation']:.0%} |")
    if scaling_data:
        print(f"\nData size (tunesmith full, {precision}, {args.epochs:g} epoch(s), no evaluation in the loop)")
        print("| share of train rows | rows | train s | samples/s | time vs linear |")
        print("|---|---|---|---|---|")
        for d in scaling_data:
            print(f"| {d['fraction']:.0%} | {d['train_rows']} | {d['train_seconds']:.1f} | {d['train_samples_per_second']:.1f} | "
                  f"{d['time_vs_linear']:.2f} |")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"cpu": cpu_model(), "flags": flags, "bf16_speedup": speedup, "seeds": args.seeds,
                                  "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "isa_limits": isa,
                                  "summary": summary, "results": rows,
                                  "frozen_vs_full": frozen,
                                  "gemm_peak_gflops": peak, "sequence_scaling": scaling, "data_scaling": scaling_data,
                                  "quick": args.quick}, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
