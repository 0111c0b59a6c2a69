"""Helpers shared by the tests: build a trainer from config overrides, run code on N gloo processes.

run_ranks(worker, N, *args) runs worker(rank, world_size, *args) in N real processes joined in a gloo process
group (distgan.local_launch: the environment torchrun would give them), so the code under test goes through
distgan.distributed.setup() exactly as in a real launch. A worker must be a module-level function.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distgan.local_launch import run_local

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


def run_ranks(fn, world: int, *args, timeout: float = 180):
    """[fn(0, world, *args), ..., fn(world-1, world, *args)], each in its own fresh process of one gloo group."""
    try:
        return run_local(world, fn, *args, timeout=timeout)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None
