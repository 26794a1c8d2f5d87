"""TokenDataset: the global batch of a step as a pure function of (seed, step).

Samples are the windows tokens[i*s : i*s + s + 1] (s = seq_len; consecutive windows share
one token so every token is a target once). Each epoch visits all windows in a seeded
permutation; global sample g = step * global_batch_size + j lives in epoch g // num_samples.
Nothing depends on world size, DP size or rank, so resumes and reshapes see the same data.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import numpy as np
import torch

from .index import TOKENS_FILE, read_index, verify_dataset

_CACHED_EPOCHS = 2  # a batch spans at most two epochs when global_batch_size <= num_samples


class TokenDataset:
    def __init__(self, prepared_dir: str, seq_len: int, *, verify: bool = False):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}: must be >= 1")
        self.prepared_dir = os.path.abspath(prepared_dir)
        self.index = verify_dataset(prepared_dir) if verify else read_index(prepared_dir)
        self.seq_len = seq_len
        n_tokens = self.index["n_tokens"]
        if n_tokens < seq_len + 1:
            raise ValueError(
                f"{prepared_dir}: {n_tokens} tokens is shorter than one sample of seq_len+1 = "
                f"{seq_len + 1} tokens; use a shorter seq_len or more data")
        dtype = np.dtype("<u2" if self.index["dtype"] == "uint16" else "<u4")
        self._tokens = np.memmap(os.path.join(prepared_dir, TOKENS_FILE), dtype=dtype, mode="r",
                                 shape=(n_tokens,))
        self._perms: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    @property
    def num_samples(self) -> int:
        return (self.index["n_tokens"] - 1) // self.seq_len

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.index["eos_id"]

    @property
    def num_tokens(self) -> int:
        return self.index["n_tokens"]

    def global_batch(self, step: int, global_batch_size: int, seed: int) -> torch.Tensor:
        """LongTensor [global_batch_size, seq_len + 1] of step `step` (0-based) of a run at
        one batch size throughout."""
        if step < 0:
            raise ValueError(f"step={step}, global_batch_size={global_batch_size}: need step >= 0")
        return self.batch_at(step * global_batch_size, global_batch_size, seed)

    def batch_at(self, first_sample: int, global_batch_size: int, seed: int,
                 rows: list[int] | None = None) -> torch.Tensor:
        """LongTensor [global_batch_size, seq_len + 1]: the run's samples from `first_sample`
        (the samples consumed so far, engine/data/position.py). With `rows` (a rank's, from
        Trainer.local_batch_rows) only those rows are read and filled; the others are left
        uninitialised, never read by that rank (a DP rank reads 1/dp of the batch)."""
        if first_sample < 0 or global_batch_size < 1:
            raise ValueError(f"first_sample={first_sample}, global_batch_size={global_batch_size}: "
                             "need first_sample >= 0, global_batch_size >= 1")
        sample_ids = self.sample_ids(first_sample, global_batch_size, seed)
        if rows is None:
            return torch.from_numpy(self._windows(sample_ids.numpy()))
        out = torch.empty(global_batch_size, self.seq_len + 1, dtype=torch.int64)
        picked = torch.as_tensor(rows, dtype=torch.long)
        out[picked] = torch.from_numpy(self._windows(sample_ids[picked].numpy()))
        return out

    def _windows(self, ids: np.ndarray) -> np.ndarray:
        starts = ids * self.seq_len
        window = starts[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)[None, :]
        return self._tokens[window].astype(np.int64)

    def sample_ids(self, first: int, count: int, seed: int) -> torch.Tensor:
        """Window indices of global samples first..first+count-1 (LongTensor [count])."""
        global_samples = torch.arange(first, first + count)
        epochs, positions = global_samples // self.num_samples, global_samples % self.num_samples
        ids = torch.empty(count, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            in_epoch = epochs == epoch
            ids[in_epoch] = self._epoch_permutation(seed, epoch)[positions[in_epoch]].long()
        return ids

    def _epoch_permutation(self, seed: int, epoch: int) -> torch.Tensor:
        key = (seed, epoch)
        if key not in self._perms:
            generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            # int32 below 2^31 windows: half the host memory (1 T tokens at seq 2048: 2 GB
            # a permutation, not 4), and the same permutation as int64 (same generator draws).
            dtype = torch.int32 if self.num_samples < 2 ** 31 else torch.int64
            self._perms[key] = torch.randperm(self.num_samples, generator=generator, dtype=dtype)
            while len(self._perms) > _CACHED_EPOCHS:
                self._perms.popitem(last=False)
        self._perms.move_to_end(key)
        return self._perms[key]


def _epoch_seed(seed: int, epoch: int) -> int:
    """Independent 63-bit seed per (seed, epoch); hashing avoids seed+epoch collisions."""
    digest = hashlib.sha256(f"foldmoe-data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)
