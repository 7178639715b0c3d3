"""The sequence-to-sequence family (summarization, translation, any text to text). Importing the package
imports only its config section (no torch)."""

from tunesmith.tasks.registry import Family, PredictOption
from tunesmith.tasks.seq2seq.config import Seq2SeqTaskConfig

FAMILY = Family(
    name="seq2seq", config=Seq2SeqTaskConfig, task="tunesmith.tasks.seq2seq.task:Seq2SeqTask",
    examples="tunesmith.tasks.seq2seq.examples:contract_examples",
    predict_options=(
        PredictOption("num_beams", "seq2seq: beam search width for this call (overrides the run's generation settings).",
                      feeds="predict"),
        PredictOption("max_new_tokens", "seq2seq: most tokens generated per output for this call.", feeds="predict"),
    ),
)
