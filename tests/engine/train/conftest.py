import pytest

from engine.testing.layouts import reference_run

_CACHE: dict = {}


@pytest.fixture(scope="session")
def reference_for():
    """Single-process reference runs, cached per (model overrides, train settings)."""
    def get(model: dict, train: dict) -> dict:
        key = (tuple(sorted(model.items())), tuple(sorted(train.items())))
        if key not in _CACHE:
            _CACHE[key] = reference_run(model, train)
        return _CACHE[key]
    return get
