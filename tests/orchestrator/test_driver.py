"""Driver checks before anything starts: a checkpoint of another layout or model, a model
vocabulary smaller than the tokenizer's, a run with nothing left to train, GPUs that are
not there."""
from __future__ import annotations

import dataclasses
import signal
import time

import pytest
import torch

from engine.checkpoint import CheckpointManager
from orchestrator.cli import main as cli_main
from orchestrator.config import ConfigError, load_config
from orchestrator.driver import prepare_data
from orchestrator.signals import signal_of
from orchestrator.resume_checks import check_resumable, completed_step

from .jobs import TINY


def _save_checkpoint(root, layout: dict, step: int = 4, model: dict | None = None) -> None:
    manager = CheckpointManager(str(root), keep=2, rank=0, world_size=1, barrier=lambda: None)
    meta = {"step": step, "layout": layout, **({"model": model} if model else {})}
    manager.save(step, {"tensors": {"model/w": torch.zeros(2)}, "shards": {}, "meta": meta})


def test_another_layout_is_resharded_and_another_model_refused_before_anything_starts(tmp_path, capsys):
    saved = {"world_size": 2, "tp": 1, "cp": 1, "pp": 1, "ep": 2, "etp": 1, "vpp": 1}
    tiny = dataclasses.asdict(load_config(TINY).model)
    _save_checkpoint(tmp_path / "ckpt", saved, model=tiny)
    run = load_config(TINY, [f"checkpoint.dir={tmp_path / 'ckpt'}"])
    note = check_resumable(run, str(tmp_path / "ckpt"))
    assert note.startswith("resharding the checkpoint of step 4 on load")
    assert "world_size: saved=2, this run=4" in note and "tp: saved=1, this run=2" in note
    _save_checkpoint(tmp_path / "other", saved, model=dict(tiny, hidden_size=32))
    with pytest.raises(ConfigError, match=r"holds another model \(\{'hidden_size': \(32, 64\)"):
        check_resumable(run, str(tmp_path / "other"))
    # Through the CLI: exit 2, one line, and no job directory was created.
    rc = cli_main(["train", TINY, "--set", f"checkpoint.dir={tmp_path / 'other'}",
                   "--set", f"cluster.storage_path={tmp_path / 'runs'}"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("config error: checkpoint.dir=")
    assert not (tmp_path / "runs").exists()


def test_an_unreadable_manifest_is_one_line_naming_it(tmp_path):
    _save_checkpoint(tmp_path / "ckpt", {"world_size": 4})
    (manifest,) = (tmp_path / "ckpt").glob("step*/manifest.json")
    manifest.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        check_resumable(load_config(TINY), str(tmp_path / "ckpt"))
    assert str(manifest.parent) in str(info.value) and "\n" not in str(info.value)


def test_same_layout_or_resume_off_passes(tmp_path):
    same = {"world_size": 4, "tp": 2, "cp": 1, "pp": 1, "ep": 4, "etp": 1, "vpp": 1}
    _save_checkpoint(tmp_path / "ckpt", same)
    assert check_resumable(load_config(TINY), str(tmp_path / "ckpt")) is None
    other = dict(same, ep=2)
    _save_checkpoint(tmp_path / "ckpt2", other)
    assert check_resumable(load_config(TINY, ["checkpoint.resume=false"]), str(tmp_path / "ckpt2")) is None


def test_model_vocabulary_must_cover_the_tokenizer(data_cache):
    run = load_config(TINY, ["model.vocab_size=128", f"data.cache_dir={data_cache}"])
    with pytest.raises(ConfigError, match=r"model.vocab_size=128: smaller than the tokenizer's "
                                          r"vocabulary \(257"):
        prepare_data(run, progress=False)


def test_signals_arriving_as_exceptions_end_the_run_as_killed():
    assert signal_of(KeyboardInterrupt()) == signal.SIGINT
    assert signal_of(SystemExit(15)) == signal.SIGTERM   # ray.init's handler: sys.exit(15)
    assert signal_of(RuntimeError("worker died")) is None


TINY_LAYOUT = {"world_size": 4, "tp": 2, "cp": 1, "pp": 1, "ep": 4, "etp": 1, "vpp": 1}


def test_a_run_already_at_train_steps_says_so_and_opens_no_mlflow_run(tmp_path, capsys):
    _save_checkpoint(tmp_path / "ckpt", TINY_LAYOUT, step=40)      # tiny-moe: train.steps 40
    args = ["train", TINY, "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
            "--set", f"cluster.storage_path={tmp_path / 'runs'}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"already complete: the newest checkpoint {tmp_path / 'ckpt' / 'step00000040'} "
                          "is at train.steps=40 (step 40); nothing to train, no MLflow run opened.")
    assert "--no-resume" in out and "train.steps" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    # Past train.steps reads "past"; --no-resume (a fresh start) is not complete.
    run = load_config(TINY, ["train.steps=10"])
    assert completed_step(run, str(tmp_path / "ckpt")) == (str(tmp_path / "ckpt" / "step00000040"), 40)
    assert completed_step(load_config(TINY, ["checkpoint.resume=false"]), str(tmp_path / "ckpt")) is None


def test_gpus_that_are_not_there_are_refused_by_the_preflight(tmp_path, data_cache, capsys):
    start = time.monotonic()
    rc = cli_main(["train", TINY, "--launcher", "torchrun", "--set", "cluster.use_gpu=true",
                   "--set", f"data.cache_dir={data_cache}", "--set", f"cluster.storage_path={tmp_path}",
                   "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert rc == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("preflight: GPU: the job needs 4 (4 workers x 1 GPU (cluster.num_workers=4, "
                    "cluster.use_gpu (1 GPU per worker))); this machine has 0; run it on a cluster "
                    "with GPUs, or set cluster.use_gpu=false")
    assert not (tmp_path / "mlflow.db").exists()       # refused before the MLflow run
    print(f"\n[figures] preflight refusal (torchrun, in-process): {time.monotonic() - start:.1f}s")


def test_the_driver_walks_back_past_a_malformed_manifest_like_the_workers(tmp_path):
    for step in (2, 4):
        _save_checkpoint(tmp_path / "ckpt", TINY_LAYOUT, step=step)
    (tmp_path / "ckpt" / "step00000004" / "manifest.json").write_text("{not json")
    warnings = []
    run = load_config(TINY, [f"checkpoint.dir={tmp_path / 'ckpt'}"])
    assert check_resumable(run, str(tmp_path / "ckpt"), warn=warnings.append) is None  # same layout
    (warning,) = warnings
    assert warning.startswith(f"warning: checkpoint {tmp_path / 'ckpt' / 'step00000004'} failed "
                              "verification (bad-manifest: ")
    assert (tmp_path / "ckpt" / "quarantine" / "step00000004.bad-manifest" / "manifest.json").is_file()
    assert [p.name for p in (tmp_path / "ckpt").glob("step*")] == ["step00000002"]


def test_an_edited_world_size_is_refused_by_the_driver_in_seconds(tmp_path, capsys):
    _save_checkpoint(tmp_path / "ckpt", TINY_LAYOUT, step=4)
    manifest_path = tmp_path / "ckpt" / "step00000004" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"world_size": 1', '"world_size": 2'))
    start = time.monotonic()
    rc = cli_main(["train", TINY, "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                   "--set", f"cluster.storage_path={tmp_path / 'runs'}"])
    elapsed = time.monotonic() - start
    assert rc == 2 and elapsed < 5.0, elapsed
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if not l.startswith("warning: ")]
    assert line.startswith(f"config error: checkpoint.dir={tmp_path / 'ckpt'}: ")
    assert f"{manifest_path}: world_size 2 disagrees with its file list (1 ranks' files)" in line
    assert not (tmp_path / "runs").exists()
    print(f"\n[figures] edited manifest refused by the driver (in-process): {elapsed:.2f}s")


def test_a_corrupt_final_checkpoint_is_not_taken_for_a_complete_run(tmp_path):
    for step in (36, 40):
        _save_checkpoint(tmp_path / "ckpt", TINY_LAYOUT, step=step)
    shard = tmp_path / "ckpt" / "step00000040" / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    warnings = []
    assert completed_step(load_config(TINY), str(tmp_path / "ckpt"), warn=warnings.append) is None
    assert "SHA-256 mismatch" in warnings[0]
    assert (tmp_path / "ckpt" / "quarantine" / "step00000040.sha256-mismatch").is_dir()
