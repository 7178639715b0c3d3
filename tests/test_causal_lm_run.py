"""A causal-LM run end to end on tiny in-process models: what the run directory holds (before/after metrics,
sample generations, generation_config.json with the stop ids, a pad distinct from eos, the chat template), the
generate / chat CLI and Python API, seeded sampling, and the method defaults (LoRA above 100M parameters)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import transformers
from typer.testing import CliRunner

import tunesmith
from tunesmith.cli import app
from tunesmith.cli.chat_loop import run_chat
from tunesmith.config import parse_config
from tunesmith.errors import TunesmithError
from tunesmith.tasks import get_task
from tunesmith.tasks.causal_lm.examples import contract_examples


def _train(variant: str, root: Path, **overrides) -> Path:
    ex = contract_examples()[variant]
    (root / "data").mkdir(parents=True)
    cfg = {"model": {"name_or_path": str(ex.build_model(root / "model"))}, "data": ex.write_data(root / "data"),
           "task": ex.task, "output_dir": str(root / "run"), "train": {**ex.train, "num_train_epochs": 3}, **overrides}
    return Path(tunesmith.train(cfg, show_progress=False).run_dir)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    return _train("smollm-chat", tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    return _train("gpt2-text", tmp_path_factory.mktemp("text"))


def test_the_run_reports_before_and_after_and_keeps_sample_generations(chat_run):
    metrics = json.loads((chat_run / "metrics.json").read_text())
    before, after = metrics["validation_before_training"], metrics["validation"]
    assert set(before) >= {"loss", "perplexity", "token_accuracy"}
    assert after["loss"] < before["loss"]  # 3 epochs at lr 3e-3 on 16 rows: the tiny model learns something
    assert after["perplexity"] == pytest.approx(2.718281828 ** after["loss"], rel=1e-6)
    samples = [json.loads(line) for line in (chat_run / "validation_generated_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 1 and samples[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert samples[0]["reference"] and "<|im_end|>" not in samples[0]["reference"]
    evals = [json.loads(line) for line in (chat_run / "log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["type"] == "eval"]
    assert evals[0].get("before_training") and len(evals) >= 2
    assert all(len(e["generated_samples"]) == 1 for e in evals)  # every evaluation's samples, in the log
    assert evals[-1]["generated_samples"][0]["prompt"] == samples[0]["prompt"]


def test_the_saved_model_generates_the_way_training_formatted(chat_run):
    folder = chat_run / "model"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    gen = transformers.GenerationConfig.from_pretrained(folder)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert im_end in stops  # the template's end-of-turn token stops generation
    assert tok.pad_token_id not in stops and gen.pad_token_id == tok.pad_token_id  # padding never hides the stop
    # max_new_tokens: the longest trained answer (a few words) rounded up to 16, not transformers' 20 default
    assert gen.max_new_tokens == 16
    assert "<|im_start|>" in tok.chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_sampling_is_reproducible_by_seed_and_greedy_by_default(chat_run):
    run = tunesmith.load(chat_run)
    prompt = "translate: one red cat"
    sampled = [run.generate([prompt], do_sample=True, temperature=1.5, seed=s, max_new_tokens=12)[0] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert run.generate([prompt])[0] == run.generate([prompt])[0]  # greedy


def test_generate_cli_json_and_stdin(chat_run):
    result = CliRunner().invoke(app, ["generate", str(chat_run), "--prompt", "translate: one red cat", "--prompt",
                                      "translate: two big dog", "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["prompt"] for r in rows] == ["translate: one red cat", "translate: two big dog"]
    assert all(isinstance(r["generated_text"], str) for r in rows)
    piped = CliRunner().invoke(app, ["generate", str(chat_run), "--max-new-tokens", "3"], input="translate: one\n\n")
    assert piped.exit_code == 0 and piped.stdout.strip()


def test_generate_cli_refuses_bad_settings_without_a_traceback(chat_run):
    result = CliRunner().invoke(app, ["generate", str(chat_run), "--prompt", "x", "--temperature", "hot"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "temperature" in result.output


def test_chat_keeps_the_history_and_streams_the_reply(chat_run):
    run = tunesmith.load(chat_run)
    seen = []
    real_chat = run.chat

    def spy(messages, **kwargs):
        seen.append([dict(m) for m in messages])
        return real_chat(messages, **kwargs)

    run.chat = spy
    lines = iter(["translate: one red cat", "/system be brief", "translate: two dog", "/reset", "/exit"])
    out = io.StringIO()
    history = run_chat(run, lambda _: next(lines), out, max_new_tokens="4")
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]  # the first exchange is kept
    assert seen[1][0]["content"] == "be brief"
    assert history == [{"role": "system", "content": "be brief"}]  # /reset keeps only the system prompt
    first_reply = seen[1][2]["content"]
    assert f"assistant> {first_reply}" in out.getvalue().replace("\n", "")  # streamed as generated


def test_a_long_chat_drops_whole_old_turns(chat_run):
    run = tunesmith.load(chat_run)
    long = [{"role": "user", "content": "one red cat " * 8}, {"role": "assistant", "content": "un chat rouge " * 8}]
    messages = [{"role": "system", "content": "be brief"}, *long * 3, {"role": "user", "content": "translate: cat"}]
    from tunesmith.tasks.causal_lm.generating import fitting_prompt, prompt_token_ids

    ids = fitting_prompt(run.tokenizer, run.state, messages, 64)
    assert len(ids) <= 64
    text = run.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nbe brief") and text.endswith("translate: cat<|im_end|>\n<|im_start|>assistant\n")
    assert len(prompt_token_ids(run.tokenizer, run.state, messages)) > 64


def test_continued_pretraining_continues_text(text_run):
    metrics = json.loads((text_run / "metrics.json").read_text())
    assert metrics["validation"]["loss"] < metrics["validation_before_training"]["loss"]
    assert not (text_run / "model" / "chat_template.jinja").exists()  # raw text: no chat template is invented
    out = tunesmith.generate(text_run, ["one red"], max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str)
    with pytest.raises(TunesmithError, match="no chat template"):
        tunesmith.chat(text_run, [{"role": "user", "content": "hi"}])


def _run_config(folder: Path, **extra):
    return parse_config({"model": {"name_or_path": str(folder)}, "data": {"train_file": "x.jsonl"},
                         "task": {"name": "causal_lm"}, **extra}, "test")


def test_lora_is_the_default_above_100m_parameters(tmp_path):
    from tunesmith.pipeline.prepare import choose_default_method

    big = tmp_path / "big"
    transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12).save_pretrained(big)  # ~150M parameters; no weights written
    small = Path(contract_examples()["llama3-sft"].build_model(tmp_path / "small"))
    task, notes = get_task("causal_lm"), []
    cfg = _run_config(big)
    choose_default_method(cfg, task, notes)
    assert cfg.method.name == "lora" and "method: lora" in notes[0]
    cfg = _run_config(big, method={"name": "full"})
    choose_default_method(cfg, task, notes)
    assert cfg.method.name == "full"  # a method the user names is kept
    cfg = _run_config(small)
    choose_default_method(cfg, task, notes)
    assert cfg.method.name == "full"


def test_the_output_ends_before_a_stop_string(text_run):
    run = tunesmith.load(text_run)
    free = run.generate(["one red"], max_new_tokens=12)[0]
    words = free.split()
    assert len(words) >= 3, free
    stop = " " + words[2]  # greedy output is stable: stop at its third word
    cut = run.generate(["one red"], max_new_tokens=12, stop_strings=[stop])[0]
    assert stop not in cut and free.startswith(cut)


def test_lora_leaves_an_untied_output_layer_frozen(tmp_path):
    from tunesmith.config.schema import METHOD_CONFIGS
    from tunesmith.methods.apply import apply_method

    folder = contract_examples()["llama3-sft"].build_model(tmp_path / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    task = get_task("causal_lm")
    wrapped = apply_method(model, METHOD_CONFIGS["lora"](), task.peft_task_type, task.head_modules(model),
                           task.adapter_saved_modules(model))
    trained = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained), trained[:5]


@pytest.mark.parametrize("kernel, message", [("flash_attention_2", "install it"), ("nonsense", "not one this model supports")])
def test_an_unavailable_attention_kernel_is_a_config_error(kernel, message, tmp_path):
    from tunesmith.errors import ConfigError

    ex = contract_examples()["gpt2-text"]
    (tmp_path / "data").mkdir()
    cfg = {"model": {"name_or_path": str(ex.build_model(tmp_path / "model")), "attn_implementation": kernel},
           "data": ex.write_data(tmp_path / "data"), "task": ex.task, "output_dir": str(tmp_path / "run"),
           "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match=message):
        tunesmith.train(cfg, show_progress=False)
    assert not (tmp_path / "run" / "model").exists()



def test_a_folder_of_text_files_trains_and_each_file_is_in_the_provenance(tmp_path):
    import hashlib

    ex = contract_examples()["gpt2-text"]
    corpus = tmp_path / "corpus"
    (corpus / "notes").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / "a.txt").write_text("one red cat sees two big dog\n\ntwo big dog sees one red cat\n", encoding="utf-8")
    (corpus / "notes" / "b.txt").write_text("红色的猫看见大狗\n\n大狗看见红色的猫\n", encoding="utf-8")
    (corpus / ".git" / "c.txt").write_text("not corpus\n", encoding="utf-8")
    cfg = {"model": {"name_or_path": str(ex.build_model(tmp_path / "model"))},
           "data": {"train_file": str(corpus), "validation_file": str(corpus / "a.txt")},
           "task": {**ex.task, "block_size": 16}, "output_dir": str(tmp_path / "run"), "train": {"max_steps": 2}}
    run_dir = Path(tunesmith.train(cfg, show_progress=False).run_dir)
    files = json.loads((run_dir / "provenance.json").read_text())["data_files"]
    assert sorted(Path(p).name for p in files) == ["a.txt", "b.txt"]
    b = corpus / "notes" / "b.txt"
    assert files[str(b)]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()
    assert not any(".git" in p for p in files)
    assert json.loads((run_dir / "metrics.json").read_text())["validation"]["tokens"] > 0


def test_the_model_card_shows_the_metrics_before_and_after(chat_run):
    card = (chat_run / "README.md").read_text()
    metrics = json.loads((chat_run / "metrics.json").read_text())
    before, after = metrics["validation_before_training"]["perplexity"], metrics["validation"]["perplexity"]
    assert "| metric | before training | after |" in card
    assert f"| perplexity | {before:.4f} | {after:.4f} |" in card
    assert "apply_chat_template" in card


def test_evaluate_a_text_run_on_a_txt_file(text_run, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("one red cat sees two big dog\n\n两只大狗\n", encoding="utf-8")
    metrics = tunesmith.evaluate(text_run, held_out)
    assert metrics["tokens"] > 0 and metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    result = CliRunner().invoke(app, ["eval", str(text_run), str(held_out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loss"] == pytest.approx(metrics["loss"], rel=1e-5)


def test_documents_end_with_one_eos_whatever_the_tokenizer_adds(tmp_path):
    from tunesmith.data.loaders import Table
    import pandas as pd

    task = get_task("causal_lm")
    tok = transformers.AutoTokenizer.from_pretrained(contract_examples()["gpt2-text"].build_model(tmp_path / "m"))
    cfg = parse_config({"model": {"name_or_path": "x"}, "task": {"name": "causal_lm", "block_size": 64}}, "t").task
    table = Table(pd.DataFrame({"text": ["one red cat", "two big dog"]}), "t.txt", lambda i: f"line {i}")
    plain = task.encode(cfg, table, tok, task.state_type())["input_ids"][0]
    assert plain.count(tok.eos_token_id) == 2
    from tokenizers import processors

    eos = tok.eos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, tok.eos_token_id)])
    adds = task.encode(cfg, table, tok, task.state_type())["input_ids"][0]
    assert adds == plain  # the tokenizer's own EOS is not doubled


def test_eval_on_start_asked_for_evaluates_first_even_without_periodic_evaluation(tmp_path):
    # eval_strategy "no" with eval_on_start true used to skip the evaluation silently (no loader was built)
    ex = contract_examples()["gpt2-text"]
    (tmp_path / "data").mkdir()
    base = {"model": {"name_or_path": str(ex.build_model(tmp_path / "model"))}, "data": ex.write_data(tmp_path / "data"),
            "task": ex.task}
    metrics = {}
    for asked in (True, None):
        train = {**ex.train, "max_steps": 2, "eval_strategy": "no", **({"eval_on_start": asked} if asked else {})}
        run = tunesmith.train({**base, "output_dir": str(tmp_path / f"run-{asked}"), "train": train}, show_progress=False)
        metrics[asked] = json.loads((Path(run.run_dir) / "metrics.json").read_text())
    assert set(metrics[True]["validation_before_training"]) >= {"loss", "perplexity", "token_accuracy"}
    assert metrics[True]["train"]["best_step"] is None or metrics[True]["train"]["best_step"] > 0  # never the step-0 model
    assert "validation_before_training" not in metrics[None]  # the task's default follows eval_strategy
    assert metrics[True]["validation"]["loss"] == pytest.approx(metrics[None]["validation"]["loss"], rel=1e-5)
