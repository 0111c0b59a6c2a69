"""Two real gloo ranks training from shards: resume consumes exactly what the straight run would (fewer shards
than ranks x workers, and through the device prefetcher, included), every label arrives with its own image, data
faults are summed over ranks and stop the run on every rank together.

Shards come from support.write_shards: sample id = key, every pixel = id % 256 (ids < 256 here: pixel = id), and
KEY.cls = id % 7 in a manifest of 7 classes."""

import collections
from pathlib import Path

import pytest
import torch

from distgan.checkpoint import CheckpointManager
from support import flat, make_trainer, run_ranks, write_shards

pytestmark = pytest.mark.dist


def label_of(sid: int) -> int:
    return sid % 7


def _step(tr) -> list[tuple[str, int]]:
    """One training step; returns the (key, label) of each sample it trained on, after checking that each batch's
    rows agree: the key names the image (its pixels) and the label is that image's."""
    reals, latents, gen = tr.draw()
    keys = list(tr.stream.last_keys)  # (of the last batch drawn: the smoke config draws one per step)
    assert len(reals) == 1
    for batch in reals:
        ids = batch.images[:, 0, 0, 0].tolist()
        assert ids == [int(k) % 256 for k in keys]
        assert batch.labels is not None and batch.labels.tolist() == [label_of(i) for i in ids]
    tr.train_step(reals, latents, gen)
    return list(zip(keys, reals[-1].labels.tolist()))


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
    keys_first = [_step(tr) for _ in range(first)]
    ckpts = CheckpointManager(Path(folder) / "run")
    path = tr.save_checkpoint(ckpts)  # collective: every rank writes its own stream position
    straight = [_step(tr) for _ in range(second)]
    tr.stream.close()

    again = trainer()
    again.load_checkpoint(path)
    resumed = [_step(again) for _ in range(second)]
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
    # 256 samples; smoke batch 16 -> 16 steps per epoch
    write_shards(tmp_path, 8, 32, resolution=32, label=label_of, num_classes=7)
    out = run_ranks(_train_and_resume, 2, str(tmp_path), 11, 9)  # the resume point is mid-epoch, 9 more cross it
    for r in out:
        assert r["streams_saved"] == 2
        assert r["resumed"] == r["straight"]  # the same samples with the same labels, in the same order and rank
        assert torch.equal(r["G"], r["G_resumed"])
    # Over both ranks, epoch 0 (the first 16 steps) is every sample once, with its label: 0 duplicated, 0 missing.
    epoch0 = [kl for step in range(16) for r in out for kl in (r["first"] + r["resumed"])[step]]
    assert sorted(epoch0) == [(f"{i:08d}", label_of(i)) for i in range(256)]
    # Control: the two ranks did get different samples.
    assert set(out[0]["first"][0]).isdisjoint(out[1]["first"][0])


def test_three_shards_on_two_ranks_of_two_workers_through_the_prefetcher(tmp_path):
    # 3 shards for 4 slots: no rank runs dry, and a round (4 epochs of shard visits: 3 visits of 16 samples per
    # slot = 6 batches of 8, i.e. 12 steps with 2 workers per rank) reads every sample exactly 4 times. The
    # checkpoint is saved with a batch pulled ahead by the prefetcher: the resumed run re-reads it.
    write_shards(tmp_path, 3, 16, resolution=32, label=label_of, num_classes=7)
    out = run_ranks(_train_and_resume, 2, str(tmp_path), 7, 5, True)
    for r in out:
        assert r["resumed"] == r["straight"]
        assert torch.equal(r["G"], r["G_resumed"])
    counts = collections.Counter(kl for r in out for step in r["first"] + r["straight"] for kl in step)
    assert counts == {(f"{i:08d}", label_of(i)): 4 for i in range(48)}


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


def _elastic_first(rank, world, folder, steps):
    """`steps` steps on this world (2 loader workers per rank, through the prefetcher), then a checkpoint."""
    from distgan.data.prefetch import Prefetcher

    tr = make_trainer(*_shard_args(folder, "train.batch=12"))
    tr.stream = Prefetcher(tr.stream, tr.device)
    keys = [_step(tr) for _ in range(steps)]
    path = tr.save_checkpoint(CheckpointManager(Path(folder) / "run"))
    tr.stream.close()
    return {"keys": keys, "path": str(path)}


def _elastic_resumed(rank, world, folder, path, steps):
    """A trainer with 1 loader worker per rank resumed from `path` (saved by another world), then `steps` steps."""
    tr = make_trainer(*_shard_args(folder, "train.batch=12", "data.workers=1"))
    tr.load_checkpoint(Path(path))
    keys = [_step(tr) for _ in range(steps)]
    tr.stream.close()
    return {"keys": keys, "line": tr.stream.resumed_from, "nimg": tr.cur_nimg, "G": flat(tr.G_module)}


def test_two_ranks_of_two_workers_resume_on_three_ranks_and_on_one_continuing_the_epoch(tmp_path):
    # 96 samples in 12 shards, a global batch of 12: 8 steps per epoch. 3 steps on 2 ranks x 2 workers, then the
    # checkpoint resumed by 3 ranks x 1 worker and by 1 x 1: the 5 steps to the epoch's end are the 60 samples not
    # yet trained on, each once, with its label (the in-process streams' version, with its control, is in
    # tests/unit/test_stream.py).
    write_shards(tmp_path, 12, 8, resolution=32, label=label_of, num_classes=7)
    first = run_ranks(_elastic_first, 2, str(tmp_path), 3)
    path = first[0]["path"]
    before = [kl for r in first for step in r["keys"] for kl in step]
    for world in (3, 1):
        out = run_ranks(_elastic_resumed, world, str(tmp_path), path, 5)
        after = [kl for r in out for step in r["keys"] for kl in step]
        assert sorted(before + after) == [(f"{i:08d}", label_of(i)) for i in range(96)], world
        assert "2 ranks x 2 loader workers re-split over" in out[0]["line"] and "60 samples" in out[0]["line"]
        assert all(r["nimg"] == 96 for r in out) and all(torch.equal(r["G"], out[0]["G"]) for r in out)
