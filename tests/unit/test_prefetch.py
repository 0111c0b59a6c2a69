"""The device prefetcher (distgan/data/prefetch.py): the same batches as the stream it wraps, one pulled ahead, and
nothing of that batch leaks into what a checkpoint records (position), what the trainer logs (fault counts) or
names (keys, bad shards). On CPU the copy to the device is a no-op, but the code path is the CUDA one.

Shards come from support.write_shards: sample id = key, every pixel = id % 256, class (KEY.cls) = id % 7; the
array stream's images are their ids, labels id % 7. take() checks that each label arrives with its own image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distgan.config import load_config
from distgan.data import ArrayStream, make_stream
from distgan.data.batch import Batch
from distgan.data.prefetch import Prefetcher
from distgan.data.stream import ShardStream
from distgan.errors import DataError
from support import write_shards

CPU = torch.device("cpu")


def ids(n=10):
    return np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)


def array_stream():
    # 2 per rank: 5 batches per epoch
    return ArrayStream(ids(), batch=4, rank=1, world_size=2, seed=5, labels=np.arange(10) % 7)


def shard_stream(folder, workers, world=1, rank=0, *overrides):
    cfg = load_config(
        None, ["data.source=shards", f"data.shards={folder}", f"data.workers={workers}", "data.shuffle_buffer=5",
               *overrides]
    ).data  # fmt: skip
    return ShardStream(cfg, 8, 3, 4 * world, rank, world, 0)


def take(stream, n):
    """The images of n batches, as lists of pixels (= ids); each batch's labels checked to be its images'."""
    out = []
    for _ in range(n):
        batch = next(stream)
        assert isinstance(batch, Batch)
        assert batch.labels.tolist() == [i % 7 for i in batch.images[:, 0, 0, 0].tolist()]
        out.append(batch.images.flatten().tolist())
    return out


@pytest.fixture
def shards(tmp_path):
    write_shards(tmp_path, 4, 6, label=lambda i: i % 7, num_classes=7)  # 24 samples, 6 batches of 4 per epoch
    return tmp_path


def make(kind, folder):
    """A fresh stream of the given kind: ("array",), ("shards", workers)."""
    if kind == "array":
        return array_stream()
    return shard_stream(folder, int(kind[-1]))


KINDS = ["array", "shards0", "shards1"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_prefetcher_yields_the_streams_batches(shards, kind):
    raw = make(kind, shards)
    expected = take(raw, 9)  # more than an epoch
    p = Prefetcher(make(kind, shards), CPU)
    got = []
    for _ in range(9):
        batch = next(p)
        assert batch.images.dtype == torch.uint8 and batch.images.device == CPU and batch.labels.device == CPU
        assert batch.labels.tolist() == [int(i) % 7 for i in batch.images[:, 0, 0, 0]]  # each label with its image
        got.append(batch.images.flatten().tolist())
        if kind != "array":  # the keys of the batch handed out, not of the one pulled ahead
            assert [int(k) % 256 for k in p.last_keys] == batch.images[:, 0, 0, 0].tolist()
            assert [int(k) % 7 for k in p.last_keys] == batch.labels.tolist()
    assert got == expected
    raw.close()
    p.close()


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_the_prefetchers_state_rereads_the_batch_pulled_ahead(shards, kind):
    straight = take(make(kind, shards), 10)
    k = 7  # mid-epoch in the second epoch (an odd count: the worker rotation matters with workers)
    p = Prefetcher(make(kind, shards), CPU)
    first = take(p, k)
    state = p.state_dict()
    raw_state = p.stream.state_dict()  # the wrapped stream at the same moment: one batch further
    p.close()

    resumed = Prefetcher(make(kind, shards), CPU)
    resumed.load_state_dict(state)
    assert first + take(resumed, 10 - k) == straight
    resumed.close()

    # Control: the wrapped stream's own state skips the batch that was pulled ahead but never handed out.
    control = Prefetcher(make(kind, shards), CPU)
    control.load_state_dict(raw_state)
    skipped = take(control, 10 - k - 1)
    assert skipped == straight[k + 1 :] and first + skipped != straight
    control.close()


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_is_pulled_before_the_first_batch_and_peek_moves_nothing(shards, kind):
    p = Prefetcher(make(kind, shards), CPU)
    before = p.state_dict()
    grid = p.peek(3)
    assert grid.shape[0] == 3 and p.state_dict() == before == p.stream.state_dict()
    if kind != "array":
        assert p.stream._it is None  # no loader worker started yet
        assert p.describe().startswith("data: 24 samples of 7 classes in 4 shards")
    else:
        assert not hasattr(p, "describe")  # only what the wrapped stream has (train.py checks with hasattr)
    # A checkpoint loaded before the first batch: the prefetcher starts from it.
    raw = make(kind, shards)
    take(raw, 3)
    p.load_state_dict(raw.state_dict())
    assert take(p, 2) == take(raw, 2)
    raw.close()
    p.close()


def test_close_ends_loader_workers_and_rewinds_to_the_handed_out_batches(shards):
    straight = take(shard_stream(shards, 1), 6)
    p = Prefetcher(shard_stream(shards, 1), CPU)
    first = take(p, 3)
    workers = list(p.stream._it._workers)
    assert workers and all(w.is_alive() for w in workers)
    p.close()
    for w in workers:
        w.join(10)
    assert not any(w.is_alive() for w in workers)
    assert p.state_dict() == p.stream.state_dict() and p.state_dict()["batches"] == 3
    assert first + take(p, 3) == straight  # a closed stream that is used again goes on where it was handed out
    p.close()


def test_fault_counts_keys_and_bad_shards_are_of_handed_out_batches_only(tmp_path):
    bad = {"00000005", "00000006", "00000014"}

    def corrupt(i, key):
        return {f"{key}.png": b"not a png"} if key in bad else None

    write_shards(tmp_path, 4, 6, extra=corrupt)
    raw = shard_stream(tmp_path, 0)
    per_batch, keys, bad_after = [], [], []
    for _ in range(8):
        next(raw)
        per_batch.append(raw.take_stats())
        keys.append(raw.last_keys)
        bad_after.append(raw.bad_shards)
    assert sum(s["Data/bad"] for s in per_batch) >= 3  # the test means something: faults within the 8 batches
    assert per_batch[1:] != per_batch[:-1]  # ... and the counts differ from batch to batch

    p = Prefetcher(shard_stream(tmp_path, 0), CPU)
    assert p.take_stats() == {"Data/samples": 0, "Data/bad": 0, "Data/refused_members": 0}
    for i in range(8):
        next(p)
        assert p.take_stats() == per_batch[i]
        assert p.last_keys == keys[i]
        assert p.bad_shards == bad_after[i]
    p.close()

    # Two batches between takes: their counts add up; the batch pulled ahead is never in them.
    p = Prefetcher(shard_stream(tmp_path, 0), CPU)
    next(p)
    next(p)
    both = p.take_stats()
    assert both == {k: per_batch[0][k] + per_batch[1][k] for k in both}
    p.close()


def test_load_state_dict_drops_the_batch_pulled_ahead_and_its_counts(tmp_path):
    def corrupt(i, key):
        return {f"{key}.png": b"not a png"} if i == 1 else None  # shard 1 is all bad

    write_shards(tmp_path, 4, 6, extra=corrupt, label=lambda i: i % 7, num_classes=7)
    raw = shard_stream(tmp_path, 0)
    for _ in range(3):
        next(raw)
    state = raw.state_dict()
    p = Prefetcher(shard_stream(tmp_path, 0), CPU)
    for _ in range(2):
        next(p)
    p.take_stats()
    p.load_state_dict(state)  # the batch pulled ahead (the third) is dropped, counts and all
    straight = shard_stream(tmp_path, 0)
    for _ in range(3):
        next(straight)
    straight.take_stats()
    for _ in range(3):
        a, b = next(p), next(straight)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert p.take_stats() == straight.take_stats()


def test_the_loaders_pin_thread_pins_images_and_labels(monkeypatch):
    # With loader workers and CUDA, the DataLoader's pin thread pins what a worker yields: the item dict, and in it
    # the Batch, through Batch.pin_memory. Without CUDA nothing can be pinned, so count what would be.
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kw: pinned.append(self) or self.clone())
    images, labels = torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([3, 1])
    item = {"batch": Batch(images, labels), "keys": ["a", "b"], "worker": 0, "stats": {"bad": 0}}
    out = pin_memory(item)
    assert isinstance(out["batch"], Batch) and out["keys"] == ["a", "b"]
    assert len(pinned) == 2 and {id(t) for t in pinned} == {id(images), id(labels)}
    assert torch.equal(out["batch"].labels, labels) and out["batch"].labels is not labels  # the pinned copies


class _Failing:
    """A stream whose third batch fails."""

    def __init__(self):
        self.n = 0

    def __next__(self):
        self.n += 1
        if self.n == 3:
            raise DataError("no readable samples in any of the 2 shards")
        return Batch(torch.full((2, 1, 1, 1), self.n, dtype=torch.uint8))

    def take_stats(self):
        return {}

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_an_error_pulling_ahead_is_raised_by_the_batch_it_belongs_to():
    p = Prefetcher(_Failing(), CPU)
    assert next(p).images[0, 0, 0, 0] == 1
    first = next(p)
    assert first.images[0, 0, 0, 0] == 2 and first.labels is None  # the third pull failed meanwhile: not raised
    assert p.state_dict() == {"n": 2}
    with pytest.raises(DataError, match="no readable samples"):
        next(p)


def test_make_stream_pins_only_for_cuda(shards):
    cfg = load_config(None, ["data.source=shards", f"data.shards={shards}", "model.resolution=8"])
    assert make_stream(cfg, 0, 1).pin_memory is False
    assert make_stream(cfg, 0, 1, device=CPU).pin_memory is False
    # For CUDA it asks to pin (which needs CUDA to happen: without it the flag does nothing).
    assert make_stream(cfg, 0, 1, device=torch.device("cuda")).pin_memory == torch.cuda.is_available()
    shapes = load_config(None, ["data.source=shapes", "data.num_images=16", "model.resolution=8"])
    assert make_stream(shapes, 0, 1, device="cuda").pin_memory == torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_on_cuda_the_batches_arrive_on_the_device_unchanged(shards, kind):
    cfg = load_config(
        None, ["data.source=shards", f"data.shards={shards}", "data.workers=" + kind[-1], "data.shuffle_buffer=5",
               "model.resolution=8", "train.batch=4", "train.seed=0"] if kind != "array" else
        ["data.source=shapes", "data.num_images=40", "model.resolution=8", "train.batch=4"]
    )  # fmt: skip
    cuda = torch.device("cuda")

    def host(batch):
        return batch.images.cpu().flatten().tolist(), batch.labels.cpu().tolist()

    raw = make_stream(cfg, 0, 1)
    expected = [host(next(raw)) for _ in range(8)]
    stream = make_stream(cfg, 0, 1, device=cuda)
    assert stream.pin_memory
    p = Prefetcher(stream, cuda)
    got = []
    for _ in range(5):
        batch = next(p)
        assert batch.images.is_cuda and batch.labels.is_cuda
        images = batch.images.float().mul(2).div(2).to(torch.uint8)  # used on the current stream
        got.append((images.cpu().flatten().tolist(), (batch.labels + 0).cpu().tolist()))
    state = p.state_dict()
    p.close()
    resumed = Prefetcher(make_stream(cfg, 0, 1, device=cuda), cuda)
    resumed.load_state_dict(state)
    got += [host(next(resumed)) for _ in range(3)]
    resumed.close()
    raw.close()
    assert got == expected
