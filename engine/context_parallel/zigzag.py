"""Zigzag causal load balance: the sequence is cut into 2*cp chunks and CP rank r holds chunks r and
2*cp-1-r, so every rank gets the same number of unmasked (query, key) pairs under a causal mask.

Pure helpers (no process group) for the data path and the tests.
"""
from __future__ import annotations

import torch


def zigzag_chunk_len(seq_len: int, cp_size: int) -> int:
    if cp_size < 1 or seq_len % (2 * cp_size):
        raise ValueError(f"zigzag: seq_len={seq_len} is not divisible by 2*cp={2 * cp_size} "
                         "(pad or pick a sequence length that is)")
    return seq_len // (2 * cp_size)


def _check_rank(cp_size: int, cp_rank: int) -> None:
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"zigzag: cp_rank={cp_rank} outside [0, {cp_size})")


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global token positions held by cp_rank, in local order (first chunk r, then chunk 2cp-1-r)."""
    chunk = zigzag_chunk_len(seq_len, cp_size)
    _check_rank(cp_size, cp_rank)
    late = 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                      torch.arange(late * chunk, (late + 1) * chunk)])


def zigzag_shard(tensor: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of `tensor` along `dim`, concatenated (a new tensor)."""
    zigzag_chunk_len(tensor.shape[dim], cp_size)
    _check_rank(cp_size, cp_rank)
    chunks = tensor.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def zigzag_unshard(shards: list[torch.Tensor], cp_size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of zigzag_shard: shards[r] is rank r's local tensor; returns the full sequence."""
    if len(shards) != cp_size:
        raise ValueError(f"zigzag: got {len(shards)} shards for cp={cp_size}")
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        if shard.shape[dim] % 2:
            raise ValueError(f"zigzag: shard {rank} has odd length {shard.shape[dim]} along dim {dim}")
        chunks[rank], chunks[2 * cp_size - 1 - rank] = shard.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def gathered_to_true_order(num_shards: int, shard_len: int) -> torch.Tensor:
    """Index that puts the concatenation of `num_shards` consecutive zigzag shards in sequence order.

    Shard p (positions p of a group of consecutive CP ranks) holds (first_p, second_p); in the
    sequence, first_0..first_{P-1} are ascending and second_{P-1}..second_0 follow. This also holds
    for a sub-group g of size P inside cp: its tokens form super-chunks g and 2R-1-g of a zigzag
    over R = cp/P super-chunks, which is what hybrid (Ulysses inside, ring across) relies on.
    """
    if shard_len % 2:
        raise ValueError(f"zigzag: local length {shard_len} must be even (two chunks)")
    positions = torch.arange(num_shards * shard_len).view(num_shards, 2, shard_len // 2)
    return torch.cat([positions[:, 0].flatten(), positions[:, 1].flip(0).flatten()])
