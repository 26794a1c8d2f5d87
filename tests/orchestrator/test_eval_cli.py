"""`foldmoe eval --tokens FILE --json` equals the Hugging Face model's token loss (fp32,
relative 1e-5) for Mixtral, Qwen2-MoE and Qwen3-MoE, at world 1 and in three folded layouts
each (TP+EP, CP+EP, PP+TP+EP); bad input is one line.

Tolerance: both sides are fp32; foldmoe sums per-token CE in fp64 and HF averages in fp32,
and TP/CP/PP change only the order of fp32 sums inside the forward (measured <= 3e-7
relative at world 1), so 1e-5 leaves a wide margin while any wrong token, mask or
reduction moves the loss by far more.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from engine.testing.hf_models import FAMILIES, save_tiny_model
from orchestrator.cli import main

from .jobs import ROOT, cli_env

SEQ, BATCH = 16, 4
ROW_LENGTHS = (17, 5, 12, 2, 9, 16)    # unequal rows; 6 rows -> 2 batches, 2 all-padding rows
LAYOUTS = {"tp2_ep2": {"tp": 2, "ep": 2}, "cp2_ep4": {"cp": 2, "ep": 4},
           "pp2_tp2_ep2": {"pp": 2, "tp": 2, "ep": 2}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        model = save_tiny_model(family, str(root / family))
        out[family] = (str(root / family), model)
    return out


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in ROW_LENGTHS]
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return str(path), rows


def hf_token_loss(model, rows) -> float:
    """HF's token-weighted mean LM loss over the rows (each row its own unpadded batch)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            total += model(input_ids=ids, labels=ids).loss.double().item() * (len(row) - 1)
            count += len(row) - 1
    return total / count


def write_config(path, model_dir, workers=1, layout=None) -> str:
    config = {"name": "eval", "model": {"init_from": model_dir}, "moe": {"aux_loss_coeff": 0.0},
              "parallel": dict(layout or {}),
              "train": {"seq_len": SEQ, "global_batch_size": BATCH, "micro_batch_size": 1},
              "cluster": {"num_workers": workers, "storage_path": str(path.parent / "runs")},
              "checkpoint": {"dir": str(path.parent / "no-checkpoints")}, "tracking": {"enabled": False}}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def assert_close(got: float, want: float, what: str) -> None:
    assert abs(got - want) <= 1e-5 * abs(want), (what, got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_world1_eval_equals_hf(family, models, rows_file, tmp_path, capsys):
    model_dir, model = models[family]
    path, rows = rows_file
    assert main(["eval", write_config(tmp_path / "c.yaml", model_dir), "--tokens", path, "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["tokens"] == sum(n - 1 for n in ROW_LENGTHS)
    assert_close(result["loss"], hf_token_loss(model, rows), family)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)


@pytest.mark.slow
def test_folded_layouts_equal_hf(models, rows_file, tmp_path):
    """Nine `foldmoe eval` command lines (3 families x 3 layouts, 4 ranks each) in one
    torchrun world, `--launcher inline`: each builds its own mesh and model."""
    path, rows = rows_file
    cases = {}
    for family, (model_dir, _) in models.items():
        for name, layout in LAYOUTS.items():
            config = write_config(tmp_path / f"{family}-{name}.yaml", model_dir, 4, layout)
            cases[f"{family}/{name}"] = ["eval", config, "--tokens", path, "--json", "--launcher", "inline"]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=4", str(ROOT / "tests/orchestrator/eval_cases.py"),
                          str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
                         env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert set(results) == set(cases)
    for label, result in results.items():
        assert result["rc"] == 0, (label, result)
        family = label.split("/")[0]
        assert_close(last_json(result["stdout"])["loss"], hf_token_loss(models[family][1], rows), label)


def test_no_weights_is_one_line_config_error(tmp_path, capsys, rows_file):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"checkpoint": {"dir": str(tmp_path / "empty")},
                                      "tracking": {"enabled": False}}))
    assert main(["eval", str(config), "--tokens", rows_file[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: checkpoint.dir=") and "model.init_from" in err and "\n" not in err


@pytest.mark.parametrize("line, message", [
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": [1]}\n', ":2: 1 token(s); a row needs at least 2"),
    ('{"input_ids": [1, 2, 3]}\nnot json\n', ":2: not JSON"),
    ('\n{"ids": [1, 2]}\n', ':2: expected {"input_ids": [int, ...]}'),
    ('{"input_ids": [1, 99]}\n', ":1: token id 99 is outside the vocabulary [0, 64)"),
    ('{"input_ids": ' + json.dumps(list(range(18))) + '}\n', ":1: 18 tokens; at most train.seq_len + 1 = 17"),
])
def test_bad_row_is_one_line_error_naming_the_line(models, tmp_path, capsys, line, message):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(line)
    config = write_config(tmp_path / "c.yaml", models["mixtral"][0])
    assert main(["eval", config, "--tokens", str(rows)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"eval error: {rows}{message}"), err
    assert "\n" not in err


def test_eval_builds_no_optimizer(models, rows_file, tmp_path, capsys, monkeypatch):
    """The weights alone (engine/train/model_shards.py): no Trainer, so no fp32 gradient
    buffer, master copy or Adam moments are allocated for an evaluation."""
    import engine.train.trainer as trainer_module

    class NoOptimizer:
        def __init__(self, *args, **kwargs):
            raise AssertionError("foldmoe eval built an optimizer")

    monkeypatch.setattr(trainer_module, "FoldedOptimizer", NoOptimizer)
    model_dir, model = models["mixtral"]
    path, rows = rows_file
    assert main(["eval", write_config(tmp_path / "c.yaml", model_dir), "--tokens", path, "--json"]) == 0
    assert_close(last_json(capsys.readouterr().out)["loss"], hf_token_loss(model, rows), "mixtral")


def test_eval_is_checked_against_device_memory(models, rows_file, tmp_path, capsys):
    """The eval memory model (weights and forwards alone) refuses in one line what cannot
    fit, before data or weights are read, and accepts a budget training could not run in."""
    from engine.planner.eval_memory import estimate_eval_memory
    from orchestrator.config import load_config
    from orchestrator.memory_report import estimate

    model_dir, model = models["mixtral"]
    config = write_config(tmp_path / "c.yaml", model_dir)
    run = load_config(config, [])
    evaluating = estimate_eval_memory(run.model, run.parallel(1), run.train).peak.total
    training = estimate(run, 1).peak.total
    assert evaluating < training / 2
    between = f"cluster.device_memory_gb={(evaluating + training) / 2 / 1e9:.9f}"
    path, rows = rows_file
    assert main(["eval", config, "--tokens", path, "--json", "--set", between]) == 0
    assert_close(last_json(capsys.readouterr().out)["loss"], hf_token_loss(model, rows), "mixtral")
    assert main(["validate", config, "--set", between]) == 2      # training would not fit
    assert "config error: memory: stage 0" in capsys.readouterr().err
    below = f"cluster.device_memory_gb={evaluating / 2 / 1e9:.9f}"
    assert main(["eval", config, "--tokens", path, "--set", below]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: memory: eval stage 0 (first+last) needs "), err
    assert "at world size 1" in err and "largest term:" in err and "recompute" not in err and "\n" not in err
