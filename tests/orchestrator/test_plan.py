"""The plan artifact: built from the engine's own split and expert slices."""
from orchestrator.config import load_config
from orchestrator.plan import plan_document, plan_text

from .jobs import TINY


def test_plan_covers_every_layer_and_expert_once():
    run = load_config(TINY, ["parallel.tp=1", "parallel.pp=2", "parallel.ep=2"])
    doc = plan_document(run, 4)
    assert doc["schedule"] == "1f1b" and doc["microbatches_per_step"] == 2   # 8 / (mbs 2 x dp 2)
    assert sorted(i for c in doc["pipeline"] for i in c["layers"]) == [0, 1, 2, 3]
    assert [c["pp_rank"] for c in doc["pipeline"]] == [0, 1]
    assert abs(sum(c["cost_share"] for c in doc["pipeline"]) - 1) < 1e-3
    assert [e["experts"] for e in doc["experts"]] == [[0, 4], [4, 8]]        # 8 experts / ep 2
    assert "chunk 1 (pp rank 1, virtual stage 0)" in plan_text(doc)
