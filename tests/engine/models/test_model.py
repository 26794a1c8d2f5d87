"""The parallelism-free model: shapes, presets, init independence, RoPE, recompute modes."""
import pytest
import torch

from engine.config.model import PRESETS, get_preset
from engine.models.init import init_weights
from engine.layers import apply_rope, rope_cos_sin
from engine.models.transformer import MoETransformer, count_parameters

# Published totals / active parameters (billions): model cards of Mixtral, Qwen2-MoE, DeepSeekMoE.
PUBLISHED = {"mixtral-8x7b": (46.7, 12.9), "mixtral-8x22b": (141.0, 39.0),
             "qwen2-57b-a14b": (57.4, 14.2), "deepseek-moe-16b": (16.4, 2.8)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_presets_match_published_sizes(name):
    counts = count_parameters(PRESETS[name])
    total, active = PUBLISHED[name]
    assert counts["total"] / 1e9 == pytest.approx(total, rel=0.01)
    assert counts["active"] / 1e9 == pytest.approx(active, rel=0.02)


def _tiny(**over):
    cfg = get_preset("tiny-moe", **over)
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=7)
    return cfg, model


def test_tiny_forward_shapes_and_param_count():
    cfg, model = _tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(tokens, torch.arange(16).expand(2, -1))
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]


def test_init_is_independent_of_which_layers_a_chunk_holds():
    cfg, full = _tiny()
    stage = MoETransformer(cfg, layer_ids=[2, 3], first_stage=False, last_stage=True)
    init_weights(stage, cfg, seed=7)
    full_params = dict(full.named_parameters())
    for name, param in stage.named_parameters():
        torch.testing.assert_close(param, full_params[name], rtol=0, atol=0)


def test_pipeline_chunks_compose_to_the_full_model():
    cfg, full = _tiny()
    first = MoETransformer(cfg, layer_ids=[0, 1], first_stage=True, last_stage=False)
    last = MoETransformer(cfg, layer_ids=[2, 3], first_stage=False, last_stage=True)
    for chunk in (first, last):
        init_weights(chunk, cfg, seed=7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    pos = torch.arange(8).expand(2, -1)
    torch.testing.assert_close(last(first(tokens, pos), pos), full(tokens, pos), rtol=0, atol=0)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), 16, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), 16, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_tied_embeddings_use_the_embedding_table():
    cfg = get_preset("tiny-moe", tie_embeddings=True)
    model = MoETransformer(cfg, layer_ids=[])   # embed -> norm -> tied head only
    init_weights(model, cfg, seed=7)
    assert model.head is None
    hidden = model.norm(model.embed(torch.tensor([[1, 2]])))
    torch.testing.assert_close(model(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]))[0, 0],
                               hidden[0, 0] @ model.embed.weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["selective", "full", "remat_aware"])
def test_recompute_modes_give_identical_gradients(mode):
    cfg, model = _tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).expand(2, -1)

    def grads(recompute):
        model.zero_grad()
        model.set_recompute(recompute)
        model(tokens, pos).float().logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference, other = grads("none"), grads(mode)
    for name in reference:
        torch.testing.assert_close(other[name], reference[name], rtol=1e-6, atol=1e-7)


def test_bad_overrides_name_the_key():
    with pytest.raises(KeyError, match="model.preset='gpt5'"):
        get_preset("gpt5")
    with pytest.raises(ValueError, match="model.num_kv_heads=3"):
        get_preset("tiny-moe", num_kv_heads=3)
    with pytest.raises(ValueError, match="moe.top_k=9"):
        get_preset("tiny-moe", moe_top_k=9)
