"""Tokenizers for dataset preparation: byte-level (default) or a local HF `tokenizer.json`.

Nothing is ever downloaded: a Hugging Face tokenizer is read from a file path only.
"""
from __future__ import annotations

import hashlib
import os
from typing import Protocol, Sequence

BYTE_VOCAB_SIZE = 257  # ids 0..255 are the UTF-8 bytes, 256 is EOS
BYTE_EOS_ID = 256

# Document separators tried in this order when a tokenizer.json is given.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[SEP]")


class Tokenizer(Protocol):
    tokenizer_id: str   # stable identity: the same id means the same token ids
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus EOS = 256 (vocab 257)."""

    tokenizer_id = "byte-v1"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local `tokenizer.json` via the `tokenizers` library.

    The id is the SHA-256 of the file's bytes, so a copy at another path is the same tokenizer.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = _tokenizer_file(path)
        with open(self.path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        self.tokenizer_id = f"hf-tokenizer-json:sha256={digest}"
        self._tok = _HFTokenizer.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()

    def _find_eos(self) -> int:
        for token in EOS_CANDIDATES:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"tokenizer {self.path}: no end-of-document token found; expected one of "
            f"{list(EOS_CANDIDATES)} in its vocabulary (documents are separated by EOS)")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [enc.ids for enc in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _tokenizer_file(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer {path!r}: file not found (expected 'byte' or a local tokenizer.json; "
            "nothing is downloaded)")
    return os.path.abspath(path)


def load_tokenizer(spec: str = "byte") -> ByteTokenizer | HFTokenizer:
    """`"byte"` or a path to a `tokenizer.json` (or a directory holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
