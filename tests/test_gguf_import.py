"""`tunesmith model import`: a GGUF file becomes a plain transformers folder. The test writes a tiny Llama GGUF
itself (gguf.GGUFWriter: metadata, a byte-level BPE tokenizer with a chat template, F32 and Q8_0 tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from tunesmith.cli import app
from tunesmith.convert.gguf import import_gguf
from tunesmith.errors import ConfigError
from tunesmith.tasks.contract import byte_level_bpe

gguf = pytest.importorskip("gguf")

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the red cat sees the big dog", "a small bird sings", "红色的猫看见大狗", "one two three four five"] * 20


def _tokenizer_fields():
    tok = byte_level_bpe(CORPUS, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=320)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL for t in tokens]
    return tokens, merges, types


def write_tiny_gguf(path: Path, quantize: bool = True) -> Path:
    """A 2-layer, 32-wide Llama in GGUF: the MLP weights Q8_0-quantized (a 'MOSTLY_Q8_0' file) when `quantize`."""
    tokens, merges, types = _tokenizer_fields()
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int, quantized: bool = False) -> None:
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32) if len(shape) > 1 else np.ones(shape, np.float32)
        if quantized and quantize:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)

    add("token_embd.weight", vocab, HIDDEN)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", HIDDEN)
        add(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.attn_k.weight", HIDDEN * KV_HEADS // HEADS, HIDDEN)
        add(f"blk.{i}.attn_v.weight", HIDDEN * KV_HEADS // HEADS, HIDDEN)
        add(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.ffn_norm.weight", HIDDEN)
        add(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN, quantized=True)
        add(f"blk.{i}.ffn_up.weight", FFN, HIDDEN, quantized=True)
        add(f"blk.{i}.ffn_down.weight", HIDDEN, FFN, quantized=True)
    add("output_norm.weight", HIDDEN)
    add("output.weight", vocab, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


def _gguf_logits(file: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def test_the_imported_folder_is_a_plain_model_with_the_same_outputs(tiny_gguf, tmp_path):
    result = import_gguf(tiny_gguf, tmp_path / "model")
    folder = result.folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # no gguf_file: a plain folder
    assert not getattr(model, "is_quantized", False)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok("the red cat sees 红色的猫").input_ids])
    with torch.no_grad():
        imported = model(ids).logits
    assert torch.equal(imported, _gguf_logits(tiny_gguf, ids))
    assert result.parameters == sum(p.numel() for p in model.parameters())
    assert result.file_type == "MOSTLY_Q8_0" and result.quantized
    import tunesmith

    assert tunesmith.import_gguf is import_gguf  # the public name


def test_the_tokenizer_round_trips_and_keeps_the_chat_template(tiny_gguf, tmp_path):
    folder = import_gguf(tiny_gguf, tmp_path / "model").folder
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "a small bird sings 红色的猫"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")


def test_a_quantized_file_is_said_to_be_dequantized(tiny_gguf, tmp_path):
    result = import_gguf(tiny_gguf, tmp_path / "model")
    readme = (result.folder / "README.md").read_text()
    assert "dequantized quantized model" in readme and "Q8_0" in readme
    assert any("dequantized" in note for note in result.notes)
    assert json.loads((result.folder / "gguf_import.json").read_text())["dequantized"] is True
    plain = import_gguf(write_tiny_gguf(tmp_path / "f32.gguf", quantize=False), tmp_path / "f32")
    assert not plain.quantized and not plain.notes
    assert "dequantized" not in (plain.folder / "README.md").read_text()


def test_bf16_weights_are_close(tiny_gguf, tmp_path):
    folder = import_gguf(tiny_gguf, tmp_path / "bf16", dtype="bfloat16").folder
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.allclose(logits, _gguf_logits(tiny_gguf, ids), atol=0.1)


def test_bad_inputs_are_config_errors_and_leave_nothing_behind(tiny_gguf, tmp_path):
    not_gguf = tmp_path / "model.safetensors"
    not_gguf.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        import_gguf(not_gguf, tmp_path / "a")
    with pytest.raises(ConfigError, match="expected a .gguf file, found nothing"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "b")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        import_gguf(tiny_gguf, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="--dtype"):
        import_gguf(tiny_gguf, tmp_path / "c", dtype="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "taken"]


def test_the_cli_imports_and_reports(tiny_gguf, tmp_path):
    result = CliRunner().invoke(app, ["model", "import", str(tiny_gguf), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "dequantized" in result.output and (tmp_path / "out" / "model.safetensors").is_file()
    again = CliRunner().invoke(app, ["model", "import", str(tiny_gguf), str(tmp_path / "out")])
    assert again.exit_code == 2 and "Traceback" not in again.output and "already exists" in again.output


def test_a_bundled_gguf_is_imported_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch):
    from tunesmith import assets
    from tunesmith.convert import gguf as convert

    calls = []
    real = convert.import_gguf
    monkeypatch.setattr(convert, "import_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = convert.imported_copy(tiny_gguf, tmp_path / "cache")
    second = convert.imported_copy(tiny_gguf, tmp_path / "cache")
    assert first == second and len(calls) == 1 and (first / "config.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no staging folder left
    assert "SmolLM2-135M-Instruct" in assets.BUNDLED_MODELS


@pytest.mark.slow
def test_the_bundled_smollm2_imports_and_chats(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    from tunesmith.assets import resolve_model_path

    try:
        folder = Path(resolve_model_path("bundled:SmolLM2-135M-Instruct"))
    except ConfigError as err:
        pytest.skip(str(err))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.config.vocab_size == 49152
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
