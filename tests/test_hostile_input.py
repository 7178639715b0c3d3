"""Pickled weights are refused unless allowed; remote code is off unless set."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import tunesmith
from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tiny import tiny_config


def test_pickled_weights_refused_by_default(tiny_bert, sentiment_csv, tmp_path):
    pickled = tmp_path / "pickled-bert"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # transformers 5 only writes safetensors
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((tiny_bert / name).read_bytes())
    assert list(pickled.glob("*.bin")) and not list(pickled.glob("*.safetensors"))
    cfg = tiny_config(pickled, sentiment_csv, tmp_path / "run", train={"num_train_epochs": 1})
    with pytest.raises(ConfigError, match="pickled .bin weights.*model.allow_pickle=true"):
        tunesmith.train(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()
    cfg["model"]["allow_pickle"] = True
    assert tunesmith.train(cfg, show_progress=False).metrics["train"]["global_step"] > 0


def test_remote_code_off_by_default():
    assert RunConfig().model.trust_remote_code is False
    assert RunConfig().model.allow_pickle is False
