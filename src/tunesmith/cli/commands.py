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

from tunesmith.errors import EXIT_USER_ERROR, TunesmithError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune, evaluate and use transformer models.")
config_app = typer.Typer(no_args_is_help=True, help="Show, validate, create and document run configs.")
app.add_typer(config_app, name="config")
model_app = typer.Typer(no_args_is_help=True, help="Bring checkpoints into tunesmith (GGUF import).")
app.add_typer(model_app, name="model")
console = Console(stderr=True)
out = Console()
EXIT_INTERRUPTED = 130  # shell convention for Ctrl-C: 128 + SIGINT


def _show_version(value: bool) -> None:
    if value:
        from tunesmith import __version__

        print(f"tunesmith {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Fine-tune, evaluate and use transformer models."""


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

    from tunesmith.loop.interrupt import TrainingInterrupted

    # A stop the user asked for is not an error.
    label = ("stopped:", "bold yellow") if isinstance(err, TrainingInterrupted) else ("error:", "bold red")
    # Messages hold paths and JSON like `data[train]` or `[records]`: printed literally, never as rich markup.
    for line in err.problems:
        console.print(Text.assemble(label, " ", line), highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(err, "exit_code", EXIT_USER_ERROR))


def _interrupted(what: str) -> None:
    from rich.text import Text

    console.print(Text.assemble(("stopped:", "bold yellow"), f" interrupted (Ctrl-C) {what}"), highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INTERRUPTED)


def _check_output(output: Path | None, option: str = "--output") -> None:
    """Before any work: the file the results go to can be written (its folder exists, it is not a folder),
    so finished results are never lost to a bad path. `-` is stdout."""
    if output is None or str(output) == "-":
        return
    if output.is_dir():
        raise TunesmithError(f"{option}: '{output}' is a folder; expected a file name, e.g. {output / 'results.json'}")
    parent = output.parent
    if not parent.is_dir():
        raise TunesmithError(f"{option}: the folder '{parent}' of '{output}' does not exist; create it first (mkdir -p {parent}) "
                             "or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise TunesmithError(f"{option}: cannot write '{output}' (permission denied); choose a path you can write to")


def _write_output(output: Path, text: str, what: str) -> None:
    if str(output) == "-":
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as err:  # the disk filled up, or the folder vanished since the check: results not lost
        sys.stdout.write(text)
        _fail(TunesmithError(f"--output: cannot write '{output}' ({err.strerror or err}); the {what} were printed on stdout instead"))
    console.print(f"wrote {what} to {output}", markup=False, highlight=False, soft_wrap=True)


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


def _looks_like_override(value: Path | None) -> bool:
    """`tunesmith train --resume RUN train.save_steps=50`: click hands the first override to CONFIG."""
    return value is not None and "=" in str(value) and not value.exists()


def _check_before_imports(config: Path | None, overrides: list[str], overwrite: bool) -> None:
    """The checks that need no torch: the config, the data paths and output.dir, reported within a second
    (importing torch and transformers takes seconds)."""
    from tunesmith.config import load_config
    from tunesmith.runs.lock import check_unlocked
    from tunesmith.paths import check_data_paths
    from tunesmith.runs.rundir import check_run_dir

    cfg = load_config(config, overrides)
    if overwrite:
        cfg.output.overwrite = True
    check_data_paths(cfg.data)
    if cfg.output.dir:
        check_unlocked(Path(cfg.output.dir))
        check_run_dir(cfg)


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
    if _looks_like_override(config):
        config, overrides = None, [str(config), *(overrides or [])]
    if config is not None and config.is_dir():
        from tunesmith.errors import ConfigError

        _fail(ConfigError(f"'{config}' is a directory, expected a YAML config file; to continue a run directory use: "
                          f"tunesmith train --resume {config}"))
    overrides = [*(overrides or []), *(["model.allow_pickle=true"] if allow_pickle else [])]
    if (nproc > 1 or max_restarts > 0) and "WORLD_SIZE" not in os.environ:
        if max_restarts and overwrite:
            from tunesmith.errors import ConfigError

            _fail(ConfigError("--overwrite with --max-restarts would replace the run, checkpoints included, on every "
                              "restart; remove the old run directory first (or choose another output.dir) and drop --overwrite"))
        resume = resume or ("auto" if max_restarts else None)  # a restart continues from the latest checkpoint
        flags = (["--quiet"] if quiet else []) + (["--resume", resume] if resume else []) + (["--overwrite"] if overwrite else [])
        raise typer.Exit(_launch_distributed(nproc, config, overrides or [], flags, max_restarts))
    if resume is None and "WORLD_SIZE" not in os.environ:
        try:
            _check_before_imports(config, overrides, overwrite)
        except TunesmithError as err:
            _fail(err)
    _setup_logging()
    from tunesmith import api

    from tunesmith.distributed import end_process_group

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


Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results here (`-` for stdout).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (logs stay on stderr), for scripts.")]


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    data: Annotated[Path, typer.Argument(help="Labelled data file with the training columns.")],
    output: Output = None,
    as_json: Json = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Evaluation batch size.")] = 64,
) -> None:
    """Evaluate a trained run on a labelled data file."""
    from tunesmith.paths import check_data_path
    from tunesmith.runs.rundir import finished_run_dir

    try:  # before the seconds of imports: a mistyped path is reported at once
        _check_output(output)
        finished_run_dir(run_dir)
        check_data_path(data, "DATA")
    except TunesmithError as err:
        _fail(err)
    _setup_logging()
    from tunesmith import api

    try:
        metrics = api.evaluate(run_dir, data, batch_size=batch_size)
    except TunesmithError as err:
        _fail(err)
    except KeyboardInterrupt:
        _interrupted("during the evaluation; nothing was written")
    text = json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
    if as_json or str(output) == "-":  # `-o -`: the JSON is the output, without the table
        sys.stdout.write(text)
    else:
        _print_metrics(f"{data}", metrics)
    if output and str(output) != "-":
        _write_output(output, text, "metrics")


def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    input_file: Annotated[Optional[Path], typer.Option("--input", "-i", help="CSV/TSV/JSON/JSONL/Parquet file, or a .txt file with one text per line.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file (default, or `-`: stdout).")] = None,
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="A text to classify (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Inference batch size.")] = 64,
    output_format: Annotated[str, typer.Option("--format", "-f", help="jsonl, or conll (token<TAB>tag; token classification).")] = "jsonl",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array of the predictions on stdout (logs on stderr).")] = False,
    **family_options,
) -> None:
    """Predict for texts given with --text, in a file (--input), or as lines on stdin (or a CSV with the run's
    text column); question answering: --question with --context, or a file with question and context columns
    (or SQuAD JSON)."""
    from tunesmith.runs.rundir import finished_run_dir

    try:  # before the seconds of imports: a mistyped path is reported at once
        _check_output(output)
        finished_run_dir(run_dir)
        if input_file is not None and not input_file.exists():
            raise TunesmithError(f"--input: file '{input_file}' not found; check the path")
        if as_json and output_format != "jsonl":
            raise TunesmithError(f"--json writes one JSON array; it cannot be combined with --format {output_format}; drop one of them")
    except TunesmithError as err:
        _fail(err)
    _setup_logging()
    from tunesmith import api
    from tunesmith.cli.predict_io import render_predictions
    from tunesmith.data.inputs import read_inputs

    try:
        loaded = api.load(run_dir)
        inputs_options, predict_options = _family_options(loaded.config.task.name, family_options)
        inputs, records = read_inputs(loaded.config, input_file, text, inputs_options)
        predictions = loaded.predict(inputs, batch_size=batch_size, **predict_options)
        lines = render_predictions(records, predictions, output_format)
    except TunesmithError as err:
        _fail(err)
    except KeyboardInterrupt:
        _interrupted("during prediction; nothing was written")
    if as_json:
        body = json.dumps([json.loads(line) for line in lines], indent=2, ensure_ascii=False) + "\n"
    else:
        body = "\n".join(lines) + "\n"
    if output and str(output) != "-":
        _write_output(output, body, f"{len(predictions)} predictions")
    else:
        sys.stdout.write(body)


