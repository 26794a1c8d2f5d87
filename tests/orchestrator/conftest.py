import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One prepared token file for every job test of the session (the driver reuses it)."""
    return tmp_path_factory.mktemp("data_cache")


from .multinode import ray_nodes  # noqa: E402,F401 - the elastic tests' multi-node Ray (session)
