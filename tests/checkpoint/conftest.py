"""The training fixtures (real FSDD shards, a one-rank world) serve the checkpoint tests too."""
from tests.engine.conftest import one_rank, small_corpus  # noqa: F401 - fixtures
