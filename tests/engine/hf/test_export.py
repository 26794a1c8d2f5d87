"""Export of checkpoints to HF model directories: bit-exact round trip from several layouts,
loadable by transformers, and a model trained in foldmoe gives HF the same loss."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from engine.hf.export import export_checkpoint
from engine.testing.hf_models import (FAMILIES, import_train_save, load_hf_tensors,
                                      save_tiny_model)
from engine.testing.multiprocess import run_distributed
from engine.testing.parity import synthetic_global_batch

BATCH, SEQ, WORLD = 4, 8, 4
LAYOUTS = {"tp2-ep2": {"tp": 2, "ep": 2}, "pp2-tp2-ep2": {"pp": 2, "tp": 2, "ep": 2},
           "cp2-ep4": {"cp": 2, "ep": 4}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    dirs = {family: str(root / family) for family in FAMILIES}
    for family, path in dirs.items():
        save_tiny_model(family, path, seed=2)
    layouts = list(LAYOUTS.items())
    cases = []
    for i, family in enumerate(FAMILIES):           # every family from two layouts, 0 steps
        for label, layout in (layouts[i % 3], layouts[(i + 1) % 3]):
            cases.append((f"{family} {label}", dirs[family], layout, 0, str(root / f"ckpt-{family}-{label}")))
    cases.append(("qwen2_moe trained", dirs["qwen2_moe"], LAYOUTS["pp2-tp2-ep2"], 3, str(root / "ckpt-trained")))
    results = run_distributed(import_train_save, WORLD, cases, BATCH, SEQ, timeout_s=300)
    return root, dirs, results[0]


@pytest.mark.slow
def test_round_trip_is_bit_exact_from_two_layouts(checkpoints):
    root, dirs, results = checkpoints
    exported_layouts = {}
    for label, result in results.items():
        family, layout = label.split()
        if layout == "trained":
            continue
        out = str(root / f"hf-{family}-{layout}")
        index = export_checkpoint(result["step_dir"], out, max_file_bytes=40_000)
        original, exported = load_hf_tensors(dirs[family]), load_hf_tensors(out)
        assert set(exported) == set(original), set(exported) ^ set(original)
        for name, tensor in original.items():
            assert torch.equal(exported[name], tensor), (label, name)
        assert len(set(index["weight_map"].values())) > 1          # split by size
        with open(os.path.join(out, "config.json")) as handle:
            assert json.load(handle)["model_type"] == family
        exported_layouts.setdefault(family, set()).add(layout)
    assert all(len(layouts) == 2 for layouts in exported_layouts.values()), exported_layouts


@pytest.mark.slow
def test_trained_export_loads_in_transformers_with_the_same_loss(checkpoints):
    import transformers as tf
    root, dirs, results = checkpoints
    result = results["qwen2_moe trained"]
    out = str(root / "hf-trained")
    from orchestrator.cli import main                 # the user's path: `foldmoe export`
    assert main(["export", result["step_dir"], out, "--max-shard-size", "20KB"]) == 0
    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    tokens = synthetic_global_batch(3, BATCH, SEQ, model.config.vocab_size)
    with torch.no_grad():
        hf_loss = model(input_ids=tokens, labels=tokens).loss.item()
    original = load_hf_tensors(dirs["qwen2_moe"])
    trained = load_hf_tensors(out)
    assert not torch.equal(trained["model.layers.3.mlp.experts.0.up_proj.weight"],
                           original["model.layers.3.mlp.experts.0.up_proj.weight"])   # it trained
    assert abs(hf_loss - result["next_lm_loss"]) <= 1e-5 * abs(hf_loss), (hf_loss, result["next_lm_loss"])
