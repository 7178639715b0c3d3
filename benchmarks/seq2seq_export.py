"""Seq2seq on ONNX, side by side with PyTorch in the same run: `tunesmith export --format onnx` of a bert2bert
model (the bundled all-MiniLM-L6-v2 warm-started as encoder and decoder) trained briefly on King James Version ->
Bible in Basic English (benchmarks/seq2seq_data.py), fp32 and int8, each with the export's own check (an int8
export the check refuses is recorded as refused, and its arm skipped); then
greedy generation over validation sources through the family's `predict` on each backend: PyTorch fp32 (what
`tunesmith.predict` runs), PyTorch bf16, ONNX fp32, ONNX int8, at batch 16 and batch 1. Reported: sources/s,
generated tokens/s, the share of outputs identical to PyTorch fp32's, and the size of the files. Quality is not
the point (a short run); whether the backends agree is.

    python benchmarks/seq2seq_export.py           # about 10 minutes on 2 cores
    python benchmarks/seq2seq_export.py --quick   # the tiny in-process BART, smoke test (~1 minute)

Prints the CPU model and flags and a markdown table; writes benchmarks/results/seq2seq-export.json.
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

FULL = {"train": 1600, "steps": 100, "batch": 16, "sources": 64, "single": 16, "max_new_tokens": 48}
QUICK = {"train": 16, "steps": 120, "batch": 4, "sources": 8, "single": 4, "max_new_tokens": 16}


def train(tmp: Path, quick: bool, settings: dict) -> tuple[Path, list[str]]:
    import tunesmith

    if quick:
        from tunesmith.tasks.seq2seq.examples import build_bart, contract_examples

        model = str(build_bart(tmp / "tiny-bart"))
        data = contract_examples()["bart"].write_data(tmp)
        rows = [json.loads(line) for line in Path(data["validation_file"]).read_text().splitlines()]
        sources = [r["source"] for r in rows]
        task = contract_examples()["bart"].task
    else:
        import seq2seq_data

        seq2seq_data.build("simplification")
        folder = seq2seq_data.task_dir("simplification")
        rows = {name: seq2seq_data.read_jsonl(folder / f"{name}.jsonl") for name in ("train", "validation")}
        data = {}
        for name, count in (("train", settings["train"]), ("validation", settings["sources"])):
            data[f"{name}_file"] = str(tmp / f"{name}.jsonl")
            Path(data[f"{name}_file"]).write_text("".join(json.dumps(r) + "\n" for r in rows[name][:count]))
        sources = [r["source"] for r in rows["validation"][:settings["sources"]]]
        model = "bundled:all-MiniLM-L6-v2"
        task = {"name": "seq2seq", "source_column": "source", "target_column": "target", "max_source_length": 64,
                "max_target_length": 64}
    run = tunesmith.train({
        "model": {"name_or_path": model}, "data": data, "task": task, "method": {"name": "full"},
        "generation": {"max_new_tokens": settings["max_new_tokens"]},
        "train": {"learning_rate": 1e-4 if not quick else 5e-3, "max_steps": settings["steps"], "seed": 0,
                  "per_device_train_batch_size": settings["batch"], "eval_strategy": "no"},
        "output": {"dir": str(tmp / "run")}}, show_progress=False)
    return Path(run.run_dir), sources


def timed(loaded, sources: list[str], batch_size: int) -> tuple[list[str], float, int]:
    import torch

    tokenizer = loaded.tokenizer
    with torch.inference_mode():
        loaded.predict(sources[:2], batch_size=batch_size)  # warm-up (first-call allocations, session set-up)
        start = time.perf_counter()
        texts = [p["generated_text"] for p in loaded.predict(sources, batch_size=batch_size)]
        seconds = time.perf_counter() - start
    tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in texts)  # + the end token
    return texts, seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    import torch
    import transformers

    import tunesmith
    from tunesmith.errors import ConfigError
    from tunesmith.export.onnx import export_onnx, load_export
    from tunesmith.paths import cache_root
    from tunesmith.speed.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model

    settings = QUICK if args.quick else FULL
    flags = sorted(cpu_flags() & ({"avx2", "avx512f", "avx512_vnni"} | NATIVE_BF16_FLAGS))
    machine = {"cpu": cpu_model(), "flags": flags, "cores": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"CPU: {machine['cpu']} | flags: {', '.join(flags)} | cores {machine['cores']} | torch {torch.__version__}")
    output = args.output or (cache_root() / "seq2seq-export-quick.json" if args.quick else
                             Path(__file__).parent / "results" / "seq2seq-export.json")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir, sources = train(tmp, args.quick, settings)
        exports = {}
        for name, quantize in (("onnx-fp32", None), ("onnx-int8", "int8")):
            try:
                result = export_onnx(run_dir, tmp / name, quantize=quantize)
            except ConfigError as refused:  # the export's check said no: that is a result too
                exports[name] = {"refused": str(refused)}
            else:
                exports[name] = {**{k: v for k, v in result.to_json().items() if k != "folder"},
                                 "megabytes": round(sum(f.stat().st_size for f in (tmp / name).glob("*.onnx")) / 1e6, 1)}
            print(name, json.dumps(exports[name]))
        exports["pytorch"] = {"megabytes": round(sum(f.stat().st_size for f in (run_dir / "model").glob("*.safetensors"))
                                                 / 1e6, 1)}
        torch_fp32 = tunesmith.load(run_dir)
        torch_bf16 = tunesmith.load(run_dir)
        torch_bf16.model.to(torch.bfloat16)
        arms = [("PyTorch fp32", torch_fp32), ("PyTorch bf16", torch_bf16),
                *((f"ONNX {name[5:]}", load_export(tmp / name)) for name in ("onnx-fp32", "onnx-int8")
                  if "refused" not in exports[name])]
        rows, reference = [], {}
        for batch_size, count in ((16, settings["sources"]), (1, settings["single"])):
            for name, loaded in arms:
                texts, seconds, tokens = timed(loaded, sources[:count], batch_size)
                reference.setdefault(batch_size, texts)
                same = sum(a == b for a, b in zip(texts, reference[batch_size])) / len(texts)
                rows.append({"system": name, "batch_size": batch_size, "sources": count, "seconds": round(seconds, 2),
                             "sources_per_second": round(count / seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
                             "same_as_pytorch_fp32": round(same, 3), "example": texts[0]})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| backend | batch | sources/s | tokens/s | same as PyTorch fp32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['batch_size']} | {r['sources_per_second']:.2f} | {r['tokens_per_second']:.1f} | "
              f"{r['same_as_pytorch_fp32']:.1%} |")
    payload = {"benchmark": "seq2seq-export", "machine": machine, "settings": settings, "quick": args.quick,
               "exports": exports, "generation": rows, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
