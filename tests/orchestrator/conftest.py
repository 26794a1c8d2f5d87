import pytest

from . import multinode


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One prepared token file for every job test of the session (the driver reuses it)."""
    return tmp_path_factory.mktemp("data_cache")


ray_nodes = multinode.ray_nodes    # the elastic tests' multi-node Ray (session scope)
