"""The shard streamer: every rank and loader worker reads its own endless, deterministic share of the shards.

next(stream) is a Batch (data/batch.py): images uint8 [B_local, C, R, R] and, when the shards have classes,
labels int64 [B_local] (else None). A sample's label is read from its own record (KEY.cls) in the same step as
its image and written into the same slot of the batch, so labels follow their images through shuffling, flips,
workers, ranks and resumes with nothing to keep in step.

How the shards are shared. Epoch e visits all S shards in an order drawn from (seed, e). Concatenating the
epochs gives one endless global sequence of shard visits; with R ranks of W loader workers there are N = R*W
slots (W counts as 1 with data.workers=0), and slot s = rank*W + worker takes visits s, s + N, s + 2N, ... of it.
So

  * no slot ever runs dry: every rank yields a batch whenever the trainer asks, whatever S is, fewer shards
    than ranks included (with S < N, consecutive slots simply read shards of later epochs' orders). WebDataset's
    split_by_node/split_by_worker on 7 shards and 2x2 slots gives the ranks 14 and 11 batches, and DDP then
    waits forever for the rank that stopped; and capping the workers at S/R, or refusing S < R, would leave
    ranks idle that the data could feed;
  * a round is N epochs of visits (N*S visits): in it every slot makes exactly S visits and every shard is
    visited exactly N times. Slots consume samples at the same pace (one batch per rank per step, the workers
    in turn), so with shards of equal size every sample is seen exactly N times per round, whatever S is;
  * when S divides by N, each slot's share of epoch e is exactly S/N shards of epoch e, and the first
    D samples all ranks consume are every sample once (D = the dataset's size, shards of equal size);
  * when S < N, each shard is being read by about N/S slots at once (each from its start, in its own shuffled
    order), so a sample comes back within a few steps instead of once per epoch, and a slot's shuffle block
    never holds more than one shard (every visit of a slot is in another epoch). Nothing breaks, but the data is
    mixed less well: describe() says so, and more, smaller shards (`distgan prepare --shard-samples`) fix it.

Labels. The shards have classes when their manifest lists some ("classes"). Without a manifest: when the stream
is given a class count (make_stream passes a conditional model's model.num_classes), else when the first sample
of the first readable shard has a .cls member (shards are labelled throughout or not at all: `distgan prepare`
writes .cls for every sample or for none). Labelled shards need a .cls in every sample: a sample without one, or
whose .cls is not a class index (a non-negative integer, below the class count when it is known), is a bad
sample, counted like an image that does not decode. Unlabelled shards' .cls members are not read.

Shuffling. Each slot collects its records in blocks of `shuffle_buffer` (a block never spans two epochs) and
yields a block in an order drawn from (seed, slot, block number), flipping images left-right from the same draw
when x-flips are on. Records are kept as undecoded bytes until yielded.

Position. A slot's place is (j, off, b, t): block b starts at record `off` of the slot's j-th shard visit and t
of its records have been yielded. Each batch carries its slot's place after its last sample; the rank's stream
keeps the place of the last batch it actually consumed from each worker, plus the number of batches consumed,
which says which worker the next batch must come from (the DataLoader takes workers in turn). A resumed stream
starts every worker at its place: it re-reads at most one block per worker and yields exactly the samples the
uninterrupted run would have, on the same ranks x workers. A manifest's sample counts let it skip to shard j
without opening the ones before. On another ranks x workers (elastic), the checkpoint's global position, built
from every slot's place (position.py), is re-split: the readers follow a new layout that deals them the rest of
the epoch, each sample once, before the following epochs; a slot's j-th shard visit is then its j-th *segment* of
that layout (the first layout's segments are the plain whole visits above).

Hand-over. A batch is written straight into the tensors the rank receives (images and labels), fresh ones per
batch (the consumer may still hold, or be copying, the previous one): in a loader worker they are allocated in
shared memory, which is how the DataLoader passes tensors between processes (a tensor allocated anywhere else is
copied into shared memory on the way); read in the rank's own process and training on CUDA, they are allocated
pinned. With pin_memory and loader workers, the DataLoader pins each Batch (Batch.pin_memory: one copy, the
price of an asynchronous copy to the GPU; see prefetch.py).

Faults. A sample that does not decode is skipped and counted; a shard that cannot be opened or breaks mid-way is
skipped from that point (its unread samples counted as bad, from the manifest when known) and its name kept.
Once a slot has found every one of the S shards empty since it last read a sample, or has read a whole visit
of every shard without one usable sample (all images undecodable, labelled shards without labels), it raises
DataError: the data would otherwise be read forever without yielding a batch.
Counts travel with the batches; the trainer sums them over ranks and stops the run past data.max_bad_fraction.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 (see _kill_leftover_workers)
import tarfile
from collections.abc import Iterator

import numpy as np
import torch

from distgan.data import position as pos
from distgan.data import shards as sh
from distgan.data.batch import Batch
from distgan.data.position import FIRST_LAYOUT, block_rng, segment_size
from distgan.errors import DataError


class SlotReader:
    """The endless record sequence of one slot, read in shuffled blocks, from any saved place."""

    def __init__(self, shard_list: sh.ShardList, slot: int, n_slots: int, seed: int, block: int, allow_pipe: bool,
                 layout: dict | None = None):  # fmt: skip
        self.urls, self.counts = shard_list.urls, shard_list.counts
        self.slot, self.n_slots, self.seed, self.block = slot, n_slots, seed, max(1, block)
        self.allow_pipe = allow_pipe
        self.layout = layout or FIRST_LAYOUT
        self.gen = self.layout["gen"]
        self._perms: dict[int, np.ndarray] = {}
        self._open: tuple[int, int, Iterator] | None = None  # (j, records read, iterator) of the open shard
        self.stats = {"samples": 0, "bad": 0, "refused": 0}
        self.bad_shards: set[str] = set()
        # Shards found empty (from their start) since this slot last read a record. Kept across blocks: with
        # S <= N slots every visit of a slot is in another epoch, so a block is one visit and a count per block
        # would never reach S. Distinct shards, not visits: a slot's S visits in a row need not cover all S shards.
        self._empty: set[int] = set()

    def segment(self, j: int) -> list:
        """This slot's j-th segment [g, lo, hi, skip]: its piece's (see Layout), then whole fresh visits."""
        return pos.slot_segment(self.layout, self.slot, self.n_slots, j)

    def visit(self, j: int) -> tuple[int, int]:
        """(epoch, shard index) of this slot's j-th segment's shard visit."""
        g = self.segment(j)[0]
        epoch, i = divmod(g, len(self.urls))
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = pos.epoch_order(self.seed, epoch, len(self.urls))
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
        seg = self.segment(j)
        _, index = self.visit(j)
        url = self.urls[index]
        known = segment_size(seg, self.counts[index] if self.counts is not None else None)
        _, lo, hi, skip = seg
        skip = set(skip)
        read = 0  # the segment's records passed
        try:
            if known is not None and off >= known:
                return
            with sh.open_shard(url, self.allow_pipe) as f:
                for i, record in enumerate(sh.iter_records(f)):
                    if i < lo or i in skip:
                        continue
                    if hi is not None and i >= hi:
                        break
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

    def _collect(self, j: int, off: int) -> tuple[list[sh.Record], int, int, list[list[int]]]:
        """One block from (j, off): up to `block` records of one epoch. Returns (records, next j, next off, spans):
        spans [[j, off, n], ...] say which segment records the block holds, in order (see global_position)."""
        epoch = self.visit(j)[0]
        records: list[sh.Record] = []
        spans: list[list[int]] = []
        while len(records) < self.block:
            n_before, first = len(records), off
            for record in self._records_of(j, off):
                records.append(record)
                off += 1
                self._open = (j, off, self._open[2])
                self._empty.clear()
                if len(records) == self.block:
                    spans.append([j, first, len(records) - n_before])
                    return records, j, off, spans
            if len(records) > n_before:
                spans.append([j, first, len(records) - n_before])
            whole = self.segment(j)[1:] == [0, None, []]
            if len(records) == n_before and off == 0 and whole:  # (a resumed visit may start at its end: not empty)
                self._empty.add(self.visit(j)[1])
                if len(self._empty) == len(self.urls):
                    raise DataError(f"no readable samples in any of the {len(self.urls)} shards: {self._bad_list()}")
            j, off = j + 1, 0
            if self.visit(j)[0] != epoch:
                break
        return records, j, off, spans

    def _bad_list(self) -> str:
        return ", ".join(sorted(self.bad_shards)[:5]) or "(all empty)"

    def samples(self, place: dict | None, resolution: int, channels: int, xflip: bool, labelled: bool = False,
                num_classes: int | None = None):  # fmt: skip
        """Yields (key, image uint8 [C, R, R], label or None, place after it) forever, starting from `place`.

        labelled: read each sample's class from its .cls member (in [0, num_classes) when that is not None); a
        sample without a valid one is bad."""
        p = dict(place or {"j": 0, "off": 0, "b": 0, "t": 0})
        j, off, b, t = p["j"], p["off"], p["b"], p["t"]
        # A run of blocks without one usable sample, and the shards of which it holds a whole visit: once it holds
        # one of every shard, nothing will ever be usable (every image undecodable, or labelled shards without
        # labels), and the slot says so instead of reading on forever. Counted at block ends, where the order in
        # which records are read and the order in which they were stored meet.
        next_v, unusable, bad_in_a_row, last_error = j if off == 0 else j + 1, set(), 0, ""
        while True:
            records, next_j, next_off, spans = self._collect(j, off)
            g = block_rng(self.seed, self.slot, b, self.gen)
            order = g.permutation(len(records))
            flips = g.random(len(records)) < 0.5
            usable = t > 0  # (a resumed block: its place is after a sample it yielded)
            for idx in range(t, len(records)):
                record = records[order[idx]]
                self.stats["samples"] += 1
                self.stats["refused"] += record.refused
                try:
                    label = read_label(record, num_classes) if labelled else None  # (cheaper than the image: first)
                    image = sh.decode_image(record, resolution, channels)
                except Exception as e:  # noqa: BLE001 (any decoder failure is a bad sample, never a crash)
                    self.stats["bad"] += 1
                    self.bad_shards.add(f"{sh.shard_name(record.url)} ({type(e).__name__} in {record.key})")
                    bad_in_a_row += 1
                    last_error = f"{sh.shard_name(record.url)}: {' '.join(str(e).split())[:200]}"
                    continue
                usable = True
                if xflip and flips[idx]:
                    image = image[:, :, ::-1]
                yield record.key, image, label, {"j": j, "off": off, "b": b, "t": idx + 1, "spans": spans}
            if usable:
                next_v, unusable, bad_in_a_row = next_j if next_off == 0 else next_j + 1, set(), 0
            else:
                unusable.update(self.visit(v)[1] for v in range(next_v, next_j))  # (visits before next_j: read)
                next_v = max(next_v, next_j)
                if len(unusable) == len(self.urls):
                    raise DataError(
                        f"no usable sample in any of the {len(self.urls)} shards: {bad_in_a_row} bad samples in a "
                        f"row, every shard read whole (e.g. {last_error or self._bad_list()})"
                    )
            j, off, b, t = next_j, next_off, b + 1, 0

    def take_stats(self) -> tuple[dict[str, int], list[str]]:
        stats, bad = self.stats, sorted(self.bad_shards)
        self.stats = {k: 0 for k in stats}
        self.bad_shards = set()
        return stats, bad


def read_label(record: sh.Record, num_classes: int | None) -> int:
    """The class index in a record's .cls member (ASCII digits, as WebDataset writes it); raises ValueError if it
    is missing, not a non-negative integer, or not below num_classes (when known)."""
    data = record.get("cls")
    if data is None:
        raise ValueError(f"sample {record.key} has no .cls member (the shards have classes)")
    text = data.decode("ascii", "replace").strip() if len(data) <= 32 else ""  # (a class index is short)
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"sample {record.key}: .cls {data[:20]!r} is not a class index")
    label = int(text)
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"sample {record.key}: class {label} is not below {num_classes}")
    return label


def shards_have_labels(urls: list[str], allow_pipe: bool) -> bool:
    """Whether shards without a manifest are labelled: the first sample of the first readable shard has a .cls."""
    for url in urls[:4]:
        try:
            with sh.open_shard(url, allow_pipe) as f:
                for record in sh.iter_records(f):
                    return "cls" in record
        except (OSError, tarfile.TarError, ValueError, EOFError):  # unreadable: the stream counts it; try the next
            continue
    return False


class _Batches(torch.utils.data.IterableDataset):
    """What each loader worker runs: its slot's samples, in batches that carry their place and fault counts."""

    def __init__(self, shard_list, rank, world_size, n_workers, batch, resolution, channels, data_cfg, seed,
                 pin_memory=False, labelled=False, num_classes=None):  # fmt: skip
        self.shard_list, self.rank, self.world_size, self.n_workers = shard_list, rank, world_size, n_workers
        self.batch, self.resolution, self.channels, self.seed = batch, resolution, channels, seed
        self.block, self.xflip, self.allow_pipe = data_cfg.shuffle_buffer, data_cfg.xflip, data_cfg.allow_pipe
        self.labelled, self.num_classes = labelled, num_classes
        self.pin_memory = pin_memory  # (only where this runs in the rank's own process; see _new_tensor)
        self.rotation = 0  # loader worker i serves logical worker (i + rotation) % n_workers
        self.places: list[dict | None] = [None] * n_workers
        self.layout = FIRST_LAYOUT  # which records the slots read (position.py): another after an elastic resume

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
            self.layout,
        )
        shape = (self.batch, self.channels, self.resolution, self.resolution)
        in_worker, pin = info is not None, self.pin_memory and info is None

        def new_batch() -> tuple[Batch, np.ndarray, np.ndarray | None]:
            images, image_view = _new_tensor(shape, torch.uint8, shared=in_worker, pinned=pin)
            if not self.labelled:
                return Batch(images), image_view, None
            labels, label_view = _new_tensor((self.batch,), torch.int64, shared=in_worker, pinned=pin)
            return Batch(images, labels), image_view, label_view

        batch, images, labels = new_batch()
        keys: list[str] = []
        samples = reader.samples(
            self.places[w], self.resolution, self.channels, self.xflip, self.labelled, self.num_classes
        )
        for key, image, label, place in samples:
            if labels is not None:
                labels[len(keys)] = label  # the same slot as its image: they travel together from here on
            images[len(keys)] = image
            keys.append(key)
            if len(keys) == self.batch:
                stats, bad = reader.take_stats()
                yield {"batch": batch, "keys": keys, "worker": w, "place": place, "stats": stats, "bad_shards": bad}
                batch, images, labels = new_batch()
                keys = []


