"""The executor on the real tiny-moe MoETransformer (token ids into chunk 0, hidden states
between chunks, positions to every chunk, MoE aux losses injected in backward)."""
import pytest
import torch
import torch.nn.functional as F

from engine.config.model import get_preset
from engine.models.init import init_weights
from engine.models.transformer import MoETransformer
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.pipeline.executor import PipelineExecutor
from engine.pipeline.schedules import build_schedule, chunks_of_rank
from engine.pipeline.split import split_layers
from engine.testing.multiprocess import run_distributed

CFG = get_preset("tiny-moe", max_seq_len=64)
MBS, SEQ, M, SEED = 2, 16, 4, 1
# Same ops per micro-batch; only the grad accumulation order may differ (fp32, ~1e-7).
TOL = dict(rtol=1e-5, atol=1e-6)


def _microbatches():
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(M):
        ids = torch.randint(0, CFG.vocab_size, (MBS, SEQ + 1), generator=gen)
        out.append({"inputs": ids[:, :-1], "labels": ids[:, 1:], "positions": torch.arange(SEQ).expand(MBS, SEQ)})
    return out


def _loss_fn(logits_bsv, batch):
    # sum of CE over local tokens / tokens of all micro-batches (design.md loss convention)
    return F.cross_entropy(logits_bsv.flatten(0, 1), batch["labels"].flatten(), reduction="sum") / (M * MBS * SEQ)


def _model(layer_ids=None, first=True, last=True):
    full = MoETransformer(CFG)
    init_weights(full, CFG, seed=SEED)
    if layer_ids is None:
        model = full
    else:
        model = MoETransformer(CFG, layer_ids, first, last)
        model.load_state_dict({k: v for k, v in full.state_dict().items() if k in model.state_dict()})
    for layer in model.moe_layers():
        layer.aux_loss_scale = 1.0 / M
    return model


def _worker(rank, world, cases):
    mesh = FoldedMesh(ParallelConfig(world_size=world, pp=world))
    out = []
    for name, vpp in cases:
        pp, num_chunks = world, world * vpp
        layers = split_layers(CFG, pp, vpp, seq_len=SEQ)
        chunks = [_model(layers[c], c == 0, c == num_chunks - 1) for c in chunks_of_rank(rank, pp, vpp)]
        executor = PipelineExecutor(chunks, mesh, build_schedule(name, pp, M, vpp)[rank], _loss_fn,
                                    (MBS, SEQ, CFG.hidden_size), torch.float32)
        losses = executor.run(_microbatches())
        out.append({"losses": losses,
                    "grads": {n: p.grad.clone() for c in chunks for n, p in c.named_parameters()}})
    return out


@pytest.mark.slow
def test_tiny_moe_pp2_1f1b_and_interleaved_match_single_process():
    model = _model()
    ref_losses = []
    for batch in _microbatches():
        loss = _loss_fn(model(batch["inputs"], batch["positions"]), batch)
        loss.backward()
        ref_losses.append(loss.detach())
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    cases = [("1f1b", 1), ("interleaved", 2)]
    results = run_distributed(_worker, 2, cases)
    for index, case in enumerate(cases):
        torch.testing.assert_close(torch.stack(results[1][index]["losses"]), torch.stack(ref_losses), **TOL)
        grads = {n: g for r in results for n, g in r[index]["grads"].items()}
        assert set(grads) == set(ref_grads), case
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=lambda s: f"{case} {name}: {s}")
