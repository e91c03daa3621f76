"""The key commands run on the tier tests' sharded models."""
from tests.tiers.conftest import tier_model  # noqa: F401 (a fixture)
