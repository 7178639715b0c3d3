"""The causal language-model family (continued pretraining, instruction tuning, chat). Importing the package
imports only its config section (no torch)."""

from tunesmith.tasks.causal_lm.config import CausalLMTaskConfig
from tunesmith.tasks.registry import Family, PredictOption

_GENERATION_OPTIONS = (
    ("max_new_tokens", "most tokens generated per output"),
    ("do_sample", "sample instead of greedy decoding (true/false)"),
    ("temperature", "sampling temperature"),
    ("top_p", "sampling: nucleus probability mass"),
    ("top_k", "sampling: keep the k most likely tokens"),
    ("num_beams", "beam search width"),
    ("repetition_penalty", "penalty on tokens already generated"),
    ("seed", "random seed of this call's sampling"),
)

FAMILY = Family(
    name="causal_lm", config=CausalLMTaskConfig, task="tunesmith.tasks.causal_lm.task:CausalLMTask",
    examples="tunesmith.tasks.causal_lm.examples:contract_examples",
    predict_options=tuple(PredictOption(name, f"causal_lm: {text} for this call (overrides the run's generation settings).",
                                        feeds="predict") for name, text in _GENERATION_OPTIONS)
    + (PredictOption("stop_strings", "causal_lm: stop at this string (repeatable).", repeatable=True, feeds="predict"),),
)
