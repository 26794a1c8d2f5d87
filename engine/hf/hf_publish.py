"""Publishing an exported HF model directory so that no reader ever sees a mix.

The export writes everything into a temporary sibling of OUT_DIR (same filesystem, so the
moves are renames), fsyncing each file. A new or empty OUT_DIR is then replaced by one
rename. An existing one (a previous export, perhaps with tokenizer files copied in) is
updated in place in an order that is never silently wrong: the old index goes first, so a
crash part-way leaves a directory that `from_pretrained` refuses (no index) rather than
one that loads tensors of two checkpoints; then the weight files, the stale ones of the
old export, config.json, and the new index last. Other files are left alone.
"""
from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from typing import Iterator

from engine.checkpoint.files import fsync_dir, rename_durable

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


class ExportError(ValueError):
    """The checkpoint cannot be exported (missing files, incomplete shards, a bad OUT_DIR)."""


def _staging_prefix(out_dir: str) -> str:
    return f".{os.path.basename(out_dir)}.export-"


@contextmanager
def staging_dir(out_dir: str) -> Iterator[str]:
    """A fresh temporary sibling of out_dir, removed when the block ends (published or
    not); leftovers of killed exports to the same out_dir are removed first."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir}: exists and is not a directory")
    parent, prefix = os.path.dirname(out_dir), _staging_prefix(out_dir)
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}")
    os.makedirs(tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: str, out_dir: str) -> None:
    """Moves the finished export in `tmp` to out_dir (see the module docstring)."""
    out_dir = os.path.abspath(out_dir)
    fsync_dir(tmp)
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    if not os.path.exists(out_dir):
        rename_durable(tmp, out_dir)
        return
    index_path = os.path.join(out_dir, INDEX_NAME)
    if os.path.exists(index_path):
        os.remove(index_path)
        fsync_dir(out_dir)
    new = {name for name in os.listdir(tmp) if _WEIGHT_FILE.fullmatch(name)}
    for name in sorted(new):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    for name in os.listdir(out_dir):
        if _WEIGHT_FILE.fullmatch(name) and name not in new:
            os.remove(os.path.join(out_dir, name))
    os.replace(os.path.join(tmp, CONFIG_NAME), os.path.join(out_dir, CONFIG_NAME))
    fsync_dir(out_dir)
    rename_durable(os.path.join(tmp, INDEX_NAME), index_path)
