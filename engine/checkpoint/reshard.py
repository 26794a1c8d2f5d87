"""Loading a sharded checkpoint into any other layout: each rank reads only the regions it needs.

Every sharded tensor a rank saved has a shard entry (its rank JSON): `local_shape`, the
`slices` that cut it out of the global tensor (engine/parallel/param_attrs.py, applied in
order: (dim, start, length) narrows, (dim, [indices], None) selects) and, for optimizer
state, `flat_range` [lo, hi): the elements of the flattened local tensor that the saved
1-D tensor holds (a ZeRO-1 shard, or the whole tensor).

Slices act on each dim separately, so a shard covers a product set of global indices,
`coverage[d]` (global index of each local position along d). A target (this rank's local
tensor, or a flat range of it) is filled from every saved shard whose coverage meets its
own: the matching positions are found per dim, only their bounding box is read with
safetensors slicing (`safe_open(...).get_slice(key)[box]`), and each element is copied
once. Replicas (shards with identical entries: DP copies, TP copies of unsliced params)
are read from one member only: this rank's own file when it holds one, else a member
picked by rank, so ranks spread their reads. A file is SHA-256-verified against the
manifest the first time this rank reads from it; files it does not need are never opened.
A target element that no saved shard provides is an error, never a silent zero.

Why not torch.distributed.checkpoint: it would replace the safetensors + manifest format
(and its integrity checks) with its own, and it does not know ZeRO-1 flat ranges.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .files import read_json
from .manager import CheckpointError, read_manifest, rank_file_names, verify_file


@dataclass(frozen=True)
class SavedShard:
    rank: int
    key: str
    slices: str                             # the recorded slices, as JSON (coverage_of)
    local_shape: tuple[int, ...]
    flat_range: tuple[int, int] | None     # None: stored with local_shape; else 1-D [lo, hi)
    signature: str                          # equal for replicas

    @property
    def stored_range(self) -> tuple[int, int]:
        return self.flat_range or (0, _numel(self.local_shape))


def _numel(shape) -> int:
    out = 1
    for size in shape:
        out *= int(size)
    return out


def coverage_of(slices, local_shape) -> tuple[torch.Tensor, ...]:
    """Global index of every local position, per dim, from the recorded slices."""
    cov: list[torch.Tensor | None] = [None] * len(local_shape)
    for dim, start, length in slices:
        if length is None:
            picked = torch.tensor(list(start), dtype=torch.long)
            cov[dim] = picked if cov[dim] is None else cov[dim][picked]
        else:
            span = torch.arange(start, start + length)
            cov[dim] = span if cov[dim] is None else cov[dim][start:start + length]
    out = tuple(torch.arange(size) if c is None else c for c, size in zip(cov, local_shape))
    if any(len(c) != size for c, size in zip(out, local_shape)):
        raise CheckpointError(f"slices {slices} do not give local shape {list(local_shape)}")
    return out


def _match(mine: torch.Tensor, theirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in mine, positions in theirs) of the global indices both hold."""
    order = torch.argsort(theirs)
    sorted_theirs = theirs[order]
    pos = torch.searchsorted(sorted_theirs, mine).clamp(max=max(len(theirs) - 1, 0))
    hit = sorted_theirs[pos] == mine if len(theirs) else torch.zeros_like(mine, dtype=torch.bool)
    return hit.nonzero().flatten(), order[pos[hit]]


def _is_span(pos: torch.Tensor) -> bool:
    return bool(len(pos) and pos[-1] - pos[0] + 1 == len(pos)
                and (len(pos) == 1 or bool((pos[1:] - pos[:-1] == 1).all())))


def _flat_index(pos: list[torch.Tensor], shape) -> torch.Tensor:
    """Flat index (row-major in `shape`) of every element of the product of `pos`."""
    flat = torch.zeros((), dtype=torch.long)
    stride = 1
    for dim in reversed(range(len(shape))):
        view = [1] * len(shape)
        view[dim] = -1
        flat = flat + pos[dim].view(view) * stride
        stride *= int(shape[dim])
    return flat


