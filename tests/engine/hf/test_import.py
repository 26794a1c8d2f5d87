"""HF import at world 1: every imported tensor, the LM loss and every gradient equal the
Hugging Face model's (fp32, relative 1e-5), for Mixtral, Qwen2-MoE and Qwen3-MoE."""
import pytest
import torch

pytest.importorskip("transformers")

from engine.hf.names import hf_tensor_map, rope_rows_from_hf, rope_rows_to_hf
from engine.testing.hf_models import (FAMILIES, foldmoe_step0, hf_loss_and_grads, load_hf_tensors,
                                      save_tiny_model)
from engine.testing.multiprocess import run_distributed
from engine.testing.parity import synthetic_global_batch

BATCH, SEQ = 2, 8


def to_hf_layout(name: str, tensor: torch.Tensor, family: str, head_dim: int) -> dict:
    """foldmoe tensor -> {hf name: tensor} (the inverse of the import mapping, for checking)."""
    spec = hf_tensor_map(name, family, head_dim)
    if spec is None:
        return {}
    if spec.stacked_experts:
        return {spec.hf_name.format(expert=e): t.T for e, t in enumerate(tensor)}
    if spec.rope_head_dim is not None:
        rows = rope_rows_from_hf(torch.arange(tensor.shape[0]), spec.rope_head_dim)
        tensor = tensor[rows]
    return {spec.hf_name: tensor}


def test_rope_row_maps_are_inverse():
    rows = torch.arange(64)
    assert torch.equal(rope_rows_from_hf(rope_rows_to_hf(rows, 16), 16), rows)
    assert rope_rows_to_hf(torch.tensor([0, 1, 2, 16, 17]), 16).tolist() == [0, 8, 1, 16, 24]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_world1_loss_and_every_gradient_equal_hf(family, tmp_path):
    model = save_tiny_model(family, str(tmp_path))
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    (result,) = run_distributed(foldmoe_step0, 1, str(tmp_path), {}, BATCH, SEQ)
    tokens = synthetic_global_batch(0, BATCH, SEQ, model.config.vocab_size)
    hf_loss, hf_grads = hf_loss_and_grads(str(tmp_path), tokens, str(tmp_path / "grads"))
    hf_params = load_hf_tensors(str(tmp_path))
    assert abs(result["loss"] - hf_loss) <= 1e-5 * abs(hf_loss), (result["loss"], hf_loss)
    covered = set()
    for name, param in result["params"].items():
        for hf_name, value in to_hf_layout(name, param, family, head_dim).items():
            assert torch.equal(value, hf_params[hf_name]), hf_name
        for hf_name, grad in to_hf_layout(name, result["grads"][name], family, head_dim).items():
            want = hf_grads[hf_name]
            err = (grad - want).abs().max() / want.abs().max().clamp_min(1e-12)
            assert err <= 1e-5, (hf_name, err.item())
            covered.add(hf_name)
    assert covered == set(hf_grads), set(hf_grads) ^ covered
