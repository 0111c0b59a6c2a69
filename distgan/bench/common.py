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


def bench_stream(cfg, rank: int = 0, world: int = 1, num: int = 2048, **kwargs):
    """An ArrayStream of bench_data (`num` shapes): what every bench trains on."""
    from distgan.data import ArrayStream

    images, labels = bench_data(cfg, num)
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
    """The textbook eager step of the config's recipe, on the same networks and data: the reference.

    DCGAN's step as pytorch/examples/dcgan writes it (D on reals and fakes, then G fools D on the same fakes). For
    the other families' recipes the same step also does what their papers' training loops do: the config's loss
    (hinge, RpGAN, ...), n_critic D steps, R1/R2 (lazily every d_reg_interval steps with the interval as gain, or in
    the main step at interval 1), StyleGAN2's path length in w every g_reg_interval steps, and Adam's lr and betas
    rescaled for lazy regularisation. Losses and penalties are distgan.losses' pure functions (tested against
    autograd references on their own): what the ratio measures is the framework around them (phases, Net rules,
    stats, EMA), not a recipe the reference skips. A conditional model gets the reals' labels and uniformly drawn
    labels for its fakes.
    """
    import math

    import torch

    from distgan.losses import LOSSES, input_gradients, path_lengths, r1_penalty, r2_penalty
    from distgan.models import build_discriminator, build_generator

    torch.manual_seed(0)
    G, D = build_generator(cfg.model).to(device), build_discriminator(cfg.model).to(device)
    o, lo, loss_fns = cfg.optim, cfg.loss, LOSSES[cfg.loss.kind]
    d_every = lo.d_reg_interval if lo.r1_gamma > 0 or lo.r2_gamma > 0 else 0
    g_every = lo.g_reg_interval if lo.pl_weight > 0 else 0

    def adam(params, lr, every):
        c = every / (every + 1) if every > 1 else 1.0  # lazy regularisation (StyleGAN2, appendix B)
        return torch.optim.Adam(params, lr * c, betas=(o.beta1**c, o.beta2**c), eps=o.eps)

    opt_g, opt_d = adam(G.parameters(), o.lr_g, g_every), adam(D.parameters(), o.lr_d, d_every)
    data = torch.from_numpy(images)
    b, z_dim = cfg.train.batch, cfg.model.z_dim
    classes = torch.from_numpy(labels) if labels is not None else None
    k = cfg.model.num_classes if classes is not None else 0
    cargs = (lambda c: (c,)) if k else (lambda c: ())
    on_w = getattr(G, "path_length_on_w", False)
    pl_mean = torch.zeros([], device=device)
    i = 0

    def r1_r2(real, real_logits, fake, fake_logits):  # inputs with requires_grad, and their logits
        pen = torch.zeros([], device=device)
        if lo.r1_gamma > 0:
            pen = pen + r1_penalty(input_gradients(real_logits, real)).mean() * lo.r1_gamma / 2
        if lo.r2_gamma > 0:
            pen = pen + r2_penalty(input_gradients(fake_logits, fake)).mean() * lo.r2_gamma / 2
        return pen

    def path_length():
        nonlocal pl_mean
        z = torch.randn(b, z_dim, device=device, requires_grad=True)
        c = torch.randint(k, [b], device=device) if k else None
        img, wrt = G(z, c, return_ws=True) if on_w else (G(z, c), z)
        y = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
        lengths = path_lengths(input_gradients(img * y, wrt))
        pl_mean = pl_mean.lerp(lengths.detach().mean(), lo.pl_decay)
        return (lengths - pl_mean).square().mean() * lo.pl_weight

    def step():
        nonlocal i
        for _ in range(lo.n_critic):
            idx = torch.randint(len(data), [b])
            real = data[idx].to(device).float() / 127.5 - 1
            c_real = classes[idx].to(device) if k else None
            c_fake = torch.randint(k, [b], device=device) if k else None
            opt_d.zero_grad()
            fake = G(torch.randn(b, z_dim, device=device), *cargs(c_fake))
            inline = d_every == 1  # R1/R2 in the main step, on its own logits
            x_real = real.requires_grad_(True) if inline else real
            x_fake = fake.detach().requires_grad_(True) if inline else fake.detach()
            real_logits, fake_logits = D(x_real, *cargs(c_real)), D(x_fake, *cargs(c_fake))
            loss = loss_fns.d_loss(real_logits, fake_logits)
            if inline:
                loss = loss + r1_r2(x_real, real_logits, x_fake, fake_logits)
            loss.backward()
            opt_d.step()
        real = real.detach()
        if d_every > 1 and i % d_every == 0:  # lazy R1 (reals) and R2 (fakes), weighed by the interval
            opt_d.zero_grad()
            x_real, x_fake = real.requires_grad_(True), fake.detach().requires_grad_(True)
            (r1_r2(x_real, D(x_real, *cargs(c_real)), x_fake, D(x_fake, *cargs(c_fake))) * d_every).backward()
            opt_d.step()
            real = real.detach()
        opt_g.zero_grad()  # G fools D on the last D step's fakes
        for p in D.parameters():
            p.requires_grad_(False)
        fake_logits = D(fake, *cargs(c_fake))
        real_logits = D(real, *cargs(c_real)) if loss_fns.relativistic else None
        loss = loss_fns.g_loss(fake_logits, real_logits)
        if g_every == 1:
            loss = loss + path_length()
        loss.backward()
        opt_g.step()
        if g_every > 1 and i % g_every == 0:  # lazy path length, weighed by the interval
            opt_g.zero_grad()
            (path_length() * g_every).backward()
            opt_g.step()
        for p in D.parameters():
            p.requires_grad_(True)
        i += 1

    step.G, step.D = G, D  # for the tests
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
