"""Interleaved A/B of tunesmith's training speed between two git revisions, on this machine.

Each revision is checked out in its own temporary worktree and `benchmarks/speed.py` of that
revision trains tunesmith's default system (c) on the same split; the runs alternate A B B A A B ...
so that drift of the machine (thermal state, other load) falls on both sides alike, after one uncounted
warm-up run per side (the first run of a machine fills tunesmith's caches and pays for it).
Prints the CPU, each run, and per revision the mean ± std of train samples/s and the ratio B/A.

    python benchmarks/ab.py --a aa0a3de --b HEAD --rounds 3 --limit 1600
    python benchmarks/ab.py --a main~5 --b WORKTREE ...   # WORKTREE: the working tree as it is, uncommitted changes too

A difference smaller than about two standard deviations is noise, not a claim.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout(rev: str, into: Path) -> Path:
    if rev == "WORKTREE":
        return ROOT
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return into


def run_once(tree: Path, seed: int, args: argparse.Namespace, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree / 'benchmarks'}", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(tree / "benchmarks" / "speed.py"), "--systems", "tunesmith", "--epochs", str(args.epochs),
               "--fractions", "--seeds", str(seed), "--output", str(out)]
    if args.limit:
        command += ["--limit", str(args.limit)]
    subprocess.run(command, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
    row = json.loads(out.read_text())["results"][0]
    return {"samples_per_second": row["train_samples_per_second"], "test_accuracy": row["test_accuracy"],
            "precision": row["precision"], "seed": seed}


def order(rounds: int) -> list[str]:
    """A B, B A, A B, ...: each side runs first as often as the other."""
    return [side for r in range(rounds) for side in (("a", "b") if r % 2 == 0 else ("b", "a"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="baseline revision (or WORKTREE)")
    parser.add_argument("--b", required=True, help="revision compared with it (or WORKTREE)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per revision")
    parser.add_argument("--limit", type=int, default=1600, help="train on the first N shuffled rows (speed.py --limit)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "speed-ab.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from tunesmith.speed.precision import cpu_flags, cpu_model

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    print(f"CPU: {cpu_model()} | flags: {', '.join(flags)} | cores {os.cpu_count()}")
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {side: checkout(getattr(args, side), Path(tmp) / side) for side in ("a", "b")}
        try:
            for side in ("a", "b"):  # not counted: fills the tokenization and precision caches, warms the page cache
                run_once(trees[side], args.seed, args, Path(tmp) / f"warmup-{side}.json")
            for i, side in enumerate(order(args.rounds)):
                row = run_once(trees[side], args.seed, args, Path(tmp) / f"run-{i}.json")
                runs[side].append(row)
                print(f"{side} ({getattr(args, side)}): {row['samples_per_second']:.1f} samples/s, "
                      f"test accuracy {row['test_accuracy']:.4f}, {row['precision']}", flush=True)
        finally:
            for side, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    summary = {}
    for side in ("a", "b"):
        speeds = [r["samples_per_second"] for r in runs[side]]
        summary[side] = {"revision": getattr(args, side), "mean": statistics.mean(speeds),
                         "std": statistics.stdev(speeds) if len(speeds) > 1 else 0.0, "runs": runs[side]}
        print(f"{side} {getattr(args, side)}: {summary[side]['mean']:.1f} ± {summary[side]['std']:.1f} samples/s "
              f"over {len(speeds)} runs")
    ratio = summary["b"]["mean"] / summary["a"]["mean"]
    print(f"B/A: {ratio:.3f}")
    args.output.write_text(json.dumps({"cpu": cpu_model(), "flags": flags, "limit": args.limit, "epochs": args.epochs,
                                       "order": order(args.rounds), "ratio_b_over_a": ratio, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
