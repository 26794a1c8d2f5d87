"""The run's parallel plan, logged as an MLflow artifact next to the layout table: which
layers each pipeline chunk holds (and their cost share), the pipeline schedule, and which
experts and FFN slice each (ep, etp) rank holds. Derived from the same engine functions
the workers build the model with, so it is what ran, not a second description of it.
"""
from __future__ import annotations

from engine.moe.parallelize import expert_slice
from engine.pipeline.split import chunk_costs, split_layers
from engine.config.train import pipeline_schedule_for

from .config import RunConfig


def plan_document(run: RunConfig, world_size: int) -> dict:
    p, m = run.parallel(world_size), run.model
    chunks = split_layers(m, p.pp, p.vpp, seq_len=run.train.seq_len)
    costs = chunk_costs(m, chunks, run.train.seq_len)
    total = sum(costs)
    pipeline = [{"chunk": c, "pp_rank": c % p.pp, "virtual_stage": c // p.pp, "layers": layers,
                 "moe_layers": [i for i in layers if m.is_moe_layer(i)],
                 "cost_share": round(cost / total, 4)}
                for c, (layers, cost) in enumerate(zip(chunks, costs))]
    experts = []
    for ep_rank in range(p.ep):
        for etp_rank in range(p.etp):
            e, f = expert_slice(m.moe.num_experts, m.moe.ffn_hidden_size, p.ep, ep_rank, p.etp, etp_rank)
            experts.append({"ep_rank": ep_rank, "etp_rank": etp_rank, "experts": [e.start, e.stop],
                            "ffn_columns": [f.start, f.stop]})
    return {"world_size": world_size,
            "schedule": pipeline_schedule_for(run.train.pipeline_schedule, p.vpp) if p.pp > 1 else "none (pp=1)",
            "microbatches_per_step": run.train.num_microbatches(p.dp),
            "dispatcher": run.schema.moe.dispatcher, "pipeline": pipeline, "experts": experts}


def plan_text(doc: dict) -> str:
    lines = [f"world size {doc['world_size']}, pipeline schedule {doc['schedule']}, "
             f"{doc['microbatches_per_step']} micro-batches per step per DP rank, "
             f"{doc['dispatcher']} dispatcher", "pipeline chunks:"]
    for c in doc["pipeline"]:
        lines.append(f"  chunk {c['chunk']} (pp rank {c['pp_rank']}, virtual stage "
                     f"{c['virtual_stage']}): layers {c['layers']}, MoE {c['moe_layers']}, "
                     f"{100 * c['cost_share']:.1f}% of the cost")
    lines.append("experts per (ep, etp) rank: [first, end) experts, [first, end) FFN columns")
    for e in doc["experts"]:
        lines.append(f"  ep {e['ep_rank']} etp {e['etp_rank']}: experts {e['experts']}, "
                     f"columns {e['ffn_columns']}")
    return "\n".join(lines) + "\n"


def plan_for(run: RunConfig):
    """world_size -> (text, document), as the observer logs it once the workers are up."""
    def build(world_size: int) -> tuple[str, dict]:
        doc = plan_document(run, world_size)
        return plan_text(doc), doc
    return build
