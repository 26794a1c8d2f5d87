"""The held-out split is disjoint from every training window and the same batches for any
caller; token rows pack into padded batches whose weights count exactly the real targets."""
import pytest
import torch

from engine.config.train import TrainConfig
from engine.data import prepare_dataset
from engine.data.eval_data import (EvalDataError, TrainWindows, held_out_batches, held_out_windows,
                                   pack_rows)
from engine.train.evaluate import eval_due, forward_program

SEQ = 8


@pytest.fixture
def prepared(tmp_path):
    source = tmp_path / "text.txt"
    source.write_text("".join(f"line {i} of the held-out test corpus\n" for i in range(40)))
    return prepare_dataset(str(source), str(tmp_path / "prepared"), progress=False)


def test_held_out_windows_are_never_trained_on(prepared):
    train = TrainConfig(global_batch_size=4, seq_len=SEQ, eval_every=5, eval_batches=2)
    assert held_out_windows(train) == 8 and held_out_windows(TrainConfig(eval_batches=2)) == 0
    windows = TrainWindows(prepared, SEQ, held_out_windows(train), 4)
    total = windows.num_samples + 8
    batches = held_out_batches(prepared, SEQ, 2, 4)
    assert [b.tokens.shape for b in batches] == [(4, SEQ + 1)] * 2
    # every window of several epochs of training lies before the split
    seen = windows.sample_ids(0, 3 * windows.num_samples, 1234)
    assert seen.max().item() == windows.num_samples - 1 and seen.unique().numel() == windows.num_samples
    tail = torch.cat([b.tokens for b in batches])
    raw = torch.from_numpy(windows._tokens[:].astype("int64"))
    starts = [(total - 8 + i) * SEQ for i in range(8)]
    assert torch.equal(tail, torch.stack([raw[s:s + SEQ + 1] for s in starts]))
    assert all(b.num_targets == 4 * SEQ for b in batches)


def test_a_split_too_large_for_the_data_is_one_line(prepared):
    n = TrainWindows(prepared, SEQ, 0, 1).num_samples
    with pytest.raises(EvalDataError, match="leaves fewer than one global batch"):
        TrainWindows(prepared, SEQ, n - 1, 4)
    with pytest.raises(EvalDataError, match="lower train.eval_batches"):
        held_out_batches(prepared, SEQ, n, 1)


def test_rows_pack_right_padded_with_zero_weight_on_padding():
    batches = pack_rows([[5, 6, 7], [1, 2], [9] * 9], global_batch_size=2, seq_len=SEQ)
    assert len(batches) == 2 and [b.num_targets for b in batches] == [3, 8]
    first = batches[0]
    assert first.tokens[0].tolist() == [5, 6, 7] + [0] * 6
    assert first.weights[0].tolist() == [0, 1, 1] + [0] * 6
    assert batches[1].weights[1].sum() == 0            # the all-padding row


def test_eval_due_and_forward_only_programs():
    train = TrainConfig(steps=7, eval_every=3)
    assert [s for s in range(1, 8) if eval_due(train, s)] == [3, 6, 7]
    assert not any(eval_due(TrainConfig(steps=7), s) for s in range(1, 8))
    for schedule, pp, m, vpp in (("1f1b", 2, 4, 1), ("gpipe", 4, 4, 1), ("interleaved", 2, 4, 2)):
        for rank in range(pp):
            program = forward_program(schedule, pp, m, vpp, rank)
            forwards = [a for a in program if a.kind == "F"]
            assert len(forwards) == m * vpp and not any(a.kind.endswith("B") for a in program)
