"""Conversations to token ids with per-turn labels, decided while tokenizing, never afterwards.

Bugs this guards against:
- Labels masked by comparing with `pad_token_id` when pad == eos (SmolLM2, Qwen, Llama with `pad = eos`): every
  EOS becomes -100, the model never learns to stop and generates until max_new_tokens (huggingface/trl#734,
  unslothai/unsloth#416, huggingface/alignment-handbook#127, huggingface/blog#1302). Here labels come from
  character spans of each assistant turn, and `choose_pad_token` gives pad an id of its own.
- Response-template matching (TRL's `DataCollatorForCompletionOnlyLM`): the marker tokenizes differently in
  context (BPE merges across the boundary) and silently matches nothing. Here the whole text is tokenized once
  with offsets and spans are mapped to tokens.
- Double BOS (Llama 3: the template writes `{{ bos_token }}` and the tokenizer adds one too;
  huggingface/alignment-handbook#127, sgl-project/sglang#888), or none (Llama 2 style: the template does not
  write it and `add_special_tokens=False` drops the tokenizer's): exactly one is kept.
- The end-of-turn token (`<|im_end|>`, `<|eot_id|>`) left untrained, so the model runs on into a new turn.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from tunesmith.errors import ConfigError, DataError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Base models: prompt, a newline, completion, EOS; no markup. A Jinja template so that it is saved with the
# tokenizer and plain `transformers` renders prompts the same way after training.
PLAIN = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
         "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}")
PAD_LIKE = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>", "[PAD]")
IGNORE = -100


class TemplateChoice(NamedTuple):
    name: str  # tokenizer | chatml | plain | custom
    added_tokens: list[str]  # new special tokens: the model's embeddings must be resized


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # a trained turn's end-of-turn token fell beyond max_length


def resolve_template(tokenizer, chat_template: str) -> TemplateChoice:
    """Install the template `task.chat_template` asks for on `tokenizer` (it is saved with it)."""
    if chat_template == "auto" and tokenizer.chat_template:
        return TemplateChoice("tokenizer", [])
    if chat_template in ("auto", "chatml"):
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        tokenizer.chat_template = CHATML
        return TemplateChoice("chatml", missing)
    if chat_template == "plain":
        tokenizer.chat_template = PLAIN
        return TemplateChoice("plain", [])
    if "{{" not in chat_template and "{%" not in chat_template:
        raise ConfigError(f"task.chat_template: '{chat_template[:60]}' is neither auto, chatml, plain nor a Jinja template; "
                          "expected one of those")
    tokenizer.chat_template = chat_template
    return TemplateChoice("custom", [])


@contextmanager
def template_errors(where: str):
    """A template's own refusal (`raise_exception('roles must alternate')`) reported as the row's problem."""
    import jinja2

    try:
        yield
    except jinja2.TemplateError as err:
        raise DataError(f"{where}: the chat template refused the conversation: {err}; fix the row's turns "
                        "(order of roles) or set task.chat_template") from None


def _render(tokenizer, turns, generation: bool) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)


def _added_token_ids(tokenizer) -> set[int]:
    return set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids generation stops at: eos plus the token the template writes right after an assistant message
    (found by rendering a probe conversation), e.g. `<|im_end|>` on a GPT-2 given chatml, whose eos differs."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        import jinja2

        probe = "tunesmithprobe"
        try:
            text = _render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], False)
        except jinja2.TemplateError:  # a template that wants a system turn first, say: eos alone still stops
            text = ""
        after = text[text.rfind(probe) + len(probe):] if probe in text else ""
        first = tokenizer(after, add_special_tokens=False).input_ids[:1]
        ids += [i for i in first if i in _added_token_ids(tokenizer)]
    return list(dict.fromkeys(ids))


def choose_pad_token(tokenizer) -> str | None:
    """Give the tokenizer a pad token distinct from eos and every end-of-turn token, so padding (and any code
    that masks by pad id) never hides the token the model must learn to stop at. Returns a notice line, or
    None when the pad token was already fine. May add `<|pad|>`: the model's embeddings must then be resized."""
    stops = set(end_of_turn_ids(tokenizer))
    if tokenizer.pad_token is not None and tokenizer.pad_token_id not in stops:
        return None
    before, vocab = tokenizer.pad_token, tokenizer.get_vocab()
    candidates = [tokenizer.unk_token, *PAD_LIKE]
    chosen = next((t for t in candidates if t and t in vocab and vocab[t] not in stops), None)
    if chosen is None:
        chosen = "<|pad|>"
        tokenizer.add_special_tokens({"pad_token": chosen})
        how = "added as a new token (the model's embeddings must be resized)"
    else:
        tokenizer.pad_token = chosen
        how = "from the vocabulary"
    why = f"was {before}, an end-of-turn token" if before else "there was none"
    return f"tokenizer: pad token set to {chosen} {how}; {why}, and padding must never mask the token the model stops at"


