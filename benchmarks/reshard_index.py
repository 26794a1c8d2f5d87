"""What opening a checkpoint for a resume costs each rank: ReshardReader's index of every
saved rank's shard entries, for a synthetic checkpoint of Mixtral-8x22B's shipped 128-GPU
layout (TP2 PP8 VPP7 EP8: 7 one-layer chunks a rank, each entry also with its 3 optimizer
entries). Measures the index as built now (entries only; coverage tensors for the shards a
rank reads) against building every entry's coverage, which the reader did until 2026-12-03.

    python -m benchmarks.reshard_index [--ranks 128] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from engine.checkpoint.files import file_record, write_json_durable
from engine.checkpoint.manager import FORMAT, FORMAT_VERSION, MANIFEST, rank_file_names
from engine.checkpoint.reshard import ReshardReader, coverage_of

H, F, E_LOCAL, HEADS_KV_ROWS = 6144, 16384, 1, 1024


def _layer_entries(layer: int, tp_rank: int, ep_rank: int) -> dict:
    """Shard entries of one Mixtral-8x22B layer at TP2 EP8 (ETP1): attention and norms
    TP-sliced or replicated, one local expert of 8 (EP-sliced along dim 0)."""
    entries = {
        f"layers.{layer}.attention.wq.weight": ([H // 2, H], [[0, tp_rank * H // 2, H // 2]]),
        f"layers.{layer}.attention.wk.weight": ([HEADS_KV_ROWS // 2, H], [[0, tp_rank * 512, 512]]),
        f"layers.{layer}.attention.wv.weight": ([HEADS_KV_ROWS // 2, H], [[0, tp_rank * 512, 512]]),
        f"layers.{layer}.attention.wo.weight": ([H, H // 2], [[1, tp_rank * H // 2, H // 2]]),
        f"layers.{layer}.attn_norm.weight": ([H], []),
        f"layers.{layer}.ffn_norm.weight": ([H], []),
        f"layers.{layer}.ffn.router.weight": ([8, H], []),
    }
    for name, shape in (("w_gate", [E_LOCAL, H, F]), ("w_up", [E_LOCAL, H, F]), ("w_down", [E_LOCAL, F, H])):
        entries[f"layers.{layer}.ffn.experts.{name}"] = (shape, [[0, ep_rank, 1]])
    out = {}
    for name, (shape, slices) in entries.items():
        out[f"model/{name}"] = {"local_shape": shape, "slices": slices}
        numel = 1
        for size in shape:
            numel *= size
        for kind in ("exp_avg", "exp_avg_sq", "main_param"):
            out[f"optim/{kind}/{name}"] = {"local_shape": shape, "slices": slices, "flat_range": [0, numel]}
    return out


def write_checkpoint(root: str, ranks: int) -> str:
    step_dir = os.path.join(root, "step00000001")
    os.makedirs(step_dir)
    files, pp, vpp = {}, 8, 7
    for rank in range(ranks):
        tp_rank, ep_rank, pp_rank = rank % 2, (rank // 2) % 8, rank // (ranks // pp)
        shards = {}
        for chunk in range(vpp):
            shards.update(_layer_entries(chunk * pp + pp_rank, tp_rank, ep_rank))
        tensor_name, json_name = rank_file_names(rank)
        write_json_durable(os.path.join(step_dir, json_name), {"rank": rank, "shards": shards,
                                                               "meta": {"step": 1}})
        open(os.path.join(step_dir, tensor_name), "wb").close()
        files[json_name] = file_record(os.path.join(step_dir, json_name))
        files[tensor_name] = file_record(os.path.join(step_dir, tensor_name))
    write_json_durable(os.path.join(step_dir, MANIFEST), {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": 1, "world_size": ranks,
        "layout": {}, "files": files, "created_unix": time.time()})
    return step_dir


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(step_dir: str) -> dict:
    base = _max_rss_bytes()
    start = time.perf_counter()
    reader = ReshardReader(step_dir, rank=0)
    index_s, index_rss = time.perf_counter() - start, _max_rss_bytes() - base
    entries = sum(len(v) for v in reader.shards.values())
    start = time.perf_counter()
    # What the reader built (and kept) for every entry of every saved rank before.
    kept = [coverage_of(json.loads(shard.slices), shard.local_shape)
            for shards in reader.shards.values() for shard in shards]
    eager_s = time.perf_counter() - start
    assert len(kept) == entries
    return {"entries": entries, "index_s": index_s, "index_rss_growth_bytes": index_rss,
            "all_coverages_s": eager_s, "all_coverages_rss_growth_bytes": _max_rss_bytes() - base - index_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        result = {"ranks": args.ranks, **measure(write_checkpoint(root, args.ranks))}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
