"""tunesmith: fine-tune pretrained transformers for downstream NLP tasks, evaluate them, serve them.

Python API first::

    import tunesmith
    result = tunesmith.train("configs/sst2-minilm.yaml")
    tunesmith.predict(result.run_dir, ["a gorgeous, witty film"])
    tunesmith.generate("runs/sft", ["Write a haiku about autumn."], max_new_tokens=40)  # causal LM / seq2seq runs
    tunesmith.qa.answer(model, tokenizer, ["Who wrote it?"], ["It was written by Ada."])  # any QA model
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {"train", "evaluate", "predict", "generate", "chat", "load", "RunResult", "LoadedRun"}


def __getattr__(name: str):
    # Importing torch/transformers takes seconds; `tunesmith --help` and config tools should not pay it.
    if name in _API:
        from tunesmith import api

        return getattr(api, name)
    if name == "import_gguf":  # `tunesmith model import`
        from tunesmith.convert.gguf import import_gguf

        return import_gguf
    if name == "qa":  # `tunesmith.qa.answer`: question answering with any AutoModelForQuestionAnswering
        import importlib

        return importlib.import_module(f"{__name__}.qa")  # `from . import qa` would ask this function again
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")


__all__ = sorted(_API) + ["__version__", "import_gguf", "qa"]
