"""File integrity helpers: SHA-256 of a file, durable writes, durable renames.

A rename is only durable once the directory that holds it is fsynced, so every
publish step syncs the file, then renames, then syncs the parent directory.
"""
from __future__ import annotations

import hashlib
import json
import os

_HASH_CHUNK = 1 << 22


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str) -> dict:
    """{"sha256", "bytes"} of a file, as stored in manifests."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_durable(path: str, payload: dict) -> None:
    """Writes JSON (sorted keys) via a temp file and os.replace, so readers never see half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        text = json.dumps(payload, indent=2, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"{os.path.basename(path)}: not JSON-serialisable ({exc})") from None
    write_bytes_durable(tmp, text.encode("utf-8"))
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def rename_durable(src: str, dst: str) -> None:
    os.rename(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))
