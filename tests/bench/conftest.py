"""The data benchmark's tests run on the same real-audio corpus as the data tests."""
from __future__ import annotations

import pytest

from tests.data.conftest import Corpus, build_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """40 real utterances in 8 shards of 5."""
    return build_corpus(tmp_path_factory.mktemp("corpus"), 40, 5)
