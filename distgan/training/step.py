"""One training step, as data: the phases, read top to bottom, and the two functions every forward goes through.

    PHASES (phases(cfg)):  name     trains  every                      loss of one micro-batch
                           D_main   D       step (n_critic times)      reals vs fakes (+ R1/R2/GP at interval 1)
                           D_reg    D       loss.d_reg_interval steps  R1, R2 and/or WGAN-GP, lazily (interval > 1)
                           G_main   G       step                       fool D (+ path length when interval 1)
                           G_reg    G       loss.g_reg_interval steps  path length, lazily (interval > 1)

A phase trains one network: the other is frozen (`requires_grad_(False)`), the batch runs in `accum`
micro-batches (train.batch_per_gpu) whose backwards accumulate, and the network's optimizer steps once (its
gradients reduced across ranks once, in the last micro-batch's backward). A penalty applied every N steps weighs
N times as much (gain), and Adam's lr and betas are rescaled for lazy regularisation (trainer.py).

    run_G(z, c, how)   every generator forward: "train" (G's phase, graph kept), "plain" (no grad: fakes for D),
                       "penalty" (G's path length: the latent's gradient is taken)
    run_D(x, c, how, gen)  every discriminator forward: "train" (D's phase), "penalty" (R1, GP: the input's gradient
                       is taken), "frozen" (D in G's phase)

Every forward passes through these two, so what must happen to every G or D input happens in one place: the
augmentation pipe goes inside run_D (reals and fakes, D's phases and G's). The Net handles refuse a forward that
breaks the phase rules (distributed/nets.py). Labels: `c` are class indices [N] when the model is conditional,
else None; reals carry their own, fakes are drawn like the data (trainer.draw). A relativistic loss (RpGAN) pairs
each fake with a real in G's phase too: G_main then gets the last critic batch's reals, through D frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distgan.losses import gradient_penalty, input_gradients, path_lengths, r1_penalty, r2_penalty


@dataclass(frozen=True)
class Phase:
    name: str  # D_main, D_reg, G_main, G_reg
    net: str  # the network it trains ("D" or "G"); the other is frozen meanwhile
    every: int  # runs at the steps divisible by this
    loss: Callable  # loss(step, mb, gen) -> the loss of micro-batch `mb` (a MicroBatch); gen: the step's RNG
    repeat: int = 1  # D_main: loss.n_critic times per step, each on its own reals and latents


def phases(cfg) -> list[Phase]:
    """The step's phases, in order, for this config."""
    lo = cfg.loss
    d_reg, g_reg = d_regularised(lo), lo.pl_weight > 0
    table = [Phase("D_main", "D", 1, d_main, repeat=lo.n_critic)]
    if d_reg and lo.d_reg_interval > 1:
        table.append(Phase("D_reg", "D", lo.d_reg_interval, d_reg_loss))
    table.append(Phase("G_main", "G", 1, g_main))
    if g_reg and lo.g_reg_interval > 1:
        table.append(Phase("G_reg", "G", lo.g_reg_interval, g_reg_loss))
    return table


def d_regularised(lo) -> bool:
    """Whether D has a penalty (R1, R2 or WGAN-GP)."""
    return lo.r1_gamma > 0 or lo.r2_gamma > 0 or lo.gp_weight > 0


@dataclass
class MicroBatch:
    """One micro-batch of a phase: reals and their labels, latents and the labels of their fakes."""

    index: int
    real: torch.Tensor | None  # [b, C, H, W] float in [-1, 1]
    real_c: torch.Tensor | None  # [b] or None
    z: torch.Tensor  # [b, z_dim]
    fake_c: torch.Tensor | None  # [b] or None
    critic: int = 0  # which of the n_critic D steps (D_main)
    last_critic: bool = True


