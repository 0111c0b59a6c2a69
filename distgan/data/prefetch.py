"""A device prefetcher: the next batch is already on the device when the trainer asks for it.

Prefetcher(stream, device) wraps a batch stream (ShardStream, ArrayStream) and offers the same interface. It
holds the NEXT batch, already pulled from the stream and, on CUDA, already being copied to the device on a side
CUDA stream (non_blocking, from the pinned batches make_stream(..., device) asks for), so that the copy of batch
k+1 overlaps training step k instead of stalling it. A batch is a Batch (batch.py): its images and its labels
(when the data has classes) are copied together, on the same side stream, so a label never arrives without its
image. next() makes the current CUDA stream wait for the copy and tells the caching allocator that the current
stream uses each of the batch's tensors (record_stream: else their memory could be handed to the side stream's
next copy while the step still reads it), returns the Batch on the device, and pulls and starts copying the one
after. On CPU the same code runs, the copy a no-op (.to(cpu) returns the same tensor)
and the side stream absent, so the CPU tests exercise the GPU path's logic.

Exactness. A checkpoint records state_dict(). With one batch pulled ahead, the wrapped stream has moved past a
batch that was never trained on; so state_dict() is the wrapped stream's state from just BEFORE that batch was
pulled (a deep copy taken then), and a resumed run re-reads it. load_state_dict() and close() drop the batch
pulled ahead and put the wrapped stream back where the handed-out batches end. What belongs to a batch follows
it: take_stats() counts the data faults of batches handed out (the wrapped stream's counts are collected right
before each pull, when they are those of batches already handed out), last_keys names the samples of the batch
last handed out, bad_shards lists the shards with faults seen up to it.

Laziness. Nothing is pulled before the first next(): constructing a prefetcher starts no loader worker, and
a checkpoint can be loaded into it first. peek() reads through to the wrapped stream, which does not move. An
error pulling the batch ahead (a DataError: every shard unreadable) is raised by the next() that would have
returned that batch, not one batch early.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from distgan.data.batch import Batch


class Prefetcher:
    """A batch stream whose next batch is pulled, and copied to `device`, one step ahead."""

    def __init__(self, stream, device):
        self.stream = stream
        self.device = torch.device(device)
        self.last_keys: list[str] = []
        self._side = None  # the side CUDA stream, made at the first pull (on CPU: none)
        self._ahead = None  # the batch pulled ahead (on the device), or None
        self._ahead_keys: list[str] = []
        self._error: Exception | None = None  # raised pulling the batch ahead: the next next() raises it
        self._state: dict | None = None  # the wrapped stream's state before the batch ahead was pulled
        self._bad_shards: list[str] | None = None  # the wrapped stream's bad shards before that pull
        self._stats: dict[str, float] = {}  # fault counts of handed-out batches not yet taken

    # ------------------------------------------------------------------ the batches
    def __iter__(self):
        return self

    def __next__(self):
        if self._ahead is None and self._error is None:
            self._pull()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        batch, self._ahead = self._ahead, None
        if self._side is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._side)
            _record_stream(batch, current)
        self.last_keys = self._ahead_keys
        self._pull()
        return batch

    def _pull(self) -> None:
        """Pull the next batch and start its copy to the device; first note what the handed-out batches were."""
        self._add(self.stream.take_stats())
        self._state = copy.deepcopy(self.stream.state_dict())
        self._bad_shards = list(self.stream.bad_shards) if hasattr(self.stream, "bad_shards") else None
        try:
            host = next(self.stream)
        except Exception as e:  # noqa: BLE001 (kept for the next() that would have returned this batch)
            self._error = e
            return
        self._ahead_keys = list(getattr(self.stream, "last_keys", []))
        if self.device.type == "cuda" and self._side is None:
            self._side = torch.cuda.Stream(device=self.device)
        context = torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext()
        with context:
            self._ahead = _to(host, self.device)

    def _drop_ahead(self) -> None:
        """Forget the batch pulled ahead and rewind the wrapped stream to just before it (its fault counts go:
        the rewound stream re-reads that batch and counts them again)."""
        if self._ahead is None and self._error is None:
            return
        self.stream.take_stats()
        self.stream.load_state_dict(self._state)
        self._ahead, self._error, self._ahead_keys = None, None, []

    # ------------------------------------------------------------------ the stream interface
    def peek(self, n: int):
        return self.stream.peek(n)

    def take_stats(self) -> dict[str, float]:
        """Data-fault counts of the batches handed out since the last call (not of the batch pulled ahead)."""
        if self._ahead is None and self._error is None:  # nothing pulled ahead: the stream's counts are all ours
            self._add(self.stream.take_stats())
        out = self._stats
        self._stats = {k: 0 for k in out}  # the same names every time (ranks report them to one reduce)
        return out

    @property
    def bad_shards(self) -> list[str]:
        if self._bad_shards is None or (self._ahead is None and self._error is None):
            return list(getattr(self.stream, "bad_shards", []))
        return self._bad_shards

    def state_dict(self) -> dict:
        """Where the handed-out batches end: a stream loaded with it yields next the batch pulled ahead."""
        if self._ahead is None and self._error is None:
            return self.stream.state_dict()
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict, *position) -> None:
        """`position`: a shard stream's global position, for a resume on another ranks x workers (stream.py)."""
        self._drop_ahead()
        self.stream.load_state_dict(state, *position)

    def close(self) -> None:
        """Drop the batch pulled ahead (the stream rewound to the handed-out batches) and close the wrapped
        stream (its loader workers end)."""
        self._drop_ahead()
        self.stream.close()

    def __getattr__(self, name: str):
        # describe() (ShardStream only: hasattr() must stay False for a stream without it), and its elastic
        # global_position and resumed_from (position-free: they read what they are given). Nothing else is
        # forwarded: the wrapped stream's own position attributes are one batch ahead of what was handed out.
        if name in ("describe", "global_position", "resumed_from") and "stream" in self.__dict__:
            return getattr(self.__dict__["stream"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self._stats[k] = self._stats.get(k, 0) + v


def _to(batch, device: torch.device):
    """The batch on `device`: a Batch (images and labels), a tensor, or tuples/lists/dicts of them."""
    if isinstance(batch, (Batch, torch.Tensor)):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _record_stream(batch, stream) -> None:
    if isinstance(batch, Batch):
        _record_stream(batch.images, stream)
        _record_stream(batch.labels, stream)
    elif isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, (tuple, list)):
        for b in batch:
            _record_stream(b, stream)
    elif isinstance(batch, dict):
        for b in batch.values():
            _record_stream(b, stream)
