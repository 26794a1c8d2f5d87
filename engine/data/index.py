"""The on-disk format of a prepared dataset: `tokens.bin`, `doc_offsets.bin`, `index.json`.

`index.json` is written last inside a temp directory that is then renamed into place,
so a directory with an index is complete.
"""
from __future__ import annotations

import json
import os

from engine.checkpoint.files import sha256_file

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENS_FILE = "tokens.bin"
DOC_OFFSETS_FILE = "doc_offsets.bin"   # uint64 start offset of each document, plus n_tokens


class PreparedDatasetError(ValueError):
    """A prepared dataset that is incomplete, corrupt, or prepared from something else."""


def token_dtype_name(vocab_size: int) -> str:
    return "uint16" if vocab_size < 2 ** 16 else "uint32"


def read_index(prepared_dir: str) -> dict:
    """The index of a complete prepared dataset; raises PreparedDatasetError otherwise."""
    path = os.path.join(prepared_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise PreparedDatasetError(
            f"{prepared_dir}: not a prepared dataset (no {INDEX_FILE}); run prepare_dataset first")
    with open(path, encoding="utf-8") as handle:
        index = json.load(handle)
    if index.get("format_version") != FORMAT_VERSION:
        raise PreparedDatasetError(
            f"{path}: format_version {index.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}; prepare the dataset again into a new directory")
    _check_size(prepared_dir, index)
    return index


def _check_size(prepared_dir: str, index: dict) -> None:
    itemsize = 2 if index["dtype"] == "uint16" else 4
    tokens = os.path.join(prepared_dir, TOKENS_FILE)
    expected = index["n_tokens"] * itemsize
    actual = os.path.getsize(tokens) if os.path.isfile(tokens) else -1
    if actual != expected:
        raise PreparedDatasetError(
            f"{tokens}: {actual} bytes on disk, index.json says {index['n_tokens']} "
            f"{index['dtype']} tokens = {expected} bytes; the dataset is damaged")


def verify_dataset(prepared_dir: str) -> dict:
    """Full check: the SHA-256 of every data file against index.json."""
    index = read_index(prepared_dir)
    for name, key in ((TOKENS_FILE, "tokens_sha256"), (DOC_OFFSETS_FILE, "doc_offsets_sha256")):
        actual = sha256_file(os.path.join(prepared_dir, name))
        if actual != index[key]:
            raise PreparedDatasetError(
                f"{os.path.join(prepared_dir, name)}: SHA-256 {actual} does not match "
                f"index.json ({index[key]}); the file was modified or damaged")
    return index
