"""The `task` section of the causal language-model family (`task: {name: causal_lm, ...}`): continued
pretraining on raw text, instruction tuning and chat. Keys are named like TRL's `SFTConfig` and LLaMA-Factory's
options where those exist. Generation settings are the shared `generation` section."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tunesmith.config.task_base import TaskConfigBase

FORMATS = ("text", "prompt_completion", "alpaca", "messages", "sharegpt")


class CausalLMTaskConfig(TaskConfigBase):
    """A decoder-only language model (GPT-2, Llama, Qwen, SmolLM, Mistral, ...): raw text or conversations."""

    pipeline_tag: ClassVar[str] = "text-generation"
    name: Literal["causal_lm"] = "causal_lm"
    format: Literal["auto", "text", "prompt_completion", "alpaca", "messages", "sharegpt"] = Field(
        "auto", description="How rows are read: `text` (raw text: continued pretraining), `prompt_completion`, `alpaca` "
        "(instruction, input, output, optional system), `messages` (role/content turns), `sharegpt` (conversations of "
        "from/value). `auto`: from the columns (.txt files and folders of them are text)."
    )
    text_column: str = Field("text", description="format text: the column with the documents (TRL's `dataset_text_field`).")
    prompt_column: str = Field("prompt", description="format prompt_completion: the prompt column.")
    completion_column: str = Field("completion", description="format prompt_completion: the completion column.")
    messages_column: str | None = Field(
        None, description="format messages / sharegpt: the column of turns; unset: `messages`, else `conversations`."
    )
    system_prompt: str | None = Field(
        None, description="A system message put before conversations that have none (prompt_completion, alpaca, messages)."
    )
    chat_template: str = Field(
        "auto", description="How conversations become text: `auto` (the tokenizer's chat template, else `chatml`), `chatml`, "
        "`plain` (prompt then completion then EOS, no markup: base models), or a Jinja template. Saved with the model."
    )
    train_on: Literal["assistant", "all", "last"] = Field(
        "assistant", description="Which tokens carry the loss: every assistant turn (with its end-of-turn token), every "
        "token, or the last assistant turn only. format text always trains on all."
    )
    block_size: int = Field(1024, gt=1, description="format text: documents are joined with EOS and cut into blocks of this many tokens.")
    max_length: int = Field(1024, gt=1, description="Longest tokenized conversation (or packed row of them).")
    packing: bool | None = Field(
        None, description="Pack several short examples into one row of `max_length` tokens; packed examples never attend "
        "to each other (positions restart, block-diagonal attention). Unset: on for text, off for conversations."
    )
    eval_packing: bool = Field(False, description="Pack evaluation rows too (faster; each example's loss is unchanged).")
    unlearnable: Literal["warn", "error"] = Field(
        "warn", description="Conversations with no trainable token, or whose last trained turn is cut off by max_length: "
        "`warn` counts them and leaves them out of training, `error` stops in preflight naming their rows."
    )
    sample_prompts: int = Field(
        3, ge=0, description="Validation prompts generated at each evaluation, written to the log and "
        "`<split>_generated_samples.jsonl`; 0: none."
    )
    loss_chunk_tokens: int = Field(
        1024, gt=0, description="The loss projects hidden states to the vocabulary this many tokens at a time, so the "
        "whole batch's logits are never held at once."
    )
