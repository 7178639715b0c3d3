"""causal_lm formats.py (rows to conversations, .txt documents) and chat.py (templates, per-turn labels)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tunesmith.data.loaders import Table
from tunesmith.errors import ConfigError, DataError
from tunesmith.tasks.causal_lm import chat, examples, formats
from tunesmith.tasks.causal_lm.config import CausalLMTaskConfig

CONV = [{"role": "user", "content": "translate: one red cat"}, {"role": "assistant", "content": "un rouge chat"}]
TWO = CONV + [{"role": "user", "content": "translate: two dog"}, {"role": "assistant", "content": "deux chien"}]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def cfg(**kw) -> CausalLMTaskConfig:
    return CausalLMTaskConfig(**kw)


def table(rows: list[dict], source: str = "train.jsonl") -> Table:
    return Table(pd.DataFrame(rows), source, lambda i: f"line {i + 1}")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Fresh copies of the three tiny tokenizers (tests may install templates or pad tokens on them)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("causal_lm_tok")
    folders = {name: build(root / name) for name, build in
               [("gpt2", examples.build_gpt2), ("llama3", examples.build_llama3), ("smollm", examples.build_smollm)]}
    return lambda name: AutoTokenizer.from_pretrained(folders[name])


# --------------------------------------------------------------------------- formats


def test_every_format_reads_into_the_same_conversation():
    rows = {
        "messages": [{"messages": CONV}],
        "sharegpt": [{"conversations": [{"from": "human", "value": CONV[0]["content"]}, {"from": "gpt", "value": CONV[1]["content"]}]}],
        "alpaca": [{"instruction": "translate:", "input": "one red cat", "output": "un rouge chat"}],
        "prompt_completion": [{"prompt": CONV[0]["content"], "completion": CONV[1]["content"]}],
    }
    alpaca_user = "translate:\n\none red cat"
    for fmt, data in rows.items():
        t = table(data)
        assert formats.detect_format(cfg(), list(t.frame.columns), t.source) == fmt
        got = formats.read_conversations(cfg(), t, fmt)
        want = [dict(CONV[0], content=alpaca_user), CONV[1]] if fmt == "alpaca" else CONV
        assert got == [want], fmt
    trl = table([{"prompt": [CONV[0]], "completion": [CONV[1]]}])
    assert formats.read_conversations(cfg(), trl, "prompt_completion") == [CONV]
    csv_cell = table([{"messages": json.dumps(CONV, ensure_ascii=False)}], "train.csv")  # a JSON string in a CSV
    assert formats.read_conversations(cfg(), csv_cell, "messages") == [CONV]


def test_system_prompt_and_alpaca_system_column():
    got = formats.read_conversations(cfg(system_prompt="Be brief."), table([{"messages": CONV}]), "messages")
    assert got == [[{"role": "system", "content": "Be brief."}, *CONV]]
    kept = formats.read_conversations(cfg(system_prompt="Be brief."), table([{"messages": [SYSTEM, *CONV]}]), "messages")
    assert kept == [[SYSTEM, *CONV]]
    alpaca = table([{"instruction": "hi", "input": "", "output": "salut", "system": "Sois bref."}])
    assert formats.read_conversations(cfg(), alpaca, "alpaca")[0][:2] == [
        {"role": "system", "content": "Sois bref."}, {"role": "user", "content": "hi"}]


def test_sharegpt_roles_are_mapped_and_unknown_roles_reported():
    turns = [{"from": r, "value": "x"} for r in ("system", "human", "chatgpt", "user", "bard", "human", "model", "user", "assistant")]
    got = formats.read_conversations(cfg(), table([{"conversations": turns}]), "sharegpt")[0]
    assert [t["role"] for t in got] == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user", "assistant"]
    bad = table([{"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}])
    assert formats.read_conversations(cfg(), bad, "sharegpt") == [None]
    (problem,) = formats.check_conversations(cfg(), bad, "sharegpt")
    assert "train.jsonl line 1" in problem and "narrator" in problem and "turn 1" in problem


def test_detect_format_error_lists_columns_and_formats():
    with pytest.raises(DataError) as err:
        formats.detect_format(cfg(), ["question", "answer"], "train.csv")
    msg = str(err.value)
    assert "train.csv" in msg and "question" in msg and "alpaca: instruction, output" in msg and "prompt_completion: prompt, completion" in msg
    assert formats.detect_format(cfg(format="text"), ["question"], "x") == "text"


def test_check_conversations_names_file_row_and_field():
    rows = [{"messages": CONV},
            {"messages": [CONV[0]]},  # no assistant turn
            {"messages": [CONV[0], {"role": "assistant", "content": "  "}]},
            {"messages": [CONV[0], {"role": "assistant", "content": None}]},
            {"messages": "not json"},
            {"messages": json.dumps({"role": "user"})},
            {"messages": None}]
    problems = formats.check_conversations(cfg(), table(rows, "chat.csv"), "messages")
    assert len(problems) == 6 and problems[5].startswith("chat.csv line 7: 'messages' is empty")
    assert problems[0].startswith("chat.csv line 2: ") and "no assistant turn" in problems[0]
    assert problems[1].startswith("chat.csv line 3: ") and "turn 2 (assistant) is empty" in problems[1]
    assert problems[2].startswith("chat.csv line 4: ") and "'messages' turn 2 content" in problems[2] and "not text" in problems[2]
    assert problems[3].startswith("chat.csv line 5: ") and "not JSON" in problems[3]
    assert problems[4].startswith("chat.csv line 6: ") and "list of {role, content}" in problems[4]
    missing = formats.check_conversations(cfg(), table([{"question": "q"}]), "alpaca")
    assert len(missing) == 2 and "missing column 'instruction'" in missing[0] and "question" in missing[0]
    pc = formats.check_conversations(cfg(), table([{"prompt": "p", "completion": ""}]), "prompt_completion")
    assert pc == ["train.jsonl line 1: 'completion' is empty; fix the row or remove it"]


def test_read_texts_skips_empty_rows():
    t = table([{"text": "un chat"}, {"text": ""}, {"text": None}, {"text": "  "}, {"text": "猫が好き"}])
    assert formats.read_texts(cfg(), t) == ["un chat", "猫が好き"]
    with pytest.raises(DataError, match="missing column 'body'"):
        formats.read_texts(cfg(text_column="body"), t)


def test_txt_file_is_split_on_blank_lines_and_keeps_chinese(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("第一行\nsecond line\n\n\n我爱猫。\n  \nlast", encoding="utf-8")
    t = formats.read_text_file(path, "utf-8", "data.train_file")
    assert list(t.frame["text"]) == ["第一行\nsecond line", "我爱猫。", "last"]
    assert t.where(1) == f"{path} line 5" and t.where(2) == f"{path} line 7"
    assert formats.detect_format(cfg(), list(t.frame.columns), t.source) == "text"


def test_txt_folder_reads_every_file_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("二\n\ndeux", encoding="utf-8")
    (tmp_path / "a.txt").write_text("一", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not read", encoding="utf-8")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a.txt").write_text("a stale copy", encoding="utf-8")
    t = formats.read_text_file(tmp_path, "utf-8", "data.train_file", column="body")
    assert list(t.frame["body"]) == ["一", "二", "deux"]
    assert t.where(2) == f"{tmp_path} b/two.txt line 3"


def test_txt_undecodable_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("ok\nstill ok\n".encode() + b"\xff\xfe bad\n")
    with pytest.raises(DataError, match=r"bad.txt: line 3: expected utf-8 text"):
        formats.read_text_file(path, "utf-8", "data.train_file")
    (tmp_path / "t.csv").write_text("text\nhello\n", encoding="utf-8")  # other suffixes: the normal reader
    assert list(formats.read_text_file(tmp_path / "t.csv", "utf-8", "data.train_file").frame["text"]) == ["hello"]


# --------------------------------------------------------------------------- chat


def trained_text(tok, rendered) -> str:
    return tok.decode([t for t in rendered.labels if t != chat.IGNORE])


@pytest.mark.parametrize("name, template, eot", [("gpt2", "auto", "<|im_end|>"), ("llama3", "auto", "<|eot_id|>"),
                                                 ("smollm", "auto", "<|im_end|>"), ("gpt2", "plain", "<|endoftext|>")])
def test_trained_tokens_are_exactly_the_assistant_turns(tokenizers, name, template, eot):
    tok = tokenizers(name)
    chat.resolve_template(tok, template)
    conv = [SYSTEM, *TWO]
    assistant = chat.render(conv, tok, "assistant", 512)
    assert trained_text(tok, assistant) == f"un rouge chat{eot}deux chien{eot}"
    assert not assistant.truncated and len(assistant.labels) == len(assistant.input_ids)
    last = chat.render(conv, tok, "last", 512)
    assert trained_text(tok, last) == f"deux chien{eot}"
    everything = chat.render(conv, tok, "all", 512)
    assert everything.labels == everything.input_ids
    if template == "plain":
        assert tok.decode(assistant.input_ids) == ("You are a helpful assistant.\ntranslate: one red cat\nun rouge chat<|endoftext|>"
                                                   "translate: two dog\ndeux chien<|endoftext|>")


def test_llama3_has_exactly_one_bos(tokenizers):
    tok = tokenizers("llama3")
    bos = tok.bos_token_id
    rendered = chat.render(TWO, tok, "assistant", 512)
    assert rendered.input_ids[0] == bos and rendered.input_ids.count(bos) == 1
    prompt = chat.prompt_ids(TWO[:3], tok)
    assert prompt.count(bos) == 1 and tok.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_bos_added_when_the_template_does_not_write_it(tokenizers):
    """Llama-2 style: the tokenizer's post-processor adds BOS, the template does not write it: one BOS kept."""
    tok = tokenizers("llama3")
    tok.chat_template = examples.LLAMA3.replace("{{ bos_token }}", "")
    rendered = chat.render(TWO, tok, "assistant", 512)
    assert rendered.input_ids.count(tok.bos_token_id) == 1 and rendered.input_ids[0] == tok.bos_token_id
    assert trained_text(tok, rendered) == "un rouge chat<|eot_id|>deux chien<|eot_id|>"