def _family_option_parameters() -> list[inspect.Parameter]:
    """`predict`'s options of the registered task families (`Family.predict_options`), each once."""
    from tunesmith.tasks import families

    parameters: dict[str, inspect.Parameter] = {}
    for family in families().values():
        for option in family.predict_options:
            kind = Optional[list[str]] if option.repeatable else Optional[str]
            parameters.setdefault(option.name, inspect.Parameter(
                option.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                annotation=Annotated[kind, typer.Option(f"--{option.name.replace('_', '-')}", help=option.help)],
            ))
    return list(parameters.values())


def _family_options(task_name: str, given: dict) -> tuple[dict, dict]:
    """The family options given, split into (inputs options, predict keywords); an option of another family is an error."""
    from tunesmith.tasks import families

    given = {name: value for name, value in given.items() if value}
    declared = {option.name: option for option in families()[task_name].predict_options}
    for name in given:
        if name not in declared:
            owners = [f.name for f in families().values() if any(o.name == name for o in f.predict_options)]
            raise TunesmithError(f"--{name.replace('_', '-')} applies to {' and '.join(owners)} runs only; this run is "
                                 f"{task_name}; drop it")
    split = ({}, {})
    for name, value in given.items():
        split[declared[name].feeds == "predict"][name] = value
    return split


