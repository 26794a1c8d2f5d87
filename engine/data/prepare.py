"""One-time dataset preparation: text source -> memory-mappable token file + index.

Writes into a sibling temp directory and renames it to `out_dir` only when complete, so a
killed preparation never leaves a dataset that is later used. Re-running with the same
source and tokenizer reuses the existing result.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from typing import Iterator

import numpy as np
from tqdm import tqdm

from engine.checkpoint.files import rename_durable, write_bytes_durable, write_json_durable

from .index import (DOC_OFFSETS_FILE, FORMAT_VERSION, INDEX_FILE, TOKENS_FILE,
                    PreparedDatasetError, read_index, token_dtype_name)
from .sources import PIECE_CHARS, DataSourceError, ResolvedSource, iter_pieces, resolve_source
from .tokenizer import load_tokenizer

_ENCODE_BATCH = 64  # documents per tokenizer call


def prepare_dataset(source: str, out_dir: str, tokenizer: str = "byte", *,
                    max_bytes: int | None = None, progress: bool = True) -> str:
    """Prepares `source` into `out_dir` (or reuses it); returns the absolute `out_dir`.

    source: "stdlib" | a directory of .txt/.md/.jsonl files | a single file.
    tokenizer: "byte" | a path to a local tokenizer.json. max_bytes caps the source text.
    """
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes}: must be >= 1 or None")
    tok = load_tokenizer(tokenizer)
    resolved = resolve_source(source)
    description = resolved.description(max_bytes)
    out_dir = os.path.abspath(out_dir)
    if _reusable(out_dir, description, tok.tokenizer_id):
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp_dir = _new_temp_dir(out_dir)
    try:
        index = _write_tokens(resolved, tok, tmp_dir, max_bytes, progress)
        index.update(source=description, source_arg=source, tokenizer_id=tok.tokenizer_id,
                     tokenizer_arg=tokenizer)
        write_json_durable(os.path.join(tmp_dir, INDEX_FILE), index)
        _publish(tmp_dir, out_dir, description, tok.tokenizer_id)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _remove_dead_temp_dirs(out_dir)
    return out_dir


def _reusable(out_dir: str, description: dict, tokenizer_id: str) -> bool:
    """True for a complete dataset of the same source/tokenizer; raises for a different one."""
    if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return False
    index = read_index(out_dir)
    if index["source"] != description or index["tokenizer_id"] != tokenizer_id:
        raise PreparedDatasetError(
            f"{out_dir} holds a dataset prepared from {index['source']} with tokenizer "
            f"{index['tokenizer_id']}; requested {description} with tokenizer {tokenizer_id}. "
            "Use another out_dir or delete this one.")
    return True


def _write_tokens(resolved: ResolvedSource, tok, tmp_dir: str, max_bytes: int | None,
                  progress: bool) -> dict:
    """Streams every document's ids + EOS into tokens.bin; returns the index fields."""
    dtype = token_dtype_name(tok.vocab_size)
    hasher = hashlib.sha256()
    offsets = [0]
    total = min(resolved.total_bytes, max_bytes or resolved.total_bytes)
    with open(os.path.join(tmp_dir, TOKENS_FILE), "wb") as handle, \
            tqdm(total=total, unit="B", unit_scale=True, desc="prepare dataset",
                 disable=not progress) as bar:
        document = 0      # tokens of the document in progress
        for batch in _batched(_capped_texts(resolved, max_bytes, bar), _ENCODE_BATCH):
            for (_, ends), ids in zip(batch, tok.encode_batch([text for text, _ in batch])):
                if ends:
                    ids.append(tok.eos_id)
                _append_tokens(handle, hasher, np.asarray(ids, dtype=dtype))
                document += len(ids)
                if ends:
                    offsets.append(offsets[-1] + document)
                    document = 0
        handle.flush()
        os.fsync(handle.fileno())
    if len(offsets) == 1:
        raise DataSourceError(f"data source {resolved.root}: no text found (all documents empty)")
    offsets_bytes = np.asarray(offsets, dtype="<u8").tobytes()
    write_bytes_durable(os.path.join(tmp_dir, DOC_OFFSETS_FILE), offsets_bytes)
    return {"format_version": FORMAT_VERSION, "n_tokens": offsets[-1], "dtype": dtype,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "n_docs": len(offsets) - 1,
            "tokens_sha256": hasher.hexdigest(),
            "doc_offsets_sha256": hashlib.sha256(offsets_bytes).hexdigest(),
            "created_unix": time.time()}


def _append_tokens(handle, hasher, ids: np.ndarray) -> None:
    data = ids.astype(ids.dtype.newbyteorder("<"), copy=False).tobytes()
    hasher.update(data)
    handle.write(data)


def _capped_texts(resolved: ResolvedSource, max_bytes: int | None, bar) -> Iterator[tuple[str, bool]]:
    """(piece, ends_a_document) of the non-empty documents in source order (a document may
    come in several pieces, sources.iter_pieces); the text is cut to fit max_bytes, and the
    document it cuts ends there."""
    budget = max_bytes
    for path in resolved.files:
        started = False                         # this document has text so far
        for text, ends in iter_pieces(path):
            raw = text.encode("utf-8")
            if budget is not None and len(raw) >= budget:
                text, budget, ends = raw[:budget].decode("utf-8", errors="ignore"), 0, True
            elif budget is not None:
                budget -= len(raw)
            bar.update(len(raw))
            if text or (ends and started):
                yield text, ends
            started = not ends and (started or bool(text))
            if budget == 0:
                return


def _batched(items: Iterator[tuple[str, bool]], size: int,
             max_chars: int = 4 * PIECE_CHARS) -> Iterator[list[tuple[str, bool]]]:
    """Lists of at most `size` items and about `max_chars` characters (one tokenizer call)."""
    batch: list[tuple[str, bool]] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(item[0])
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---- temp directories and publication ---------------------------------------------------

def _temp_prefix(out_dir: str) -> str:
    return os.path.join(os.path.dirname(out_dir),
                        f".{os.path.basename(out_dir)}.tmp-{socket.gethostname()}-")


def _new_temp_dir(out_dir: str) -> str:
    path = f"{_temp_prefix(out_dir)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(path)
    return path


def _publish(tmp_dir: str, out_dir: str, description: dict, tokenizer_id: str) -> None:
    """Atomic rename; if another process published first, reuse its result when it matches."""
    try:
        rename_durable(tmp_dir, out_dir)  # also replaces an empty out_dir
    except OSError:
        if not _reusable(out_dir, description, tokenizer_id):
            raise


def _remove_dead_temp_dirs(out_dir: str) -> None:
    """Deletes temp dirs left by killed preparations on this host (their pid is gone)."""
    prefix = _temp_prefix(out_dir)
    parent, stem = os.path.dirname(prefix), os.path.basename(prefix)
    for name in os.listdir(parent):
        match = re.fullmatch(re.escape(stem) + r"(\d+)-[0-9a-f]{8}", name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