def test_truncation_flag(tokenizers):
    tok = tokenizers("smollm")
    full = chat.render(TWO, tok, "assistant", 512)
    end = len(full.input_ids)
    assert not chat.render(TWO, tok, "assistant", end - 1).truncated  # only chatml's trailing "\n" is cut
    cut = chat.render(TWO, tok, "assistant", end - 2)  # the last <|im_end|> is cut
    assert cut.truncated and len(cut.input_ids) == end - 2 and len(cut.labels) == end - 2
    assert chat.render(TWO, tok, "last", end - 2).truncated


def test_end_of_turn_ids(tokenizers):
    gpt2 = tokenizers("gpt2")
    assert chat.end_of_turn_ids(gpt2) == [gpt2.eos_token_id]  # no template: eos only
    assert chat.resolve_template(gpt2, "auto") == ("chatml", ["<|im_start|>", "<|im_end|>"])
    assert gpt2.convert_ids_to_tokens(chat.end_of_turn_ids(gpt2)) == ["<|endoftext|>", "<|im_end|>"]
    assert tokenizers("llama3").convert_ids_to_tokens(chat.end_of_turn_ids(tokenizers("llama3"))) == ["<|eot_id|>"]
    smol = tokenizers("smollm")
    assert smol.convert_ids_to_tokens(chat.end_of_turn_ids(smol)) == ["<|im_end|>"]


