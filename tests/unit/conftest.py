"""Session fixtures for the data pipeline tests: one small sample corpus and one tokenizer.

Names start with ``dp_`` so they cannot shadow fixtures defined in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.sample_corpus import write_sample_corpus
from data_pipeline.tokenizer import train_tokenizer

DP_DOCS = 300
# 107 reserved pieces + 256 byte pieces + the corpus's ~60 characters leave ~90 learned pieces:
# the smallest round number sentencepiece accepts for this corpus, and it trains in ~0.1 s.
DP_VOCAB_SIZE = 512


@pytest.fixture(scope="session")
def dp_corpus_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sample_corpus(tmp_path_factory.mktemp("dp_corpus"), docs=DP_DOCS, seed=0, docs_per_file=150)


@pytest.fixture(scope="session")
def dp_tokenizer_path(dp_corpus_paths: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(
        dp_corpus_paths, vocab_size=DP_VOCAB_SIZE, out_prefix=tmp_path_factory.mktemp("dp_tok") / "sp"
    )
