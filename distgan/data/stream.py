"""The shard streamer: every rank and loader worker reads its own endless, deterministic share of the shards.

How the shards are shared. Epoch e visits all S shards in an order drawn from (seed, e). Concatenating the
epochs gives one endless global sequence of shard visits; with R ranks of W loader workers there are R*W slots,
and slot s = rank*W + worker takes visits s, s + R*W, s + 2*R*W, ... of it. So

  * no slot ever runs dry: every rank yields a batch whenever the trainer asks, whatever S is. (WebDataset's
    split_by_node/split_by_worker on 7 shards and 2x2 slots gives the ranks 14 and 11 batches, and DDP then
    waits forever for the rank that stopped.) Over R*W epochs every shard is visited equally often;
  * when S divides by R*W, each slot's share of epoch e is exactly S/(R*W) shards of epoch e, and the first
    N samples all ranks consume are every sample once (N = the dataset's size, shards of equal size).

Shuffling. Each slot collects its records in blocks of `shuffle_buffer` (a block never spans two epochs) and
yields a block in an order drawn from (seed, slot, block number), flipping images left-right from the same draw
when x-flips are on. Records are kept as undecoded bytes until yielded.

Position. A slot's place is (j, off, b, t): block b starts at record `off` of the slot's j-th shard visit and t
of its records have been yielded. Each batch carries its slot's place after its last sample; the rank's stream
keeps the place of the last batch it actually consumed from each worker, plus the number of batches consumed,
which says which worker the next batch must come from (the DataLoader takes workers in turn). A resumed stream
starts every worker at its place: it re-reads at most one block per worker and yields exactly the samples the
uninterrupted run would have, on the same ranks x workers. A manifest's sample counts let it skip to shard j
without opening the ones before.

Faults. A sample that does not decode is skipped and counted; a shard that cannot be opened or breaks mid-way is
skipped from that point (its unread samples counted as bad, from the manifest when known) and its name kept.
Counts travel with the batches; the trainer sums them over ranks and stops the run past data.max_bad_fraction.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 (see _kill_leftover_workers)
import tarfile
from collections.abc import Iterator

import numpy as np
import torch

from distgan.data import shards as sh
from distgan.errors import DataError


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class SlotReader:
    """The endless record sequence of one slot, read in shuffled blocks, from any saved place."""

    def __init__(self, shard_list: sh.ShardList, slot: int, n_slots: int, seed: int, block: int, allow_pipe: bool):
        self.urls, self.counts = shard_list.urls, shard_list.counts
        self.slot, self.n_slots, self.seed, self.block = slot, n_slots, seed, max(1, block)
        self.allow_pipe = allow_pipe
        self._perms: dict[int, np.ndarray] = {}
        self._open: tuple[int, int, Iterator] | None = None  # (j, records read, iterator) of the open shard
        self.stats = {"samples": 0, "bad": 0, "refused": 0}
        self.bad_shards: set[str] = set()

    def visit(self, j: int) -> tuple[int, int]:
        """(epoch, shard index) of this slot's j-th shard visit."""
        g = self.slot + j * self.n_slots
        epoch, i = divmod(g, len(self.urls))
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = _rng(self.seed, epoch, 0xD47A).permutation(len(self.urls))
        return epoch, int(self._perms[epoch][i])

    # ------------------------------------------------------------------ reading records
    def _records_of(self, j: int, off: int) -> Iterator[sh.Record]:
        """Records of visit j from record `off` on; faults end the iterator after being counted."""
        if self._open is not None and self._open[0] == j and self._open[1] == off:
            it = self._open[2]
        else:
            it = self._fresh(j, off)
        self._open = (j, off, it)
        return it

    def _fresh(self, j: int, off: int) -> Iterator[sh.Record]:
        _, index = self.visit(j)
        url = self.urls[index]
        known = self.counts[index] if self.counts is not None else None
        read = 0
        try:
            if known is not None and off >= known:
                return
            with sh.open_shard(url, self.allow_pipe) as f:
                for record in sh.iter_records(f):
                    if read >= off:
                        record.url = url
                        yield record
                    read += 1
        except (OSError, tarfile.TarError, ValueError, EOFError) as e:
            self._lost(url, max(known - read, 1) if known is not None else 1, type(e).__name__)
            return
        if known is not None and read < known:  # a tar cut at a member boundary just ends: only counts tell
            self._lost(url, known - read, f"truncated: {read} of {known} samples")

    def _lost(self, url: str, n: int, why: str) -> None:
        self.stats["samples"] += n
        self.stats["bad"] += n
        self.bad_shards.add(f"{sh.shard_name(url)} ({why})")

    def _collect(self, j: int, off: int) -> tuple[list[sh.Record], int, int]:
        """One block from (j, off): up to `block` records of one epoch. Returns (records, next j, next off)."""
        epoch = self.visit(j)[0]
        records: list[sh.Record] = []
        empty_visits = 0
        while len(records) < self.block:
            n_before = len(records)
            for record in self._records_of(j, off):
                records.append(record)
                off += 1
                self._open = (j, off, self._open[2])
                if len(records) == self.block:
                    return records, j, off
            empty_visits = empty_visits + 1 if len(records) == n_before else 0
            if empty_visits >= len(self.urls):
                raise DataError(f"no readable samples in any of the {len(self.urls)} shards: {self._bad_list()}")
            j, off = j + 1, 0
            if self.visit(j)[0] != epoch:
                break
        return records, j, off

    def _bad_list(self) -> str:
        return ", ".join(sorted(self.bad_shards)[:5]) or "(all empty)"

    def samples(self, place: dict | None, resolution: int, channels: int, xflip: bool):
        """Yields (key, image uint8 [C, R, R], place after it) forever, starting from `place`."""
        p = dict(place or {"j": 0, "off": 0, "b": 0, "t": 0})
        j, off, b, t = p["j"], p["off"], p["b"], p["t"]
        while True:
            records, next_j, next_off = self._collect(j, off)
            g = _rng(self.seed, self.slot, b, 0xB10C)
            order = g.permutation(len(records))
            flips = g.random(len(records)) < 0.5
            for idx in range(t, len(records)):
                record = records[order[idx]]
                self.stats["samples"] += 1
                self.stats["refused"] += record.refused
                try:
                    image = sh.decode_image(record, resolution, channels)
                except Exception as e:  # noqa: BLE001 (any decoder failure is a bad sample, never a crash)
                    self.stats["bad"] += 1
                    self.bad_shards.add(f"{sh.shard_name(record.url)} ({type(e).__name__} in {record.key})")
                    continue
                if xflip and flips[idx]:
                    image = image[:, :, ::-1]
                yield record.key, image, {"j": j, "off": off, "b": b, "t": idx + 1}
            j, off, b, t = next_j, next_off, b + 1, 0

    def take_stats(self) -> tuple[dict[str, int], list[str]]:
        stats, bad = self.stats, sorted(self.bad_shards)
        self.stats = {k: 0 for k in stats}
        self.bad_shards = set()
        return stats, bad