def _bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (Llama's BOS), by comparing encodings."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    n = len(full) - len(plain)
    return full[:n] if n > 0 and full[n:n + len(plain)] == plain else []


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of a rendered text, with exactly one BOS where the tokenizer wants one."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a Python (sentencepiece) tokenizer: no offsets to map turns to tokens
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} gives no character offsets; expected a fast (tokenizers) "
                          "tokenizer; load the model's tokenizer.json or convert it with transformers") from None
    ids, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
    prefix = _bos_prefix(tokenizer)
    if prefix and ids[:len(prefix)] != prefix:
        ids, offsets = prefix + ids, [(0, 0)] * len(prefix) + offsets
    return ids, offsets


def prompt_ids(conversation, tokenizer, where: str = "a prompt") -> list[int]:
    """Ids of the turns before a reply (pass the conversation without the assistant turn to generate), with the
    generation prompt and the same BOS rule as training."""
    with template_errors(where):
        return _encode(tokenizer, _render(tokenizer, conversation, True))[0]


def _assistant_spans(conversation, tokenizer, full: str) -> list[tuple[int, int]]:
    """Character span of each assistant turn in `full`: from the end of the generation prompt to the end of
    its render (the end-of-turn token included, whitespace the template writes after it excluded). Needs every
    render of the first turns to be a prefix of the whole; templates that rewrite earlier turns fail loudly."""
    spans = []
    for i, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        head, done = _render(tokenizer, conversation[:i], True), _render(tokenizer, conversation[:i + 1], False)
        if not (done.startswith(head) and full.startswith(done)):
            raise ConfigError(
                f"chat template: rendering turns 1..{i + 1} is not a prefix of the whole conversation (the template rewrites "
                f"earlier turns), so the assistant turns cannot be located; template starts '{tokenizer.chat_template[:80]}'; "
                "set task.chat_template to chatml or a template that renders turns in order")
        spans.append((len(head), len(done.rstrip())))
    return spans


def _chosen_spans(spans: list[tuple[int, int]], train_on: str) -> list[tuple[int, int]]:
    return spans[-1:] if train_on == "last" else spans


def render(conversation, tokenizer, train_on: str = "assistant", max_length: int = 1024, where: str = "a conversation") -> Rendered:
    """Token ids and labels of a conversation: assistant turns' tokens (with their end-of-turn token) carry the
    loss, others are -100; `all` labels every token, `last` the last assistant turn only. Cut to `max_length`."""
    with template_errors(where):
        full = _render(tokenizer, conversation, False)
        spans = _assistant_spans(conversation, tokenizer, full)
    ids, offsets = _encode(tokenizer, full)
    trained = _chosen_spans(spans, train_on)
    labels, last_token = [IGNORE] * len(ids), []
    for start, end in trained:
        inside = [k for k, (a, b) in enumerate(offsets) if b > a and start <= a < end]
        for k in inside:
            labels[k] = ids[k]
        last_token.append(inside[-1] if inside else -1)
    if train_on == "all":
        labels = list(ids)
    truncated = any(k >= max_length for k in last_token)
    return Rendered(ids[:max_length], labels[:max_length], truncated)
