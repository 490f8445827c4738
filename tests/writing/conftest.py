"""Fixtures of the writing tests."""

from __future__ import annotations

import pytest

from steer_experts.models import CACHE_ENV


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A temporary cache: conversions of tiny models (and their refusals) stay out of the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