class _Batches(torch.utils.data.IterableDataset):
    """What each loader worker runs: its slot's samples, in batches that carry their place and fault counts."""

    def __init__(self, shard_list, rank, world_size, n_workers, batch, resolution, channels, data_cfg, seed):
        self.shard_list, self.rank, self.world_size, self.n_workers = shard_list, rank, world_size, n_workers
        self.batch, self.resolution, self.channels, self.seed = batch, resolution, channels, seed
        self.block, self.xflip, self.allow_pipe = data_cfg.shuffle_buffer, data_cfg.xflip, data_cfg.allow_pipe
        self.rotation = 0  # loader worker i serves logical worker (i + rotation) % n_workers
        self.places: list[dict | None] = [None] * n_workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        w = ((info.id if info else 0) + self.rotation) % self.n_workers
        reader = SlotReader(
            self.shard_list,
            self.rank * self.n_workers + w,
            self.world_size * self.n_workers,
            self.seed,
            self.block,
            self.allow_pipe,
        )
        images = np.empty((self.batch, self.channels, self.resolution, self.resolution), np.uint8)
        keys: list[str] = []
        for key, image, place in reader.samples(self.places[w], self.resolution, self.channels, self.xflip):
            images[len(keys)] = image
            keys.append(key)
            if len(keys) == self.batch:
                stats, bad = reader.take_stats()
                yield {"images": torch.from_numpy(images.copy()), "keys": keys, "worker": w, "place": place,
                       "stats": stats, "bad_shards": bad}  # fmt: skip
                keys = []


