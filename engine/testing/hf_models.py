"""Tiny random Hugging Face MoE models (one per family) saved with `save_pretrained`, and
the helpers that compare foldmoe with them. Needs `transformers` (tests only)."""
from __future__ import annotations

import math

import torch

from engine.compose import build_trainer
from engine.config.train import TrainConfig
from engine.hf.config import model_config_from_hf, read_hf_config
from engine.hf.reader import HFWeightSource
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.testing.parity import GradCapturingTrainer, synthetic_global_batch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
_SHAPES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def hf_config(family: str):
    import transformers as tf
    if family == "mixtral":
        return tf.MixtralConfig(**_SHAPES, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        # dense layers at 1 (mlp_only_layers) and 2 (sparse step 2 keeps only odd ids 1, 3).
        return tf.Qwen2MoeConfig(**_SHAPES, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                 decoder_sparse_step=2, mlp_only_layers=[1], norm_topk_prob=False)
    return tf.Qwen3MoeConfig(**_SHAPES, num_experts=4, num_experts_per_tok=2, head_dim=16,
                             moe_intermediate_size=16, norm_topk_prob=True)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """O(1) random values everywhere: matrices N(0, 1/fan_in) (unit-scale outputs), vectors
    (norms, biases) around 1 or 0, so every tensor and every convention matters."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        values = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.5 * values)
        elif param.dim() == 1:
            param.copy_(0.5 * values)
        elif "embed" in name:
            param.copy_(values)
        else:
            param.copy_(values / math.sqrt(param.shape[-1]))


def save_tiny_model(family: str, out_dir: str, seed: int = 0) -> torch.nn.Module:
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family)).float()
    randomize_(model, seed)
    model.save_pretrained(out_dir)
    return model


def load_hf_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of a saved HF model, under its checkpoint (published) names."""
    from safetensors.torch import load_file
    from engine.hf.reader import weight_files
    out = {}
    for path in sorted(set(weight_files(model_dir).values())):
        out.update(load_file(path))
    return out


def hf_loss_and_grads(model_dir: str, tokens: torch.Tensor, grad_dir: str) -> tuple[float, dict]:
    """HF's mean LM loss on `tokens` and its gradients under checkpoint names: the grads are
    written with HF's own save_pretrained (which undoes its in-memory expert fusion)."""
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.grad)
    model.save_pretrained(grad_dir)
    return loss.item(), load_hf_tensors(grad_dir)


def foldmoe_step0(rank: int, world: int, model_dir: str, layout: dict, batch: int, seq: int) -> dict:
    """Imports the HF model into `layout`, runs one forward/backward on the shared batch;
    returns the LM loss, this rank's gradient shards, their slices and the parameters."""
    from engine.parallel.param_attrs import slices
    cfg = model_config_from_hf(read_hf_config(model_dir))
    cfg = type(cfg)(**{**cfg.__dict__, "moe": type(cfg.moe)(**{**cfg.moe.__dict__, "aux_loss_coeff": 0.0})})
    mesh = FoldedMesh(ParallelConfig(world_size=world, **layout))
    dp = mesh.config.dp
    train = TrainConfig(global_batch_size=batch, micro_batch_size=batch // dp, seq_len=seq, grad_clip=0.0)
    trainer = build_trainer(cfg, train, mesh, trainer_cls=GradCapturingTrainer,
                            weights=HFWeightSource(model_dir))
    params = {n: p.detach().clone() for n, p in trainer.named_params}
    metrics = trainer.train_step(0, synthetic_global_batch(0, batch, seq, cfg.vocab_size))
    return {"loss": metrics["lm_loss"], "grads": trainer.grads_per_step[0], "params": params,
            "slices": {n: slices(p) for n, p in trainer.named_params}}


def full_from_hf(name: str, hf_tensors: dict, model_type: str, head_dim: int,
                 num_experts: int) -> torch.Tensor | None:
    """The whole foldmoe tensor `name` built from HF tensors (independent of the reader's
    slicing; the world-1 import test checks this mapping tensor by tensor)."""
    from engine.hf.names import hf_tensor_map, rope_rows_to_hf
    spec = hf_tensor_map(name, model_type, head_dim)
    if spec is None:
        return None
    if spec.stacked_experts:
        return torch.stack([hf_tensors[spec.hf_name.format(expert=e)].T for e in range(num_experts)])
    tensor = hf_tensors[spec.hf_name]
    if spec.rope_head_dim is not None:
        tensor = tensor[rope_rows_to_hf(torch.arange(tensor.shape[0]), spec.rope_head_dim)]
    return tensor


def layouts_step0(rank: int, world: int, cases: list, batch: int, seq: int) -> dict:
    """foldmoe_step0 for each (label, model_dir, layout) in one spawned job."""
    return {label: foldmoe_step0(rank, world, model_dir, layout, batch, seq)
            for label, model_dir, layout in cases}


def import_train_save(rank: int, world: int, cases: list, batch: int, seq: int) -> dict:
    """For each (label, model_dir, layout, steps, checkpoint_root): import, train `steps`
    steps, save a checkpoint, then return the LM loss of the next batch (before its update)."""
    import torch.distributed as dist
    from engine.checkpoint.manager import CheckpointManager
    out = {}
    for label, model_dir, layout, steps, root in cases:
        cfg = model_config_from_hf(read_hf_config(model_dir))
        mesh = FoldedMesh(ParallelConfig(world_size=world, **layout))
        train = TrainConfig(global_batch_size=batch, micro_batch_size=batch // mesh.config.dp,
                            seq_len=seq, lr=1e-2, warmup_steps=0)
        trainer = build_trainer(cfg, train, mesh, weights=HFWeightSource(model_dir))
        for step in range(steps):
            trainer.train_step(step, synthetic_global_batch(step, batch, seq, cfg.vocab_size))
        manager = CheckpointManager(root, 1, dist.get_rank(), world, barrier=dist.barrier)
        step_dir = manager.save(steps, trainer.checkpoint_state())
        next_loss = trainer.train_step(steps, synthetic_global_batch(steps, batch, seq, cfg.vocab_size))
        out[label] = {"step_dir": step_dir, "next_lm_loss": next_loss["lm_loss"]}
    return out
