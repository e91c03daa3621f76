"""The key commands run on the tier tests' sharded models; the patch commands on the patch tests' models; the
search command on the search tests' models."""
from tests.patches.conftest import models  # noqa: F401 (a fixture)
from tests.search.conftest import search_models, write_search  # noqa: F401 (fixtures)
from tests.tiers.conftest import tier_model  # noqa: F401 (a fixture)
