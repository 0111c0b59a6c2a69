"""A shard stream's global position: what its readers have consumed, in a form that names no rank and no worker,
and how a run on another number of them picks it up (elastic resume).

Layout. The readers (slots: ranks x loader workers, stream.py) follow a layout {"gen", "start", "pieces"}: slot
s of N first reads pieces[s], a list of segments, then the whole shard visits start + s, start + s + N, ... of the
endless global sequence of visits (epoch e visits every shard once, in an order drawn from (seed, e)). A segment
[g, lo, hi, skip] is the records of global visit g whose index in its shard is in [lo, hi) (hi None: up to the
shard's end) and not in `skip`. A run starts with layout gen 0: start 0, no pieces, the plain scheme.

Global position. Each slot's place says which block it is in (a block: `shuffle_buffer` records of one epoch,
possibly across several segments: its `spans`), and how many of the block's shuffled records were consumed; the
block's shuffle is a function of (seed, slot, block number, gen). From all the places global_position() builds

    {"kind": "shard-position", "gen", "start": G, "shards": S, "rest": [segment, ...]}

G is the end of the latest epoch that any slot has entered (a multiple of S, or the layout's start), and `rest`
holds every record of the visits before G that no slot has consumed yet: the visits a slot is in the middle of,
with their consumed records in `skip`, and the untouched ones whole. No slot has read anything from G on. A
checkpoint keeps it in state.pt (the trainer gathers the ranks' places to build it).

Re-split. split() deals `rest` over N' slots in N' contiguous runs (a segment is cut where a run ends; shard sizes
come from the manifest), each run as long as what its slot will consume of it (shares(): a rank takes one batch per
step, from its workers in turn), and starts layout gen + 1 at G. A run resumed on N' slots thus reads the rest of
the current epoch exactly once, and all its ranks reach the end of it at the same step; then the following epochs
as usual. 0 samples repeated, 0 missing. Without a manifest
whole visits' sizes are unknown and segments are dealt in turn instead: still each record once, but slots may
finish the epoch a few steps apart. A layout of gen > 0 shuffles its blocks from a key of its own, so its
blocks are not the first layout's again.
"""

from __future__ import annotations

import bisect

import numpy as np

from distgan.errors import DataError

FIRST_LAYOUT = {"gen": 0, "start": 0, "pieces": []}
KIND = "shard-position"


def epoch_order(seed: int, epoch: int, n_shards: int) -> np.ndarray:
    """The shard indices in the order epoch `epoch` visits them."""
    return np.random.default_rng([seed, epoch, 0xD47A]).permutation(n_shards)


def block_rng(seed: int, slot: int, block: int, gen: int) -> np.random.Generator:
    """The generator of one block's shuffle (and flips): its permutation is the first draw."""
    key = [seed, slot, block, 0xB10C] if gen == 0 else [seed, slot, block, gen, 0xB10C]
    return np.random.default_rng(key)


def slot_segment(layout: dict, slot: int, n_slots: int, j: int) -> list:
    """Slot `slot`'s j-th segment under `layout`: its piece's, then whole fresh visits."""
    piece = layout["pieces"][slot] if layout["pieces"] else []
    if j < len(piece):
        return piece[j]
    return [layout["start"] + slot + (j - len(piece)) * n_slots, 0, None, []]


def segment_size(seg: list, count: int | None) -> int | None:
    """Records in a segment of a shard of `count` records (None: unknown, and so is the size unless hi bounds it)."""
    _, lo, hi, skip = seg
    end = hi if count is None else (count if hi is None else min(hi, count))
    if end is None:
        return None
    return max(0, end - lo - sum(1 for i in skip if lo <= i < end))


def segment_index(seg: list, k: int) -> int:
    """The index in its shard of a segment's k-th record."""
    _, lo, _, skip = seg
    i = lo + k
    for s in sorted(skip):
        if s < lo:
            continue
        if s > i:
            break
        i += 1
    return i


class _Shards:
    """Shard sizes by global visit (from the manifest's counts, else unknown)."""

    def __init__(self, n_shards: int, counts: list[int] | None, seed: int):
        self.n, self.counts, self.seed = n_shards, counts, seed
        self._orders: dict[int, np.ndarray] = {}

    def count(self, g: int) -> int | None:
        if self.counts is None:
            return None
        epoch, i = divmod(g, self.n)
        if epoch not in self._orders:
            self._orders[epoch] = epoch_order(self.seed, epoch, self.n)
        return self.counts[int(self._orders[epoch][i])]


