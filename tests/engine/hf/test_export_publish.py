"""`foldmoe export` never publishes a wrong model directory: the checkpoint is verified
first (manifest, sizes, SHA-256 of the files it reads), and the output appears whole or
not at all (engine/hf/hf_publish.py)."""
import hashlib
import json
import os
import shutil

import pytest

import engine.hf.export as export_module
from engine.hf.export import ExportError, export_checkpoint
from engine.testing.multiprocess import run_distributed


def save_checkpoint(rank: int, world: int, root: str) -> str:
    import torch.distributed as dist
    from engine.checkpoint.manager import CheckpointManager
    from engine.compose import build_trainer
    from engine.config.model import ModelConfig, MoEConfig
    from engine.config.train import TrainConfig
    from engine.parallel.config import ParallelConfig
    from engine.parallel.mesh import FoldedMesh
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=48, first_k_dense=0, moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=16))
    trainer = build_trainer(cfg, TrainConfig(global_batch_size=2, seq_len=8),
                            FoldedMesh(ParallelConfig(world_size=world, ep=2)))
    return CheckpointManager(root, 1, rank, world, barrier=dist.barrier).save(0, trainer.checkpoint_state())


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory):
    return run_distributed(save_checkpoint, 2, str(tmp_path_factory.mktemp("ckpt")))[0]


def _digests(directory) -> dict:
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


def _copy(step_dir, tmp_path):
    return shutil.copytree(step_dir, tmp_path / "step")


def test_config_json_carries_the_keys_transformers_4_reads(step_dir, tmp_path):
    export_checkpoint(step_dir, str(tmp_path / "hf"))
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert sorted(os.listdir(tmp_path)) == ["hf"]      # no staging directory left behind


@pytest.mark.parametrize("damage,match", [("flip", "SHA-256 mismatch"), ("truncate", "truncated"),
                                          ("manifest", "no manifest.json")])
def test_a_damaged_checkpoint_is_refused_and_nothing_is_written(step_dir, tmp_path, damage, match):
    step = _copy(step_dir, tmp_path)
    tensors = step / "rank00001.safetensors"
    data = bytearray(tensors.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(bytes(data[:-8]))
    else:
        os.remove(step / "manifest.json")
    with pytest.raises(ExportError, match=match):
        export_checkpoint(str(step), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_an_export_that_fails_midway_leaves_the_previous_export_as_it_was(step_dir, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    export_checkpoint(step_dir, str(out), max_file_bytes=4_000)
    before = _digests(out)
    calls = []
    real_assemble = export_module.assemble

    def failing_assemble(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_assemble(*args, **kwargs)

    monkeypatch.setattr(export_module, "assemble", failing_assemble)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(step_dir, str(out), max_file_bytes=2_000)
    assert _digests(out) == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_a_re_export_replaces_every_weight_file_and_keeps_other_files(step_dir, tmp_path):
    out = tmp_path / "hf"
    export_checkpoint(step_dir, str(out), max_file_bytes=2_000)
    many = {n for n in os.listdir(out) if n.endswith(".safetensors")}
    (out / "tokenizer.json").write_text("{}")
    index = export_checkpoint(step_dir, str(out), max_file_bytes=10**9)
    files = {n for n in os.listdir(out) if n.endswith(".safetensors")}
    assert len(many) > 1 and files == set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert json.load(open(out / "model.safetensors.index.json")) == index
    assert (out / "tokenizer.json").read_text() == "{}"


def test_out_dir_that_is_a_file_is_refused(step_dir, tmp_path):
    (tmp_path / "hf").write_text("not a directory")
    with pytest.raises(ExportError, match="not a directory"):
        export_checkpoint(step_dir, str(tmp_path / "hf"))


def test_an_in_place_update_cut_short_leaves_no_index_to_load(step_dir, tmp_path, monkeypatch):
    # A directory holding tensors of two checkpoints must not load: the old index goes first.
    import engine.hf.hf_publish as publish_module
    out = tmp_path / "hf"
    export_checkpoint(step_dir, str(out), max_file_bytes=2_000)
    real_replace, moved = os.replace, []   # os is one module: this also patches files.py

    def replace_then_die(src, dst):
        if os.path.dirname(dst) == str(out):
            moved.append(dst)
        if len(moved) == 2:       # the second weight file moved into out
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(publish_module.os, "replace", replace_then_die)
    with pytest.raises(OSError, match="Input/output error"):
        export_checkpoint(step_dir, str(out), max_file_bytes=2_000)
    assert not (out / "model.safetensors.index.json").exists()
