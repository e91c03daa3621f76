"""The tier and statistics tests' model fixtures, for the same runs over several ranks."""
from tests.stats.conftest import text_file, tiny_lm  # noqa: F401 (fixtures)
from tests.tiers.conftest import tier_model  # noqa: F401 (fixtures)
