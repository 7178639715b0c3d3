"""The `tunesmith` command: a thin layer over the Python API.

User errors (bad config, bad data, missing files) print one line per problem and exit with code
2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table as RichTable

from .errors import EXIT_USER_ERROR, TunesmithError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune, evaluate and use transformer models.")
config_app = typer.Typer(no_args_is_help=True, help="Show, validate, create and document run configs.")
app.add_typer(config_app, name="config")
console = Console(stderr=True)
out = Console()


def _setup_logging(verbose: bool = False) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from accelerate.utils import get_cpu_distributed_information

    # Under DDP every process runs the same steps: the first process of each machine logs them, the others
    # only warnings and errors (as Trainer's log_level_replica="warning" with log_on_each_node).
    replica = get_cpu_distributed_information().local_rank != 0
    level = logging.DEBUG if verbose else logging.WARNING if replica else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[_rich_handler()])
    # transformers/datasets chatter (weight-loading reports, per-map bars) drowns the run's own log.
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _rich_handler():
    from rich.logging import RichHandler

    return RichHandler(console=console, show_path=False, show_time=False, markup=False)


def _fail(err: TunesmithError) -> None:
    from rich.text import Text

    # Messages hold paths and JSON like `data[train]` or `[records]`: printed literally, never as rich markup.
    for line in err.problems:
        console.print(Text.assemble(("error:", "bold red"), " ", line), highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(err, "exit_code", EXIT_USER_ERROR))


def _print_metrics(title: str, metrics: dict) -> None:
    table = RichTable(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, int) and not isinstance(value, bool):
            table.add_row(key, str(value))
    out.print(table)


Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.learning_rate=1e-4 method=lora")]


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML run config (see `tunesmith config init`); optional with --resume RUN_DIR.")] = None,
    overrides: Overrides = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Data-parallel processes on this machine (DDP; gloo on CPU).")] = 1,
    max_restarts: Annotated[int, typer.Option("--max-restarts", min=0, help="Restart the processes up to N times when one fails (torchrun --max-restarts), each time continuing from the latest checkpoint (--resume auto).")] = 0,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue RUN_DIR from its latest checkpoint, or `auto`: the config's output.dir if it has one.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Also load pickled .bin weights (they can run code); same as model.allow_pickle=true.")] = False,
) -> None:
    """Fine-tune a model as CONFIG says; writes a run directory with the model, metrics and logs."""
    if config is not None and config.is_dir():
        from .errors import ConfigError

        _fail(ConfigError(f"'{config}' is a directory, expected a YAML config file; to continue a run directory use: "
                          f"tunesmith train --resume {config}"))
    overrides = [*(overrides or []), *(["model.allow_pickle=true"] if allow_pickle else [])]
    if (nproc > 1 or max_restarts > 0) and "WORLD_SIZE" not in os.environ:
        if max_restarts and overwrite:
            from .errors import ConfigError

            _fail(ConfigError("--overwrite with --max-restarts would replace the run, checkpoints included, on every "
                              "restart; remove the old run directory first (or choose another output.dir) and drop --overwrite"))
        resume = resume or ("auto" if max_restarts else None)  # a restart continues from the latest checkpoint
        flags = (["--quiet"] if quiet else []) + (["--resume", resume] if resume else []) + (["--overwrite"] if overwrite else [])
        raise typer.Exit(_launch_distributed(nproc, config, overrides or [], flags, max_restarts))
    _setup_logging()
    from . import api

    from .distributed import end_process_group

    try:
        result = api.train(config, overrides or [], show_progress=not quiet, resume=resume, overwrite=overwrite)
    except TunesmithError as err:
        end_process_group(finished=False)
        _fail(err)
    # This process owns the group (torchrun / accelerate launch): close it before the interpreter exits.
    end_process_group()
    from accelerate.utils import get_cpu_distributed_information

    if get_cpu_distributed_information().rank != 0:
        return  # under DDP the main process reports (RANK, or an MPI launcher's rank)
    _print_metrics("validation (best checkpoint)", result.metrics["validation"])
    if "test" in result.metrics:
        _print_metrics("test", result.metrics["test"])
    out.print(f"run directory: {result.run_dir}", markup=False, highlight=False, soft_wrap=True)


def _launch_distributed(nproc: int, config: Path | None, overrides: list[str], flags: list[str], max_restarts: int = 0) -> int:
    """Re-run this command under torchrun: N processes, each `tunesmith train` with DDP via accelerate."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *([f"--max-restarts={max_restarts}"] if max_restarts else []), "-m", "tunesmith.cli", "train", *([str(config)] if config else []), *overrides, *flags]
    console.print(f"launching {nproc} process{'es' if nproc > 1 else ''}: {' '.join(command[1:])}", highlight=False, markup=False)
    import psutil

    # torchrun gives every process OMP_NUM_THREADS=1 when it is unset; give each its share of the cores instead.
    env = {"OMP_NUM_THREADS": str(max(1, (psutil.cpu_count(logical=False) or 1) // nproc)), **os.environ}
    return subprocess.run(command, check=False, env=env).returncode


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    data: Annotated[Path, typer.Argument(help="Labelled data file with the training columns.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write metrics JSON here.")] = None,
) -> None:
    """Evaluate a trained run on a labelled data file."""
    _setup_logging()
    from . import api

    try:
        metrics = api.evaluate(run_dir, data)
    except TunesmithError as err:
        _fail(err)
    _print_metrics(f"{data}", metrics)
    if output:
        output.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    input_file: Annotated[Optional[Path], typer.Option("--input", "-i", help="CSV/TSV/JSON/JSONL/Parquet file, or a .txt file with one text per line.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file (default: stdout).")] = None,
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="A text to classify (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option(help="Inference batch size.")] = 64,
    output_format: Annotated[str, typer.Option("--format", "-f", help="jsonl, or conll (token<TAB>tag; token classification).")] = "jsonl",
    aggregation: Annotated[Optional[str], typer.Option(help="Token classification: first, average or max (default: the run's).")] = None,
    question: Annotated[Optional[list[str]], typer.Option("--question", help="Question answering: a question (repeatable).")] = None,
    context: Annotated[Optional[list[str]], typer.Option("--context", help="Question answering: its context (one per --question, or one for all).")] = None,
) -> None:
    """Predict for texts given with --text, in a file (--input), or as lines on stdin; question answering:
    --question with --context, or a file with question and context columns (or SQuAD JSON)."""
    _setup_logging()
    from . import api
    from .predict_io import read_inputs, render_predictions

    try:
        loaded = api.load(run_dir)
        if aggregation and "aggregation" not in inspect.signature(loaded.task.predict).parameters:
            raise TunesmithError("--aggregation applies to token classification runs only; drop it")
        inputs, records = read_inputs(loaded.config, input_file, text, question, context)
        predictions = loaded.predict(inputs, batch_size=batch_size, **({"aggregation": aggregation} if aggregation else {}))
        lines = render_predictions(records, predictions, output_format)
    except TunesmithError as err:
        _fail(err)
    if output:
        output.write_text("\n".join(lines) + "\n", encoding="utf-8")
        console.print(f"wrote {len(predictions)} predictions to {output}", markup=False, highlight=False, soft_wrap=True)
    else:
        for line in lines:
            print(line)


@app.command()
def doctor() -> None:
    """Versions, threads, bf16 support and which bundled assets are installed."""
    import torch

    from .assets import installed_assets
    from .precision import NATIVE_BF16_FLAGS, choose_precision, cpu_flags, cpu_model
    from .run import package_versions

    table = RichTable(title="tunesmith doctor")
    table.add_column("item")
    table.add_column("value")
    for name, version in package_versions().items():
        table.add_row(name, version or "not installed")
    table.add_row("python", sys.version.split()[0])
    table.add_row("cpu", cpu_model())
    table.add_row("torch threads (intra/inter)", f"{torch.get_num_threads()}/{torch.get_num_interop_threads()}")
    table.add_row("native bf16 flags", ", ".join(sorted(NATIVE_BF16_FLAGS & cpu_flags())) or "none")
    table.add_row("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = choose_precision("auto", device)
    table.add_row("precision: auto", f"{choice.precision} — {choice.reason}")
    table.add_row("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "unset"))
    for name, where in installed_assets().items():
        table.add_row(name, where)
    out.print(table)


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    full: Annotated[bool, typer.Option(help="Train on all 8,530 Rotten Tomatoes sentences (slower).")] = False,
) -> None:
    """Fine-tune the bundled MiniLM on Rotten Tomatoes sentences, evaluate, and classify examples."""
    _setup_logging()
    from .demo import run_demo

    try:
        run_demo(output_dir, full=full, printer=out)
    except TunesmithError as err:
        _fail(err)


@config_app.command("show")
def config_show(config: Annotated[Optional[Path], typer.Argument()] = None, overrides: Overrides = None) -> None:
    """Print the fully resolved config (defaults filled in)."""
    from .config import dump_config, load_config

    try:
        print(dump_config(load_config(config, overrides or [])), end="")
    except TunesmithError as err:
        _fail(err)


@config_app.command("validate")
def config_validate(config: Path, overrides: Overrides = None) -> None:
    """Check a config: unknown keys (with the closest valid key), types, ranges."""
    from .config import load_config

    try:
        load_config(config, overrides or [])
    except TunesmithError as err:
        _fail(err)
    from rich.text import Text

    console.print(Text.assemble(("ok:", "green"), f" {config} is valid"), highlight=False, soft_wrap=True)


@config_app.command("init")
def config_init(
    path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path("tunesmith.yaml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a starter config with every section and its defaults."""
    from .config import RunConfig, dump_config

    if path.exists() and not force:
        _fail(TunesmithError(f"'{path}' exists; pass --force to overwrite it or choose another path"))
    cfg = RunConfig.model_validate({"data": {"train_file": "train.csv"}})
    header = "# tunesmith run config. Reference: docs/config.md. Validate: tunesmith config validate THIS_FILE\n"
    path.write_text(header + dump_config(cfg), encoding="utf-8")
    console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)


@config_app.command("reference")
def config_reference_cmd(output: Annotated[Optional[Path], typer.Option("--output", "-o")] = None) -> None:
    """Print (or write) the generated reference of every config key."""
    from .config import config_reference

    text = config_reference()
    if output:
        output.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
