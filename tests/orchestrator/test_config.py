"""Config schema, overrides, layout validation and the resolved config (pure, fast)."""
from __future__ import annotations

import pathlib

import pytest

from orchestrator.config import (ConfigError, apply_overrides, build_run_config, flatten,
                                 load_config, read_yaml)

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-moe.yaml"


def test_tiny_config_resolves_to_the_documented_folded_layout():
    run = load_config(TINY)
    assert run.name == "tiny-moe" and run.world_sizes == (4,)
    p = run.parallel(4)
    assert (p.tp, p.dp, p.ep, p.edp) == (2, 2, 4, 1)
    # Hand-derived: attention tp-cp-dp-pp with tp stride 1, MoE etp-ep-edp-pp with ep stride 1.
    groups = run.layout_table(4)
    assert groups["tp"] == [[0, 1], [2, 3]]
    assert groups["dp"] == [[0, 2], [1, 3]]
    assert groups["ep"] == [[0, 1, 2, 3]]
    assert groups["edp"] == [[0], [1], [2], [3]]


def test_resolved_config_round_trips_and_fills_preset_values():
    run = load_config(TINY, ["model.num_layers=2", "moe.capacity_factor=1.5"])
    resolved = run.resolved()
    assert resolved["model"]["num_layers"] == 2
    assert resolved["model"]["hidden_size"] == 64           # from the preset
    assert resolved["model"]["moe_ffn_hidden_size"] == 32   # preset MoE size under model
    assert resolved["moe"]["capacity_factor"] == 1.5
    assert build_run_config(resolved).resolved() == resolved


def test_overrides_reach_the_engine_configs():
    run = load_config(TINY, ["model.num_experts=16", "model.top_k=4", "moe.capacity_factor=1.25",
                             "moe.drop_policy=position", "train.lr=1e-3", "train.steps=7"])
    assert (run.model.moe.num_experts, run.model.moe.top_k) == (16, 4)
    assert run.model.moe.capacity_factor == 1.25 and run.model.moe.drop_policy == "position"
    assert run.train.lr == 1e-3 and run.train.steps == 7   # YAML 1.1 reads 1e-3 as a string


def test_null_capacity_factor_means_dropless():
    run = load_config(TINY, ["moe.capacity_factor=null"])
    assert run.model.moe.capacity_factor is None


def test_elastic_num_workers_checks_every_size_and_replans():
    run = load_config(TINY, ["cluster.num_workers=[2, 4]", "train.global_batch_size=12"])
    assert run.elastic and run.world_sizes == (2, 3, 4)
    layouts = {w: (run.parallel(w).tp, run.parallel(w).ep, run.parallel(w).dp) for w in (2, 3, 4)}
    # (tp, ep, dp): configured tp2 ep4 at 4; ep shrinks to 2 at 2; 3 keeps only degree 1.
    assert layouts == {2: (2, 2, 1), 3: (1, 1, 3), 4: (2, 4, 2)}
    # The workers re-plan by the same rule (JobSpec.parallel_config).
    spec = run.job_spec(job_dir="/j", data_dir="/d", checkpoint_dir="/c", events_path="/e")
    assert all(spec.parallel_config(w) == run.parallel(w) for w in (2, 3, 4))


def test_set_parses_values_as_yaml():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=[2, 4]", "a.c=null", "d.e=bf16"])
    assert data == {"a": {"b": [2, 4], "c": None}, "d": {"e": "bf16"}}


