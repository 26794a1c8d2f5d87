"""Text sources for dataset preparation: the stdlib's .py files, a directory, or one file.

A source is resolved once into a sorted file list (deterministic order on every machine)
and a JSON-able description whose equality decides whether a prepared dataset is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
# Third-party packages live under the stdlib path too; they differ between environments.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class DataSourceError(ValueError):
    """A source that cannot be read: missing, empty, or a malformed record (file:line)."""


@dataclass(frozen=True)
class ResolvedSource:
    kind: str                     # "stdlib" | "directory" | "file"
    root: str                     # absolute path
    files: tuple[str, ...]        # absolute paths, sorted by path relative to root
    sizes: tuple[int, ...]        # bytes on disk, for progress and the fingerprint
    mtimes: tuple[int, ...] = ()  # modification times (ns), for the fingerprint

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def description(self, max_bytes: int | None) -> dict:
        """What identifies the prepared data: kind, root, file list fingerprint, cap."""
        # Size and modification time: an edit that keeps the size is a new dataset too.
        listing = "".join(f"{os.path.relpath(p, self.root)}\t{n}\t{t}\n"
                          for p, n, t in zip(self.files, self.sizes, self.mtimes))
        desc = {"kind": self.kind, "root": self.root, "num_files": len(self.files),
                "total_bytes": self.total_bytes,
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest(),
                "max_bytes": max_bytes}
        if self.kind == "stdlib":
            desc["python"] = platform.python_version()
        return desc


def resolve_source(source: str) -> ResolvedSource:
    if source == "stdlib":
        root = os.path.abspath(sysconfig.get_paths()["stdlib"])
        return _with_sizes("stdlib", root, _stdlib_files(root))
    path = os.path.abspath(source)
    if os.path.isdir(path):
        files = _text_files(path)
        if not files:
            raise DataSourceError(
                f"data source {source!r}: directory has no {'/'.join(TEXT_SUFFIXES)} files")
        return _with_sizes("directory", path, files)
    if os.path.isfile(path):
        if not path.endswith(TEXT_SUFFIXES + (".py",)):
            raise DataSourceError(
                f"data source {source!r}: not a text file this reads ({'/'.join(TEXT_SUFFIXES)} "
                "or .py; a compressed or binary file would be trained on as bytes)")
        return _with_sizes("file", os.path.dirname(path), [path])
    raise DataSourceError(
        f"data source {source!r}: no such file or directory (expected 'stdlib', a directory of "
        f"{'/'.join(TEXT_SUFFIXES)} files, or a single file)")


def _with_sizes(kind: str, root: str, files: list[str]) -> ResolvedSource:
    ordered = sorted(files, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))
    stats = [os.stat(p) for p in ordered]
    return ResolvedSource(kind, root, tuple(ordered), tuple(st.st_size for st in stats),
                          tuple(st.st_mtime_ns for st in stats))


def _stdlib_files(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return found


def _text_files(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if f.endswith(TEXT_SUFFIXES) and not f.startswith("."))
    return found


PIECE_CHARS = 1 << 18     # a plain file is read and tokenized in pieces of about this size


def iter_pieces(path: str, piece_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """(text, ends_a_document) of one file in order: each JSONL record's `text` is one
    document; a plain file is one document, streamed in pieces of about `piece_chars` cut
    where a line ends and the next one starts with text (byte tokens are the same as for the
    whole file; word-level tokenizers never merge across such a cut), so a 10 GB .txt file
    is never one string in memory."""
    if path.endswith(".jsonl"):
        for text in _jsonl_texts(path):
            yield text, True
        return
    carry = ""
    with open(path, encoding="utf-8", errors="replace") as handle:
        while chunk := handle.read(piece_chars):
            text = carry + chunk
            cut = _cut_point(text)
            if cut > 0:
                yield text[:cut], False
                carry = text[cut:]
            elif len(text) >= 4 * piece_chars:   # no line break for a long way: cut anyway
                yield text, False
                carry = ""
            else:
                carry = text
    yield carry, True


def _cut_point(text: str) -> int:
    """Index just after the last newline that a non-newline character follows, or -1."""
    i = text.rfind("\n")
    while i >= 0 and (i + 1 >= len(text) or text[i + 1] == "\n"):
        i = text.rfind("\n", 0, i)
    return i + 1 if i >= 0 else -1


def _jsonl_texts(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataSourceError(
                    f"{path}:{line_no}: expected a JSON object with a string 'text' field")
            yield record["text"]
