"""Calibration of the memory preflight (`tunesmith.speed.memory`) against the peak RSS of real runs.

Bundled MiniLM, 3 optimizer steps on texts that fill `max_length`, evaluation batch 64, one
subprocess per setting: `tunesmith.train` runs with the preflight's `estimate_training_memory` wrapped to
record the RSS when the check runs and its estimate (`MemoryEstimate.training`); "measured" is the growth of peak RSS
(`ru_maxrss`) over that RSS. Prints the table of docs/reliability.md and writes JSON.

    python benchmarks/memory.py                 # the nine settings, about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GiB = 1024**3
# (batch, length, method, precision, extra train options, label)
SETTINGS = [
    (8, 128, "full", "fp32", {}, "full"),
    (32, 128, "full", "fp32", {}, "full"),
    (16, 256, "full", "fp32", {}, "full"),
    (8, 512, "full", "fp32", {}, "full"),
    (32, 256, "full", "fp32", {}, "full"),
    (32, 256, "lora", "fp32", {}, "lora"),
    (32, 256, "full", "fp32", {"gradient_checkpointing": True}, "full + gradient checkpointing"),
    (32, 256, "full", "bf16", {}, "full"),
    (32, 256, "last_n", "fp32", {}, "last_n (2 layers)"),
]

CHILD = """
import json, random, resource, sys
import pandas as pd, psutil
import tunesmith, tunesmith.speed.memory as memory
batch, length, method, precision, extra, folder = json.loads(sys.argv[1])
words = "the film was good bad great awful story plot acting music scene".split()
rng = random.Random(0)
rows = [{"text": " ".join(rng.choice(words) for _ in range(3 * length)), "label": i % 2} for i in range(5 * batch)]
pd.DataFrame(rows).to_csv(folder + "/train.csv", index=False)
seen = {}
estimate = memory.estimate_training_memory
def spy(*args, **kwargs):  # the preflight's own estimate, with the arguments it derived from the config and data
    found = estimate(*args, **kwargs)
    if "estimate" not in seen:  # the first call prices the configured batch; later ones only price suggestions
        seen["rss"], seen["estimate"] = psutil.Process().memory_info().rss, found.training
    return found
memory.estimate_training_memory = spy
method_cfg = {"name": method, **({"last_n_layers": 2} if method == "last_n" else {})}
tunesmith.train({"data": {"train_file": folder + "/train.csv", "max_eval_samples": 32}, "method": method_cfg,
                 "task": {"max_length": length}, "output": {"dir": folder + "/run"},
                 "train": {"per_device_train_batch_size": batch, "max_steps": 3, "eval_strategy": "no",
                           "precision": precision, **extra}}, show_progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss_at_check": seen["rss"], "measured": peak - seen["rss"], "estimated": seen["estimate"], "peak": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = parser.parse_args()
    from tunesmith.speed.precision import cpu_model

    rows = []
    for batch, length, method, precision, extra, label in SETTINGS:
        with tempfile.TemporaryDirectory() as folder:
            out = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD),
                                  json.dumps([batch, length, method, precision, extra, folder])],
                                 capture_output=True, text=True, check=True)
        row = {"batch": batch, "length": length, "method": label, "precision": precision,
               **json.loads(out.stdout.strip().splitlines()[-1])}
        row["ratio"] = row["estimated"] / row["measured"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nCPU: {cpu_model()}")
    print("| batch x length | method | precision | measured increase (GiB) | estimated (GiB) | estimated / measured |"
          " peak RSS (GiB) | estimated peak (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} x {r['length']} | {r['method']} | {r['precision']} | {r['measured'] / GiB:.2f} | "
              f"{r['estimated'] / GiB:.2f} | {r['ratio']:.2f} | {r['peak'] / GiB:.2f} | {(r['rss_at_check'] + r['estimated']) / GiB:.2f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
