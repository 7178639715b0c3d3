import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# pytest-xdist runs one process per core: more than one torch thread each oversubscribes the CPU
# (measured ~10x slower training on 2 cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from tiny import build_pretrained_tiny_bert, build_tiny_bert, sentiment_rows, write_csv


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Tokenization cache and the cached bf16 measurement (precision.json) in a per-session folder: tests,
    # and the runs they start, never read or overwrite the user's (set unconditionally: a TUNESMITH_CACHE
    # in the shell is the user's cache).
    os.environ["TUNESMITH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def sentiment_csv(tmp_path):
    return write_csv(tmp_path / "train.csv", sentiment_rows(64))


@pytest.fixture(scope="session")
def pretrained_tiny_bert(tiny_bert, tmp_path_factory):
    """Tiny BERT encoder with sentiment-bearing features and no task head."""
    return build_pretrained_tiny_bert(tiny_bert, tmp_path_factory.mktemp("pretrained-bert"), tmp_path_factory.mktemp("pretrain-work"))