@pytest.mark.parametrize("name, pad", [("gpt2", "<|pad|>"), ("llama3", "<|pad|>"), ("smollm", "<|endoftext|>")])
def test_choose_pad_token(tokenizers, name, pad):
    tok = tokenizers(name)
    chat.resolve_template(tok, "auto")
    notice = chat.choose_pad_token(tok)
    assert tok.pad_token == pad and pad in notice
    assert tok.pad_token_id not in chat.end_of_turn_ids(tok) and tok.pad_token_id != tok.eos_token_id
    assert chat.choose_pad_token(tok) is None  # already fine: nothing changes


def test_template_that_reorders_turns_fails_clearly(tokenizers):
    tok = tokenizers("smollm")
    # Puts the last message first: rendering turns 1..2 is not a prefix of rendering all four.
    tok.chat_template = ("{{ messages[-1]['content'] }}{% for m in messages[:-1] %}{{ '<|im_start|>' + m['content'] + '<|im_end|>' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>' }}{% endif %}")
    with pytest.raises(ConfigError, match="not a prefix"):
        chat.render(TWO, tok, "assistant", 512)


def test_template_exception_names_the_row(tokenizers):
    tok = tokenizers("smollm")
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match=r"train.jsonl line 7: the chat template refused .*roles must alternate"):
        chat.render([CONV[0], CONV[0], CONV[1]], tok, "assistant", 512, where="train.jsonl line 7")


def test_resolve_template_names(tokenizers):
    tok = tokenizers("smollm")
    assert chat.resolve_template(tok, "auto") == ("tokenizer", [])
    assert chat.resolve_template(tok, "plain").name == "plain" and tok.chat_template == chat.PLAIN
    assert chat.resolve_template(tok, "chatml") == ("chatml", [])  # its tokens exist already
    assert chat.resolve_template(tok, "{{ messages[0]['content'] }}").name == "custom"
    with pytest.raises(ConfigError, match="chatml, plain"):
        chat.resolve_template(tok, "zephyr")


def test_example_rows_render(tokenizers):
    """The contract suite's toy data (examples.py) reads and renders in each format."""
    tok = tokenizers("smollm")
    chats = formats.read_conversations(cfg(), table(examples.chat_rows(3)), "messages")
    assert trained_text(tok, chat.render(chats[0], tok)).count("<|im_end|>") == 2
    sft = formats.read_conversations(cfg(), table(examples.sft_rows(3)), "prompt_completion")
    assert all(c and c[1]["role"] == "assistant" for c in sft)
    assert formats.read_texts(cfg(), table(examples.text_rows(2))) == [r["text"] for r in examples.text_rows(2)]


def test_txt_folder_through_make_splits(tmp_path):
    """A folder as data.train_file reaches the reader (read_file alone refuses folders) and splits like a table."""
    from tunesmith.config.schema import DataConfig
    from tunesmith.data.splits import make_splits

    for k in range(10):
        (tmp_path / f"doc{k:02d}.txt").write_text(f"文档 {k}\n\nsecond {k}", encoding="utf-8")
    data = DataConfig(train_file=str(tmp_path), validation_split=0.25)
    tables, notes = make_splits(data, 0, reader=formats.read_text_file)
    assert len(tables["train"].frame) + len(tables["validation"].frame) == 20
    assert any("20 documents from 10 .txt file(s)" in n for n in notes)