class GANStep:
    """The phases' shared machinery: the two networks' forwards, the penalties, and their state (pl_mean)."""

    version = 1  # of state_dict()

    def __init__(self, cfg, G, D, loss, precision, stats, dist, micro: int, accum: int):
        self.cfg, self.G, self.D, self.loss, self.precision, self.stats = cfg, G, D, loss, precision, stats
        self.dist, self.device, self.micro, self.accum = dist, dist.device, micro, accum
        self.pl_mean = torch.zeros([], device=self.device)
        self.fakes: list[torch.Tensor] = []  # the last D_main's fakes, per micro-batch (with graph when reused)
        self.class_probs: torch.Tensor | None = None  # generated labels' distribution (trainer sets it)
        self.augment = None  # D's input augmentation (distgan/augment; the trainer sets it when augment.kind is set)
        lo = cfg.loss
        self.inline_d_reg = d_regularised(lo) and lo.d_reg_interval == 1
        # The penalties' weights: the config's, or their ramps' values at this step (the trainer sets them).
        self.r1_gamma, self.r2_gamma = lo.r1_gamma, lo.r2_gamma
        self.inline_g_reg = lo.pl_weight > 0 and lo.g_reg_interval == 1
        # G_main reuses the last D step's fakes with their graph (one G forward less per step); with micro-batches
        # it regenerates them from the same latents instead (G has not changed since: the same images).
        self.reuse = cfg.train.reuse_fake and accum == 1

    # ------------------------------------------------------------------ every forward
    def run_G(self, z: torch.Tensor, c: torch.Tensor | None, how: str = "train", **kwargs):
        with torch.set_grad_enabled(how != "plain"), self.precision.autocast():
            if how == "plain":
                return self.G.plain(z, c)
            return self.G.penalty(z, c, **kwargs) if how == "penalty" else self.G(z, c)

    def run_D(self, x: torch.Tensor, c: torch.Tensor | None, how: str, gen: torch.Generator) -> torch.Tensor:
        if self.augment is not None:  # every image D sees, reals and fakes, in every phase (differentiable)
            x = self.augment(x, gen)
        with self.precision.autocast():
            if how == "frozen":
                return self.D.frozen(x, c)
            return self.D.penalty(x, c) if how == "penalty" else self.D(x, c)

    # ------------------------------------------------------------------ penalties
    def d_penalties(self, real, real_c, real_logits, fake, fake_c, fake_logits, gen, gain: int) -> torch.Tensor:
        """R1 on the reals, R2 on the fakes (their logits given when taken in D_main, with the input's gradient
        kept), and/or WGAN-GP on interpolates."""
        lo = self.cfg.loss
        scale = self.D.loss_scale()
        total = torch.zeros([], device=self.device)
        if lo.r1_gamma > 0:
            if real_logits is None:
                real = real.detach().requires_grad_(True)
                real_logits = self.run_D(real, real_c, "penalty", gen)
            r1 = r1_penalty(input_gradients(real_logits, real, scale))  # [b]
            self.stats.report("Loss/D/r1", r1)
            # `real_logits * 0` ties every D parameter into this backward, as DDP requires.
            total = total + r1.mean() * (self.r1_gamma / 2) * gain + real_logits.float().mean() * 0
        if lo.r2_gamma > 0:
            if fake_logits is None:
                fake = fake.detach().float().requires_grad_(True)
                fake_logits = self.run_D(fake, fake_c, "penalty", gen)
            r2 = r2_penalty(input_gradients(fake_logits, fake, scale))  # [b]
            self.stats.report("Loss/D/r2", r2)
            total = total + r2.mean() * (self.r2_gamma / 2) * gain + fake_logits.float().mean() * 0
        if lo.gp_weight > 0:
            u = torch.rand([real.shape[0], 1, 1, 1], generator=gen, device=self.device)
            x_hat = torch.lerp(real.detach(), fake.detach().float(), u).requires_grad_(True)
            logits = self.run_D(x_hat, real_c, "penalty", gen)
            gp = gradient_penalty(input_gradients(logits, x_hat, scale))  # [b]
            self.stats.report("Loss/D/gp", gp)
            total = total + gp.mean() * lo.gp_weight * gain + logits.float().mean() * 0
        return total

    def g_penalty(self, gen, gain: int) -> torch.Tensor:
        """Path length: ||J^T y|| for random unit-variance image directions y should stay near its running mean,
        so equal steps in the latent make equal changes in the image. J is the Jacobian of the image in z, or in
        the styles w for a family that has them (`path_length_on_w`: StyleGAN2, whose penalty is on w)."""
        lo, m = self.cfg.loss, self.cfg.model
        z = torch.randn([self.micro, m.z_dim], generator=gen, device=self.device).requires_grad_(True)
        c = self.draw_labels(self.micro, gen)
        if getattr(self.G.module, "path_length_on_w", False):
            img, wrt = self.run_G(z, c, "penalty", return_ws=True)  # [b, C, H, W], ws [b, num_ws, w_dim]
        else:
            img, wrt = self.run_G(z, c, "penalty"), z  # [b, C, H, W]
        y = torch.randn(img.shape, generator=gen, device=self.device) / math.sqrt(img.shape[2] * img.shape[3])
        lengths = path_lengths(input_gradients(img.float() * y, wrt, self.G.loss_scale()))  # [b]
        batch_mean = self.dist.all_reduce_mean(lengths.detach().mean().clone())  # the same on every rank
        self.pl_mean.lerp_(batch_mean, lo.pl_decay)
        penalty = (lengths - self.pl_mean).square()
        self.stats.report("Loss/G/pl", penalty)
        self.stats.report("G/pl_mean", self.pl_mean)
        return penalty.mean() * lo.pl_weight * gain + img.float().mean() * 0

    def draw_labels(self, n: int, gen) -> torch.Tensor | None:
        """Labels for n generated images: like the data's class frequencies when known, else uniform."""
        k = self.cfg.model.num_classes
        if not k:
            return None
        if self.class_probs is not None:
            return torch.multinomial(self.class_probs, n, replacement=True, generator=gen)
        return torch.randint(k, [n], generator=gen, device=self.device)

    def state_dict(self) -> dict:
        return {"pl_mean": self.pl_mean.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.pl_mean.copy_(state["pl_mean"])


# ---------------------------------------------------------------------- the phases' losses (one micro-batch each)


def d_main(s: GANStep, mb: MicroBatch, gen) -> torch.Tensor:
    """D learns reals vs fakes; the fakes are kept for G_main (with G's graph when it reuses them)."""
    keep_graph = s.reuse and mb.last_critic
    fake = s.run_G(mb.z, mb.fake_c, "train" if keep_graph else "plain")
    if mb.index == 0:
        s.fakes = []
    s.fakes.append(fake)
    lo = s.cfg.loss
    r1, r2 = s.inline_d_reg and lo.r1_gamma > 0, s.inline_d_reg and lo.r2_gamma > 0
    # R1/R2 in the main step share the main step's logits (their inputs then need gradients).
    real = mb.real.detach().requires_grad_(True) if r1 else mb.real
    fake = fake.detach().requires_grad_(True) if r2 else fake.detach()
    real_logits = s.run_D(real, mb.real_c, "penalty" if r1 else "train", gen)  # [b]
    fake_logits = s.run_D(fake, mb.fake_c, "penalty" if r2 else "train", gen)  # [b]
    loss = s.loss.d_loss(real_logits.float(), fake_logits.float())
    s.stats.report("Loss/D/main", loss)
    s.stats.report("D/real_logit", real_logits)
    s.stats.report("D/fake_logit", fake_logits)
    if s.augment is not None:
        s.augment.observe(real_logits)  # ADA's overfitting heuristic
    # D(x) and D(G(z)): the mean probability D gives a real and a fake of being real (0.5 each when D is lost).
    s.stats.report("D/real_prob", torch.sigmoid(real_logits.detach().float()))
    s.stats.report("D/fake_prob", torch.sigmoid(fake_logits.detach().float()))
    if s.inline_d_reg:
        loss = loss + s.d_penalties(real, mb.real_c, real_logits if r1 else None, fake, mb.fake_c,
                                    fake_logits if r2 else None, gen, gain=1)  # fmt: skip
    return loss


def d_reg_loss(s: GANStep, mb: MicroBatch, gen) -> torch.Tensor:
    return s.d_penalties(mb.real, mb.real_c, None, s.fakes[mb.index], mb.fake_c, None, gen,
                         gain=s.cfg.loss.d_reg_interval)  # fmt: skip


def g_main(s: GANStep, mb: MicroBatch, gen) -> torch.Tensor:
    """G learns to fool D (frozen), on the last D step's fakes or regenerated from its latents."""
    fake = s.fakes[mb.index] if s.reuse else s.run_G(mb.z, mb.fake_c, "train")
    fake_logits = s.run_D(fake, mb.fake_c, "frozen", gen)
    real_logits = s.run_D(mb.real, mb.real_c, "frozen", gen).float() if s.loss.relativistic else None
    loss = s.loss.g_loss(fake_logits.float(), real_logits)
    s.stats.report("Loss/G/main", loss)
    if s.inline_g_reg:
        loss = loss + s.g_penalty(gen, gain=1)
    return loss


def g_reg_loss(s: GANStep, mb: MicroBatch, gen) -> torch.Tensor:
    return s.g_penalty(gen, gain=s.cfg.loss.g_reg_interval)
