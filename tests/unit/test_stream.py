"""The shard streamer (distgan/data/stream.py, shards.py): splitting, epochs, resume, faults, hostile shards.

Ranks are simulated here by building one ShardStream per rank in this process: a stream depends on its rank
and world size only through arithmetic (no collectives). Real multi-process runs are in tests/distributed and
tests/integration. Shards come from support.write_shards: sample id = key, every pixel = id % 256, and in labelled
shards (label=label_of) the class in KEY.cls = id % 7: consume() checks that every batch's rows agree, image, key
and label, so a label that lost its image would show.
"""

from __future__ import annotations

import collections
import functools
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from conftest import patience
from distgan.config import load_config
from distgan.data.batch import Batch
from distgan.data.position import segment_size
from distgan.data.stream import ShardStream
from distgan.errors import DataError
from support import write_shards

CLASSES = 7


def label_of(sid: int) -> int:
    return sid % CLASSES


def labelled(folder, n_shards, per_shard, **kw):
    """write_shards with KEY.cls = id % 7 and a manifest listing 7 classes."""
    return write_shards(folder, n_shards, per_shard, label=label_of, num_classes=CLASSES, **kw)


def data_cfg(shards, *overrides):
    return load_config(None, ["data.source=shards", f"data.shards={shards}", *overrides]).data


def streams(shards, world=2, workers=2, batch=8, res=8, *overrides, seed=0):
    cfg = data_cfg(shards, f"data.workers={workers}", "data.shuffle_buffer=5", *overrides)
    return [ShardStream(cfg, res, 3, batch, r, world, seed) for r in range(world)]


def check(batch, keys, labels: bool):
    """The batch's rows are the samples `keys` names: each image's pixels and each label are its sample's."""
    assert isinstance(batch, Batch) and batch.images.dtype == torch.uint8 and len(batch) == len(keys)
    ids = [int(k) for k in keys]
    assert batch.images[:, 0, 0, 0].tolist() == [i % 256 for i in ids]
    if labels:
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (len(keys),)
        assert batch.labels.tolist() == [label_of(i) for i in ids]
        # ... and so the label is the one of the image it travels with (ids here are < 256: pixel = id).
        assert batch.labels.tolist() == [label_of(p) for p in batch.images[:, 0, 0, 0].tolist()]
    else:
        assert batch.labels is None


def consume(ranks, steps):
    """Keys of `steps` global steps, per step and rank: [[rank0 keys, rank1 keys], ...]; every batch checked."""
    out = []
    for _ in range(steps):
        row = []
        for s in ranks:
            check(next(s), s.last_keys, s.labelled)
            row.append(list(s.last_keys))
        out.append(row)
    return out


def keys_of(rows):
    return [k for row in rows for keys in row for k in keys]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_exactly_once_per_epoch_when_shards_divide(tmp_path, workers):
    labelled(tmp_path, 8, 8)  # 64 samples; 2 ranks x 4 per rank = 8 per step, 8 steps per epoch
    ranks = streams(tmp_path, workers=workers)
    assert all(s.labelled and s.num_classes == CLASSES for s in ranks)
    epochs = [collections.Counter(keys_of(consume(ranks, 8))) for _ in range(3)]
    for counts in epochs:
        assert sorted(counts) == [f"{i:08d}" for i in range(64)] and set(counts.values()) == {1}
    # Shuffled: not the written order, and each epoch in another order.
    first = keys_of(consume(streams(tmp_path, workers=workers), 8))
    assert first != sorted(first)


def test_ranks_see_disjoint_samples_within_an_epoch(tmp_path):
    write_shards(tmp_path, 8, 8)
    rows = consume(streams(tmp_path), 8)
    rank0 = {k for row in rows for k in row[0]}
    rank1 = {k for row in rows for k in row[1]}
    assert len(rank0) == len(rank1) == 32 and not rank0 & rank1


def test_seven_shards_on_two_ranks_of_two_workers_never_run_dry(tmp_path):
    # The WebDataset split_by_node/worker deadlock case (ENVIRONMENT.md): 14 vs 11 batches. Here every rank keeps
    # yielding, and over the R*W = 4 epochs of shard visits every shard is read equally often.
    write_shards(tmp_path, 7, 8)
    ranks = streams(tmp_path, batch=8)
    counts = collections.Counter(keys_of(consume(ranks, 28)))  # 28 steps x 8 = 224 = 4 epochs of 56 samples
    assert sorted(counts) == [f"{i:08d}" for i in range(56)]
    assert max(counts.values()) - min(counts.values()) <= 2


