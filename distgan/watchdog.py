"""Stop signals agreed across ranks, and a watchdog that turns a hung rank into a failure naming it.

StopSignals: SIGTERM (schedulers, `kill`, torchrun shutting down) and SIGUSR1 (SLURM's advance warning,
`scancel --signal=USR1`) only set a flag in the handler. The ranks combine their flags with one small all-reduce
on the gloo control group, started at one step boundary and waited for `every` steps later, so it runs while they
train: if any rank got a signal, every rank learns it at the same step boundary, all save that step's checkpoint
together and exit with code 3. A signal that reaches only one rank (`kill` of one PID, a node-local preemption
notice) therefore still stops the whole job cleanly. SIGKILL aborts without saving.

How often: an all-reduce over gloo's TCP takes 2(N-1) hops on N ranks (tens of ms at 512 ranks), longer than a
fast GPU step; so the ranks agree about every AGREE_EVERY_S seconds, not every step. Each agreement also carries
the slowest rank's time since the previous one, and from it every rank derives the same number of steps until the
next (`every`). A stop therefore takes effect within about two such intervals (~0.5 s), and costs one small
collective per interval, hidden behind the steps it overlaps (docs/scaling.md counts it).

Watchdog: a thread per rank. The training loop calls `beat(step, phase, what)` where each step starts, when its
data is ready, before each backward (where DDP's all-reduces wait) and before anything long (checkpoint, sample
grid); the thread publishes the last beat to a small key-value store every second. When a rank has not beaten for
`train.hang_timeout_s`, it reads every rank's last beat: the ranks furthest behind in (step, phase) are the ones
the others wait for. It prints one line naming them and where they were, and exits with code 5
(the hung rank exits too, by its own watchdog), so `torchrun --max-restarts` restarts the job from its last
checkpoint instead of it waiting forever in a collective (gloo's own timeout is 30 min and names nobody).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time

import torch

from distgan.errors import EXIT_HUNG

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


AGREE_EVERY_S = 0.25  # target seconds between two agreements on stop signals
MAX_EVERY = 10_000  # steps


class StopSignals:
    def __init__(self, dist, signals=STOP_SIGNALS):
        self.dist = dist
        self.received = 0  # the signal number, set by the handler
        self.agreed = 0  # the signal any rank received, as the ranks agreed at the last agreement
        self.received_at: float | None = None
        self.every = 1  # steps from one agreement to the next (the same on every rank)
        self._steps = 0  # steps since the last agreement
        self._work = None
        self._buf = None
        self._since = time.monotonic()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.received:
            self.received, self.received_at = signum, time.time()

    def end_step(self) -> int:
        """At a step boundary: the signal some rank received (the same answer on every rank, at the same step), or
        0. Every `every` steps the result of the agreement started `every` steps ago is read, and the next one is
        started with this rank's flag and how long its last interval took."""
        if self.dist.world_size == 1:
            self.agreed = self.received
            return self.received
        self._steps += 1
        if self._steps < self.every:
            return 0
        steps, self._steps = self._steps, 0
        if self._work is not None:
            self._work.wait()
            flag, slowest_us, interval = self._buf.tolist()
            self.agreed = int(flag)
            per_step = max(slowest_us, 1) / 1e6 / max(interval, 1)
            self.every = int(min(MAX_EVERY, max(1, math.ceil(AGREE_EVERY_S / per_step))))
        now = time.monotonic()
        elapsed_us = int((now - self._since) * 1e6)
        self._since = now
        self._buf = torch.tensor([self.received, elapsed_us, steps], dtype=torch.int64)
        self._work = self.dist.all_reduce_max_async(self._buf)
        return self.agreed

    def close(self) -> None:
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError:  # a peer died mid-step: that error is already on its way up
                pass
            self._work = None
        if self.received or self.agreed:
            # Stopping (this rank got the signal, or another did): keep only recording signals until the process
            # is gone. The launcher may signal the ranks that are still finishing (torchrun SIGTERMs the others
            # once one exits), and W&B's last flush or the loader shutdown must not die of it half-way.
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Watchdog:
    def __init__(self, dist, timeout_s: float, interval_s: float | None = None):
        self.dist, self.timeout = dist, float(timeout_s)
        self.interval = interval_s or min(1.0, max(self.timeout / 10, 0.05))
        self.pos, self.what = (-1, 0), "start"
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        self._store = None
        if self.timeout <= 0:
            return
        self._store = dist.make_store(self.timeout)
        self._thread = threading.Thread(target=self._run, name="distgan-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, phase: int, what: str) -> None:
        self.pos, self.what, self._last_beat = (step, phase), what, time.monotonic()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if not self._thread.is_alive():  # (a thread still in a store call keeps its store until it returns)
                self._store = None

    def _run(self) -> None:
        rank, world = self.dist.rank, self.dist.world_size
        while not self._stop.wait(self.interval):
            try:
                if self._store is not None:
                    self._store.set(f"hb/{rank}", json.dumps([*self.pos, self.what]))
                    if self._store.check(["hb/verdict"]):  # another rank judged first: act on its verdict
                        self._finish(json.loads(self._store.get("hb/verdict")))
            except Exception:  # noqa: BLE001, S110 (rank 0, the store's host, is gone: judged below)
                pass
            stalled = time.monotonic() - self._last_beat
            if stalled < self.timeout or self._stop.is_set():
                continue
            beats = {rank: [*self.pos, self.what]}
            try:
                keys = [f"hb/{r}" for r in range(world)]
                if self._store is not None and self._store.check(keys):
                    beats = {r: json.loads(v) for r, v in enumerate(self._store.multi_get(keys))}
            except Exception:  # noqa: BLE001, S110 (no store: this rank judges by itself)
                pass
            verdict = self._judge(beats, stalled)
            try:  # the first verdict written wins, so every rank tells the same story
                if self._store is not None:
                    verdict = json.loads(self._store.compare_set("hb/verdict", "", json.dumps(verdict)))
            except Exception:  # noqa: BLE001, S110
                pass
            self._finish(verdict)

    def _judge(self, beats: dict[int, list], stalled: float) -> list:
        """[reporting rank, message]: who is behind, where, and for how long the others waited."""
        low = min((step, phase) for step, phase, _ in beats.values())
        behind = sorted(r for r, (step, phase, _) in beats.items() if (step, phase) == low)
        rest = sorted(set(beats) - set(behind))
        limit = f"train.hang_timeout_s={self.timeout:g}"
        if rest:
            where = "; ".join(f"rank {r} in step {beats[r][0]} ({beats[r][2]})" for r in behind)
            s_behind, s_rest = ("s" if len(behind) > 1 else ""), ("s" if len(rest) > 1 else "")
            return [
                rest[0],
                f"rank{s_behind} {', '.join(map(str, behind))} hung: {where}, while rank{s_rest} "
                f"{', '.join(map(str, rest))} waited {stalled:.0f} s ({limit})",
            ]
        step, _, what = beats[self.dist.rank]
        if len(beats) < self.dist.world_size:  # the others' beats are out of reach: speak for this rank only
            return [self.dist.rank, f"rank {self.dist.rank} made no progress for {stalled:.0f} s in step {step} "
                    f"({what}); the other ranks could not be asked ({limit})"]  # fmt: skip
        return [min(beats), f"no progress for {stalled:.0f} s on any rank, all at step {step} ({what}) ({limit})"]

    def _finish(self, verdict: list) -> None:
        """Print the verdict (its reporting rank only) and exit; rank 0 hosts the store, so it leaves last."""
        reporter, msg = verdict
        if self.dist.rank == reporter:
            sys.stdout.flush()
            print(f"distgan: error: {msg}; stopping (exit code {EXIT_HUNG})", file=sys.stderr, flush=True)
        if self._store is not None:
            try:
                self._store.add("hb/done", 1)
                deadline = time.monotonic() + 3 * self.interval + 2
                while self.dist.is_main and time.monotonic() < deadline:
                    if self._store.add("hb/done", 0) >= self.dist.world_size:
                        break
                    time.sleep(0.05)
            except Exception:  # noqa: BLE001, S110
                pass
        os._exit(EXIT_HUNG)
