"""A foldmoe training step against transformers' MixtralForCausalLM on the same weights.

Step = forward + backward + global-norm clipping (1.0) + AdamW, on one batch of B x s
tokens, CPU, one thread. foldmoe runs its real path (Trainer.train_step on a world-1 gloo
mesh: flat fp32 buckets, routing statistics, metrics); transformers runs the model with
`experts_implementation` "eager" (a loop over the experts that are hit) and "grouped_mm"
(torch._grouped_mm over expert-sorted tokens), torch.nn.utils.clip_grad_norm_ and
torch.optim.AdamW: with its default kernel (per-tensor, what foldmoe's FoldedOptimizer runs
on its flat buffers) and, as a third candidate, with fused=True (one vectorised pass, which
FoldedOptimizer does not use). Before timing, the logits of both models on the first batch
are compared (the weight mapping is in benchmarks/hf_mixtral.py).

    python -m benchmarks.step_vs_hf [--rounds 4] [--shapes mixtral,fine64] [--eager-shapes mixtral]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import (init_single_process_group, interleaved_rounds, median, median_ratio,
                               one_thread, print_table, write_json)
from benchmarks.hf_mixtral import build_hf_model
from engine.compose import build_trainer
from engine.config.model import ModelConfig, MoEConfig
from engine.config.train import TrainConfig
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.testing.parity import synthetic_global_batch
from engine.train.trainer import Trainer

BATCH, SEQ = 4, 256
SHAPES = {
    # Mixtral-8x7B proportions scaled down: F/h = 3.5, GQA 4:1, 8 experts top-2.
    "mixtral": ModelConfig(vocab_size=2048, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                           first_k_dense=0, max_seq_len=SEQ,
                           moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=1792)),
    # Fine-grained experts (DeepSeekMoE / Qwen2-MoE style): 64 experts top-6, F_e/h = 0.75.
    "fine64": ModelConfig(vocab_size=2048, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=4,
                          first_k_dense=0, max_seq_len=SEQ,
                          moe=MoEConfig(num_experts=64, top_k=6, ffn_hidden_size=384)),
}
TRAIN = dict(global_batch_size=BATCH, micro_batch_size=BATCH, seq_len=SEQ, lr=1e-4, min_lr=1e-5,
             warmup_steps=1, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0)


def foldmoe_step(cfg: ModelConfig, mesh: FoldedMesh, batch: torch.Tensor):
    trainer = build_trainer(cfg, TrainConfig(**TRAIN), mesh)
    counter = iter(range(10**9))
    return trainer, lambda: trainer.train_step(next(counter), batch)


def hf_step(model, batch: torch.Tensor, fused_adamw: bool = False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1, fused=fused_adamw or None)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step():
        out = model(input_ids=inputs)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        if out.aux_loss is not None:
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


@torch.no_grad()
def logits_error(trainer: Trainer, hf_model, batch: torch.Tensor) -> float:
    inputs = batch[:, :-1]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    ours = trainer.chunks[0](inputs, positions)
    theirs = hf_model(input_ids=inputs).logits
    return float((ours - theirs).abs().max() / theirs.abs().max())


def run_shape(name: str, cfg: ModelConfig, mesh: FoldedMesh, rounds: int, eager: bool = True) -> dict:
    batch = synthetic_global_batch(0, BATCH, SEQ, cfg.vocab_size)
    trainer, fold = foldmoe_step(cfg, mesh, batch)
    weights = {n: p.detach() for n, p in trainer.named_params}
    impls = ("eager", "grouped_mm") if eager else ("grouped_mm",)
    hf = {impl: build_hf_model(cfg, weights, impl) for impl in impls}
    errors = {impl: logits_error(trainer, model, batch) for impl, model in hf.items()}
    candidates = {"foldmoe": fold, **{f"hf_{impl}": hf_step(model, batch) for impl, model in hf.items()}}
    fused_model = build_hf_model(cfg, weights, "grouped_mm")
    candidates["hf_grouped_mm_fused_adamw"] = hf_step(fused_model, batch, fused_adamw=True)
    times = interleaved_rounds(candidates, rounds)
    tokens = BATCH * SEQ
    return {"shape": name, "config": {"hidden": cfg.hidden_size, "layers": cfg.num_layers,
                                      "experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
                                      "ffn_expert": cfg.moe.ffn_hidden_size, "vocab": cfg.vocab_size,
                                      "batch": BATCH, "seq": SEQ},
            "logits_rel_error": errors,
            "median_step_s": {k: median(v) for k, v in times.items()},
            "tokens_per_s": {k: tokens / median(v) for k, v in times.items()},
            # > 1: foldmoe is faster (throughput ratio = HF step time / foldmoe step time).
            "throughput_ratio_vs_hf_eager": (median_ratio(times["hf_eager"], times["foldmoe"])
                                             if eager else None),
            "throughput_ratio_vs_hf_grouped_mm": median_ratio(times["hf_grouped_mm"], times["foldmoe"]),
            "throughput_ratio_vs_hf_grouped_mm_fused_adamw": median_ratio(
                times["hf_grouped_mm_fused_adamw"], times["foldmoe"]),
            "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--eager-shapes", default=",".join(SHAPES),
                        help="shapes that also time HF eager experts (16 s a step at fine64)")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
    args = parser.parse_args()
    one_thread()
    init_single_process_group()
    mesh = FoldedMesh(ParallelConfig(world_size=1))
    eager = set(args.eager_shapes.split(","))
    results = [run_shape(name, SHAPES[name], mesh, args.rounds, name in eager) for name in args.shapes.split(",")]
    print_table(f"training step, CPU, 1 thread, B x s = {BATCH} x {SEQ}, median of {args.rounds} rounds",
                ["shape", "foldmoe s", "hf eager s", "hf grouped_mm s", "hf gmm+fused s", "x vs eager",
                 "x vs grouped_mm", "x vs gmm+fused", "logits err"],
                [[r["shape"], r["median_step_s"]["foldmoe"], r["median_step_s"].get("hf_eager", "-"),
                  r["median_step_s"]["hf_grouped_mm"], r["median_step_s"]["hf_grouped_mm_fused_adamw"],
                  r["throughput_ratio_vs_hf_eager"] or "-", r["throughput_ratio_vs_hf_grouped_mm"],
                  r["throughput_ratio_vs_hf_grouped_mm_fused_adamw"], max(r["logits_rel_error"].values())]
                 for r in results])
    write_json("step_vs_hf", {"rounds": args.rounds, "results": results}, args.json)


if __name__ == "__main__":
    main()