def test_stream_resumes_exactly_across_an_epoch_end(tmp_path):
    labelled(tmp_path, 8, [8, 8, 8, 8, 8, 8, 8, 5])  # uneven last shard; consume() checks every label
    straight = streams(tmp_path)
    before = consume(straight, 7)  # 7 steps: an odd batch count (worker rotation) and the epoch nearly done
    states = [s.state_dict() for s in straight]
    after = consume(straight, 9)  # crosses into epoch 1

    resumed = streams(tmp_path)
    for s, st in zip(resumed, states):
        s.load_state_dict(st)
    assert consume(resumed, 9) == after
    # Across the stop: 0 duplicated, 0 missing within epoch 0 (61 samples).
    seen = keys_of(before) + keys_of(after)
    assert len(set(seen[:61])) == 61


def test_resume_refuses_another_world_size(tmp_path):
    write_shards(tmp_path, 8, 8)
    state = streams(tmp_path)[0].state_dict()
    other = streams(tmp_path, world=1)[0]
    with pytest.raises(DataError, match="2 ranks x 2 loader workers"):
        other.load_state_dict(state)


def resumed(shards, states, world, workers, batch):
    """Streams of another ranks x workers resumed from `states` (every rank's) through their global position."""
    position = streams(shards, len(states), states[0]["workers"], batch)[0].global_position(states)
    out = streams(shards, world, workers, batch)
    for s in out:
        s.load_state_dict(states[0], position)  # (another world size: the trainer hands every rank rank 0's file)
    return out


@pytest.mark.parametrize("steps, world, workers", [(3, 1, 1), (1, 3, 1), (3, 3, 1), (1, 1, 2)])
def test_resume_on_other_ranks_and_workers_continues_the_epoch_without_repeats_or_gaps(tmp_path, steps, world, workers):
    # 96 samples in 12 shards; a global batch of 12. Stopped mid-epoch on 2 ranks x 2 workers (after 1 step worker 1
    # of each rank has handed out nothing yet), resumed on another count: the epoch's other samples come next, each
    # once, and every slot finishes the epoch at the same step (the next epoch then starts on all of them).
    labelled(tmp_path, 12, 8)
    first = streams(tmp_path, 2, 2, 12)
    before = keys_of(consume(first, steps))
    states = [s.state_dict() for s in first]
    with pytest.raises(DataError, match="2 ranks x 2 loader workers"):  # the control: without the global position
        streams(tmp_path, world, workers, 12)[0].load_state_dict(states[0])

    after = resumed(tmp_path, states, world, workers, 12)
    assert "re-split over" in after[0].resumed_from and f"{96 - 12 * steps} samples" in after[0].resumed_from
    rest = keys_of(consume(after, 8 - steps))
    assert sorted(before + rest) == [f"{i:08d}" for i in range(96)]
    # The next epoch: every sample once more, on the new count alone.
    assert sorted(keys_of(consume(after, 8))) == [f"{i:08d}" for i in range(96)]


def test_a_resplit_stream_resumes_exactly_and_resplits_again(tmp_path):
    # 2x2 -> 3x1 (stopped mid-way) -> the same 3x1 exactly, and -> 1x2: still each sample of the epoch once.
    labelled(tmp_path, 12, [8] * 11 + [5])  # an uneven last shard: 93 samples, not a multiple of the batch
    first = streams(tmp_path, 2, 2, 12)
    seen = keys_of(consume(first, 3))
    middle = resumed(tmp_path, [s.state_dict() for s in first], 3, 1, 12)
    seen += keys_of(consume(middle, 2))
    states = [s.state_dict() for s in middle]
    straight = consume(middle, 2)
    again = streams(tmp_path, 3, 1, 12)
    for s, st in zip(again, states):
        s.load_state_dict(st, first[0].global_position(states))  # same ranks x workers: the exact place wins
    assert consume(again, 2) == straight
    last = resumed(tmp_path, states, 1, 2, 12)
    rest = keys_of(consume(last, 3))  # 33 samples left of 93 (then 3 of the next epoch)
    assert sorted(seen + rest[:33]) == [f"{i:08d}" for i in range(93)]


