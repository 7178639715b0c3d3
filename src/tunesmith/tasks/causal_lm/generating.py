"""Generation for causal-LM runs: the prompt ids of a message, a conversation or a raw text (chat template, system
prompt, the oldest turns dropped to fit), batched generation with token counts and finish reasons, stop strings
cut as OpenAI-style APIs do, and seeded sampling. Used by `predict`, `chat`, the evaluation's sample generations
and the server."""

from __future__ import annotations

import dataclasses

import torch

from tunesmith import generation
from tunesmith.errors import ConfigError
from tunesmith.tasks.causal_lm import chat


def prompt_token_ids(tokenizer, state, text) -> list[int]:
    """The token ids a generation starts from: a chat run's user message (or a list of messages) rendered with
    the generation prompt, or a raw-text run's text."""
    if not state.chat:
        return tokenizer(str(text))["input_ids"]
    messages = list(text) if isinstance(text, (list, tuple)) else [{"role": "user", "content": str(text)}]
    return chat.prompt_ids(_with_system(messages, state.system_prompt), tokenizer)


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`task.system_prompt` before a conversation that has no system turn of its own (training and generation alike)."""
    if not system_prompt or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generation: the text (before any stop string, special tokens dropped), its token counts and why it ended:
    "stop" (an end-of-turn / EOS id or a stop string) or "length" (max_new_tokens reached), as OpenAI-style APIs
    report them."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def generate_completions(model, tokenizer, prompts: list[list[int]], streamer=None, **settings) -> list[Completion]:
    """Each prompt's continuation, prompts left-padded into one batch."""
    device = next(model.parameters()).device
    # an empty prompt (a text run given "") starts from BOS, or EOS as GPT-2-style models do: never zero tokens
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompts = [list(p) or [start] for p in prompts]
    longest = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    output = generation.generate(model, ids, mask, tokenizer, **({"streamer": streamer} if streamer else {}), **settings)
    new = output[:, longest:]
    config = getattr(model, "module", model).generation_config
    stops = settings.get("stop_strings") or getattr(config, "stop_strings", None)
    stop_ids = set(_as_list(settings.get("eos_token_id", config.eos_token_id)))
    limit = settings.get("max_new_tokens") or config.max_new_tokens
    found = []
    for prompt, row, text in zip(prompts, new.tolist(), tokenizer.batch_decode(new, skip_special_tokens=True)):
        count, ended = 0, False
        for token in row:
            if token == pad:  # pad is never a stop id (preflight picks a distinct one): the rest is padding
                ended = True
                break
            count += 1
            if token in stop_ids:
                ended = True
                break
        cut = _before_stop(text, stops)
        ended = ended or cut != text or count < limit
        found.append(Completion(cut.strip(), len(prompt), count, "stop" if ended else "length"))
    return found


def generate_texts(model, tokenizer, prompts: list[list[int]], streamer=None, **settings) -> list[str]:
    """Each prompt's generated continuation (special tokens dropped, cut before a stop string)."""
    return [c.text for c in generate_completions(model, tokenizer, prompts, streamer=streamer, **settings)]


def _as_list(ids) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _before_stop(text: str, stops) -> str:
    """The text before the first stop string: transformers stops *after* writing it, OpenAI-style APIs and chat UIs
    leave it out."""
    for stop in [stops] if isinstance(stops, str) else stops or []:
        text = text.split(stop, 1)[0] if stop else text
    return text


def fitting_prompt(tokenizer, state, messages: list[dict], max_length: int | None) -> list[int]:
    """A conversation's prompt ids, its oldest turns dropped (system turns kept) while it is longer than the model
    was trained on, so a long chat keeps whole recent turns rather than a cut-off one."""
    ids = prompt_token_ids(tokenizer, state, messages)
    while max_length and len(ids) > max_length:
        oldest = next((i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"), None)
        if oldest is None:
            break
        messages = messages[:oldest] + messages[oldest + 1:]
        ids = prompt_token_ids(tokenizer, state, messages)
    return ids


def last_tokens(ids: list[int], max_length: int | None) -> list[int]:
    """A prompt longer than the model was trained on keeps its end (the latest turns)."""
    return ids[-max_length:] if max_length and len(ids) > max_length else ids


def seed_sampling(seed: int | str | None) -> None:
    if seed is None:
        return
    try:
        torch.manual_seed(int(seed))
    except ValueError:
        raise ConfigError(f"seed (--seed): expected a whole number, found {seed!r}; fix the value") from None
