"""The shard-size build (engine/compose.py): one rank of a layout whose full model is 16x its
shard builds with a peak memory of about its own parameters, where a full-shape build of the
same chunk would not fit the bound; and the shards equal the slices of the full model."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from engine.compose import build_chunks
from engine.config.model import get_preset
from engine.models.init import init_weights
from engine.models.transformer import MoETransformer
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import global_slice
from engine.testing.multiprocess import run_distributed

# 64 experts, EP8 x PP2 (world 16): rank 3 holds 4 of 8 layers and 8 of 64 experts per layer.
BIG = dict(moe_num_experts=64, moe_top_k=2, moe_ffn_hidden_size=384, hidden_size=256, num_heads=4,
           num_kv_heads=2, num_layers=8, first_k_dense=0, vocab_size=512)
LAYOUT = dict(world_size=16, ep=8, pp=2)

_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from engine.compose import build_chunks, chunk_layer_ids
    from engine.config.model import get_preset
    from engine.metrics.memory import param_bytes, peak_memory_bytes, reset_peak_memory
    from engine.models.transformer import MoETransformer
    from engine.parallel.config import ParallelConfig
    from engine.parallel.mesh import FoldedMesh
    overrides, layout, mode = json.loads(sys.argv[1])
    cfg = get_preset("tiny-moe", **overrides)
    dist.init_process_group("fake", rank=3, world_size=layout["world_size"], store=FakeStore())
    mesh = FoldedMesh(ParallelConfig(**layout))     # fake groups: one rank of the world
    cpu = torch.device("cpu")
    with torch.device("meta"):                      # one-time costs of the first meta build
        MoETransformer(get_preset("tiny-moe"))      # belong to the baseline
    reset_peak_memory(cpu)
    baseline = peak_memory_bytes(cpu)               # interpreter + torch + the mesh
    reset_peak_memory(cpu)
    if mode == "shard":
        chunks = build_chunks(cfg, mesh, seed=0)
    else:                                           # the same chunk at full shape (no plans)
        (index, layer_ids), = chunk_layer_ids(cfg, mesh)
        chunks = [MoETransformer(cfg, layer_ids, first_stage=False, last_stage=True)]
    print(json.dumps({"baseline": baseline, "peak": peak_memory_bytes(cpu),
                      "param_bytes": param_bytes(chunks)}))
""")


def _measure(mode: str) -> dict:
    # A fixed mmap threshold (which also stops glibc raising it) returns every freed buffer
    # above 64 KiB to the system, so the peak RSS counts what the build holds, not what
    # glibc keeps of freed temporaries.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([BIG, LAYOUT, mode])],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_rank_builds_at_shard_size():
    full_model = sum(p.numel() for p in MoETransformer(get_preset("tiny-moe", **BIG)).parameters()) * 4
    shard = _measure("shard")
    assert full_model >= 8 * shard["param_bytes"]
    bound = 1.3 * shard["param_bytes"] + shard["baseline"]
    assert shard["peak"] <= bound, shard
    full_shape = _measure("full")       # what the old build allocated for the same chunk
    assert full_shape["peak"] > bound, (full_shape, bound)
    print(f"\nshard params {shard['param_bytes'] / 2**20:.1f} MiB, build peak "
          f"{(shard['peak'] - shard['baseline']) / 2**20:.1f} MiB over a baseline of "
          f"{shard['baseline'] / 2**20:.0f} MiB; full-shape chunk "
          f"{(full_shape['peak'] - full_shape['baseline']) / 2**20:.1f} MiB")


def _shards_worker(rank, world, layout, precision):
    cfg = get_preset("tiny-moe", tie_embeddings=True)
    mesh = FoldedMesh(ParallelConfig(world_size=world, **layout))
    chunks = build_chunks(cfg, mesh, seed=5, precision=precision)
    full = MoETransformer(cfg)
    init_weights(full, cfg, 5)
    reference = dict(full.named_parameters())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return {name: (torch.equal(p.detach(), global_slice(p, reference[name].detach()).to(dtype)),
                   p.dtype == dtype, p.device.type)
            for chunk in chunks for name, p in chunk.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("layout,precision", [(dict(tp=2, ep=2), "fp32"), (dict(pp=2, ep=2, etp=1), "bf16"),
                                              (dict(tp=4, ep=2, etp=2), "fp32")])
def test_every_shard_is_the_slice_of_the_full_model(layout, precision):
    for result in run_distributed(_shards_worker, 4, layout, precision):
        bad = {name: r for name, r in result.items() if r != (True, True, "cpu")}
        assert not bad and result, bad
