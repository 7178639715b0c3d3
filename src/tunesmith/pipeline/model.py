"""The model a run trains: loaded, the fine-tuning method applied, sped up, checked for memory; sharded."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from tunesmith.assets import resolve_model_path
from tunesmith.config import RunConfig
from tunesmith import distributed
from tunesmith.errors import ConfigError
from tunesmith.methods.apply import apply_method, count_parameters
from tunesmith.pipeline.devices import Devices
from tunesmith.pipeline.prepare import Prepared
from tunesmith.speed.memory import check_memory
from tunesmith.speed.performance import apply_speed_options
from tunesmith.tasks.base import Task, TaskState

log = logging.getLogger("tunesmith")


@dataclass
class Built:
    model: torch.nn.Module
    parameters: str  # the parameter counts, as the model card and provenance show them
    speed: dict  # the speed options applied (provenance's `speed`)
    warnings: list[str]  # the memory check's


def build_model(cfg: RunConfig, data: Prepared, devices: Devices, train_data, cleanup: contextlib.ExitStack) -> Built:
    """The pretrained model with the method applied and the speed options on (undone by `cleanup`);
    a ResourceError if it would not fit, before the run directory exists."""
    transformers.set_seed(cfg.train.seed)
    model = load_model(cfg, data.task, data.state, data.tokenizer)
    model = apply_method(model, cfg.method, data.task.peft_task_type, data.task.head_modules(model),
                         data.task.adapter_saved_modules(model))
    # Counted before the speed options: skipping unseen embedding rows hides most of the embedding from
    # `parameters()`, which would report the model as half its size.
    params = str(count_parameters(model))
    model, speed = apply_speed_options(model, cfg.train, cfg.method.name, devices.threads, sequence_head=data.task.sequence_head,
                                       device_type=devices.device.type,
                                       train_data=None if data.task.inserts_any_token else train_data,
                                       pad_token_id=data.tokenizer.pad_token_id, cleanup=cleanup)
    if cfg.train.neftune_noise_alpha:
        cleanup.callback(_neftune(model, cfg).remove)
    warnings = check_memory(model, cfg, devices.precision.precision, train_data,
                            logits_elements=lambda batch, length: data.task.logits_elements(model, cfg.task, batch, length))
    return Built(model, params, speed, warnings)


def _neftune(model, cfg: RunConfig):
    from tunesmith.methods.neftune import add_neftune

    if cfg.method.name == "frozen" and cfg.train.cache_frozen_features:
        raise ConfigError("train.neftune_noise_alpha: with method frozen and train.cache_frozen_features the embeddings "
                          "run once before training, so there is nothing to add noise to; set "
                          "train.cache_frozen_features=false or unset train.neftune_noise_alpha")
    log.info("train.neftune_noise_alpha=%s: noise on the input embeddings while training", cfg.train.neftune_noise_alpha)
    return add_neftune(model, cfg.train.neftune_noise_alpha)


def load_model(run_cfg: RunConfig, task: Task, state: TaskState, tokenizer) -> torch.nn.Module:
    """The pretrained model the run starts from, configured for the task (`Task.configure_model`)."""
    cfg = run_cfg.model
    source = resolve_model_path(cfg.name_or_path)
    # Pickled weights can execute code on load: safetensors only unless the user opts in (GGUF is not pickle).
    safetensors_only = not cfg.allow_pickle and not cfg.gguf_file
    try:
        model = task.load_pretrained(
            run_cfg.task,
            source,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            gguf_file=cfg.gguf_file,
            dtype=torch.float32,
            ignore_mismatched_sizes=True,
            use_safetensors=True if safetensors_only else None,
            **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}),
            **task.model_kwargs(state),
        )
    except ImportError as err:  # a kernel that is not installed here (flash-attn on a CPU machine)
        raise ConfigError(f"model.attn_implementation={cfg.attn_implementation}: {str(err).splitlines()[0][:200]}; "
                          "install it, or unset model.attn_implementation (sdpa)") from None
    except (OSError, ValueError) as err:
        if cfg.attn_implementation and "attn_implementation" in str(err):
            raise ConfigError(f"model.attn_implementation: '{cfg.attn_implementation}' is not one this model supports "
                              f"({str(err).splitlines()[0][:200]}); unset it or pick sdpa / eager") from None
        pickled = safetensors_only and Path(source).is_dir() and any(Path(source).glob("*.bin"))
        if pickled:
            raise ConfigError(
                f"model.name_or_path: '{source}' has only pickled .bin weights, which can run code when loaded; "
                "tunesmith loads safetensors only. Convert the weights to safetensors, or set model.allow_pickle=true "
                "(tunesmith train --allow-pickle) if you trust the files"
            ) from None
        raise ConfigError(
            f"model.name_or_path: cannot load '{source}' as {task.auto_model_class} ({str(err).splitlines()[0][:200]}); "
            "check the name or folder (it needs config.json and safetensors weights)"
        ) from None
    _drop_quantizer(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    task.configure_model(model, tokenizer, run_cfg, state)
    return model


def _drop_quantizer(model: torch.nn.Module) -> None:
    # A GGUF file loads dequantized to fp32; the leftover quantizer would block training and saving.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def maybe_shard(model, cfg: RunConfig, accelerator, launcher_fsdp: bool, reshard: bool, speed: dict) -> torch.nn.Module | None:
    """FSDP2 when `train.fsdp` is set (or `accelerate launch` asked for it) and several processes run:
    shards `model` in place and returns a parameter-less copy of it for the final save; else None.
    Under DeepSpeed (which partitions the model in `prepare`) the copy is returned too."""
    speed["fsdp"] = False
    if distributed.deepspeed_requested(accelerator):
        if cfg.train.fsdp:
            raise ConfigError("train.fsdp=true under DeepSpeed (accelerate launch with a DeepSpeed config): both shard the "
                              "model; drop train.fsdp, or launch with configs/accelerate/fsdp.yaml instead")
        stage = accelerator.state.deepspeed_plugin.zero_stage
        speed["deepspeed"] = {"processes": accelerator.num_processes, "zero_stage": stage, "device": accelerator.device.type}
        log.info("accelerate launch (DeepSpeed): ZeRO stage %d over %d processes (%s)", stage, accelerator.num_processes,
                 accelerator.device.type)
        return distributed.meta_copy(model)
    if not cfg.train.fsdp:
        return None
    source = "accelerate launch (FSDP)" if launcher_fsdp else "train.fsdp"
    if accelerator.num_processes == 1:
        log.info("%s: no effect with one process (nothing to shard across)", source)
        return None
    if cfg.method.name == "frozen" and cfg.train.cache_frozen_features:
        log.info("%s: no effect for method frozen with cached features (only the small head trains)", source)
        return None
    skeleton = distributed.meta_copy(model)
    blocks = distributed.shard_model(model, accelerator, reshard_after_forward=reshard)
    speed["fsdp"] = {"processes": accelerator.num_processes, "blocks": blocks, "reshard_after_forward": reshard}
    log.info("%s: FSDP2 over %d processes (%s), %d transformer blocks sharded, then the whole model",
             source, accelerator.num_processes, accelerator.device.type, blocks)
    return skeleton
