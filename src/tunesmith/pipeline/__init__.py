"""The phases of a training run, in the order `api._train` calls them.

- `prepare`: the config to run (fresh, resumed, overwritten), the data checked (splits, the task's
  preflight), the tokenizer, the config/data fingerprint; then the splits encoded.
- `devices`: threads, precision and the Accelerator (launcher checks, FSDP/DeepSpeed take-over).
- `model`: the pretrained model loaded, the fine-tuning method applied, speed options, the memory
  check; FSDP2 sharding (or DeepSpeed's skeleton) once the loaders exist.
- `run_dir`: the run directory locked and created only once all of that passed (`NewRun` undoes
  what this run wrote if it fails or is stopped).
- `fit`: the loaders, the `frozen` feature cache, the best-model metric, the training loop.
- `finish`: the final evaluation (after the task's `after_training`), the plain trained model, the
  saved model and run files (metrics, provenance, model card).

Each phase is a function of what the earlier ones returned (small dataclasses: `prepare.Prepared`,
`devices.Devices`, `model.Built`, `fit.Fitted`), nothing more.
"""

from tunesmith.pipeline import prepare, devices, model, run_dir, fit, finish  # noqa: E402  (the phases, in order)

__all__ = ["devices", "finish", "fit", "model", "prepare", "run_dir"]