# (overrides, expected start of the message): one case per class of bad input.
BAD = [
    (["model.hiden_size=64"], "model.hiden_size=64: unknown key"),
    (["foo.bar=1"], 'foo={"bar": 1}: unknown key'),
    (["train.steps=ten"], "train.steps=ten: Input should be a valid integer"),
    (["train.steps=2.5"], "train.steps=2.5: Input should be a valid integer"),
    (["cluster.use_gpu=maybe"], "cluster.use_gpu=maybe: Input should be a valid boolean"),
    (["parallel.tp=3"], "parallel.tp=3: tp*cp*pp = 3*1*1 = 3 does not divide the world size 4"),
    (["parallel.ep=3"], "parallel.ep=3: etp*ep*pp = 1*3*1 = 3 does not divide the world size 4"),
    (["model.num_experts=6"], "parallel.ep=4: model.num_experts=6 is not divisible by it"),
    (["moe.dispatcher=nccl"], "moe.dispatcher=nccl: Input should be 'alltoall' or 'allgather'"),
    (["train.precision=fp16"], "train.precision='fp16': expected one of"),
    (["cluster.num_workers=[8, 4]"], "cluster.num_workers=[8, 4]: [min, max] needs min <= max"),
    (["cluster.num_workers=0"], "cluster.num_workers=0: expected a positive int"),
    (["cluster.num_workers=[2, 4]"], "cluster.num_workers=[2, 4]: world size 3 admits no layout: "
                                     "parallel: no layout for world size 3"),
    (["train.seq_len=63"], "train.seq_len=63: must be divisible by tp*cp = 2"),
    (["train.global_batch_size=6"], "train.global_batch_size=6 is not divisible by micro_batch_size*dp"),
    (["model.preset=gpt5"], "model.preset='gpt5': unknown"),
    (["moe.num_experts=16"], "moe.num_experts=16: conflicts with model.num_experts=8"),
    (["moe.top_k=9", "model.top_k=null"], "moe.top_k=9: must be in [1, num_experts=8]"),
    (["checkpoint.keep=-1"], "checkpoint.keep=-1: Input should be greater than or equal to 0"),
    (["model=5"], "model=5: Input should be a valid dictionary"),
    (["train.pipeline_schedule=zb"], "train.pipeline_schedule='zb': expected one of"),
    (["parallel.tp=1", "parallel.ep=2", "parallel.pp=2", "parallel.vpp=2", "train.pipeline_schedule=1f1b"],
     "train.pipeline_schedule=1f1b runs one chunk per rank; parallel.vpp=2 needs"),
    (["parallel.tp=1", "parallel.ep=2", "parallel.pp=2", "train.pipeline_schedule=interleaved"],
     "train.pipeline_schedule=interleaved needs parallel.vpp > 1"),
    # the workers' rule, refused here rather than by every restarted group
    (["parallel.tp=1", "parallel.ep=2", "parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=6",
      "train.micro_batch_size=1"],
     "interleaved 1F1B with pp=2 needs the micro-batches per DP rank (3) to be a multiple of pp (world size 4)"),
]


def test_auto_schedule_is_interleaved_only_with_virtual_stages():
    from engine.config.train import pipeline_schedule_for
    assert (pipeline_schedule_for("auto", 1), pipeline_schedule_for("auto", 2)) == ("1f1b", "interleaved")
    assert pipeline_schedule_for("gpipe", 1) == "gpipe"   # an explicit choice is honoured


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_gives_one_line_naming_key_and_value(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny-moe\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line"):
        read_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"top level must be a mapping"):
        read_yaml(listing)
    with pytest.raises(ConfigError, match=r"--set model: expected key=value"):
        apply_overrides({}, ["model"])


def test_empty_file_means_all_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    run = load_config(empty)
    assert run.name == "empty" and run.world_sizes == (1,)
    assert run.checkpoint_dir == "checkpoints/empty"


def test_keep_zero_keeps_every_checkpoint_as_documented():
    run = load_config(TINY, ["checkpoint.keep=0"])
    assert run.schema.checkpoint.keep == 0
    spec = run.job_spec(job_dir="/j", data_dir="/d", checkpoint_dir="/c", events_path="/e")
    assert spec.checkpoint_keep == 0


def test_no_resume_still_lets_a_restarted_group_resume_from_this_jobs_checkpoints():
    import time
    before = time.time()
    fresh = load_config(TINY, ["checkpoint.resume=false"]).job_spec(
        job_dir="/j", data_dir="/d", checkpoint_dir="/c", events_path="/e")
    assert fresh.resume is False and fresh.resume_since_unix >= before
    plain = load_config(TINY).job_spec(job_dir="/j", data_dir="/d", checkpoint_dir="/c", events_path="/e")
    assert plain.resume and plain.resume_since_unix is None


def test_flatten_uses_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": None}


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
