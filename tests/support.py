"""Helpers shared by the tests: build a trainer from config overrides, run code on N gloo processes.

run_ranks(worker, N, *args) runs worker(rank, world_size, *args) in N real processes joined in a gloo
process group, with the environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
so the code under test goes through distgan.distributed.setup() exactly as in a real launch. Processes are
spawned fresh, so nothing leaks between tests. A worker must be a module-level function.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"


def make_trainer(*overrides: str, config: Path = SMOKE, run_dir=None, dist=None):
    """A Trainer on this process's world (1 unless launched by run_ranks), fed by the configured dataset."""
    from distgan import distributed
    from distgan.config import load_config
    from distgan.data import ArrayStream, load_images
    from distgan.trainer import Trainer

    cfg = load_config(config, list(overrides))
    if dist is None:
        dist = distributed.setup(cfg.train.precision, threads=1)
    cfg.validate(dist.world_size)
    stream = ArrayStream(load_images(cfg), cfg.train.batch, dist.rank, dist.world_size, cfg.train.seed)
    return Trainer(cfg, dist, stream, run_dir)


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# ---------------------------------------------------------------------- N processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, args, queue):
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[key]
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    try:
        # Plain pickle bytes: tensors travel by value, not as shared-memory handles that die with this process.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 180):
    """[fn(0, world, *args), ..., fn(world-1, world, *args)], each in its own process of one gloo group."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and not errors:
            try:
                rank, status, value = queue.get(timeout=1)
            except queue_module.Empty:
                # A rank that died without reporting (killed, crashed at start) must not leave us waiting.
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result")
                elif time.monotonic() > deadline:
                    errors.append(f"no result within {timeout:.0f} s")
                continue
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=1 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
