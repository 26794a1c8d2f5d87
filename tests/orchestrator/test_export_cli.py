"""`foldmoe export`: bad input is a one-line error with exit code 2; sizes parse like HF's."""
import argparse

import pytest

from orchestrator.cli import main
from orchestrator.export_command import parse_size


def test_sizes_parse_like_hugging_face():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6 and parse_size("1024") == 1024
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("5 parsecs")


def test_not_a_checkpoint_is_one_line_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().startswith("export error: ")
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a foldmoe checkpoint step directory" in err and "\n" not in err
