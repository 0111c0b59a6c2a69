"""Two real gloo ranks training from shards: resume consumes exactly what the straight run would (fewer shards
than ranks x workers, and through the device prefetcher, included), data faults are summed over ranks and stop
the run on every rank together."""

import collections
from pathlib import Path

import pytest
import torch

from distgan.checkpoint import CheckpointManager
from support import flat, make_trainer, run_ranks, write_shards

pytestmark = pytest.mark.dist


def _shard_args(folder, *more):
    return ("data.source=shards", f"data.shards={folder}", "data.workers=2", "data.shuffle_buffer=7", *more)


def _train_and_resume(rank, world, folder, first, second, prefetch=False):
    """Straight: first+second steps. Resumed: a new trainer from the state after `first`, then second steps.
    prefetch: both trainers read through a Prefetcher (one batch pulled ahead when the checkpoint is saved)."""
    from distgan.data.prefetch import Prefetcher

    def trainer():
        tr = make_trainer(*_shard_args(folder))
        if prefetch:
            tr.stream = Prefetcher(tr.stream, tr.device)
        return tr

    tr = trainer()
    keys_first = []
    for _ in range(first):
        tr.train_step(*tr.draw())
        keys_first.append(list(tr.stream.last_keys))
    ckpts = CheckpointManager(Path(folder) / "run")
    path = tr.save_checkpoint(ckpts)  # collective: every rank writes its own stream position
    straight = []
    for _ in range(second):
        tr.train_step(*tr.draw())
        straight.append(list(tr.stream.last_keys))
    tr.stream.close()

    again = trainer()
    again.load_checkpoint(path)
    resumed = []
    for _ in range(second):
        again.train_step(*again.draw())
        resumed.append(list(again.stream.last_keys))
    again.stream.close()
    return {
        "first": keys_first,
        "straight": straight,
        "resumed": resumed,
        "G": flat(tr.G_module),
        "G_resumed": flat(again.G_module),
        "streams_saved": len(list(path.glob("rank-*.pt"))),
    }


def test_two_ranks_resume_from_shards_without_duplicates_or_gaps(tmp_path):
    write_shards(tmp_path, 8, 32, resolution=32)  # 256 samples; smoke batch 16 -> 16 steps per epoch
    out = run_ranks(_train_and_resume, 2, str(tmp_path), 11, 9)  # the resume point is mid-epoch, 9 more cross it
    for r in out:
        assert r["streams_saved"] == 2
        assert r["resumed"] == r["straight"]  # the same samples, in the same order, on the same rank
        assert torch.equal(r["G"], r["G_resumed"])
    # Over both ranks, epoch 0 (the first 16 steps) is every sample once: 0 duplicated, 0 missing.
    epoch0 = [k for step in range(16) for r in out for k in (r["first"] + r["resumed"])[step]]
    assert sorted(epoch0) == [f"{i:08d}" for i in range(256)]
    # Control: the two ranks did get different samples.
    assert set(out[0]["first"][0]).isdisjoint(out[1]["first"][0])


def test_three_shards_on_two_ranks_of_two_workers_through_the_prefetcher(tmp_path):
    # 3 shards for 4 slots: no rank runs dry, and a round (4 epochs of shard visits: 3 visits of 16 samples per
    # slot = 6 batches of 8, i.e. 12 steps with 2 workers per rank) reads every sample exactly 4 times. The
    # checkpoint is saved with a batch pulled ahead by the prefetcher: the resumed run re-reads it.
    write_shards(tmp_path, 3, 16, resolution=32)
    out = run_ranks(_train_and_resume, 2, str(tmp_path), 7, 5, True)
    for r in out:
        assert r["resumed"] == r["straight"]
        assert torch.equal(r["G"], r["G_resumed"])
    counts = collections.Counter(k for r in out for step in r["first"] + r["straight"] for k in step)
    assert counts == {f"{i:08d}": 4 for i in range(48)}


def _bad_data_run(rank, world, folder):
    from distgan.errors import DataError

    tr = make_trainer(*_shard_args(folder, "data.max_bad_fraction=0.05", "train.log_every_kimg=0.032"))
    try:
        tr.fit()
    except DataError as e:
        return {"error": str(e), "nimg": tr.cur_nimg}
    finally:
        tr.stream.close()
    return {"error": None, "nimg": tr.cur_nimg}


def test_bad_samples_are_summed_over_ranks_and_stop_every_rank(tmp_path):
    corrupt = {"shard-000005.tar"}

    def garbage(i, key):
        return {f"{key}.png": b"garbage"} if f"shard-{i:06d}.tar" in corrupt else None

    write_shards(tmp_path, 8, 16, resolution=32, extra=garbage)  # 1 of 8 shards unreadable: 12.5% > 5%
    out = run_ranks(_bad_data_run, 2, str(tmp_path))
    assert out[0]["error"] is not None and out[0]["error"] == out[1]["error"]
    assert "> data.max_bad_fraction=0.05" in out[0]["error"] and "shard-000005.tar" in out[0]["error"]
    assert out[0]["nimg"] == out[1]["nimg"] < 128  # stopped early, at the same step on both ranks


def test_a_few_bad_samples_below_the_limit_train_on(tmp_path):
    def one_bad(i, key):
        return {f"{key}.png": b"garbage"} if key == "00000007" else None

    write_shards(tmp_path, 8, 16, resolution=32, extra=one_bad)  # 1 of 128 samples: under 5%
    out = run_ranks(_bad_data_run, 2, str(tmp_path))
    assert out[0]["error"] is None and out[0]["nimg"] == 128
