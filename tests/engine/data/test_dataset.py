"""TokenDataset: the batch of a step is a pure function of (seed, step)."""
import os

import numpy as np
import pytest
import torch

from engine.data import TokenDataset, prepare_dataset

SEQ = 9
TEXT = "".join(chr(ord("a") + i % 26) for i in range(1000))  # 1000 byte tokens + EOS


@pytest.fixture
def prepared(tmp_path):
    (tmp_path / "src.txt").write_text(TEXT, encoding="ascii")
    return prepare_dataset(str(tmp_path / "src.txt"), str(tmp_path / "out"), progress=False)


def _all_tokens(prepared):
    return torch.from_numpy(np.fromfile(os.path.join(prepared, "tokens.bin"), dtype="<u2")
                            .astype(np.int64))


def test_sizes(prepared):
    ds = TokenDataset(prepared, SEQ)
    assert ds.num_tokens == 1001 and ds.vocab_size == 257
    assert ds.num_samples == (1001 - 1) // SEQ == 111


def test_same_seed_and_step_same_batch_in_a_fresh_instance(prepared):
    first = TokenDataset(prepared, SEQ)
    later_step_first = first.global_batch(7, 8, seed=3)  # visit another step first
    batch = first.global_batch(2, 8, seed=3)
    fresh = TokenDataset(prepared, SEQ).global_batch(2, 8, seed=3)
    assert batch.dtype == torch.long and batch.shape == (8, SEQ + 1)
    assert torch.equal(batch, fresh)
    assert not torch.equal(batch, later_step_first)
    assert not torch.equal(batch, first.global_batch(2, 8, seed=4))


def test_rows_are_windows_of_the_token_file(prepared):
    ds = TokenDataset(prepared, SEQ)
    tokens = _all_tokens(prepared)
    ids = ds.sample_ids(5 * 8, 8, seed=0)
    batch = ds.global_batch(5, 8, seed=0)
    for row, sample in zip(batch, ids.tolist()):
        assert torch.equal(row, tokens[sample * SEQ: sample * SEQ + SEQ + 1])


def test_batch_depends_only_on_global_sample_index(prepared):
    """Step s of batch B holds global samples s·B..s·B+B-1, whoever slices it afterwards."""
    ds = TokenDataset(prepared, SEQ)
    eight = ds.global_batch(1, 8, seed=11)
    four_a, four_b = ds.global_batch(2, 4, seed=11), ds.global_batch(3, 4, seed=11)
    assert torch.equal(eight, torch.cat([four_a, four_b]))


def test_each_epoch_visits_every_window_once_then_reshuffles(prepared):
    ds = TokenDataset(prepared, SEQ)
    n = ds.num_samples
    epoch0, epoch1 = ds.sample_ids(0, n, seed=5), ds.sample_ids(n, n, seed=5)
    assert sorted(epoch0.tolist()) == list(range(n)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1) and not torch.equal(epoch0, torch.arange(n))
    # step 13 of batch 8 covers global samples 104..111: epoch 0's last 7, epoch 1's first
    straddling = ds.sample_ids(13 * 8, 8, seed=5)
    assert torch.equal(straddling, torch.cat([epoch0[104:], epoch1[:1]]))


def test_single_sample_dataset_hand_values(prepared):
    ds = TokenDataset(prepared, 1000)  # exactly one window: all 1001 tokens
    expected = list(TEXT.encode("ascii")) + [256]
    batch = ds.global_batch(4, 2, seed=0)
    assert batch.tolist() == [expected, expected]


def test_too_short_data_and_bad_arguments(prepared):
    with pytest.raises(ValueError, match="shorter than one sample"):
        TokenDataset(prepared, 1001)
    with pytest.raises(ValueError, match="step=-1"):
        TokenDataset(prepared, SEQ).global_batch(-1, 8, seed=0)


def test_the_int32_permutation_is_the_int64_one(prepared):
    # Permutations are kept in int32 (half the host memory at real size); the order must be
    # the one every earlier run and checkpoint saw, which the int64 randperm gave.
    from engine.data.dataset import _epoch_seed
    ds = TokenDataset(prepared, SEQ)
    for epoch in range(3):
        kept = ds._epoch_permutation(11, epoch)
        assert kept.dtype == torch.int32
        int64 = torch.randperm(ds.num_samples, generator=torch.Generator().manual_seed(_epoch_seed(11, epoch)))
        assert torch.equal(kept.long(), int64)
    assert ds.sample_ids(0, 5, 11).dtype == torch.long
