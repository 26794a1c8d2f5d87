import pytest


@pytest.fixture
def corpus(tmp_path):
    """A small directory source: two plain files, one JSONL in a sub-folder, one ignored file."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.md").write_text("# B\n", encoding="utf-8")
    (root / "a.txt").write_text("héllo", encoding="utf-8")
    (root / "sub" / "c.jsonl").write_text('{"text": "x"}\n\n{"text": "yz", "id": 3}\n',
                                          encoding="utf-8")
    (root / "ignored.csv").write_text("not,text\n", encoding="utf-8")
    return root


def make_tokenizer_json(path, with_eos=True):
    """A 5-token word-level tokenizer built with the `tokenizers` library (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    if with_eos:
        vocab["<|endoftext|>"] = 4
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return path
