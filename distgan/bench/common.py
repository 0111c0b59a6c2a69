"""What several benches share: the timer, memory readings, the in-memory images and step functions they train
on, and the helpers for their child processes (distgan.local_launch runs those).

Nothing here imports another module of distgan.bench: every bench may import this one, so it must stay the bottom
of the package's import graph (tests/unit/test_bench_package.py checks that).
"""

from __future__ import annotations

import os
import time

# What distgan.local_launch sets in each child: a process that drops them is a world of one.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------- timing and memory


def timed(fn, steps: int, device) -> float:
    """Seconds per step."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def current_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mb("VmRSS")


def peak_memory_mb(device) -> float:
    """Peak since the process started: CUDA allocator's allocated bytes, or the CPU resident set (VmHWM)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status_mb("VmHWM")


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


# ---------------------------------------------------------------------- what the benches train on


def bench_images(cfg, num: int = 2048):
    """In-memory shapes at the model's resolution and channel count: the step time does not depend on what the
    images show, and no config then needs its dataset (MNIST) downloaded to be measured."""
    return bench_data(cfg, num)[0]


def bench_data(cfg, num: int = 2048):
    """(images, labels) of bench_images; the labels (the shapes' classes, folded into a conditional model's class
    count) only when the model is conditional, else None."""
    from distgan.data import shapes

    images, labels = shapes.generate(num, seed=0, resolution=cfg.model.resolution)  # uint8 [N, 3, res, res]
    if cfg.model.channels == 1:
        images = images.mean(axis=1, keepdims=True).astype(images.dtype)
    k = cfg.model.num_classes
    return images, (labels % k if isinstance(k, int) and k > 0 else None)


def bench_stream(cfg, rank: int = 0, world: int = 1, **kwargs):
    """An ArrayStream of bench_data: what every bench trains on."""
    from distgan.data import ArrayStream

    images, labels = bench_data(cfg)
    return ArrayStream(images, cfg.train.batch, rank, world, cfg.train.seed, labels=labels, **kwargs)


def make_steppers(cfg, dist, names=("distgan", "plain")) -> dict:
    """{"distgan": one Trainer step, "plain": one textbook step}, on the same data and device."""
    from distgan.training import Trainer

    images, labels = bench_data(cfg)
    out = {}
    for name in names:
        if name == "distgan":
            trainer = Trainer(cfg, dist, bench_stream(cfg))
            out[name] = lambda trainer=trainer: trainer.train_step(*trainer.draw())
        else:
            out[name] = plain_loop(cfg, images, dist.device, labels)
    return out


def plain_loop(cfg, images, device, labels=None):
    """The textbook eager DCGAN step (pytorch/examples/dcgan), on the same networks and data: the reference (a
    conditional model gets the reals' labels and uniformly drawn labels for its fakes)."""
    import torch
    import torch.nn.functional as F

    from distgan.models import build_discriminator, build_generator

    torch.manual_seed(0)
    G, D = build_generator(cfg.model).to(device), build_discriminator(cfg.model).to(device)
    o = cfg.optim
    opt_g = torch.optim.Adam(G.parameters(), o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(D.parameters(), o.lr_d, betas=(o.beta1, o.beta2))
    data = torch.from_numpy(images)
    b, z_dim = cfg.train.batch, cfg.model.z_dim
    ones, zeros = torch.ones(b, device=device), torch.zeros(b, device=device)

    classes = torch.from_numpy(labels) if labels is not None else None
    k = cfg.model.num_classes if classes is not None else 0

    def step():
        idx = torch.randint(len(data), [b])
        real = data[idx].to(device).float() / 127.5 - 1
        c_real = classes[idx].to(device) if k else None
        c_fake = torch.randint(k, [b], device=device) if k else None
        args = (lambda c: (c,)) if k else (lambda c: ())
        # D: real and fake batches, one backward each (as pytorch/examples does).
        opt_d.zero_grad()
        F.binary_cross_entropy_with_logits(D(real, *args(c_real)), ones).backward()
        fake = G(torch.randn(b, z_dim, device=device), *args(c_fake))
        F.binary_cross_entropy_with_logits(D(fake.detach(), *args(c_fake)), zeros).backward()
        opt_d.step()
        # G: fool D on the same fakes.
        opt_g.zero_grad()
        F.binary_cross_entropy_with_logits(D(fake, *args(c_fake)), ones).backward()
        opt_g.step()

    return step


# ---------------------------------------------------------------------- child processes (distgan.local_launch)


def child_world(rank: int, world: int, together: bool) -> tuple[int, int]:
    """(rank, world) for a child of run_local: unchanged when `together`; otherwise the launch variables are
    dropped, so the process trains as a world of one: the same work, no communication."""
    if together:
        return rank, world
    for key in LAUNCH_ENV:
        os.environ.pop(key, None)
    return 0, 1