def test_a_resplit_with_fewer_shards_than_readers_reads_each_started_epoch_once(tmp_path):
    # 3 shards of 8 for 2 ranks x 2 workers: the readers are in different epochs at once. The global position's
    # rest is everything of the epochs begun and not yet read; resumed on 1 x 1 it is read next, and with what was
    # read before it makes up those epochs exactly: every sample once per epoch begun.
    labelled(tmp_path, 3, 8)
    first = streams(tmp_path, 2, 2, 4)
    before = keys_of(consume(first, 3))
    states = [s.state_dict() for s in first]
    position = first[0].global_position(states)
    epochs = position["start"] // 3
    assert epochs >= 2  # (the readers had entered more than one epoch)
    after = resumed(tmp_path, states, 1, 1, 4)
    left = 24 * epochs - len(before)
    rest = keys_of(consume(after, left // 4))
    assert collections.Counter(before + rest) == {f"{i:08d}": epochs for i in range(24)}


def test_without_a_manifest_a_resplit_still_reads_each_left_sample_once(tmp_path):
    write_shards(tmp_path, 12, 8, manifest=False)
    pattern = str(tmp_path / "shard-{000000..000011}.tar")
    first = streams(pattern, 2, 2, 12)
    before = keys_of(consume(first, 3))
    after = resumed(pattern, [s.state_dict() for s in first], 3, 1, 12)
    assert "re-split over 3 x 1" in after[0].resumed_from
    rest = consume(after, 12)
    # The slots' shares of the epoch's rest are dealt by whole segments (sizes unknown): unequal, so they finish the
    # epoch at different steps. Each slot's first records are its share: with `before`, every sample once.
    shares = [sum(segment_size(seg, 8) for seg in piece) for piece in after[0].dataset.layout["pieces"]]
    assert sum(shares) == 60 and len(set(shares)) > 1
    epoch0 = before + [k for r, n in enumerate(shares) for k in [k for row in rest for k in row[r]][:n]]
    assert sorted(epoch0) == [f"{i:08d}" for i in range(96)]


def test_missing_shard_is_an_error_before_the_first_batch(tmp_path):
    paths = write_shards(tmp_path, 4, 4)
    paths[2].unlink()
    with pytest.raises(DataError, match=r"1 of 4 shards not found: .*shard-000002\.tar"):
        streams(tmp_path)


def test_one_shard_feeds_two_ranks_of_two_workers(tmp_path):
    # Fewer shards than ranks used to be refused ("a rank would get no data"): the slots simply read later epochs.
    write_shards(tmp_path, 1, 4)
    ranks = streams(tmp_path, batch=4)
    # A round: each of the 4 slots makes 1 visit (4 samples, 2 batches of 2): 4 steps, every sample 4 times.
    counts = collections.Counter(keys_of(consume(ranks, 4)))
    assert counts == {f"{i:08d}": 4 for i in range(4)}
    assert ranks[0].loader_workers == 2  # not lowered to shards // ranks = 0
    line = ranks[0].describe()
    assert line.endswith(
        "2 loader workers per rank; 1 shard for 2 ranks x 2 workers: every shard is read by ~4.0 of the 4 readers "
        "at once, so samples recur within a few steps; `distgan prepare --shard-samples N` for at least 4 shards "
        "spreads the data evenly"
    )
    for s in ranks:
        s.close()


def test_describe_is_plain_when_there_are_enough_shards(tmp_path):
    write_shards(tmp_path, 4, 4)
    (s,) = streams(tmp_path, world=1, workers=0)
    assert s.describe() == f"data: 16 samples in 4 shards from {tmp_path}, 0 loader workers per rank"
    assert "readers" not in streams(tmp_path, world=2, workers=2)[0].describe()  # 4 shards, 4 slots: even


# ---------------------------------------------------------------------------- fewer shards than slots
# 20 shards of 3 samples on 32 ranks (a batch of 4 per rank). The slot scheme of stream.py's docstring, restated
# here as the test's own expectation: epoch e visits the shards in the order permutation(seed, e); the visits of
# all epochs form one sequence, and slot s (of N) takes visits s, s+N, s+2N, ... A round is N epochs: every slot
# makes S = 20 visits, i.e. reads 60 samples = 15 batches, and every sample is read N times in all.
S20, PER20, B20 = 20, 3, 4


def scheme_counts(slot, n_slots, n_shards=S20, per=PER20, seed=0):
    """The samples slot `slot` reads over one round, with multiplicity, from the scheme itself."""
    import numpy as np

    counts = collections.Counter()
    for j in range(n_shards):
        epoch, i = divmod(slot + j * n_slots, n_shards)
        shard = int(np.random.default_rng([seed, epoch, 0xD47A]).permutation(n_shards)[i])
        counts.update(f"{shard * per + k:08d}" for k in range(per))
    return counts


def test_twenty_shards_feed_thirty_two_ranks_a_full_round(tmp_path):
    labelled(tmp_path, S20, PER20)
    ranks = streams(tmp_path, world=32, workers=0, batch=32 * B20)
    per_rank = [keys_of(consume([s], S20 * PER20 // B20)) for s in ranks]  # one round: 15 batches each
    for r, keys in enumerate(per_rank):
        assert collections.Counter(keys) == scheme_counts(r, 32)
    total = collections.Counter(k for keys in per_rank for k in keys)
    assert total == {f"{i:08d}": 32 for i in range(S20 * PER20)}  # every sample N = 32 times per round
    # Control: the ranks do not all read the same thing (rank 0 and rank 1 start on different shards).
    assert per_rank[0][:B20] != per_rank[1][:B20]
    assert "20 shards for 32 ranks: every shard is read by ~1.6 of the 32 readers at once" in ranks[0].describe()

    # Resume mid-round, mid-shard (7 batches of 4 = 28 samples: 9 visits and 1 of the 10th's 3) on a few ranks.
    for r in (0, 13, 31):
        again = streams(tmp_path, world=32, workers=0, batch=32 * B20)[r]
        first = consume([again], 7)
        resumed = streams(tmp_path, world=32, workers=0, batch=32 * B20)[r]
        resumed.load_state_dict(again.state_dict())
        assert keys_of(first + consume([resumed], 8)) == per_rank[r]


def _logical_worker_keys(stream, w, n_batches):
    """Keys of logical worker w's first batches, straight from the rank's _Batches (no loader process)."""
    stream.dataset.rotation = w  # outside a loader worker, _Batches serves logical worker `rotation`
    it = iter(stream.dataset)
    out = []
    for _ in range(n_batches):
        item = next(it)
        check(item["batch"], item["keys"], stream.labelled)
        out.append(item["keys"])
    return out


def test_twenty_shards_feed_thirty_two_ranks_of_two_workers(tmp_path):
    labelled(tmp_path, S20, PER20)
    ranks = streams(tmp_path, world=32, workers=2, batch=32 * B20)
    assert ranks[0].loader_workers == 2
    n = S20 * PER20 // B20  # batches of one slot in a round
    slots = {}
    for r, s in enumerate(ranks):
        for w in range(2):
            slots[r * 2 + w] = _logical_worker_keys(s, w, n)
    for slot, batches in slots.items():
        assert collections.Counter(k for b in batches for k in b) == scheme_counts(slot, 64)
    total = collections.Counter(k for batches in slots.values() for b in batches for k in b)
    assert total == {f"{i:08d}": 64 for i in range(S20 * PER20)}
    assert "20 shards for 32 ranks x 2 workers: every shard is read by ~3.2 of the 64 readers" in ranks[0].describe()

    # Real loader workers on two of the ranks: batches come from workers 0, 1, 0, 1, ...; resume mid-way.
    for r in (0, 31):
        s = streams(tmp_path, world=32, workers=2, batch=32 * B20)[r]
        expected = [slots[2 * r + k % 2][k // 2] for k in range(12)]
        first = consume([s], 5)  # an odd count: the resumed rank starts with worker 1
        state = s.state_dict()
        s.close()
        resumed = streams(tmp_path, world=32, workers=2, batch=32 * B20)[r]
        resumed.load_state_dict(state)
        assert [row[0] for row in first + consume([resumed], 7)] == expected
        resumed.close()


def test_all_shards_unreadable_is_an_error_with_fewer_shards_than_slots(tmp_path):
    # With S <= N every visit of a slot is in another epoch (a block is one visit): the empty-shard count must
    # span blocks, else this looped forever.
    paths = write_shards(tmp_path, 3, 4, manifest=False)
    for p in paths:
        p.write_bytes(b"\0garbage" * 100)
    ranks = streams(f"{tmp_path}/shard-{{000000..000002}}.tar", world=4, workers=0, batch=8)
    assert "no readable samples in any of the 3 shards" in first_error(ranks[3])


def first_error(stream) -> str:
    """The DataError of the stream's first batch, waited for in a thread: a regression that loops forever fails
    the test instead of hanging the suite."""
    raised: list[str] = []

    def first_batch():
        try:
            next(stream)
        except DataError as e:
            raised.append(str(e))

    t = threading.Thread(target=first_batch, daemon=True)
    t.start()
    t.join(patience(60))
    assert not t.is_alive(), "the stream is still looking for a usable sample"
    assert raised, "no DataError"
    return raised[0]


def test_one_readable_shard_of_many_unreadable_still_trains(tmp_path):
    paths = write_shards(tmp_path, 4, 4, manifest=False)
    for p in paths[1:]:
        p.write_bytes(b"\0garbage" * 100)
    ranks = streams(f"{tmp_path}/shard-{{000000..000003}}.tar", world=4, workers=0, batch=8)
    for s in ranks:
        for _ in range(3):
            next(s)
            assert set(s.last_keys) <= {f"{i:08d}" for i in range(4)}


def test_batches_are_fresh_tensors_and_worker_batches_are_allocated_in_shared_memory(tmp_path):
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 (registers torch's reductions with ForkingPickler)

    from distgan.data.stream import _new_tensor

    # A loader worker's batch, images and labels: pickling it for the rank (what the DataLoader's queue does)
    # moves no data.
    images, view = _new_tensor((2, 3, 4, 4), torch.uint8, shared=True, pinned=False)
    labels, label_view = _new_tensor((2,), torch.int64, shared=True, pinned=False)
    view[:] = 7
    label_view[:] = [5, 6]
    batch = Batch(images, labels)
    ptrs = images.data_ptr(), labels.data_ptr()
    ForkingPickler.dumps(batch)
    assert images.is_shared() and labels.is_shared() and (images.data_ptr(), labels.data_ptr()) == ptrs
    assert int(images.sum()) == 7 * 96 and labels.tolist() == [5, 6] and labels.dtype == torch.int64
    # Control: a tensor allocated the ordinary way is copied into shared memory on the way (its storage moves).
    plain = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    ptr = plain.data_ptr()
    ForkingPickler.dumps(plain)
    assert plain.data_ptr() != ptr

    # Batches handed out are never overwritten by later ones (no reused buffer), with and without workers.
    labelled(tmp_path, 4, 8)
    for workers in (0, 1):
        (s,) = streams(tmp_path, world=1, workers=workers, batch=4)
        held = []
        for _ in range(6):
            held.append((next(s), list(s.last_keys)))
        for batch, keys in held:
            check(batch, keys, labels=True)
        s.close()


def test_pin_memory_without_cuda_changes_nothing(tmp_path):
    labelled(tmp_path, 4, 8)
    cfg = data_cfg(tmp_path, "data.workers=0", "data.shuffle_buffer=5")
    plain = ShardStream(cfg, 8, 3, 4, 0, 1, 0)
    pinned = ShardStream(cfg, 8, 3, 4, 0, 1, 0, pin_memory=True)
    assert pinned.pin_memory == torch.cuda.is_available()
    for _ in range(5):
        a, b = next(plain), next(pinned)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_manifest_resolution_mismatch_is_an_error(tmp_path):
    write_shards(tmp_path, 2, 4, resolution=16)
    with pytest.raises(DataError, match="16x16x3 images but the model is 8x8x3.*--size 8"):
        streams(tmp_path)


def test_shards_without_manifest_by_brace_pattern_are_resized(tmp_path):
    write_shards(tmp_path, 4, 4, resolution=16, manifest=False)
    ranks = streams(f"{tmp_path}/shard-{{000000..000003}}.tar", workers=1, batch=4)
    rows = consume(ranks, 4)
    assert sorted(keys_of(rows)) == [f"{i:08d}" for i in range(16)]
    assert next(ranks[0]).images.shape == (2, 3, 8, 8)
    assert not ranks[0].labelled  # no manifest, no .cls members: labels None (consume() checked)


def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(tmp_path):
    bad = {"00000003", "00000005"}

    def corrupt(i, key):
        return {f"{key}.png": b"not a png"} if key in bad else None

    paths = write_shards(tmp_path, 4, 8, extra=corrupt)  # the corrupt bytes replace those samples' images
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2])  # truncated mid-shard (the manifest still says 8 samples)
    (s,) = streams(tmp_path, world=1, workers=0, batch=4)
    got = keys_of(consume([s], 5))  # 20 of at most 32 - 2 - (lost) readable samples
    assert not bad & set(got)
    for _ in range(5):
        next(s)
    stats = s.take_stats()
    assert stats["Data/samples"] - stats["Data/bad"] == 40  # every consumed image is a good one
    assert stats["Data/bad"] >= 2 + 3  # two corrupt samples, and the unread part of shard 3 (5 of 8 remain)
    assert any(b.startswith("shard-000003.tar (") for b in s.bad_shards)
    assert any("shard-000000.tar" in b for b in s.bad_shards)


def test_bad_labels_are_bad_samples_counted_never_a_crash(tmp_path):
    # A labelled manifest (7 classes): a sample whose .cls is missing, not a number, negative, out of range or huge
    # is skipped and counted like an undecodable image, with its shard named.
    # (The last is fine: whitespace around the digits.)
    broken = {"00000002": None, "00000005": b"seven", "00000009": b"-1", "00000011": b"7", "00000020": b"1" * 100,
              "00000026": b" 5\n"}  # fmt: skip

    def corrupt(i, key):
        return {f"{key}.cls": broken[key]} if key in broken else None

    labelled(tmp_path, 4, 8, extra=corrupt)
    for workers in (0, 1):
        (s,) = streams(tmp_path, world=1, workers=workers, batch=4)
        got = keys_of(consume([s], 13))  # 52 = 2 epochs of the 27 good samples, less 2 (consume checks labels)
        bad = {k for k, v in broken.items() if v != b" 5\n"}
        assert not bad & set(got) and "00000026" in got
        stats = s.take_stats()
        assert stats["Data/samples"] - stats["Data/bad"] == 52 and stats["Data/bad"] >= 5
        assert any("ValueError in 00000005" in b for b in s.bad_shards)
        s.close()


def test_labels_follow_the_manifest_or_the_first_sample(tmp_path):
    # A manifest without classes: unlabelled, its .cls members not even read (a broken one is no fault).
    write_shards(tmp_path / "none", 2, 4, label=label_of, extra=lambda i, key: {f"{key}.cls": b"x"} if i else None)
    (s,) = streams(tmp_path / "none", world=1, workers=0, batch=8)
    assert not s.labelled and s.num_classes is None
    consume([s], 2)
    assert s.take_stats()["Data/bad"] == 0
    # No manifest: the first sample has a .cls, so labelled, class count unknown (any non-negative index).
    labelled(tmp_path / "raw", 2, 4, manifest=False)
    raw = f"{tmp_path}/raw/shard-{{000000..000001}}.tar"
    (s,) = streams(raw, world=1, workers=1, batch=8)
    assert s.labelled and s.num_classes is None
    assert s.describe().startswith("data: samples with labels in 2 shards")
    consume([s], 3)
    s.close()
    # ... or given a class count (a conditional model's): labels at or above it are bad.
    cfg = data_cfg(raw, "data.workers=0", "data.shuffle_buffer=5")
    s = ShardStream(cfg, 8, 3, 4, 0, 1, 0, num_classes=5)
    assert s.labelled and s.num_classes == 5 and s.describe().startswith("data: samples of 5 classes in 2 shards")
    for _ in range(4):
        batch = next(s)
        assert batch.labels.tolist() == [label_of(int(k)) for k in s.last_keys] and max(batch.labels) < 5
    assert s.take_stats()["Data/bad"] >= 2  # ids 5 and 6 (class 5, 6) were read in 16 samples of 8
    # With a manifest, its classes decide; describe() says how many.
    labelled(tmp_path / "m", 2, 4)
    assert streams(tmp_path / "m", world=1, workers=0)[0].describe().startswith("data: 8 samples of 7 classes in 2")


def test_shards_without_any_usable_sample_are_an_error_not_an_endless_read(tmp_path):
    # Labelled (as a conditional model says) but without labels, or no image that decodes: every sample is bad.
    # The slot reads a whole visit of every shard, then says so; it used to read on forever.
    write_shards(tmp_path / "nolabels", 3, 4, manifest=False)
    garbage = {"png": b"not a png"}
    write_shards(tmp_path / "noimages", 3, 4, extra=lambda i, key: {f"{key}.{e}": v for e, v in garbage.items()})
    cases = [
        (f"{tmp_path}/nolabels/shard-{{000000..000002}}.tar", 7, "has no .cls member"),
        (str(tmp_path / "noimages"), None, "shard-00000"),
    ]
    for spec, n_classes, why in cases:
        cfg = data_cfg(spec, "data.workers=0", "data.shuffle_buffer=5")
        s = ShardStream(cfg, 8, 3, 4, 0, 1, 0, num_classes=n_classes)
        error = first_error(s)
        assert error.startswith("no usable sample in any of the 3 shards: 12 bad samples in a row")
        assert why in error
    # Through a loader worker: the same one line.
    cfg = data_cfg(cases[0][0], "data.workers=1", "data.shuffle_buffer=5")
    s = ShardStream(cfg, 8, 3, 4, 0, 1, 0, num_classes=7)
    with pytest.raises(DataError, match=r"^no usable sample in any of the 3 shards: .*has no \.cls member"):
        next(s)
    s.close()


def test_unreadable_everything_is_one_clear_error(tmp_path):
    paths = write_shards(tmp_path, 2, 4, manifest=False)
    for p in paths:
        p.write_bytes(b"\0garbage" * 100)
    (s,) = streams(f"{tmp_path}/shard-{{000000..000001}}.tar", world=1, workers=1, batch=2)
    with pytest.raises(DataError, match="no readable samples in any of the 2 shards"):
        next(s)


class _Canary:
    """Unpickling this creates a file: proof that something decoded a pickle member."""

    path = ""

    def __reduce__(self):
        return (Path(self.path).touch, ())


def test_hostile_members_are_never_decoded_nor_written(tmp_path):
    canary = tmp_path / "canary"
    _Canary.path = str(canary)
    payload = pickle.dumps(_Canary())
    outside = tmp_path.parent / "escaped.png"

    def hostile(i, key):
        return {f"{key}.pyd": payload, f"{key}.pickle": payload, f"{key}.pth": payload, "../escaped.png": b"x",
                "/tmp/abs.png": b"x"}  # fmt: skip

    write_shards(tmp_path / "shards", 2, 4, extra=hostile)
    (s,) = streams(tmp_path / "shards", world=1, workers=1, batch=4)
    keys = keys_of(consume([s], 4))
    assert sorted(set(keys)) == [f"{i:08d}" for i in range(8)]  # every real sample still trains
    assert s.take_stats()["Data/refused_members"] >= 16 * 3
    assert not canary.exists() and not outside.exists()


def test_pipe_urls_need_opt_in(tmp_path):
    (path,) = write_shards(tmp_path, 1, 4, manifest=False)
    canary = tmp_path / "ran"
    spec = f"pipe:touch {canary}; cat {path}"
    with pytest.raises(Exception, match="allow_pipe"):  # config validation refuses it first
        streams(spec, world=1, workers=0, batch=4)
    assert not canary.exists()
    (s,) = streams(spec, 1, 0, 4, 8, "data.allow_pipe=true")
    assert sorted(keys_of(consume([s], 1))) == [f"{i:08d}" for i in range(4)]
    assert canary.exists()


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_streams_over_http_from_a_manifest_and_from_urls(http_root):
    from distgan.data.catalog import UNKNOWN, data_classes

    root, url = http_root
    labelled(root, 4, 4)
    ranks = streams(f"{url}/manifest.json", workers=1, batch=4)
    assert ranks[0].describe().startswith(f"data: 16 samples of 7 classes in 4 shards from {url}")
    assert sorted(keys_of(consume(ranks, 4))) == [f"{i:08d}" for i in range(16)]  # (labels checked)
    brace = f"{url}/shard-{{000000..000003}}.tar"
    assert sorted(keys_of(consume(streams(brace, workers=0, batch=4), 4))) == [f"{i:08d}" for i in range(16)]
    # The classes of remote data, before training: from the remote manifest; unknown for bare URLs.
    assert data_classes(data_cfg(f"{url}/manifest.json")).names == tuple(f"class-{c}" for c in range(7))
    assert data_classes(data_cfg(brace)) is UNKNOWN
    with pytest.raises(DataError, match="1 of 1 shards not found"):
        streams(f"{url}/nope.tar", world=1)


def test_peek_reads_the_first_images_without_moving(tmp_path):
    write_shards(tmp_path, 2, 4)
    (s,) = streams(tmp_path, world=1, workers=0, batch=4)
    grid = s.peek(6)
    assert grid.shape == (6, 3, 8, 8) and grid[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert s.batches == 0


def test_xflip_flips_about_half_deterministically(tmp_path):
    # Images with a left-right gradient: a flip is visible.
    def gradient(i, key):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((torch.arange(8).repeat(8, 1) * 30).byte().numpy()).convert("RGB").save(buf, "PNG")
        return {f"{key}.png": buf.getvalue()}

    write_shards(tmp_path, 2, 16, extra=gradient)
    flipped = []
    for _ in range(2):
        (s,) = streams(tmp_path, 1, 0, 32, 8, "data.xflip=true")
        flipped.append((next(s).images[:, 0, 0, 0] > 0).tolist())
    assert flipped[0] == flipped[1] and 8 <= sum(flipped[0]) <= 24


def test_tar_reader_detects_truncation_and_corrupt_headers(tmp_path):
    from distgan.data import shards as sh

    (path,) = write_shards(tmp_path, 1, 4, manifest=False)
    whole = path.read_bytes()

    def read(data):
        return [r.key for r in sh.iter_records(io.BytesIO(data))]

    assert read(whole) == [f"{i:08d}" for i in range(4)]
    assert tarfile.open(path).getnames() == [f"{i:08d}.png" for i in range(4)]  # the standard reader agrees
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        read(whole[:520])  # cut inside the first member's data
    flipped = bytearray(whole)
    flipped[3] ^= 0x20  # a byte of the first member's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        read(bytes(flipped))
    # Cut at a member boundary: the stream just ends (only a manifest's count can tell).
    first = 512 + (len(whole_member := whole[512 : 512 + int(whole[124:135], 8)]) + 511) // 512 * 512
    assert len(whole_member) > 0 and read(whole[:first]) == ["00000000"]


def test_long_member_names_and_pax_headers_are_read(tmp_path):
    from distgan.data import shards as sh

    long_key = "d" * 120 + "/00000001"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in (f"{long_key}.png", f"{long_key}.cls", "dir/ünïcode.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    records = list(sh.iter_records(io.BytesIO(buf.getvalue())))
    assert [(r.key, sorted(r)) for r in records] == [(long_key, ["cls", "png"]), ("dir/ünïcode", ["png"])]
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(f"{long_key}.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert [r.key for r in sh.iter_records(io.BytesIO(gnu.getvalue()))] == [long_key]


def test_prepared_shards_are_plain_webdataset(tmp_path):
    # The shards `distgan prepare` writes are ordinary WebDataset: its own reader gets the same samples.
    import webdataset as wds

    from distgan.data import prepare

    assert prepare.main(["shapes", "--out", str(tmp_path), "--num", "40", "--shard-samples", "16", "--size", "8"]) == 0
    ds = wds.WebDataset(f"{tmp_path}/shard-{{000000..000002}}.tar", shardshuffle=False).decode("rgb8")
    theirs = {s["__key__"]: s["png"] for s in ds}
    their_labels = {s["__key__"]: s["cls"] for s in ds}
    (ours,) = streams(tmp_path, world=1, workers=0, batch=40, res=8)
    batch = next(ours)
    assert sorted(theirs) == sorted(ours.last_keys) and len(theirs) == 40
    for key, image, label in zip(ours.last_keys, batch.images, batch.labels.tolist()):
        assert torch.equal(torch.tensor(theirs[key]).permute(2, 0, 1), image)
        assert label == their_labels[key]  # WebDataset's own .cls decoder reads the same class


EXIT_WITH_A_LIVE_WORKER = """
from distgan.config import load_config
from distgan.data.position import segment_size
from distgan.data.stream import ShardStream
cfg = load_config(None, ["data.source=shards", "data.shards={folder}", "data.workers=1"]).data
stream = ShardStream(cfg, 8, 3, 4, 0, 1, 0)
next(stream)  # a loader worker is running; the stream is never closed
print("exiting", flush=True)
"""


def test_a_process_exits_promptly_with_an_unclosed_stream(tmp_path):
    # Loader workers ignore SIGTERM (a scheduler's signal is for their rank), so Python's exit-time terminate()
    # cannot end them; without distgan's exit hook this process never exits (it hung CI once).
    import subprocess
    import sys

    write_shards(tmp_path, 2, 8)
    code = EXIT_WITH_A_LIVE_WORKER.format(folder=tmp_path)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=patience(60))
    assert p.returncode == 0 and "exiting" in p.stdout, p.stderr[-2000:]


def test_the_decoder_is_imported_before_loader_workers_fork(tmp_path):
    # Imported first in a forked worker after wandb.init, torchvision.io ran W&B's import hook there, which raises:
    # every resumed W&B run counted its workers' first samples bad. Control: importing the stream does not import it.
    import subprocess
    import sys

    write_shards(tmp_path, 2, 4)
    code = (
        "import sys; from distgan.config import load_config; from distgan.data.stream import ShardStream; "
        "before = 'torchvision.io' in sys.modules; "
        f"cfg = load_config(None, ['data.source=shards', 'data.shards={tmp_path}']).data; "
        "ShardStream(cfg, 8, 3, 4, 0, 1, 0); print(before, 'torchvision.io' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