_PREDICT_SIGNATURE = inspect.signature(predict, eval_str=True)


def refresh_family_options() -> None:
    """typer reads a command's options from its signature when the CLI runs: predict's own, then every
    registered family's. Called at import; again after registering a family at run time (a test's toy family)."""
    own = [p for p in _PREDICT_SIGNATURE.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    predict.__signature__ = _PREDICT_SIGNATURE.replace(parameters=[*own, *_family_option_parameters()])
    predict.__annotations__ = {p.name: p.annotation for p in predict.__signature__.parameters.values()}


refresh_family_options()
app.command()(predict)


def _generation_option(text: str):
    return Annotated[Optional[str], typer.Option(show_default=False, help=f"{text} (default: the run's generation_config.json).")]


MaxNewTokens = _generation_option("Most tokens generated per output")
DoSample = _generation_option("Sample (true) instead of greedy or beam decoding (false)")
Temperature = _generation_option("Sampling temperature")
TopP = _generation_option("Sampling: keep the smallest set of tokens with this probability mass")
TopK = _generation_option("Sampling: keep the k most likely tokens")
NumBeams = _generation_option("Beam search width")
RepetitionPenalty = _generation_option("Penalty on tokens already generated (1.0: none)")
Seed = Annotated[Optional[str], typer.Option(show_default=False, help="Random seed: the same seed samples the same text.")]


def _generation_settings(**given) -> dict:
    """The generation options given on the command line (strings; validated with the run's `generation` section)."""
    return {name: value for name, value in given.items() if value not in (None, [])}


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A finished causal-LM or seq2seq run directory.")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable); none: one per line on stdin.")] = None,
    max_new_tokens: MaxNewTokens = None,
    do_sample: DoSample = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    num_beams: NumBeams = None,
    repetition_penalty: RepetitionPenalty = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop at this string (repeatable).")] = None,
    seed: Seed = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array of {prompt, generated_text} on stdout.")] = False,
) -> None:
    """Generate text from prompts with a trained run (greedy by default; --do-sample true --temperature 0.7 --top-p 0.9
    to sample). Unset options keep the run's generation_config.json."""
    from tunesmith.runs.rundir import finished_run_dir

    try:
        finished_run_dir(run_dir)
    except TunesmithError as err:
        _fail(err)
    prompts = list(prompt) if prompt else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        _fail(TunesmithError("generate: no prompt; pass --prompt TEXT, or prompts one per line on stdin"))
    _setup_logging()
    from tunesmith import api

    settings = _generation_settings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                                    top_k=top_k, num_beams=num_beams, repetition_penalty=repetition_penalty, stop_strings=stop)
    try:
        loaded = api.load(run_dir)
        texts = loaded.generate(prompts, **settings, **({"seed": seed} if seed is not None else {}))
    except TunesmithError as err:
        _fail(err)
    except KeyboardInterrupt:
        _interrupted("during generation")
    if as_json:
        sys.stdout.write(json.dumps([{"prompt": p, "generated_text": t} for p, t in zip(prompts, texts)], indent=2,
                                    ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n\n".join(texts) + "\n")


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(help="A finished causal-LM run directory with a chat template.")],
    system: Annotated[Optional[str], typer.Option(help="System prompt (default: the run's task.system_prompt).")] = None,
    max_new_tokens: MaxNewTokens = None,
    do_sample: DoSample = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
) -> None:
    """Chat with a trained run in the terminal: the run's chat template, the history kept, the reply streamed."""
    from tunesmith.runs.rundir import finished_run_dir

    try:
        finished_run_dir(run_dir)
    except TunesmithError as err:
        _fail(err)
    _setup_logging()
    from tunesmith import api
    from tunesmith.cli.chat_loop import run_chat

    settings = _generation_settings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                                    top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)
    try:
        loaded = api.load(run_dir)
        run_chat(loaded, input, sys.stdout, system=system, **settings)
    except TunesmithError as err:
        _fail(err)