def _new_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, shared: bool, pinned: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """A fresh tensor for one batch's images or labels, and a numpy view of it to write the samples into (handed
    over without a copy).

    shared: in a loader worker. The DataLoader passes tensors to the rank through shared memory; one allocated
    anywhere else is copied into shared memory when pickled (torch's reductions), so allocate it there
    (what torch's default_collate does in workers too). pinned: read in the rank's own process for a CUDA
    device, so that the copy to the GPU can be asynchronous (with workers the DataLoader's pin thread does it).
    """
    if shared:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * itemsize)
        out = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    else:
        out = torch.empty(shape, dtype=dtype, pin_memory=pinned)
    return out, out.numpy()


class ShardStream:
    """A rank's endless batches from WebDataset shards: Batch(images uint8 [B_local, C, R, R], labels int64
    [B_local] or None), resumable, fault-counting."""

    def __init__(self, data_cfg, resolution: int, channels: int, batch: int, rank: int, world_size: int, seed: int,
                 pin_memory: bool = False, num_classes: int | None = None):  # fmt: skip
        """pin_memory: hand out batches in pinned memory, for an asynchronous copy to a CUDA device (set it when
        training on CUDA; without CUDA it does nothing, as with the DataLoader's own flag).

        num_classes: for shards without a manifest only (a manifest's class list decides otherwise): a positive
        count says they are labelled, with classes below it; None looks at their first sample."""
        shard_list = sh.resolve(data_cfg.shards, data_cfg.allow_pipe)
        m = shard_list.manifest
        if m is not None and (m["resolution"], m["channels"]) != (resolution, channels):
            raise DataError(
                f"{data_cfg.shards} holds {m['resolution']}x{m['resolution']}x{m['channels']} images but the model is "
                f"{resolution}x{resolution}x{channels}; set model.resolution/model.channels to match, or re-run "
                f"`distgan prepare` with --size {resolution}"
            )
        sh.check_available(shard_list.urls)
        # The image decoder's modules, imported here in the rank's process, before its loader workers are forked:
        # imported first in a worker, after wandb.init (a resumed run draws no grid of reals, which would have
        # imported them), they go through W&B's import hook, which raises in a forked process (wandb 0.31): the
        # first sample of every worker was counted bad.
        sh._torchvision_decoder()
        self.shard_list = shard_list
        # Labelled or not, decided once here for every worker (see the module docstring).
        if m is not None:
            self.classes: list[str] | None = list(m["classes"])
            self.labelled, self.num_classes = bool(m["classes"]), len(m["classes"]) or None
        elif num_classes:
            self.classes, self.labelled, self.num_classes = None, True, num_classes
        else:
            self.classes, self.num_classes = None, None
            self.labelled = shards_have_labels(shard_list.urls, data_cfg.allow_pipe)
        self.rank, self.world_size = rank, world_size
        # As many loader workers as asked, whatever the shard count: no slot runs dry (see the module docstring);
        # with fewer shards than slots, describe() says what that costs.
        self.loader_workers = data_cfg.workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        n_logical = max(self.loader_workers, 1)
        args = (shard_list, rank, world_size, n_logical, batch // world_size, resolution, channels, data_cfg, seed)
        self.dataset = _Batches(*args, pin_memory=self.pin_memory, labelled=self.labelled, num_classes=self.num_classes)
        self.batches = 0  # batches this rank has consumed
        self.last_keys: list[str] = []
        self.resumed_from: str | None = None  # a line for the console after an elastic resume
        self._stats = {"samples": 0, "bad": 0, "refused": 0}
        self._bad_shards: set[str] = set()
        self._it = None

    def describe(self) -> str:
        src = self.shard_list.manifest["root"] if self.shard_list.manifest else f"{len(self.shard_list.urls)} URLs"
        n, n_shards = self.shard_list.num_samples, len(self.shard_list.urls)
        size = f"{n} samples in " if n is not None else ""
        if self.labelled:  # (shards without labels: said by saying nothing, as before labels existed)
            kinds = f"of {self.num_classes} classes" if self.num_classes else "with labels"
            size = f"{n} samples {kinds} in " if n is not None else f"samples {kinds} in "
        workers = f"{self.loader_workers} loader worker{'' if self.loader_workers == 1 else 's'} per rank"
        line = f"data: {size}{n_shards} shards from {src}, {workers}"
        slots = self.world_size * self.dataset.n_workers
        if n_shards < slots:  # it trains, but each shard is read by several slots at once (module docstring)
            who = f"{self.world_size} rank{'' if self.world_size == 1 else 's'}"
            if self.loader_workers:
                who += f" x {self.loader_workers} worker{'' if self.loader_workers == 1 else 's'}"
            line += (
                f"; {n_shards} shard{'' if n_shards == 1 else 's'} for {who}: every shard is read by "
                f"~{slots / n_shards:.1f} of the {slots} readers at once, so samples recur within a few steps; "
                f"`distgan prepare --shard-samples N` for at least {slots} shards spreads the data evenly"
            )
        return line

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
            # pin_memory_device stays unset: torch >= 2.6 then pins for CUDA (newer: for the current accelerator,
            # and it warns that the argument is deprecated when given).
            pin_memory=self.pin_memory,
            worker_init_fn=_die_with_rank,
            # Its workers' base seed from a generator of its own: a DataLoader iterator otherwise draws it from
            # torch's global generator, which the networks' forwards use (StyleGAN2's noise); a resumed run starts
            # its iterator at another point of that sequence than the uninterrupted one, and trained otherwise.
            # (The samples do not depend on the workers' seeds: the shard order is a function of the position.)
            generator=torch.Generator().manual_seed(0),
        )
        self._it = iter(loader)
        _workers[:] = [w for w in _workers if w.is_alive()] + list(getattr(self._it, "_workers", []))

    def __next__(self) -> Batch:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except Exception as e:  # (a worker's DataError comes back as a DataError too, its traceback in the text)
            raise _unwrap_worker_error(e) from None
        self.dataset.places[batch["worker"]] = batch["place"]
        self.batches += 1
        for k, v in batch["stats"].items():
            self._stats[k] += v
        self._bad_shards.update(batch["bad_shards"])
        self.last_keys = batch["keys"]
        return batch["batch"]

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
        """Up to n images (uint8 [n, C, R, R], no labels) from the start of the first shard, for a grid of reals
        (the stream does not move)."""
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
        """This rank's exact place (same ranks x workers: the resumed run reads what the uninterrupted one would)."""
        return {
            "kind": "shards",
            "batches": self.batches,
            "world_size": self.world_size,
            "workers": self.dataset.n_workers,
            "places": list(self.dataset.places),
            "layout": self.dataset.layout,
        }

    def global_position(self, states: list[dict]) -> dict:
        """The position of the whole stream, independent of ranks x workers, from every rank's state_dict()
        (position.py); what a resume on another count re-splits."""
        return pos.global_position(states, len(self.shard_list.urls), self.shard_list.counts, self.dataset.seed)

    def load_state_dict(self, state: dict, position: dict | None = None) -> None:
        """Resume from this rank's saved state when the run has the same ranks x workers (exactly), else from the
        checkpoint's global `position`, re-split over this run's slots (elastic: each remaining sample once)."""
        if state.get("kind") != "shards":
            raise DataError("the checkpoint's data position is not from a shard stream (data.source changed)")
        saved = (state["world_size"], state["workers"])
        self.close()
        self.resumed_from = None
        if saved == (self.world_size, self.dataset.n_workers):
            self.batches = int(state["batches"])
            self.dataset.places = list(state["places"])
            self.dataset.layout = state.get("layout", FIRST_LAYOUT)
            return
        if position is None:
            raise DataError(
                f"the checkpoint's data position is for {saved[0]} ranks x {saved[1]} loader workers, this run has "
                f"{self.world_size} x {self.dataset.n_workers}, and it holds no global position (written by an "
                "older distgan); resume with the same world size and data.workers"
            )
        n_shards, counts, seed = len(self.shard_list.urls), self.shard_list.counts, self.dataset.seed
        d = self.dataset
        d.layout = pos.split(position, self.world_size, d.n_workers, d.batch, n_shards, counts, seed)
        self.dataset.places = [None] * self.dataset.n_workers
        self.batches = 0
        left = pos.records_left(position, n_shards, counts, seed)
        self.resumed_from = (
            f"data: the position of {_n(saved[0], 'rank')} x {_n(saved[1], 'loader worker')} re-split over "
            f"{self.world_size} x {self.dataset.n_workers}"
            + (f": {left} samples of the current epoch left, each read once" if left is not None else "")
        )

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


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images))


def _unwrap_worker_error(e: Exception) -> Exception:
    """A DataError raised in a loader worker reaches us wrapped with its traceback; give back its one line."""
    text = str(e)
    marker = "distgan.errors.DataError: "
    if marker in text:
        return DataError(text.rsplit(marker, 1)[1].strip().splitlines()[0])
    return e
