"""Run a function on N fresh local processes joined in one process group, and collect what each returns.

    results = run_local(2, worker, arg)   # [worker(0, 2, arg), worker(1, 2, arg)]

Each process gets the environment `torchrun --nproc_per_node=N` would give it (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT on loopback, OMP_NUM_THREADS=1), so code that calls
`distgan.distributed.setup()` inside joins the group exactly as in a real launch. Used by `distgan bench` and by
the tests. Processes are spawned, not forked: nothing of the caller's state leaks in. `worker` must be a
module-level function; results travel back pickled by value. A process that raises, or dies without a word
(killed, crashed on import), turns into a RuntimeError naming its rank instead of a wait without end.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import time
import traceback


def run_local(world: int, fn, *args, timeout: float = 900, env: dict[str, str] | None = None) -> list:
    """[fn(0, world, *args), ...] on `world` fresh processes (see the module doc); `env`: more variables for them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, queue, env or {})) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    error = None
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and error is None:
            try:
                rank, ok, payload = queue.get(timeout=1)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    error = f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result"
                elif time.monotonic() > deadline:
                    error = f"no result from every rank within {timeout:.0f} s"
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                error = f"rank {rank} failed:\n{payload}"
    finally:
        for p in procs:
            p.join(timeout=1 if error else 30)  # after a failure the others may be stuck in a collective
            if p.is_alive():
                p.kill()
    if error:
        raise RuntimeError(error)
    return [results[r] for r in range(world)]


def _child(fn, rank, world, port, args, queue, env):
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[key]  # a launcher's leftovers from the caller's environment must not leak in
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    os.environ.update(env)
    try:
        # Plain pickle bytes: tensors travel by value, not as shared-memory handles that die with this process.
        queue.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
        raise SystemExit(1) from None
