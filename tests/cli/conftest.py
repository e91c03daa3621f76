"""The key commands run on the tier tests' sharded models; the patch commands on the patch tests' models."""
from tests.patches.conftest import models  # noqa: F401 (a fixture)
from tests.tiers.conftest import tier_model  # noqa: F401 (a fixture)
