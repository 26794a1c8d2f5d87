"""prepare_dataset: content, idempotence, atomicity under a crash, source errors."""
import json
import os
import signal
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import engine.data.prepare as prepare_module
from engine.data import (DataSourceError, PreparedDatasetError, prepare_dataset, read_index,
                         verify_dataset)
from engine.data.index import sha256_file

from .conftest import make_tokenizer_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
EOS = 256
# corpus fixture in sorted path order a.txt, b.md, sub/c.jsonl (two records); .csv ignored
CORPUS_TOKENS = ([104, 195, 169, 108, 108, 111, EOS]      # "héllo"
                 + [35, 32, 66, 10, EOS]                    # "# B\n"
                 + [120, EOS] + [121, 122, EOS])            # "x", "yz"


def _tokens(prepared):
    return np.fromfile(os.path.join(prepared, "tokens.bin"), dtype="<u2").tolist()


def _temp_dirs(parent):
    return [name for name in os.listdir(parent) if ".tmp-" in name]


def test_directory_source_content_and_index(corpus, tmp_path):
    out = prepare_dataset(str(corpus), str(tmp_path / "out"), progress=False)
    assert _tokens(out) == CORPUS_TOKENS
    index = verify_dataset(out)
    assert (index["n_tokens"], index["n_docs"], index["dtype"]) == (17, 4, "uint16")
    assert (index["vocab_size"], index["eos_id"], index["tokenizer_id"]) == (257, EOS, "byte-v1")
    assert index["tokens_sha256"] == sha256_file(os.path.join(out, "tokens.bin"))
    offsets = np.fromfile(os.path.join(out, "doc_offsets.bin"), dtype="<u8").tolist()
    assert offsets == [0, 7, 12, 14, 17]


def test_tokenizer_json_preparation(tmp_path):
    tok_path = make_tokenizer_json(tmp_path / "tokenizer.json")
    text = tmp_path / "one.txt"
    text.write_text("hello world again", encoding="utf-8")
    out = prepare_dataset(str(text), str(tmp_path / "out"), str(tok_path), progress=False)
    assert _tokens(out) == [1, 2, 3, 4]
    assert read_index(out)["tokenizer_id"].startswith("hf-tokenizer-json:sha256=")


def test_second_call_reuses_without_rewriting(corpus, tmp_path):
    out = prepare_dataset(str(corpus), str(tmp_path / "out"), progress=False)
    before = os.stat(os.path.join(out, "tokens.bin"))
    created = read_index(out)["created_unix"]
    assert prepare_dataset(str(corpus), str(tmp_path / "out"), progress=False) == out
    after = os.stat(os.path.join(out, "tokens.bin"))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert read_index(out)["created_unix"] == created


