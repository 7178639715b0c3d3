"""Task contract v2 pieces that every family relies on: heads, per-unit losses, references."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, GPT2Config, GPT2LMHeadModel

from tunesmith.errors import ConfigError
from tunesmith.config import method_config
from tunesmith.methods.apply import apply_method, head_module_names
from tunesmith.tasks.base import Losses, LossTotal


def _gpt2_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def _bert_classifier():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return AutoModelForSequenceClassification.from_config(config)


def test_a_tied_output_embedding_is_not_a_head():
    lm = _gpt2_lm()
    assert lm.lm_head.weight is lm.transformer.wte.weight  # tied, as hub causal LMs ship
    assert head_module_names(lm) == []
    assert head_module_names(_bert_classifier()) == ["classifier"]


def test_frozen_needs_a_head_and_lora_does_not_save_the_vocabulary():
    with pytest.raises(ConfigError, match="nothing would train .* tied to the input embeddings"):
        apply_method(_gpt2_lm(), method_config("frozen"), "CAUSAL_LM")
    lora = apply_method(_gpt2_lm(), method_config("lora", target_modules="all-linear"), "CAUSAL_LM")
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable), trainable  # no copy of lm_head / wte
    frozen = apply_method(_bert_classifier(), method_config("frozen"), "SEQ_CLS")
    assert {name.split(".")[0] for name, p in frozen.named_parameters() if p.requires_grad} == {"classifier"}


def test_a_task_may_declare_its_head():
    model = apply_method(_bert_classifier(), method_config("frozen"), "SEQ_CLS", heads=["bert"])
    assert all(p.requires_grad for p in model.bert.parameters()) and not model.classifier.weight.requires_grad


def test_loss_total_weighs_every_unit_alike():
    total = LossTotal()
    total.add(torch.tensor([6.0]), torch.tensor([3.0]))  # one example of 3 tokens, loss 2 each
    total.add(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))  # two of 1 token, loss 1 each
    assert total.mean == pytest.approx(8 / 5)  # not the mean of the batch means (1.5)
    assert Losses.per_example(torch.tensor([1.0, 3.0])).units.tolist() == [1.0, 1.0]


def test_a_family_refuses_input_options_it_does_not_declare(tmp_path):
    from tunesmith.tasks.classification.config import ClassificationTaskConfig
    from tunesmith.errors import DataError
    from tunesmith.tasks import get_task

    task = get_task("classification")
    with pytest.raises(DataError, match="--question: not an option of classification runs"):
        task.predict_inputs(ClassificationTaskConfig(), "utf-8", None, ["a text"], {"question": ["Who?"]})
    assert task.predict_inputs(ClassificationTaskConfig(), "utf-8", None, ["a text"], {}) == (["a text"], [{"text": "a text"}])


def test_typed_state_round_trips_and_names_what_is_missing():
    from tunesmith.errors import ConfigError
    from tunesmith.tasks.classification.task import ClassificationState

    state = ClassificationState("multi_label", ["a", "b"], 0.3)
    assert ClassificationState.from_json({**state.to_json(), "from_a_later_version": 1}) == state
    with pytest.raises(ConfigError, match="missing problem_type, labels"):
        ClassificationState.from_json({}, "RUN/task.json")


def test_predict_options_come_from_the_registry():
    from typer.testing import CliRunner

    from tunesmith.cli import commands as cli
    from tunesmith.errors import TunesmithError
    from tunesmith.tasks import Family, register, unregister
    from tunesmith.tasks.classification.config import ClassificationTaskConfig
    from tunesmith.tasks.registry import PredictOption

    class ToyConfig(ClassificationTaskConfig):
        name: Literal["toy_options"] = "toy_options"

    register(Family("toy_options", ToyConfig, "tunesmith.tasks.classification.task:ClassificationTask",
                    predict_options=(PredictOption("toy_knob", "Toy: a knob.", feeds="predict"),)))
    try:
        cli.refresh_family_options()
        assert "--toy-knob" in CliRunner().invoke(cli.app, ["predict", "--help"]).output
        assert cli._family_options("toy_options", {"toy_knob": "0.7", "question": None}) == ({}, {"toy_knob": "0.7"})
        assert cli._family_options("question_answering", {"question": ["Q?"]}) == ({"question": ["Q?"]}, {})
        with pytest.raises(TunesmithError, match="--question applies to question_answering runs only; this run is classification"):
            cli._family_options("classification", {"question": ["Who?"]})
    finally:
        unregister("toy_options")
        cli.refresh_family_options()
    assert "--toy-knob" not in CliRunner().invoke(cli.app, ["predict", "--help"]).output
