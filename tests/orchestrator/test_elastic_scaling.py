"""What the Ray launcher hands Ray Train for a fixed size and for an elastic range."""
from __future__ import annotations

from orchestrator.config import load_config
from orchestrator.ray_launcher import PLACEMENT_TIMEOUT_ENV, controller_env, scaling_size

from .jobs import TINY

ELASTIC = ["cluster.num_workers=[2,4]", "train.global_batch_size=12"]


def _cluster(*overrides: str):
    return load_config(TINY, list(overrides)).schema.cluster


def test_an_elastic_range_is_ray_trains_min_max_with_the_resize_interval(monkeypatch):
    monkeypatch.delenv(PLACEMENT_TIMEOUT_ENV, raising=False)
    elastic = _cluster(*ELASTIC, "cluster.resize_check_s=5")
    assert scaling_size(elastic) == {"num_workers": (2, 4), "elastic_resize_monitor_interval_s": 5.0}
    assert controller_env(elastic) == {PLACEMENT_TIMEOUT_ENV: "15"}
    assert controller_env(_cluster(*ELASTIC, "cluster.placement_timeout_s=30")) == {PLACEMENT_TIMEOUT_ENV: "30"}


def test_a_fixed_size_keeps_ray_defaults_and_the_users_environment_wins(monkeypatch):
    monkeypatch.delenv(PLACEMENT_TIMEOUT_ENV, raising=False)
    fixed = _cluster()
    assert scaling_size(fixed) == {"num_workers": 4}
    assert controller_env(fixed) == {}
    monkeypatch.setenv(PLACEMENT_TIMEOUT_ENV, "90")
    assert controller_env(_cluster(*ELASTIC)) == {}
