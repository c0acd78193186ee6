"""The training fixtures (real FSDD shards) serve the router test's training run too."""
from tests.engine.conftest import small_corpus  # noqa: F401 - a fixture
