"""`parallel.auto: true`: the job trains on the planner's first row for the world size it
gets (torchrun launcher, 4 and 2 workers), and prints / logs the choice."""
from __future__ import annotations

import json
import re

import pytest

from .jobs import TINY, job_overrides, only_run, read_jsonl, run_cli, set_args

pytestmark = pytest.mark.slow


def _plan_first_row(overrides, world, cwd) -> dict:
    out = run_cli(["plan", TINY, "--gpus", str(world), "--json", *set_args(overrides)], cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["layouts"][0]


@pytest.mark.parametrize("world", [4, 2])
def test_auto_layout_trains_on_plans_first_row(tmp_path, data_cache, world):
    overrides = job_overrides(tmp_path, data_cache, steps=2,
                              extra=["parallel.auto=true", f"cluster.num_workers={world}"])
    first = _plan_first_row(overrides, world, tmp_path)
    out = run_cli(["train", TINY, "--launcher", "torchrun", "--metrics-jsonl", "m.jsonl",
                   *set_args(overrides)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [0, 1]
    note = re.search(r"parallel\.auto: world size (\d+) -> tp=(\d+) cp=(\d+) pp=(\d+) vpp=(\d+) "
                     r"ep=(\d+) etp=(\d+).*MFU ([\d.]+)%", out.stdout)
    assert note, out.stdout[-2000:]
    chosen = dict(zip(("tp", "cp", "pp", "vpp", "ep", "etp"), map(int, note.groups()[1:7])))
    assert int(note.group(1)) == world
    assert chosen == {k: first[k] for k in chosen}
    assert abs(float(note.group(8)) - 100 * first["mfu"]) < 0.06
    client, run = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = run.data.params          # what the workers really built, from their start event
    assert {k: int(params[f"layout.{k}"]) for k in ("tp", "cp", "pp", "ep", "etp")} == \
        {k: first[k] for k in ("tp", "cp", "pp", "ep", "etp")}
    (mfu,) = client.get_metric_history(run.info.run_id, "auto_predicted_mfu")
    assert mfu.value == pytest.approx(first["mfu"])
