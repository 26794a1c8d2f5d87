"""Evaluation data: the held-out split of a prepared dataset, and files of token rows.

Held-out split (train.eval_every / train.eval_batches, and `foldmoe eval` without --tokens):
the last `eval_batches x global_batch_size` windows of the token file, in file order. With
train.eval_every > 0 training draws its seeded permutation over the windows before them
only (TrainWindows), so no held-out target token is ever a training target (the boundary
token is the last target of the last training window and the first input of the first
held-out one). The split depends only on the token file, seq_len, eval_batches and
global_batch_size: every layout and world size sees the same batches.

Token rows (`foldmoe eval --tokens FILE.jsonl`): one `{"input_ids": [...]}` object a line
(blank lines skipped); a row of n ids gives n - 1 targets. Rows are packed in file order,
`global_batch_size` rows a batch, each right-padded with id 0 to seq_len + 1; padded
positions and the all-padding rows that fill the last batch have target weight 0. Under
causal attention right-padding never changes the loss of a real token (dropless MoE:
padding tokens route independently; with a capacity factor they may take capacity).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .dataset import TokenDataset


class EvalDataError(ValueError):
    """A token-rows file or a held-out split that cannot be evaluated (one line)."""


@dataclass(frozen=True)
class EvalBatch:
    tokens: torch.Tensor     # [B, s+1] int64 token ids (the trainer's global-batch format)
    weights: torch.Tensor    # [B, s+1] float: 1 where the token is a counted target (column 0 is 0)

    @property
    def num_targets(self) -> int:
        return int(self.weights[:, 1:].sum().item())


def held_out_windows(train) -> int:
    """Windows held out of training: eval_batches global batches when eval_every > 0."""
    return train.eval_batches * train.global_batch_size if train.eval_every > 0 else 0


class TrainWindows(TokenDataset):
    """The training windows of a prepared dataset: all but the last `held_out` ones."""

    def __init__(self, prepared_dir: str, seq_len: int, held_out: int, global_batch_size: int):
        super().__init__(prepared_dir, seq_len)
        self.held_out = held_out
        if super().num_samples - held_out < global_batch_size:
            held = (f"; holding out {held_out} (train.eval_batches x train.global_batch_size) "
                    "leaves fewer") if held_out else " are fewer"
            raise EvalDataError(
                f"{prepared_dir}: {super().num_samples} windows of seq_len {seq_len}{held} than one "
                f"global batch ({global_batch_size}) to train on; lower train.global_batch_size"
                f"{', train.eval_batches' if held_out else ''} or use more data")

    @property
    def num_samples(self) -> int:
        return super().num_samples - self.held_out


def check_held_out_fits(prepared_dir: str, seq_len: int, eval_batches: int,
                        global_batch_size: int) -> TokenDataset:
    """The dataset, after checking that the held-out split and one global batch fit (reads
    only the index: the driver's check before the start)."""
    data = TokenDataset(prepared_dir, seq_len)
    need = eval_batches * global_batch_size
    if data.num_samples < need + global_batch_size:
        raise EvalDataError(
            f"{prepared_dir}: {data.num_samples} windows of seq_len {seq_len}; the held-out split "
            f"needs {need} (train.eval_batches x train.global_batch_size) plus one global batch "
            "to train on; lower train.eval_batches or use more data")
    return data


def held_out_batches(prepared_dir: str, seq_len: int, eval_batches: int,
                     global_batch_size: int) -> list[EvalBatch]:
    """The held-out split as `eval_batches` batches of `global_batch_size` windows."""
    data = check_held_out_fits(prepared_dir, seq_len, eval_batches, global_batch_size)
    need = eval_batches * global_batch_size
    first = data.num_samples - need
    starts = (first + np.arange(need, dtype=np.int64)) * seq_len
    window = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    tokens = torch.from_numpy(data._tokens[window].astype(np.int64))
    weights = torch.ones(tokens.shape, dtype=torch.float64)
    weights[:, 0] = 0.0
    return [EvalBatch(t, w) for t, w in zip(tokens.split(global_batch_size), weights.split(global_batch_size))]


def read_token_rows(path: str, vocab_size: int, seq_len: int) -> list[list[int]]:
    """The rows of a JSONL file of `{"input_ids": [...]}`; a bad row is an EvalDataError
    naming FILE:LINE."""
    rows = []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise EvalDataError(f"{path}: {err.strerror or err}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                rows.append(_row(line, f"{path}:{number}", vocab_size, seq_len))
    if not rows:
        raise EvalDataError(f"{path}: no rows; expected one {{\"input_ids\": [...]}} object a line")
    return rows


def _row(line: str, where: str, vocab_size: int, seq_len: int) -> list[int]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{where}: not JSON ({err.msg})") from None
    ids = obj.get("input_ids") if isinstance(obj, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise EvalDataError(f"{where}: expected {{\"input_ids\": [int, ...]}}")
    if len(ids) < 2:
        raise EvalDataError(f"{where}: {len(ids)} token(s); a row needs at least 2 (one target)")
    if len(ids) > seq_len + 1:
        raise EvalDataError(f"{where}: {len(ids)} tokens; at most train.seq_len + 1 = {seq_len + 1} "
                            "(raise train.seq_len or split the row)")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise EvalDataError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def pack_rows(rows: list[list[int]], global_batch_size: int, seq_len: int) -> list[EvalBatch]:
    """Rows -> batches of global_batch_size rows of seq_len + 1, right-padded, weights 0 on padding."""
    n_batches = -(-len(rows) // global_batch_size)
    tokens = torch.zeros(n_batches * global_batch_size, seq_len + 1, dtype=torch.int64)
    weights = torch.zeros(tokens.shape, dtype=torch.float64)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        weights[r, 1:len(ids)] = 1.0
    return [EvalBatch(t, w) for t, w in zip(tokens.split(global_batch_size), weights.split(global_batch_size))]
