"""What DDP, FSDP2 and DeepSpeed ZeRO-2/3 cost on CPU processes of one machine, side by side in one run.

Bundled MiniLM (22.7M parameters) on the first `--rows` Rotten Tomatoes sentences (split 80/10/10
with seed 0, as benchmarks/classification.py), batch 16 per process, one epoch, no evaluation in the
loop, `--precision` (fp32 by default: DeepSpeed's bf16 casts the model, tunesmith's autocast does not,
so fp32 compares like with like), `--processes` gloo processes with one thread each:

  ddp     `tunesmith train --nproc N`
  fsdp2   `tunesmith train --nproc N train.fsdp=true`
  zero2   `accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes N`
  zero3   the same with deepspeed_zero3.yaml

Reports train samples/s (tunesmith's own, evaluation excluded), the launcher's wall time and the
largest resident set of one process (`getrusage` of the children), for `--rounds` interleaved rounds,
and each system's ratio to DDP within a round. Writes JSON to benchmarks/results/.

    python benchmarks/distributed.py                  # about 7 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from classification import make_split  # noqa: E402
from tunesmith.speed.precision import cpu_flags, cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
SYSTEMS = ("ddp", "fsdp2", "zero2", "zero3")


def command(system: str, config: Path, processes: int) -> list[str]:
    tunesmith = ["-m", "tunesmith.cli", "train", str(config), "--quiet"]
    if system in ("ddp", "fsdp2"):
        return [sys.executable, *tunesmith, "--nproc", str(processes), *(["train.fsdp=true"] if system == "fsdp2" else [])]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / f"deepspeed_{system}.yaml"),
            "--num_processes", str(processes), "--mixed_precision", "no", *tunesmith]


def run(system: str, config: Path, out: Path, processes: int) -> dict:
    """One launch in a child process tree; its largest process's peak RSS comes from getrusage(CHILDREN),
    which is only ever raised, so each launch runs under its own Python (`--child`)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", system, str(config), str(processes)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{system} failed:\n{done.stderr[-3000:]}")
    train = json.loads((out / "metrics.json").read_text())["train"]
    return {"system": system, "train_samples_per_second": train["samples_per_second"], "train_seconds": train["train_seconds"],
            "wall_seconds": time.perf_counter() - start, "peak_rss_mb": json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]}


def child(system: str, config: Path, processes: int) -> None:
    subprocess.run(command(system, config, processes), check=True, cwd=config.parent)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "distributed.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.child[2]))
        return

    print(f"CPU: {cpu_model()}; {os.cpu_count()} logical CPUs; flags: {' '.join(sorted(cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'}))}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_split(folder, args.rows)
        out = folder / "out"
        config = folder / "run.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"name_or_path": "bundled:all-MiniLM-L6-v2"},
            "data": {"train_file": str(paths["train"]), "validation_file": str(paths["validation"])},
            "task": {"name": "classification", "max_length": 128},
            "train": {"learning_rate": 5e-5, "num_train_epochs": 1, "per_device_train_batch_size": 16, "seed": 0,
                      "precision": args.precision, "logging_steps": 10, "eval_strategy": "no"},
            "output": {"dir": str(out), "overwrite": True},
        }))
        rows = []
        for round_index in range(args.rounds):
            for system in args.systems:
                row = {**run(system, config, out, args.processes), "round": round_index}
                rows.append(row)
                print(f"round {round_index} {system:6s} {row['train_samples_per_second']:6.1f} samples/s  "
                      f"peak RSS {row['peak_rss_mb']:6.0f} MiB  wall {row['wall_seconds']:5.1f} s", flush=True)

    print(f"\n| system | train samples/s | vs DDP (per round) | largest process peak RSS (MiB) |\n|---|---|---|---|")
    summary = []
    for system in args.systems:
        mine = [r for r in rows if r["system"] == system]
        sps = [r["train_samples_per_second"] for r in mine]
        rss = [r["peak_rss_mb"] for r in mine]
        ddp = {r["round"]: r["train_samples_per_second"] for r in rows if r["system"] == "ddp"}
        ratios = [r["train_samples_per_second"] / ddp[r["round"]] for r in mine if r["round"] in ddp]
        spread = lambda xs: f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"  # noqa: E731
        print(f"| {system} | {spread(sps)} | {spread(ratios) if ratios else '—'} | {min(rss):.0f}-{max(rss):.0f} |")
        summary.append({"system": system, "train_samples_per_second": sps, "vs_ddp": ratios, "peak_rss_mb": rss})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"cpu": cpu_model(), "processes": args.processes, "rows_used": args.rows,
                                       "precision": args.precision, "summary": summary, "runs": rows}, indent=1))
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main()
