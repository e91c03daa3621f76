"""The package's names, loaded on first use (merge_engine/__init__.py)."""
import pytest

import merge_engine


def test_every_exported_name_resolves_and_is_listed_once():
    for name in merge_engine.__all__:
        assert getattr(merge_engine, name) is not None
    listed = dir(merge_engine)
    assert set(merge_engine.__all__) <= set(listed)
    assert len(listed) == len(set(listed)), sorted(n for n in set(listed) if listed.count(n) > 1)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        merge_engine.no_such_name