@app.command()
def serve(
    run_dirs: Annotated[list[Path], typer.Argument(help="Finished run directories; requests pick one by its `model` name.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 opens the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    name: Annotated[Optional[list[str]], typer.Option(help="A served run's name (default: its folder's), once per run.")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        help="Bearer token every /v1 and /metrics request must carry (default: $TUNESMITH_API_KEY; unset: open).")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Inputs of concurrent requests run together, at most.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(
        help="How long a request waits for others to batch with (0: none; requests that queue while the model runs "
             "are batched).")] = 0.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413 above).")] = 1_000_000,
    max_items: Annotated[int, typer.Option(help="Most inputs (or chat messages) per request (413 above).")] = 256,
    max_chars: Annotated[int, typer.Option(help="Longest text per input (413 above).")] = 20_000,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most new tokens a request may ask for (422 above).")] = 1024,
    max_num_beams: Annotated[int, typer.Option(help="Widest beam search a request may ask for (422 above).")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds before a request is answered 504.")] = 120.0,
    backend: Annotated[str, typer.Option(help="torch (run directories) or onnx (folders `tunesmith export` wrote).")] = "torch",
    dtype: Annotated[str, typer.Option(
        help="auto (bf16 where this CPU measured it faster, as training's precision: auto; else fp32), fp32 (the "
             "scores tunesmith predict gives), or bf16. Torch backend only.")] = "auto",
) -> None:
    """Serve trained runs over HTTP: /v1/predict for every family, OpenAI-compatible /v1/chat/completions and
    /v1/completions for causal LMs, /v1/models, /healthz, /readyz, /metrics, and the API docs at /docs."""
    from tunesmith.runs.rundir import finished_run_dir

    try:
        for run_dir in run_dirs:
            if backend != "onnx":  # an export folder is checked when it loads
                finished_run_dir(run_dir)
    except TunesmithError as err:
        _fail(err)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        from tunesmith.errors import ConfigError

        _fail(ConfigError(f"tunesmith serve needs {err.name}, a dependency of tunesmith that is not installed here; "
                          "reinstall tunesmith (pip install -e . in a checkout) to bring it back"))
    _setup_logging()
    from tunesmith import serving

    try:
        settings = serving.ServeSettings(
            api_key=api_key or os.environ.get(serving.API_KEY_ENV) or None, max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes, max_items=max_items, max_chars=max_chars,
            max_new_tokens=max_new_tokens, max_num_beams=max_num_beams, request_timeout_s=timeout)
    except ValueError as err:
        from tunesmith.errors import ConfigError

        _fail(ConfigError(f"{err}; fix the option"))
    if host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        logging.getLogger("tunesmith").warning("serving on %s without an API key: anyone who can reach this address can use the models "
                    "(--api-key or $%s)", host, serving.API_KEY_ENV)
    try:
        serving.serve(run_dirs, host=host, port=port, settings=settings, names=name, backend=backend, dtype=dtype)
    except TunesmithError as err:
        _fail(err)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (classification, token classification, QA, seq2seq).")],
    out: Annotated[Path, typer.Argument(help="The folder to write: the .onnx files, tokenizer, label map, export.json.")],
    format: Annotated[str, typer.Option("--format", help="Export format.")] = "onnx",
    quantize: Annotated[Optional[str], typer.Option(help="int8: dynamic int8 weights (checked: >= 99% same predictions).")] = None,
    sample: Annotated[Optional[Path], typer.Option(help="Inputs to check the export on (default: the run's validation data).")] = None,
    samples: Annotated[int, typer.Option(help="How many sample inputs the check runs.")] = 200,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
) -> None:
    """Export a run to ONNX (adapters merged; dynamic batch and sequence axes) and check it against PyTorch on a
    validation sample; the folder serves with `tunesmith serve OUT --backend onnx`."""
    from tunesmith.runs.rundir import finished_run_dir

    try:
        finished_run_dir(run_dir)
        if format != "onnx":
            from tunesmith.errors import ConfigError

            raise ConfigError(f"--format: expected onnx, found {format!r}")
    except TunesmithError as err:
        _fail(err)
    _setup_logging()
    from tunesmith.export.onnx import export_onnx

    try:
        result = export_onnx(run_dir, out, quantize=quantize, sample_file=sample, samples=samples, overwrite=overwrite)
    except TunesmithError as err:
        _fail(err)
    kind = f"int8 ({result.quantized})" if result.quantize else "fp32"
    console.print(f"exported {kind} ONNX to {result.folder} in {result.seconds:.1f} s; checked on {result.samples} inputs: "
                  f"largest output difference {result.max_abs_diff:.2g}, same predictions {result.agreement:.1%}",
                  highlight=False, soft_wrap=True)


