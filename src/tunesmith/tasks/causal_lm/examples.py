"""The causal-LM family's material for the contract suite (tests/contract/) and its tests: tiny random GPT-2,
Llama and SmolLM-style checkpoints, each with a byte-level BPE tokenizer trained in-process, and toy data they
overfit in a few epochs (raw text for continued pretraining; prompt/completion and chat for SFT).

The special-token conventions the builders reproduce are the traps the family must handle:
- GPT-2: one special token `<|endoftext|>` (bos = eos = unk), no pad token, no chat template (the chatml
  fallback adds `<|im_start|>`/`<|im_end|>`); the output layer is tied to the input embeddings.
- Llama 3: `<|begin_of_text|>` added by the tokenizer *and* written by the chat template (`{{ bos_token }}`): a
  naive render has two; turns end with `<|eot_id|>`, the tokenizer's eos; no pad token; untied output layer.
- SmolLM2 (chatml in the tokenizer): `<|im_end|>` is eos *and* pad, so padding by pad id would mask every eos.
"""

from __future__ import annotations

import random
from pathlib import Path

from tunesmith.tasks.causal_lm.chat import CHATML
from tunesmith.tasks.contract import ContractExamples, byte_level_bpe, data_section, fast_tokenizer, save_checkpoint, write_jsonl

LEXICON = {"one": "un", "two": "deux", "red": "rouge", "blue": "bleu", "big": "grand", "small": "petit",
           "cat": "chat", "dog": "chien", "bird": "oiseau", "sees": "voit"}
HIDDEN, HEADS, FFN, LAYERS, POSITIONS = 32, 2, 64, 2, 256

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(list(LEXICON)) for _ in range(rng.randint(2, 5)))


def translate(source: str) -> str:
    return " ".join(LEXICON[w] for w in source.split())


def pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` distinct toy (English, "French") sentence pairs."""
    rng, found = random.Random(seed), {}
    while len(found) < n:
        source = _sentence(rng)
        found.setdefault(source, translate(source))
    return list(found.items())


def corpus() -> list[str]:
    """What the tokenizers are trained on: the toy sentences, prompts and chat markup words."""
    rows = pairs(200, seed=1)
    return [*(s for s, _ in rows), *(t for _, t in rows), *(f"translate: {s}" for s, _ in rows[:50]),
            "system user assistant", "You are a helpful assistant."] * 2


# --------------------------------------------------------------------------- checkpoints


def build_gpt2(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    eot = "<|endoftext|>"
    fast = fast_tokenizer(byte_level_bpe(corpus(), [eot]), bos_token=eot, eos_token=eot, unk_token=eot)
    config = GPT2Config(vocab_size=len(fast), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=fast.bos_token_id,
                        eos_token_id=fast.eos_token_id, initializer_range=0.1)
    torch.manual_seed(0)
    return save_checkpoint(GPT2LMHeadModel(config), fast, folder)


def _llama(folder: Path, specials: list[str], bos: str | None, template: str, tied: bool = False, **tokens) -> Path:
    import torch
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_level_bpe(corpus(), specials)
    if bos:  # Llama's tokenizer puts bos before every text it encodes
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = fast_tokenizer(tok, **({"bos_token": bos} if bos else {}), **tokens)
    fast.chat_template = template
    config = LlamaConfig(vocab_size=len(fast), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=POSITIONS,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=tied,
                         initializer_range=0.1, pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    return save_checkpoint(LlamaForCausalLM(config), fast, folder)


def build_llama3(folder: Path) -> Path:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return _llama(folder, specials, "<|begin_of_text|>", LLAMA3, eos_token="<|eot_id|>")


def build_smollm(folder: Path) -> Path:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # SmolLM2 ties its output layer to the embeddings (Llama 3 8B does not)
    return _llama(folder, specials, None, CHATML, tied=True, eos_token="<|im_end|>", pad_token="<|im_end|>",
                  unk_token="<|endoftext|>")


# --------------------------------------------------------------------------- data


def text_rows(n: int, seed: int = 0) -> list[dict]:
    """Documents of a few toy sentences each: "one red cat . un rouge chat . ..."."""
    rows, found = [], pairs(3 * n, seed)
    for i in range(n):
        rows.append({"text": " . ".join(f"{s} . {t}" for s, t in found[3 * i:3 * i + 3])})
    return rows


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": f"translate: {s}", "completion": t} for s, t in pairs(n, seed)]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    found = pairs(2 * n, seed)
    return [{"messages": [{"role": "user", "content": f"translate: {a}"}, {"role": "assistant", "content": ta},
                          {"role": "user", "content": f"translate: {b}"}, {"role": "assistant", "content": tb}]}
            for (a, ta), (b, tb) in zip(found[::2], found[1::2])]


def _data(rows):
    def write(folder: Path) -> dict:
        return data_section(folder, rows(16), rows(8))
    return write


def _bad_data(folder: Path) -> dict:
    rows = sft_rows(8)
    rows[1] = {"prompt": rows[1]["prompt"]}  # no completion
    rows[5] = {**rows[5], "completion": ""}  # nothing to learn
    return {"train_file": str(write_jsonl(folder / "bad.jsonl", rows)), "validation_split": 0.25}


def contract_examples() -> dict[str, ContractExamples]:
    def examples(build, rows, task: dict, inputs: list, epochs: int, tied: bool) -> ContractExamples:
        return ContractExamples(build_model=build, write_data=_data(rows), write_bad_data=_bad_data,
                                task={"name": "causal_lm", "max_length": 64, "sample_prompts": 1, **task},
                                predict_inputs=inputs, train={"num_train_epochs": epochs, "learning_rate": 3e-3},
                                refused_methods=("frozen",) if tied else ())

    prompts = ["translate: one red cat", "translate: two big dog sees bird"]
    return {
        "gpt2-text": examples(build_gpt2, text_rows, {"block_size": 32}, ["one red cat", "two big"], 30, tied=True),
        "llama3-sft": examples(build_llama3, sft_rows, {}, prompts, 30, tied=False),
        "smollm-chat": examples(build_smollm, chat_rows, {"packing": True}, prompts, 30, tied=True),
    }
