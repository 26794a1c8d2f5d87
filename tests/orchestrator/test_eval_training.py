"""Validation loss during training and `foldmoe eval` on trained weights, end to end under
torchrun: a run started from HF weights (`model.init_from`) whose first loss equals HF's on
that batch, `val_loss` in MLflow and equal for two layouts, and after 3 steps HF's loss on the
held-out batch of the exported checkpoint equals `foldmoe eval` (all fp32, relative 1e-5:
the same forward as tests/orchestrator/test_eval_cli.py, plus 3 AdamW steps whose updates
agree across layouts to ~1e-7, docs in engine/testing/parity.py)."""
from __future__ import annotations

import glob
import json

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from engine.data.eval_data import TrainWindows, held_out_batches
from engine.testing.hf_models import hf_config, randomize_

from .jobs import metric_steps, only_run, read_jsonl, run_cli

pytestmark = pytest.mark.slow
SEQ, BATCH, STEPS = 16, 4, 3


def save_byte_vocab_model(path) -> None:
    """The tiny Mixtral with a vocabulary that holds the byte tokenizer's 257 ids."""
    import transformers as tf
    config = hf_config("mixtral")
    config.vocab_size = 320
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).float()
    randomize_(model, 0)
    model.save_pretrained(str(path))


def hf_loss(model_dir, tokens: torch.Tensor) -> float:
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=tokens, labels=tokens).loss.item()


def write_config(tmp, name, model_dir, layout, data_cache) -> str:
    config = {"name": name, "model": {"init_from": str(model_dir)}, "moe": {"aux_loss_coeff": 0.0},
              "parallel": layout,
              "train": {"steps": STEPS, "seq_len": SEQ, "global_batch_size": BATCH, "micro_batch_size": 1,
                        "lr": 1e-2, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1},
              "data": {"source": "stdlib", "tokenizer": "byte", "max_bytes": 2000000,
                       "cache_dir": str(data_cache)},
              "cluster": {"num_workers": 2, "storage_path": str(tmp / f"runs-{name}"),
                          "collective_timeout_s": 120},
              "checkpoint": {"dir": str(tmp / f"ckpt-{name}"), "every_steps": STEPS},
              "tracking": {"uri": f"sqlite:///{tmp / name}.db", "report": False}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * abs(b)


def test_val_loss_init_from_and_eval_of_the_export(tmp_path, data_cache):
    hf_dir = tmp_path / "hf"
    save_byte_vocab_model(hf_dir)
    runs = {}
    for name, layout in (("tp2ep2", {"tp": 2, "ep": 2}), ("cp2ep2", {"cp": 2, "ep": 2})):
        config = write_config(tmp_path, name, hf_dir, layout, data_cache)
        out = run_cli(["train", config, "--launcher", "torchrun", "--metrics-jsonl", f"{name}.jsonl"],
                      cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        client, run = only_run(f"sqlite:///{tmp_path / name}.db")
        runs[name] = {"config": config, "records": read_jsonl(tmp_path / f"{name}.jsonl"),
                      "val": metric_steps(client, run.info.run_id, "train/val_loss")}
    a, b = runs["tp2ep2"], runs["cp2ep2"]
    assert [s for s, _ in a["val"]] == [1, 2] == [s for s, _ in b["val"]]
    assert all(close(va, vb) for (_, va), (_, vb) in zip(a["val"], b["val"])), (a["val"], b["val"])
    assert [r["step"] for r in a["records"] if "val_loss" in r] == [1, 2]

    (spec_path,) = glob.glob(str(tmp_path / "runs-tp2ep2" / "*" / "spec.json"))
    data_dir = json.loads(open(spec_path).read())["data_dir"]
    first = TrainWindows(data_dir, SEQ, BATCH, BATCH).global_batch(0, BATCH, 1234)
    assert close(a["records"][0]["lm_loss"], hf_loss(hf_dir, first)), a["records"][0]["lm_loss"]

    export = tmp_path / "exported"
    (step_dir,) = glob.glob(str(tmp_path / "ckpt-tp2ep2" / f"step{STEPS:08d}"))
    out = run_cli(["export", step_dir, str(export)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    out = run_cli(["eval", a["config"], "--json", "--launcher", "torchrun"], cwd=tmp_path)  # 2 workers
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    (held_out,) = held_out_batches(data_dir, SEQ, 1, BATCH)
    assert result["tokens"] == BATCH * SEQ
    assert close(result["loss"], hf_loss(export, held_out.tokens)), result
    assert close(result["loss"], a["val"][-1][1]), (result, a["val"])
