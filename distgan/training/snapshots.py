"""Snapshots of a run: sample grids from G_ema on fixed latents, the grid of reals, and the BatchNorm statistics
they rely on.

Fixed latents: the same for the whole run and across resumes (drawn from (seed, SAMPLES)), so grids of different
kimg show the same images evolving. A conditional model's grid has one row per class (each row the same latents,
so a column shows one latent across the classes); rows are repeated when the grid has more rows than classes.

BatchNorm: DDP does not broadcast buffers before each forward (distributed/__init__.py): in training mode they do
not affect the output, and each rank's running statistics track its own batches. `sync_buffers` averages them
over the ranks before a snapshot uses them (a collective), so grids, checkpoints and evaluations see the estimate
of all ranks' data, identical on every rank.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from distgan import rng


def grid_cols(n: int) -> int:
    return max(1, int(math.ceil(math.sqrt(n))))


def sample_layout(n: int, z_dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(latents [n, z_dim], labels [n] or None, columns) of a run's sample grids (on the CPU)."""
    gen = rng.generator(seed, rng.SAMPLES)
    if not num_classes:
        return torch.randn([n, z_dim], generator=gen), None, grid_cols(n)
    rows = max(num_classes, round(math.sqrt(n)))  # one row per class at least
    cols = max(1, n // rows)
    z = torch.randn([cols, z_dim], generator=gen).repeat(rows, 1)  # row r: the same latents, class r % K
    c = torch.arange(rows).repeat_interleave(cols) % num_classes
    return z, c, cols


class Snapshots:
    def __init__(self, cfg, G_ema, modules, dist, run_dir: Path | None):
        self.cfg, self.G_ema, self.modules, self.dist = cfg, G_ema, modules, dist
        self.run_dir = Path(run_dir) if run_dir is not None else None
        m, t = cfg.model, cfg.train
        z, c, self.cols = sample_layout(t.sample_num, m.z_dim, m.num_classes, t.seed)
        self.fixed_z = z.to(dist.device)
        self.fixed_c = c.to(dist.device) if c is not None else None

    @torch.no_grad()
    def sample(self, z: torch.Tensor, c: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
        """Images from the EMA generator: [N, C, H, W] in [-1, 1].

        Randomness inside G's forward (StyleGAN2's noise inputs) is drawn from torch's generator reseeded for
        the samples, inside a fork of it: every grid gets the same noise (grids over time differ only by
        training), and the training's own draws are untouched, so sampling or not (a resumed run samples at
        other steps) cannot change what trains."""
        parts_c = c.split(chunk) if c is not None else [None] * len(z.split(chunk))
        devices = [z.device] if z.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(rng.derive_seed(self.cfg.train.seed, rng.SAMPLES))
            return torch.cat([self.G_ema.module(zp, cp) for zp, cp in zip(z.split(chunk), parts_c)])

    def write_samples(self, nimg: int, tracker) -> Path:
        from torchvision.utils import save_image

        path = self.run_dir / "samples" / f"fakes-{nimg:09d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        images = self.sample(self.fixed_z, self.fixed_c).float().cpu()
        save_image(images, path, nrow=self.cols, normalize=True, value_range=(-1, 1))
        tracker.log_image("Samples/fakes", path, nimg / 1000)
        return path

    def write_reals(self, stream) -> None:
        from torchvision.utils import save_image

        path = self.run_dir / "samples" / "reals.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        n = self.cfg.train.sample_num
        images = stream.peek(n) if hasattr(stream, "peek") else None
        images = getattr(images, "images", images)  # (a Batch, or the images alone)
        if images is not None:
            save_image(images.float() / 255, path, nrow=grid_cols(len(images)))

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average BatchNorm running statistics over ranks, before a snapshot uses them (a collective)."""
        if self.dist.world_size == 1:
            return
        bufs = [b for m in self.modules for b in m.buffers() if b.is_floating_point()]
        if bufs:
            packed = self.dist.all_reduce_mean(torch.cat([b.flatten() for b in bufs]))
            for b, new in zip(bufs, packed.split([b.numel() for b in bufs])):
                b.copy_(new.view_as(b))
        self.G_ema.copy_buffers()