def test_other_source_or_tokenizer_in_same_dir_is_refused(corpus, tmp_path):
    out = str(tmp_path / "out")
    prepare_dataset(str(corpus), out, progress=False)
    with pytest.raises(PreparedDatasetError, match="Use another out_dir"):
        prepare_dataset(str(corpus), out, max_bytes=3, progress=False)
    tok_path = make_tokenizer_json(tmp_path / "tokenizer.json")
    with pytest.raises(PreparedDatasetError, match="hf-tokenizer-json"):
        prepare_dataset(str(corpus), out, str(tok_path), progress=False)
    (corpus / "new.txt").write_text("more", encoding="utf-8")  # the source changed
    with pytest.raises(PreparedDatasetError, match="Use another out_dir"):
        prepare_dataset(str(corpus), out, progress=False)
    # an edit that keeps every size is a change too (the listing has the mtimes)
    again = str(tmp_path / "again")
    prepare_dataset(str(corpus), again, progress=False)
    stat = os.stat(corpus / "a.txt")
    (corpus / "a.txt").write_text("HÉLLO", encoding="utf-8")
    os.utime(corpus / "a.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert os.path.getsize(corpus / "a.txt") == stat.st_size
    with pytest.raises(PreparedDatasetError, match="Use another out_dir"):
        prepare_dataset(str(corpus), again, progress=False)


def test_exception_mid_write_leaves_nothing(corpus, tmp_path, monkeypatch):
    calls = []

    def failing_append(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_append(*args)

    real_append = prepare_module._append_tokens
    monkeypatch.setattr(prepare_module, "_append_tokens", failing_append)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(str(corpus), str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out") and not _temp_dirs(tmp_path)


_KILL_SCRIPT = """
import os, signal, sys
import engine.data.prepare as prep
real, calls = prep._append_tokens, []
def dying(*args):
    real(*args)
    calls.append(1)
    if len(calls) == 3:
        args[0].flush()  # partial tokens reach the file, as after a real crash
        os.kill(os.getpid(), signal.SIGKILL)
prep._append_tokens = dying
prep.prepare_dataset(sys.argv[1], sys.argv[2], progress=False)
"""


def test_killed_preparation_is_never_used_and_is_cleaned(corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(corpus), str(out)],
                          cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not out.exists()
    (leftover,) = _temp_dirs(tmp_path)
    assert os.path.getsize(tmp_path / leftover / "tokens.bin") > 0  # really died mid-write
    assert not (tmp_path / leftover / "index.json").exists()
    assert prepare_dataset(str(corpus), str(out), progress=False) == str(out)
    assert _tokens(str(out)) == CORPUS_TOKENS
    assert not _temp_dirs(tmp_path)  # the dead process's temp dir was removed


def test_dir_without_index_is_not_reused(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokens.bin").write_bytes(b"\x00\x01")  # e.g. a copy interrupted half-way
    with pytest.raises(PreparedDatasetError, match="not a prepared dataset"):
        prepare_dataset(str(corpus), str(out), progress=False)


def test_truncated_tokens_file_is_detected(corpus, tmp_path):
    out = prepare_dataset(str(corpus), str(tmp_path / "out"), progress=False)
    with open(os.path.join(out, "tokens.bin"), "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(PreparedDatasetError, match="damaged"):
        prepare_dataset(str(corpus), out, progress=False)


def test_flipped_byte_fails_verification(corpus, tmp_path):
    out = prepare_dataset(str(corpus), str(tmp_path / "out"), progress=False)
    with open(os.path.join(out, "tokens.bin"), "r+b") as handle:
        handle.seek(4)
        handle.write(b"\x07")
    with pytest.raises(PreparedDatasetError, match="tokens.bin: SHA-256"):
        verify_dataset(out)


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"}\n{"text": broken\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n\n{"body": "no text"}\n', r"bad\.jsonl:3: expected a JSON object"),
    ('["text"]\n', r"bad\.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line, encoding="utf-8")
    with pytest.raises(DataSourceError, match=message):
        prepare_dataset(str(tmp_path / "bad.jsonl"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataSourceError, match="no such file or directory"):
        prepare_dataset(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="has no"):
        prepare_dataset(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    (tmp_path / "empty" / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataSourceError, match="no text found"):
        prepare_dataset(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "corpus.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(DataSourceError, match="not a text file this reads"):
        prepare_dataset(str(tmp_path / "corpus.jsonl.gz"), str(tmp_path / "out"), progress=False)


def test_stdlib_source_is_capped_and_sorted(tmp_path):
    cap = 20_000
    out = prepare_dataset("stdlib", str(tmp_path / "std"), max_bytes=cap, progress=False)
    index = read_index(out)
    text_tokens = index["n_tokens"] - index["n_docs"]  # byte tokens = text bytes; 1 EOS per doc
    assert cap - 3 <= text_tokens <= cap  # the cut may drop a partial UTF-8 character
    assert index["source"]["python"] == sys.version.split()[0]
    stdlib = sysconfig.get_paths()["stdlib"]
    first = min(name for name in os.listdir(stdlib) if name.endswith(".py"))
    with open(os.path.join(stdlib, first), "rb") as handle:
        head = list(handle.read(64))
    assert _tokens(out)[:len(head)] == head
    assert json.loads(open(os.path.join(out, "index.json")).read())["source"]["max_bytes"] == cap


@pytest.mark.parametrize("tokenizer", ["byte", "json"])
def test_a_plain_file_streams_in_pieces_with_the_tokens_of_the_whole(tmp_path, monkeypatch, tokenizer):
    # A .txt file is one document, but read and tokenized in pieces cut between a line end
    # and text: a 10 GB file is never one string (it cost 12x its size in RSS as one).
    import numpy as np

    import engine.data.prepare as prepare_module
    import engine.data.sources as sources_module
    from engine.data.tokenizer import load_tokenizer
    lines = [("hello world again\n" if i % 3 else "\n\nhello\n") for i in range(400)]
    text = "".join(lines) + "again"
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    tok_path = "byte" if tokenizer == "byte" else str(make_tokenizer_json(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(sources_module, "PIECE_CHARS", 100)
    monkeypatch.setattr(sources_module.iter_pieces, "__defaults__", (100,))
    pieces = list(sources_module.iter_pieces(str(tmp_path / "big.txt")))
    assert len(pieces) > 30 and "".join(p for p, _ in pieces) == text
    assert [end for _, end in pieces].count(True) == 1 and pieces[-1][1]
    assert all(p.endswith("\n") for p, _ in pieces[:-1])
    assert not any(p.startswith("\n") for p, _ in pieces[1:])   # cut before text, never in a run of newlines
    out = prepare_module.prepare_dataset(str(tmp_path / "big.txt"), str(tmp_path / "out"), tok_path,
                                         progress=False)
    index = read_index(out)
    tok = load_tokenizer(tok_path)
    whole = tok.encode_batch([text])[0] + [tok.eos_id]
    got = np.fromfile(os.path.join(out, "tokens.bin"), dtype=np.dtype(index["dtype"]).newbyteorder("<"))
    assert index["n_docs"] == 1 and got.tolist() == whole
