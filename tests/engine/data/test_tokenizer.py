"""Byte tokenizer and local tokenizer.json loading."""
import shutil

import pytest

from engine.data import BYTE_EOS_ID, BYTE_VOCAB_SIZE, load_tokenizer
from engine.data.index import token_dtype_name

from .conftest import make_tokenizer_json


def test_byte_tokenizer_is_utf8_bytes():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id) == (BYTE_VOCAB_SIZE, BYTE_EOS_ID) == (257, 256)
    assert tok.encode_batch(["hé", ""]) == [[104, 195, 169], []]  # é = C3 A9
    assert tok.decode([104, 195, 169, 256]) == "hé"


def test_tokenizer_json_from_path_and_dir(tmp_path):
    path = make_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(path))
    assert (tok.vocab_size, tok.eos_id) == (5, 4)
    assert tok.encode_batch(["hello world", "again zzz"]) == [[1, 2], [3, 0]]
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy(path, copy_dir / "tokenizer.json")
    assert load_tokenizer(str(copy_dir)).tokenizer_id == tok.tokenizer_id  # id = content hash


def test_tokenizer_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_tokenizer(str(tmp_path / "missing.json"))
    path = make_tokenizer_json(tmp_path / "no_eos.json", with_eos=False)
    with pytest.raises(ValueError, match="end-of-document token"):
        load_tokenizer(str(path))


def test_token_dtype_by_vocab():
    assert token_dtype_name(257) == token_dtype_name(65535) == "uint16"
    assert token_dtype_name(65536) == "uint32"