@app.command()
def doctor(
    as_json: Json = False,
    recheck: Annotated[bool, typer.Option("--recheck", help="Measure bf16 against fp32 again (train.precision=auto caches its decision per CPU and torch version).")] = False,
) -> None:
    """Versions, threads, bf16 support and which bundled assets are installed."""
    import torch

    from tunesmith.assets import installed_assets
    from tunesmith.speed.precision import NATIVE_BF16_FLAGS, choose_precision, cpu_flags, cpu_model
    from tunesmith.runs.rundir import package_versions

    rows: dict[str, str] = {name: version or "not installed" for name, version in package_versions().items()}
    rows["python"] = sys.version.split()[0]
    rows["cpu"] = cpu_model()
    rows["torch threads (intra/inter)"] = f"{torch.get_num_threads()}/{torch.get_num_interop_threads()}"
    rows["native bf16 flags"] = ", ".join(sorted(NATIVE_BF16_FLAGS & cpu_flags())) or "none"
    rows["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = choose_precision("auto", device, recheck=recheck)
    rows["precision: auto"] = f"{choice.precision} — {choice.reason}"
    rows["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "unset")
    rows.update(installed_assets())
    if as_json:
        print(json.dumps({**rows, "precision: auto": {"choice": choice.precision, "reason": choice.reason}}, indent=2, ensure_ascii=False))
        return
    table = RichTable(title="tunesmith doctor")
    table.add_column("item")
    table.add_column("value")
    for name, value in rows.items():
        table.add_row(name, value)
    out.print(table)


@app.command()
def demo(
    output_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/demo, or runs/demo-2, ... when that holds a run).")] = None,
    full: Annotated[bool, typer.Option(help="Train on all 8,530 Rotten Tomatoes sentences (slower).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in --output-dir (kept until the new one has saved).")] = False,
) -> None:
    """Fine-tune the bundled MiniLM on Rotten Tomatoes sentences, evaluate, and classify examples."""
    _setup_logging()
    from tunesmith.cli.demo import demo_run_dir, run_demo

    try:
        run_demo(demo_run_dir(output_dir, overwrite), full=full, printer=out, overwrite=overwrite)
    except TunesmithError as err:
        _fail(err)


@config_app.command("show")
def config_show(config: Annotated[Optional[Path], typer.Argument()] = None, overrides: Overrides = None) -> None:
    """Print the fully resolved config (defaults filled in)."""
    from tunesmith.config import dump_config, load_config

    if _looks_like_override(config):
        config, overrides = None, [str(config), *(overrides or [])]
    notes: list[str] = []
    try:
        cfg = load_config(config, overrides or [], notes=notes)
    except TunesmithError as err:
        _fail(err)
    _print_notes(notes)  # on stderr: stdout stays YAML
    print(dump_config(cfg), end="")


def _print_notes(notes: list[str]) -> None:
    from rich.text import Text

    for line in notes:
        console.print(Text.assemble(("note:", "cyan"), " ", line), highlight=False, soft_wrap=True)


@config_app.command("validate")
def config_validate(config: Path, overrides: Overrides = None) -> None:
    """Check a config: unknown keys (with the closest valid key), types, ranges, and that its data files exist."""
    from tunesmith.config import load_config
    from tunesmith.paths import check_data_paths

    notes: list[str] = []
    try:
        check_data_paths(load_config(config, overrides or [], notes=notes).data)
    except TunesmithError as err:
        _fail(err)
    _print_notes(notes)
    from rich.text import Text

    console.print(Text.assemble(("ok:", "green"), f" {config} is valid"), highlight=False, soft_wrap=True)


@config_app.command("init")
def config_init(
    path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path("tunesmith.yaml"),
    train_file: Annotated[Optional[Path], typer.Option("--train-file", help="Your training data (CSV, TSV, JSON, JSONL, Parquet); its columns are checked.")] = None,
    text_column: Annotated[str, typer.Option(help="Column with the text to classify.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column with the label.")] = "label",
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a starter config with every section and its defaults (sequence classification; see configs/
    for the other task families)."""
    from tunesmith.config import RunConfig, dump_config

    try:
        if path.is_dir():
            raise TunesmithError(f"'{path}' is a folder; expected a file name for the config, e.g. {path / 'my.yaml'}")
        if path.exists() and not force:
            raise TunesmithError(f"'{path}' exists; pass --force to overwrite it or choose another path")
        if not path.parent.is_dir():
            raise TunesmithError(f"the folder '{path.parent}' does not exist; create it first (mkdir -p {path.parent}) or "
                                 "choose another path for the config")
        data = {"train_file": _config_relative(train_file, path) if train_file else "train.csv"}
        if train_file:
            _check_columns(train_file, [text_column, label_column])
        cfg = RunConfig.model_validate({"data": data, "task": {"text_column": text_column, "label_column": label_column}})
        header = "# tunesmith run config. Reference: docs/config.md. Validate: tunesmith config validate THIS_FILE\n"
        if not train_file:
            header += "# Set data.train_file to your CSV (columns: text, label) before training.\n"
        path.write_text(header + dump_config(cfg), encoding="utf-8")
    except TunesmithError as err:
        _fail(err)
    except OSError as err:
        _fail(TunesmithError(f"cannot write '{path}' ({err.strerror or err}); choose a path you can write to"))
    console.print(f"wrote {path}" + ("" if train_file else " (edit data.train_file before training)"),
                  markup=False, highlight=False, soft_wrap=True)


def _config_relative(data_file: Path, config_path: Path) -> str:
    # Paths in a config are read relative to the config's folder.
    return os.path.relpath(data_file.resolve(), config_path.parent.resolve())


def _check_columns(data_file: Path, columns: list[str]) -> None:
    from tunesmith.data.loaders import read_file

    table = read_file(data_file, field="--train-file")
    found = [str(c) for c in table.frame.columns]
    missing = [c for c in columns if c not in found]
    if missing:
        options = " ".join(f"--{flag}-column NAME" for flag, c in zip(("text", "label"), columns) if c in missing)
        raise TunesmithError(f"--train-file: '{data_file}' has no column {', '.join(repr(c) for c in missing)}; columns found: "
                             f"{', '.join(found)}; name the right ones with {options}")


@config_app.command("reference")
def config_reference_cmd(output: Annotated[Optional[Path], typer.Option("--output", "-o")] = None) -> None:
    """Print (or write) the generated reference of every config key."""
    from tunesmith.config import config_reference

    text = config_reference()
    if output:
        output.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)


def main() -> None:
    _refuse_dashed_overrides(sys.argv[1:])
    app()


def _refuse_dashed_overrides(args: list[str]) -> None:
    """`--train.learning_rate=1e-4` (litgpt's and Hydra's habit) would get click's bare "No such option"."""
    import re

    for arg in args:
        match = re.fullmatch(r"--?([A-Za-z_]+(?:\.[A-Za-z_]+)+)(=.*)?", arg)
        if match:
            from rich.text import Text

            fixed = match.group(1) + (match.group(2) or "=VALUE")
            console.print(Text.assemble(("error:", "bold red"), f" unknown option '{arg}': config overrides are written without "
                                        f"dashes, e.g. `tunesmith train CONFIG {fixed}`; drop the leading '--'"),
                          highlight=False, soft_wrap=True)
            raise SystemExit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()


@model_app.command("import")
def model_import(
    file: Annotated[Path, typer.Argument(help="A llama.cpp .gguf file (quantized or not).")],
    out: Annotated[Path, typer.Argument(help="A new folder for the transformers model.")],
    dtype: Annotated[str, typer.Option(help="Weights stored as float32 or bfloat16.")] = "float32",
) -> None:
    """Write a GGUF file as a plain transformers folder (safetensors, tokenizer with chat template, no quantization
    attributes) that trains like any model: `model.name_or_path: OUT`. A quantized file gives a dequantized model."""
    _setup_logging()
    from tunesmith.convert.gguf import import_gguf

    try:
        result = import_gguf(file, out, dtype)
    except TunesmithError as err:
        _fail(err)
    for line in result.notes:
        console.print(f"note: {line}", highlight=False, soft_wrap=True)
    console.print(f"wrote {result.folder} ({result.architecture}, {result.parameters:,} parameters, {dtype})", highlight=False)
