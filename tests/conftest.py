"""Shared fixtures."""

import pytest

from fedmerge.threads import torch_threads


@pytest.fixture
def one_thread():
    """Tiny models train ~10× faster on one thread than on two contended ones."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module (its module-scoped fixtures train too)."""
    with torch_threads(1):
        yield
