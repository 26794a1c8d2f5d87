"""Worker-loop pieces that need no process group: derived metrics, the checkpoint
schedule, the torchrun reporter, and the data feed's independence from history."""
from __future__ import annotations

import json

import pytest

from engine.data import TokenDataset, prepare_dataset
from orchestrator.config import load_config
from workers.events import EventTail
from workers.loop import _should_save, step_record
from workers.reporters import FileReporter

from ..orchestrator.jobs import TINY


def test_step_record_derives_throughput_by_hand():
    metrics = {"loss": 5.0, "tokens": 1000.0, "step_time_s": 0.5, "model_flops": 4e12}
    record = step_record(7, metrics, world_size=4, peak_flops=1e12)
    assert record["step"] == 7 and record["loss"] == 5.0
    assert record["tokens_per_s"] == pytest.approx(2000.0)          # 1000 tokens / 0.5 s
    assert record["tflops_per_device"] == pytest.approx(2.0)        # 4e12 / (0.5 * 1e12 * 4)
    assert record["mfu"] == pytest.approx(2.0)                      # 2 TFLOP/s over a 1 TFLOP/s peak


def test_checkpoint_schedule_every_n_and_at_the_end():
    paths = {"job_dir": "/job", "data_dir": "/data", "checkpoint_dir": "/ckpt", "events_path": "/ev"}
    spec = load_config(TINY, ["train.steps=10", "checkpoint.every_steps=4"]).job_spec(**paths)
    assert [c for c in range(1, 11) if _should_save(spec, c)] == [4, 8, 10]
    never = load_config(TINY, ["train.steps=10", "checkpoint.every_steps=0"]).job_spec(**paths)
    assert not any(_should_save(never, c) for c in range(1, 11))


def test_file_reporter_writes_from_rank_0_only_with_torchrun_restart_count(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    path = str(tmp_path / "events.jsonl")
    FileReporter(path, rank=1).step({"step": 0, "loss": 1.0})
    assert EventTail(path).read() == []
    reporter = FileReporter(path, rank=0)
    reporter.start({"world_size": 2})
    reporter.step({"step": 0, "loss": float("nan")})
    events = EventTail(path).read()
    assert [e["type"] for e in events] == ["placed", "start", "step"]   # placed: on creation
    assert all(e["restarts"] == 2 for e in events)
    assert events[-1]["loss"] == "nan"          # JSON has no NaN; kept readable


def test_restarts_count_the_worker_groups_that_came_up_before(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    path = str(tmp_path / "events.jsonl")
    for expected in range(3):
        reporter = FileReporter(path, rank=0)      # a (re)started rank 0
        assert reporter.restarts == expected
        reporter.start({"world_size": 2})
        reporter.step({"step": expected, "loss": 1.0})


def test_event_tail_skips_a_partial_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"type": "step", "step": 0}) + "\n" + '{"type": "st')
    tail = EventTail(str(path))
    assert [e["step"] for e in tail.read()] == [0]
    with open(path, "a") as handle:
        handle.write('ep", "step": 1}\n')
    assert [e["step"] for e in tail.read()] == [1]
    assert tail.read() == []


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stdlib"
    return prepare_dataset("stdlib", str(out), "byte", max_bytes=200_000, progress=False)


def test_batch_of_a_step_does_not_depend_on_history(small_dataset):
    """A resumed worker computes step 5's batch cold; it must equal the one an uninterrupted
    worker gets after steps 0..4 (data position = step, no iterator state)."""
    warm = TokenDataset(small_dataset, 32)
    in_order = [warm.global_batch(step, 4, seed=1234) for step in range(6)]
    cold = TokenDataset(small_dataset, 32).global_batch(5, 4, seed=1234)
    assert cold.equal(in_order[5])
    assert not in_order[4].equal(in_order[5])
    assert not TokenDataset(small_dataset, 32).global_batch(5, 4, seed=99).equal(cold)
