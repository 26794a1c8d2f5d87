"""`model.init_from`: the model section is derived from an HF config.json; explicit keys may
change only what keeps the shapes; contradictions are one-line config errors."""

import pytest
import yaml

pytest.importorskip("transformers")

from orchestrator.cli import main
from orchestrator.config import ConfigError, build_run_config
from engine.config.job import JobSpec
from engine.testing.hf_models import save_tiny_model
from workers.loop import pretrained_weights


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    save_tiny_model("qwen2_moe", str(path))
    return str(path)


def test_model_is_derived_from_config_json(qwen2_dir):
    run = build_run_config({"model": {"init_from": qwen2_dir}, "train": {"seq_len": 16}})
    m = run.model
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads) == (64, 32, 4, 4, 2)
    assert [m.is_moe_layer(i) for i in range(4)] == [False, False, False, True]   # step 2, mlp_only [1]
    assert m.qkv_bias and not m.qk_norm
    assert (m.moe.num_experts, m.moe.ffn_hidden_size, m.moe.shared_ffn_hidden_size) == (4, 16, 24)
    assert m.moe.shared_expert_gate and m.moe.pre_softmax and not m.moe.norm_topk_prob
    assert run.job_spec(job_dir="j", data_dir="d", checkpoint_dir="c", events_path="e").init_from == run.init_from
    again = build_run_config(yaml.safe_load(yaml.safe_dump(run.resolved())))
    assert again.model == m


def test_shape_keeping_overrides_are_allowed(qwen2_dir):
    run = build_run_config({"model": {"init_from": qwen2_dir, "rope_theta": 5e5, "hidden_size": 32},
                            "moe": {"aux_loss_coeff": 0.0}, "train": {"seq_len": 16}})
    assert run.model.rope_theta == 5e5 and run.model.moe.aux_loss_coeff == 0.0


@pytest.mark.parametrize("model, message", [
    ({"hidden_size": 64}, "model.hidden_size=64: contradicts model.init_from config.json (32)"),
    ({"num_experts": 8}, "model.num_experts=8: contradicts model.init_from config.json (4)"),
    ({"dense_layers": []}, "model.dense_layers=[]: contradicts model.init_from config.json ([1])"),
    ({"preset": "tiny-moe"}, "model.preset=tiny-moe: conflicts with model.init_from"),
])
def test_contradictions_are_config_errors(qwen2_dir, model, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        build_run_config({"model": {"init_from": qwen2_dir, **model}, "train": {"seq_len": 16}})


def test_missing_dir_is_one_line_cli_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_from": str(tmp_path / "nope")}}))
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: model.init_from=") and "no config.json" in err and "\n" not in err


def test_worker_reads_hf_weights_only_without_a_checkpoint(qwen2_dir, tmp_path):
    run = build_run_config({"model": {"init_from": qwen2_dir}, "train": {"seq_len": 16}})
    spec = run.job_spec(job_dir="j", data_dir="d", checkpoint_dir=str(tmp_path / "ckpt"), events_path="e")
    spec = JobSpec.from_json(spec.to_json())
    assert spec.model == run.model and pretrained_weights(spec).model_dir == qwen2_dir


def _rewrite_weights(src: str, dst, edit) -> str:
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(dst)


def test_a_checkpoint_with_tensors_the_model_would_not_read_is_refused(qwen2_dir, tmp_path):
    import torch
    extra = _rewrite_weights(qwen2_dir, tmp_path / "extra", lambda t: t.update({
        "model.layers.0.self_attn.o_proj.bias": torch.zeros(32),       # e.g. Qwen3's attention_bias
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))  # ignored: a RoPE buffer
    with pytest.raises(ConfigError, match=r"1 tensors the qwen2_moe model would not use \(e.g. "
                                          r"\['model.layers.0.self_attn.o_proj.bias'\]\)"):
        build_run_config({"model": {"init_from": extra}, "train": {"seq_len": 16}})
    missing = _rewrite_weights(qwen2_dir, tmp_path / "missing",
                               lambda t: t.pop("model.layers.3.mlp.experts.2.down_proj.weight"))
    with pytest.raises(ConfigError, match=r"1 tensors missing \(e.g. \['model.layers.3.mlp.experts.2.down_proj"):
        build_run_config({"model": {"init_from": missing}, "train": {"seq_len": 16}})