class ShardStream:
    """A rank's endless batches from WebDataset shards: uint8 [B_local, C, R, R], resumable, fault-counting."""

    def __init__(self, data_cfg, resolution: int, channels: int, batch: int, rank: int, world_size: int, seed: int):
        shard_list = sh.resolve(data_cfg.shards, data_cfg.allow_pipe)
        m = shard_list.manifest
        if m is not None and (m["resolution"], m["channels"]) != (resolution, channels):
            raise DataError(
                f"{data_cfg.shards} holds {m['resolution']}x{m['resolution']}x{m['channels']} images but the model is "
                f"{resolution}x{resolution}x{channels}; set model.resolution/model.channels to match, or re-run "
                f"`distgan prepare` with --size {resolution}"
            )
        if len(shard_list.urls) < world_size:
            raise DataError(
                f"{len(shard_list.urls)} shard(s) for {world_size} ranks: a rank would get no data; "
                "prepare more, smaller shards (distgan prepare --shard-samples N)"
            )
        sh.check_available(shard_list.urls)
        self.shard_list = shard_list
        self.rank, self.world_size = rank, world_size
        # Loader workers per rank; never more slots than shards (a slot's epoch share would be empty).
        self.requested_workers = data_cfg.workers
        self.loader_workers = min(data_cfg.workers, len(shard_list.urls) // world_size)
        n_logical = max(self.loader_workers, 1)
        self.dataset = _Batches(
            shard_list, rank, world_size, n_logical, batch // world_size, resolution, channels, data_cfg, seed
        )
        self.batches = 0  # batches this rank has consumed
        self.last_keys: list[str] = []
        self._stats = {"samples": 0, "bad": 0, "refused": 0}
        self._bad_shards: set[str] = set()
        self._it = None

    def describe(self) -> str:
        src = self.shard_list.manifest["root"] if self.shard_list.manifest else f"{len(self.shard_list.urls)} URLs"
        n = self.shard_list.num_samples
        note = ""
        if self.loader_workers < self.requested_workers:
            note = f" (data.workers={self.requested_workers} lowered: {len(self.shard_list.urls)} shards)"
        size = f"{n} samples in " if n is not None else ""
        workers = f"{self.loader_workers} loader worker{'' if self.loader_workers == 1 else 's'} per rank{note}"
        return f"data: {size}{len(self.shard_list.urls)} shards from {src}, {workers}"

    def __iter__(self):
        return self

    def _start(self) -> None:
        n = self.dataset.n_workers
        self.dataset.rotation = self.batches % n
        if self.loader_workers == 0:
            self._it = iter(self.dataset)
            return
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.loader_workers,
            prefetch_factor=4,
            persistent_workers=False,
            worker_init_fn=_die_with_rank,
        )
        self._it = iter(loader)
        _workers[:] = [w for w in _workers if w.is_alive()] + list(getattr(self._it, "_workers", []))

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except DataError:
            raise
        except Exception as e:
            raise _unwrap_worker_error(e) from None
        self.dataset.places[batch["worker"]] = batch["place"]
        self.batches += 1
        for k, v in batch["stats"].items():
            self._stats[k] += v
        self._bad_shards.update(batch["bad_shards"])
        self.last_keys = batch["keys"]
        return batch["images"]

    def take_stats(self) -> dict[str, float]:
        """Fault counts since the last call (the trainer sums them over ranks)."""
        out = {"Data/samples": self._stats["samples"], "Data/bad": self._stats["bad"]}
        out["Data/refused_members"] = self._stats["refused"]
        self._stats = {k: 0 for k in self._stats}
        return out

    @property
    def bad_shards(self) -> list[str]:
        return sorted(self._bad_shards)

    def peek(self, n: int) -> torch.Tensor | None:
        """Up to n images from the start of the first shard, for a grid of reals (the stream does not move)."""
        out = []
        for url in self.shard_list.urls[:4]:
            try:
                with sh.open_shard(url, self.dataset.allow_pipe) as f:
                    for record in sh.iter_records(f):
                        try:
                            out.append(sh.decode_image(record, self.dataset.resolution, self.dataset.channels))
                        except Exception:  # noqa: BLE001, S112 (a grid of reals skips what does not decode)
                            continue
                        if len(out) == n:
                            return _stack(out)
            except (OSError, tarfile.TarError):
                continue
        return _stack(out) if out else None

    def state_dict(self) -> dict:
        return {
            "kind": "shards",
            "batches": self.batches,
            "world_size": self.world_size,
            "workers": self.dataset.n_workers,
            "places": list(self.dataset.places),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "shards":
            raise DataError("the checkpoint's data position is not from a shard stream (data.source changed)")
        saved = (state["world_size"], state["workers"])
        if saved != (self.world_size, self.dataset.n_workers):
            raise DataError(
                f"the checkpoint's data position is for {saved[0]} ranks x {saved[1]} loader workers, this run has "
                f"{self.world_size} x {self.dataset.n_workers}; resume with the same world size and data.workers"
            )
        self.close()
        self.batches = int(state["batches"])
        self.dataset.places = list(state["places"])

    def close(self) -> None:
        self._it = None  # a DataLoader iterator shuts its workers down when released


# Loader workers ignore SIGTERM (below), so multiprocessing's exit-time terminate() + join() of daemon processes
# would wait forever on one still running at exit (a stream never closed, an iterator kept by a traceback). This
# hook kills them first: atexit runs hooks last-registered-first, and multiprocessing.util (imported above)
# registered its own before this one.
_workers: list = []


@atexit.register
def _kill_leftover_workers() -> None:
    for w in _workers:
        if w.is_alive():
            w.kill()
            w.join(5)


def _die_with_rank(worker_id: int) -> None:
    """Loader workers leave stopping to their rank, and die with it.

    Stop signals: a scheduler's SIGTERM or SIGUSR1 often reaches every process of the job, workers included. A worker
    killed by it makes the rank fail ("DataLoader worker killed by signal") before it can save; so workers ignore
    them, the rank saves and then shuts its workers down. Death (Linux): a SIGKILLed rank's workers would otherwise
    live on for ~5 s holding the rank's inherited sockets, so its peers notice late and a restart finds stragglers.
    """
    import ctypes
    import os
    import signal

    from distgan.watchdog import STOP_SIGNALS

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: torch's own parent check still ends the worker
        return
    if os.getppid() == 1:  # the rank died before prctl took effect
        os._exit(0)


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images))


def _unwrap_worker_error(e: Exception) -> Exception:
    """A DataError raised in a loader worker reaches us wrapped with its traceback; give back its one line."""
    text = str(e)
    marker = "distgan.errors.DataError: "
    if marker in text:
        return DataError(text.rsplit(marker, 1)[1].strip().splitlines()[0])
    return e
