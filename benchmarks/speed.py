"""Training speed, side by side in one run: plain Trainer, Trainer at its best, tunesmith defaults.

Same model (bundled MiniLM), same data (Rotten Tomatoes sentences, split 80/10/10 with seed 0),
same hyper-parameters (batch 32, lr 5e-5, max_length 128), same machine, one process tree — each
system runs in its own child process so peak RSS is its own:

  (a) `transformers.Trainer` with its defaults (fp32, random batches)
  (b) `transformers.Trainer` at its best for this machine: length-grouped sampling
      (`train_sampling_strategy="group_by_length"`) and `bf16=True` only where bf16 measures faster
  (c) tunesmith defaults

Reports train samples/s, wall time, peak RSS, test accuracy and ratios, model FLOPs utilisation
against this machine's measured GEMM peak for the precision used, and how step time grows with
sequence length. Prints the CPU model and flags.

    python benchmarks/speed.py --epochs 1            # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from tunesmith.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model, measured_bf16_speedup  # noqa: E402

BATCH, LR, MAX_LENGTH, SEED = 32, 5e-5, 128, 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(system: str, split_dir: Path, epochs: float, out: Path) -> None:
    """Runs one system in this (child) process and writes its result JSON."""
    from classification import run_tunesmith

    paths = {k: split_dir / f"{k}.csv" for k in ("train", "validation", "test")}
    if system == "tunesmith":
        import classification

        classification.SETTINGS["epochs"] = epochs
        row = run_tunesmith(paths, "full", split_dir / "runs", "auto")
    else:
        from classification import run_trainer

        row = run_trainer(paths, split_dir / "runs", epochs, best=system == "trainer-best")
    row["peak_rss_mb"] = peak_rss_mb()
    out.write_text(json.dumps(row))


def gemm_peak(precision: str) -> float:
    """Measured GFLOP/s of a 2048^3 matmul in the given precision (this machine's own ceiling)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        a @ b
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def sequence_scaling(precision: str) -> list[dict]:
    """Time of one training step (batch 32) of MiniLM at fixed sequence lengths."""
    from transformers import AutoModelForSequenceClassification

    from tunesmith.assets import bundled_model_path

    model = AutoModelForSequenceClassification.from_pretrained(str(bundled_model_path("bundled:all-MiniLM-L6-v2")), num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    rows = []
    for length in (64, 128, 256, 512):
        batch = {"input_ids": torch.randint(1000, 20000, (BATCH, length)), "labels": torch.randint(0, 2, (BATCH,))}
        times = []
        for _ in range(3):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        step = min(times[1:])
        flops = 6 * params * BATCH * length  # forward + backward of the dense layers; attention excluded
        rows.append({"seq_len": length, "step_seconds": step, "tokens_per_second": BATCH * length / step,
                     "achieved_gflops": flops / step / 1e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--systems", nargs="+", default=["trainer-defaults", "trainer-best", "tunesmith"])
    parser.add_argument("--limit", type=int, default=None, help="Only the first N shuffled rows (smoke test).")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "speed.json")
    parser.add_argument("--child", nargs=3, metavar=("SYSTEM", "SPLIT_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.epochs, Path(args.child[2]))
        return

    from classification import make_split

    flags = sorted(cpu_flags() & ({"avx2", "avx512f"} | NATIVE_BF16_FLAGS))
    speedup = measured_bf16_speedup()
    print(f"CPU: {cpu_model()} | flags: {', '.join(flags)} | cores {os.cpu_count()} | bf16 matmul speed-up {speedup:.2f}x")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        split_dir = Path(tmp)
        make_split(split_dir, args.limit)
        for system in args.systems:
            out = split_dir / f"{system}.json"
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs), "--child", system, str(split_dir), str(out)],
                           check=True)
            row = json.loads(out.read_text())
            row["process_wall_seconds"] = time.perf_counter() - start
            rows.append(row)
            print(json.dumps(row))
    base = {r["system"].replace("transformers.", ""): r["train_samples_per_second"] for r in rows}
    precision = next((r["precision"] for r in rows if r["system"].startswith("tunesmith")), "fp32")
    peak = gemm_peak(precision)
    scaling = sequence_scaling(precision)
    print("\n| system | test accuracy | train samples/s | vs (a) | vs (b) | train s | peak RSS MB | precision |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = base.get("Trainer (defaults)"), base.get("Trainer (best)")
        ratio = lambda ref: f"{r['train_samples_per_second'] / ref:.2f}x" if ref else "—"
        print(f"| {r['system']} | {r['test_accuracy']:.4f} | {r['train_samples_per_second']:.1f} | {ratio(a)} | {ratio(b)} | "
              f"{r['train_seconds']:.0f} | {r['peak_rss_mb']:.0f} | {r['precision']} |")
    print(f"\nGEMM peak ({precision}, 2048^3): {peak:.0f} GFLOP/s")
    print("| seq len | step s (batch 32) | tokens/s | MFU vs GEMM peak |")
    print("|---|---|---|---|")
    for s in scaling:
        print(f"| {s['seq_len']} | {s['step_seconds']:.3f} | {s['tokens_per_second']:.0f} | {s['achieved_gflops'] / peak:.0%} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"cpu": cpu_model(), "flags": flags, "bf16_speedup": speedup, "results": rows,
                                       "gemm_peak_gflops": peak, "sequence_scaling": scaling}, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