def global_position(states: list[dict], n_shards: int, counts: list[int] | None, seed: int) -> dict:
    """The world-independent position of a stream from every rank's state_dict() (rank order)."""
    first = states[0]
    world, workers = first["world_size"], first["workers"]
    if len(states) != world or any((s["world_size"], s["workers"]) != (world, workers) for s in states):
        raise ValueError("global_position needs the stream states of every rank of one run")
    layout = first.get("layout", FIRST_LAYOUT)
    n_slots, gen, shards = world * workers, layout["gen"], _Shards(n_shards, counts, seed)
    rest: list[list] = []
    frontier = []  # per slot: its first segment no block has reached
    latest = -1  # the latest epoch a block has reached
    for slot in range(n_slots):
        place = states[slot // workers]["places"][slot % workers]
        if place is None:
            frontier.append(0)
            continue
        if "spans" not in place:
            raise DataError(
                "the checkpoint's data position was saved by an older distgan, which kept no global position; "
                f"resume it with its {world} ranks x {workers} loader workers"
            )
        j0, spans = place["j"], place["spans"]
        consumed: dict[int, set[int]] = {j0: set(range(place["off"]))}
        ends = np.cumsum([n for _, _, n in spans]).tolist()
        order = block_rng(seed, slot, place["b"], gen).permutation(ends[-1] if ends else 0)[: place["t"]]
        for p in order.tolist():
            i = bisect.bisect_right(ends, p)
            j, off, n = spans[i]
            consumed.setdefault(j, set()).add(off + p - (ends[i] - n))
        last = spans[-1][0] if spans else j0
        read = {j for j, _, _ in spans} | {j0}
        for j in range(j0, last + 1):
            if j in read:  # (a segment between them that gave the block nothing was read through: empty)
                seg = slot_segment(layout, slot, n_slots, j)
                left = _remaining(seg, consumed.get(j, set()), shards.count(seg[0]))
                rest += [left] if left is not None else []
        frontier.append(last + 1)
        latest = max(latest, slot_segment(layout, slot, n_slots, last)[0] // n_shards)
    end = max(layout["start"], (latest + 1) * n_shards)
    for slot in range(n_slots):
        j = frontier[slot]
        while (seg := slot_segment(layout, slot, n_slots, j))[0] < end:  # (a piece's are all before its start)
            rest.append(seg)
            j += 1
    rest.sort(key=lambda s: (s[0], s[1]))
    return {"kind": KIND, "gen": gen, "start": end, "shards": n_shards, "rest": rest}


def _remaining(seg: list, consumed: set[int], count: int | None) -> list | None:
    """What is left of a segment after its records `consumed` (segment-record numbers); None when nothing."""
    g, _, hi, skip = seg
    m = 0
    while m in consumed:
        m += 1
    lo = segment_index(seg, m)
    taken = {segment_index(seg, k) for k in consumed if k > m}
    left = [g, lo, hi, sorted(i for i in set(skip) | taken if i >= lo and (hi is None or i < hi))]
    return None if segment_size(left, count) == 0 else left


def shares(total: int, ranks: int, workers: int, batch: int) -> list[int]:
    """Records per slot (rank-major) that the ranks consume in the steps that take `total` records, `batch` per
    rank and step, each rank's workers in turn from worker 0 (a resumed stream's first batch is worker 0's)."""
    steps, extra = divmod(total, ranks * batch)
    out = []
    for _ in range(ranks):
        out += [len(range(w, steps, workers)) * batch for w in range(workers)]
    for r in range(ranks):  # a last, partial step: worker steps % workers of each rank, in rank order
        take = min(batch, extra)
        out[r * workers + steps % workers] += take
        extra -= take
    return out


def split(position: dict, ranks: int, workers: int, batch: int, n_shards: int, counts: list[int] | None,
          seed: int) -> dict:  # fmt: skip
    """The layout (gen + 1) that deals a global position's rest over ranks x workers slots (`batch` records per rank
    and step): each slot gets what it will consume, so every rank reaches the end of the rest at the same step."""
    n_slots = ranks * workers
    if position.get("kind") != KIND:
        raise DataError("the checkpoint's data position is not from a shard stream (data.source changed)")
    if position["shards"] != n_shards:
        raise DataError(
            f"the checkpoint's data position is for {position['shards']} shards and data.shards has {n_shards}; "
            "resume with the data it was trained on"
        )
    rest, sizes = position["rest"], _sizes(position, n_shards, counts, seed)
    pieces: list[list] = [[] for _ in range(n_slots)]
    if any(size is None for size in sizes):  # (no manifest: whole visits of unknown size, dealt in turn)
        for i, seg in enumerate(rest):
            pieces[i % n_slots].append(seg)
    else:
        bounds = np.cumsum(shares(sum(sizes), ranks, workers, batch)).tolist()
        i = done = 0
        for seg, size in zip(rest, sizes):
            k = 0
            while k < size:
                while bounds[i] == done:
                    i += 1
                take = min(bounds[i] - done, size - k)
                pieces[i].append(_cut(seg, k, k + take))
                k, done = k + take, done + take
    return {"gen": position["gen"] + 1, "start": position["start"], "pieces": pieces}


def _cut(seg: list, a: int, b: int) -> list:
    """A segment of a segment's records a..b-1."""
    lo, hi = segment_index(seg, a), segment_index(seg, b - 1) + 1
    return [seg[0], lo, hi, [i for i in seg[3] if lo <= i < hi]]


def _sizes(position: dict, n_shards: int, counts: list[int] | None, seed: int) -> list[int | None]:
    """The record count of each segment of the position's rest (None: unknown without the shards' sizes)."""
    shards = _Shards(n_shards, counts, seed)
    return [segment_size(seg, shards.count(seg[0])) for seg in position["rest"]]


def records_left(position: dict, n_shards: int, counts: list[int] | None, seed: int) -> int | None:
    """How many records the position's rest holds (None without shard sizes)."""
    sizes = _sizes(position, n_shards, counts, seed)
    return None if any(s is None for s in sizes) else sum(sizes)
