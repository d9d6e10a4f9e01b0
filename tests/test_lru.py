"""The bounded cache behind the ClientApp's per-device caches."""

from __future__ import annotations

import pytest

from edgefed.common.lru import Lru


def test_the_least_recently_used_entry_goes_first_and_is_made_again_when_asked_for():
    made: list[str] = []
    cache: Lru[str, str] = Lru(2)

    def make(key: str):  # noqa: ANN202
        return lambda: made.append(key) or key.upper()

    assert cache.get("a", make("a")) == "A" and cache.get("b", make("b")) == "B"
    assert cache.get("a", make("a")) == "A"  # a hit, and now the most recent
    cache.get("c", make("c"))  # b goes
    assert "b" not in cache and "a" in cache and len(cache) == 2
    assert cache.get("b", make("b")) == "B" and made == ["a", "b", "c", "b"]


def test_a_cache_holds_at_least_one_entry():
    with pytest.raises(ValueError, match="at least one"):
        Lru(0)