def _row_span(shape, flat_range: tuple[int, int]) -> tuple[int, int]:
    """The dim-0 rows that a flat range [lo, hi) of a tensor of `shape` touches."""
    row = max(_numel(shape[1:]), 1)
    return flat_range[0] // row, -(-flat_range[1] // row)


def _rows_in_ranges(matches, local_shape, target_range, shard: SavedShard):
    """Drops the dim-0 matches outside the rows of the target's and the shard's flat ranges,
    so the element path's index tensors stay about the size of what this rank owns
    (a ZeRO-1 range), not of the whole local tensor."""
    if not matches or not len(local_shape):
        return matches
    (my_lo, my_hi), (src_lo, src_hi) = (_row_span(local_shape, target_range),
                                        _row_span(shard.local_shape, shard.stored_range))
    my_pos, src_pos = matches[0]
    keep = (my_pos >= my_lo) & (my_pos < my_hi) & (src_pos >= src_lo) & (src_pos < src_hi)
    return [(my_pos[keep], src_pos[keep])] + list(matches[1:])


class ReshardReader:
    """Reads a checkpoint written by any layout for the rank `rank` of the current one."""

    def __init__(self, path: str, rank: int):
        self.path, self.rank = path, rank
        self.manifest = read_manifest(path)
        self.saved_world = int(self.manifest["world_size"])
        self.rank_meta: list[dict] = []
        self.shards: dict[str, list[SavedShard]] = {}
        for saved_rank in range(self.saved_world):
            self._index_rank(saved_rank)
        self.files_read: set[str] = set()
        self._handles: dict[int, object] = {}
        self._coverage: dict[str, tuple[torch.Tensor, ...]] = {}

    def _index_rank(self, saved_rank: int) -> None:
        json_name = rank_file_names(saved_rank)[1]
        verify_file(self.path, json_name, self.manifest)
        side = read_json(os.path.join(self.path, json_name))
        self.rank_meta.append(side["meta"])
        for key, info in side["shards"].items():
            flat = info.get("flat_range")
            signature = json.dumps([info["local_shape"], info["slices"], flat])
            # Coverage tensors are built only for the shards a fill_ reads (coverage()): at
            # 1,024 saved ranks building them all cost every rank gigabytes of host memory.
            self.shards.setdefault(key, []).append(SavedShard(
                saved_rank, key, json.dumps(info["slices"]), tuple(info["local_shape"]),
                tuple(flat) if flat else None, signature))

    def coverage(self, shard: SavedShard) -> tuple[torch.Tensor, ...]:
        """Per dim, the global index of each local position of `shard` (built once per
        distinct entry; replicas share it)."""
        if shard.signature not in self._coverage:
            self._coverage[shard.signature] = coverage_of(json.loads(shard.slices), shard.local_shape)
        return self._coverage[shard.signature]

    def has(self, key: str) -> bool:
        return key in self.shards

    # ---- reading ------------------------------------------------------------------------

    def _handle(self, saved_rank: int):
        if saved_rank not in self._handles:
            name = rank_file_names(saved_rank)[0]
            verify_file(self.path, name, self.manifest)
            self.files_read.add(name)
            self._handles[saved_rank] = safe_open(os.path.join(self.path, name), "pt")
        return self._handles[saved_rank]

    def read_rank_tensor(self, saved_rank: int, key: str) -> torch.Tensor:
        """A whole tensor of one saved rank (e.g. its RNG state)."""
        return self._handle(saved_rank).get_tensor(key)

    def read_rank_tensors(self, saved_rank: int) -> dict[str, torch.Tensor]:
        """Every tensor of one saved rank's file."""
        handle = self._handle(saved_rank)
        return {key: handle.get_tensor(key) for key in handle.keys()}

    def _read_box(self, shard: SavedShard, pos: list[torch.Tensor]) -> torch.Tensor:
        """The elements of the product of `pos` (local positions of `shard`), reading only
        their bounding box from the file."""
        box = tuple(slice(int(p.min()), int(p.max()) + 1) for p in pos)
        values = self._handle(shard.rank).get_slice(shard.key)[box]
        for dim, (p, cut) in enumerate(zip(pos, box)):
            if not _is_span(p) or len(p) != cut.stop - cut.start:
                values = values.index_select(dim, p - cut.start)
        return values

    def _read_flat(self, shard: SavedShard, flat: torch.Tensor) -> torch.Tensor:
        lo = shard.stored_range[0]
        first, last = int(flat.min()), int(flat.max()) + 1
        chunk = self._handle(shard.rank).get_slice(shard.key)[first - lo:last - lo]
        return chunk[flat - first]

    # ---- filling a target ---------------------------------------------------------------

    def _chosen(self, key: str) -> list[SavedShard]:
        """One member per group of replicas: this rank's own, else one picked by rank."""
        groups: dict[str, list[SavedShard]] = {}
        for shard in self.shards.get(key, []):
            groups.setdefault(shard.signature, []).append(shard)
        chosen = []
        for members in groups.values():
            own = [s for s in members if s.rank == self.rank]
            chosen.append(own[0] if own else members[self.rank % len(members)])
        return chosen

    @torch.no_grad()
    def fill_(self, key: str, out: torch.Tensor, slices, local_shape,
              flat_range: tuple[int, int] | None = None) -> None:
        """Writes into `out` the saved values of global tensor `key` at this rank's shard
        (`slices`, `local_shape`); `out` is the whole local tensor, or with `flat_range`
        the 1-D range [lo, hi) of its flattened elements."""
        if key not in self.shards:
            raise CheckpointError(f"{self.path}: has no tensor {key!r} (another model?)")
        local_shape = tuple(int(s) for s in local_shape)
        target_range = flat_range or (0, _numel(local_shape))
        mine = coverage_of(slices, local_shape)
        filled = torch.zeros(target_range[1] - target_range[0], dtype=torch.bool)
        for shard in self._chosen(key):
            if len(shard.local_shape) != len(local_shape):
                raise CheckpointError(f"{key}: saved with {len(shard.local_shape)} dims, "
                                      f"this model has {len(local_shape)}")
            matches = _rows_in_ranges([_match(m, t) for m, t in zip(mine, self.coverage(shard))],
                                      local_shape, target_range, shard)
            if any(len(my_pos) == 0 for my_pos, _ in matches):
                continue
            self._copy(shard, out, local_shape, target_range, flat_range is None, matches, filled)
        if not bool(filled.all()):
            missing = int((~filled).sum())
            raise CheckpointError(f"{self.path}: no saved shard provides {missing} of "
                                  f"{filled.numel()} elements of {key!r} for rank {self.rank}; "
                                  "the checkpoint is of another model or incomplete")

    def _copy(self, shard, out, local_shape, target_range, out_is_nd, matches, filled) -> None:
        my_pos = [m for m, _ in matches]
        src_pos = [s for _, s in matches]
        if shard.flat_range is None and out_is_nd and all(_is_span(p) for p in my_pos):
            # Fast path (every param): a box of the saved tensor into a box of this one.
            region, mask = out, filled.view(local_shape)
            for dim, p in enumerate(my_pos):
                region = region.narrow(dim, int(p[0]), len(p))
                mask = mask.narrow(dim, int(p[0]), len(p))
            region.copy_(self._read_box(shard, src_pos))
            mask.fill_(True)
            return
        # Element path (optimizer state): flat indices of the matched box on both sides.
        src_flat = _flat_index(src_pos, shard.local_shape)
        my_flat = _flat_index(my_pos, local_shape)
        s_lo, s_hi = shard.stored_range
        t_lo, t_hi = target_range
        keep = (src_flat >= s_lo) & (src_flat < s_hi) & (my_flat >= t_lo) & (my_flat < t_hi)
        if not bool(keep.any()):
            return
        if shard.flat_range is None:
            values = self._read_box(shard, src_pos)[keep]
        else:
            values = self._read_flat(shard, src_flat[keep])
        dest = my_flat[keep] - t_lo
        # index_put_ needs the values on out's device (a CUDA optimizer buffer); the file's
        # values and the positions are on the host.
        target = out.view(-1) if out_is_nd else out
        target[dest.to(out.device)] = values.to(out.device, out.dtype)
        filled[dest] = True
