"""Generation shared by the generating families (sequence-to-sequence, causal LMs): the run's `generation`
section written onto a model's GenerationConfig (saved as generation_config.json, which plain `generate()`
reads), per-call overrides validated like the section, and `generate` that stays in step across processes."""

from __future__ import annotations

import torch
from pydantic import ValidationError
from transformers import GenerationConfig

from tunesmith.config.schema import GenerationSection
from tunesmith.errors import ConfigError


def apply_settings(model, settings: dict, max_new_tokens: int, **fixed) -> GenerationConfig:
    """The model's generation config with the run's settings: a key left unset keeps the checkpoint's own value;
    `max_new_tokens` is the section's or the task's default (never transformers' 20); `fixed` are ids the task
    decides (eos, pad, decoder start). Validated as `save_pretrained` would, so a bad combination fails before
    the run directory exists. Sets `model.generation_config` and returns it."""
    generation = model.generation_config or GenerationConfig.from_model_config(model.config)
    for key, value in settings.items():
        if value is not None:
            setattr(generation, key, value)
    generation.max_new_tokens = settings.get("max_new_tokens") or max_new_tokens
    for key, value in fixed.items():
        setattr(generation, key, value)
    try:
        generation.validate(strict=True)
    except ValueError as err:
        raise ConfigError(f"generation: these settings do not fit together ({' '.join(str(err).split())[:300]}); "
                          "fix the generation section") from None
    model.generation_config = generation
    return generation


def overrides(given: dict) -> dict:
    """Per-call generation settings (`predict(..., num_beams=4)`, `--num-beams 4`), validated like the config's
    `generation` section (strings from the command line become numbers)."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(GenerationSection.model_fields))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a generation setting; expected some of "
                          f"{', '.join(GenerationSection.model_fields)}")
    try:
        section = GenerationSection(**given)
    except ValidationError as err:
        problems = [f"{e['loc'][0]} (--{str(e['loc'][0]).replace('_', '-')}): {e['msg'].lower()}, found {e['input']!r}"
                    for e in err.errors()]
        raise ConfigError("; ".join(problems) + "; fix the value") from None
    return {k: getattr(section, k) for k in given}


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokenizer=None, **settings) -> torch.Tensor:
    """`generate` with the model's generation config (and per-call settings); `tokenizer` lets stop strings work.
    Under several processes every process keeps stepping until all have finished (sharded weights are gathered
    collectively at each step)."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrap the model
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    synced = distributed and torch.distributed.get_world_size() > 1
    extra = {"tokenizer": tokenizer} if tokenizer is not None and _stop_strings(inner, settings) else {}
    return inner.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=synced, **extra, **settings)


def _stop_strings(model, settings: dict) -> bool:
    return bool(settings.get("stop_strings") or getattr(model.generation_config, "stop_strings", None))
