"""Merge search inside a wall-clock budget (`merge-engine search`): search spaces in a mergekit config
(spaces.py), the budget (budget.py), and the search itself over an in-memory merge session (run.py)."""
from merge_engine.search.budget import parse_duration
from merge_engine.search.run import SearchError, SearchOptions, SearchResult, load_search_config, search
from merge_engine.search.spaces import SearchConfig, Space, parse_search_config

__all__ = ["SearchConfig", "SearchError", "SearchOptions", "SearchResult", "Space", "load_search_config",
           "parse_duration", "parse_search_config", "search"]
