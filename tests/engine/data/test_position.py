"""The data position a checkpoint records (engine/data/position.py): a resume at another global
batch size continues the same order at the samples consumed (every window once per epoch),
the held-out split stays the one training began with, and what changes is said or refused."""
import pytest
import torch

from engine.config.train import TrainConfig
from engine.data import prepare_dataset
from engine.data.eval_data import EvalDataError, TrainWindows
from engine.data.position import DataContinuityError, data_state, resume_position

SEQ, SEED = 4, 7


@pytest.fixture
def prepared(tmp_path):
    source = tmp_path / "text.txt"
    source.write_text("".join(f"line {i} of the position test corpus\n" for i in range(30)))
    return prepare_dataset(str(source), str(tmp_path / "prepared"), progress=False)


def _train(gbs, **kw):
    return TrainConfig(global_batch_size=gbs, micro_batch_size=1, seq_len=SEQ, seed=SEED, **kw)


def test_a_larger_batch_after_a_resume_sees_every_window_once_per_epoch(prepared):
    windows = TrainWindows(prepared, SEQ, 0, 8)
    n = windows.num_samples
    before = [windows.sample_ids(8 * step, 8, SEED) for step in range(3)]
    saved = data_state(24, _train(8), 0, "abc")
    position = resume_position(saved, 3, _train(16), 0, "abc")
    assert position.consumed_samples == 24 and position.notes[0].startswith("train.global_batch_size 8 -> 16")
    steps = (n - 24) // 16
    after = [windows.sample_ids(24 + 16 * i, 16, SEED) for i in range(steps)]
    ids = [i for b in before + after for i in b.tolist()]
    assert len(ids) == len(set(ids)) == 24 + 16 * steps       # no window twice in the epoch
    assert windows.batch_at(24, 16, SEED).shape == (16, SEQ + 1)
    # step x new batch size, what the loop did before: 48 of the epoch, skipping 24..47
    skipped = windows.sample_ids(24, 24, SEED)
    assert set(windows.sample_ids(48, 16, SEED).tolist()).isdisjoint(skipped.tolist())


def test_the_held_out_split_is_the_one_training_began_with():
    saved = data_state(40, _train(4, eval_every=5, eval_batches=2), 8, "abc")
    # eval_batches 2 -> 1 at gbs 4: a subset of the held-out windows; the permutation keeps 8
    assert resume_position(saved, 10, _train(4, eval_every=5, eval_batches=1), 4, "abc").held_out == 8
    # gbs 4 -> 8 with eval_batches 2 would need 16 held-out windows: 8 of them were trained on
    with pytest.raises(DataContinuityError, match=r"= 16 held-out windows, but the run being resumed "
                                                  r"held out 8: .*use train.eval_batches <= 1"):
        resume_position(saved, 10, _train(8, eval_every=5, eval_batches=2), 16, "abc")
    # a run that held nothing out cannot start evaluating on its training windows
    with pytest.raises(DataContinuityError, match="turn train.eval_every off"):
        resume_position(data_state(40, _train(4), 0, "abc"), 10, _train(4, eval_every=5, eval_batches=1), 4, "abc")


def test_a_changed_order_is_said_and_an_old_checkpoint_continues_at_step_x_batch():
    saved = data_state(40, _train(4), 0, "abc")
    notes = resume_position(saved, 10, TrainConfig(global_batch_size=4, seq_len=8, seed=1), 0, "def").notes
    assert notes == ("the data order changed (seq_len 4 -> 8, seed 7 -> 1, tokens_sha256 abc -> def): "
                     "training continues at sample 40 of the new order, so this epoch repeats some "
                     "windows and skips others",)
    assert resume_position({}, 10, _train(4), 0, "abc").consumed_samples == 40
    assert resume_position(saved, 10, _train(4), 0, "abc").notes == ()


def test_a_dataset_smaller_than_one_global_batch_is_refused_without_eval_too(prepared):
    n = TrainWindows(prepared, SEQ, 0, 1).num_samples
    with pytest.raises(EvalDataError, match=rf"{n} windows of seq_len {SEQ} are fewer than one global "
                                            rf"batch \({n + 1}\) to train on; lower train.global_batch_size or"):
        TrainWindows(prepared, SEQ, 0, n + 1)


def test_a_rank_reads_only_its_rows_and_gets_the_same_micro_batches(prepared):
    from engine.parallel.config import ParallelConfig
    from engine.parallel.mesh import FoldedMesh
    from engine.train.batch import local_rows, split_microbatches

    windows = TrainWindows(prepared, SEQ, 0, 8)
    whole = windows.batch_at(16, 8, SEED)
    for dp_rank in range(2):
        mesh = FoldedMesh(ParallelConfig(world_size=2), rank=dp_rank, create_groups=False)
        rows = local_rows(mesh, micro_batch_size=2, num_microbatches=2)
        assert rows == [r + 2 * dp_rank for r in (0, 1, 4, 5)]
        mine = windows.batch_at(16, 8, SEED, rows)
        assert torch.equal(mine[rows], whole[rows])
        got = split_microbatches(mine, mesh, 2, 2, torch.device("cpu"))
        want = split_microbatches(whole, mesh, 2, 2, torch.device("cpu"))
        assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels) for a, b in zip(got, want))
