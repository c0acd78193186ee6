"""The training fixtures (real FSDD shards) serve the launch tests too."""
from tests.engine.conftest import small_corpus  # noqa: F401 - a fixture
