"""The adversarial training loop: named phases, EMA, progress in images, snapshots.

One training step, read top to bottom in `train_step`:

    for each of n_critic D steps:
        fake = G(z)                       (kept with its graph on the last one, for G_main to reuse)
        D_main   D learns reals vs fakes  (+ D's penalties in the same backward when d_reg_interval == 1)
        D_reg    R1 / gradient penalty    (every d_reg_interval steps, lazily, when > 1)
    G_main       G learns to fool D, on the reused fakes, D frozen
    G_reg        path-length penalty      (every g_reg_interval steps)
    G_ema        moving average of G's weights

Every phase toggles which network may receive gradients, runs one backward (one gradient reduction across
ranks) and steps that network's own optimizer through that network's own loss scaler. G and D are `Net`s
(distributed/nets.py): DDP modules or DeepSpeed ZeRO engines, and the phases say what each forward is for:
`D(x)` in D's own phase, `D.penalty(x)` for a gradient penalty, `D.frozen(x)` while G trains. D is frozen
(`requires_grad_(False)`) during G's phases, so G's backward leaves D's gradients alone; the nets refuse a use
that breaks these rules instead of training wrong.

Progress is counted in real images shown to D (`cur_nimg`); all random numbers of a step derive from
(seed, rank, cur_nimg) so a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import signal
import time
from pathlib import Path

import torch

from distgan import faults, launcher, rng
from distgan.checkpoint import CheckpointManager, load_file, rank_file, read_manifest
from distgan.config import micro_batches
from distgan.distributed.nets import make_adam
from distgan.ema import EMA, ema_beta
from distgan.errors import CheckpointError, DataError, Diverged, Interrupted
from distgan.losses import LOSSES, gradient_penalty, input_gradients, path_lengths, r1_penalty
from distgan.models import build_discriminator, build_generator
from distgan.precision import Precision
from distgan.stats import Collector
from distgan.tracking import NullTracker, Tracker

STATE_FORMAT = 2


class Trainer:
    def __init__(self, cfg, dist, stream, run_dir: Path | None = None, console=None):
        t, lo = cfg.train, cfg.loss
        self.cfg, self.dist, self.stream = cfg, dist, stream
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.console = console
        self.device = dist.device
        self.precision = Precision(t.precision, dist.device)
        self.loss = LOSSES[lo.kind]
        # The batch: train.batch images per step over all ranks; each rank's share runs in `accum` micro-batches of
        # `micro` images (train.batch_per_gpu caps a forward's size; gradients accumulate over the micro-batches).
        self.batch_local, self.micro, self.accum = micro_batches(t.batch, dist.world_size, t.batch_per_gpu)

        # Which penalties run, and whether lazily in a phase of their own.
        self.d_penalty = lo.r1_gamma > 0 or lo.gp_weight > 0
        self.g_penalty = lo.pl_weight > 0
        self.d_reg_lazy = self.d_penalty and lo.d_reg_interval > 1
        self.g_reg_lazy = self.g_penalty and lo.g_reg_interval > 1

        # Construct networks: identical initial weights on every rank (DDP would broadcast rank 0's anyway).
        torch.manual_seed(rng.derive_seed(t.seed, rng.INIT))
        self.G_module = build_generator(cfg.model).to(self.device)
        self.D_module = build_discriminator(cfg.model).to(self.device)
        self.G_ema = EMA(self.G_module)

        # One optimizer and one loss scaler per network. Adam is fused where torch has the kernel: one kernel per
        # update, and a skipped update (non-finite gradients) decided on the device, without a host sync.
        o = cfg.optim
        self.hparams = {
            "G": self._adam_hparams(o.lr_g, lo.g_reg_interval if self.g_reg_lazy else None),
            "D": self._adam_hparams(o.lr_d, lo.d_reg_interval if self.d_reg_lazy else None),
        }
        self.opt_G = make_adam(self.G_module.parameters(), **self.hparams["G"], device=self.device)
        self.opt_D = make_adam(self.D_module.parameters(), **self.hparams["D"], device=self.device)

        # Distribute across processes: G and D as DDP modules (or plain ones in a world of one), or as two
        # DeepSpeed ZeRO engines. The phases below only say what each forward is for (distributed/nets.py).
        self.strategy = cfg.dist.strategy = launcher.resolve_strategy(cfg.dist.strategy, t.precision)
        self.G, self.D = (
            dist.make_net(
                name,
                module,
                opt,
                self.strategy,
                t.precision,
                self.micro,
                self.accum,
                scaler=self.precision.make_scaler(),
            )  # fmt: skip
            for name, module, opt in (("G", self.G_module, self.opt_G), ("D", self.D_module, self.opt_D))
        )
        self.nets = {"G": self.G, "D": self.D}

        # Counters and running values (all part of the checkpoint).
        self.cur_nimg = 0
        self.step_idx = 0
        self.data_totals = {"samples": 0, "bad": 0}  # over all ranks, for data.max_bad_fraction
        # Skipped steps are counted on the device (a step must not wait for the host to learn whether it skipped);
        # the host reads them at log intervals and while a checkpoint waits (`_read_skips`).
        self.skips_in_a_row = 0  # host copies, as of the last read
        self.skips_total = 0
        self._skip_counts = torch.zeros(3, dtype=torch.int64, device=self.device)  # [in a row, worst run, total]
        self.rollbacks = 0
        self.nimg_discarded = 0  # images trained and thrown away by rollbacks: W&B's step is cur_nimg + this
        self._skips_alerted = 0  # skips_total when the last alert about skipped steps went out
        self._step_skipped = torch.zeros((), device=self.device)  # 1 when a phase of this step skipped (device)
        self._beat = None  # the watchdog's beat(step, phase, what), during fit
        self._phase_no = 0
        self.pl_mean = torch.zeros([], device=self.device)
        self.stats = Collector(self.device)
        self.tracker: Tracker = NullTracker()

    def _adam_hparams(self, lr: float, reg_interval: int | None) -> dict:
        # Lazy regularisation steps the optimizer interval+1 times per interval steps: rescale lr and betas so
        # the effective step size and momentum horizon are unchanged (StyleGAN2, Karras et al. 2020, app. B).
        o = self.cfg.optim
        ratio = reg_interval / (reg_interval + 1) if reg_interval else 1.0
        return {"lr": lr * ratio, "betas": (o.beta1**ratio, o.beta2**ratio), "eps": o.eps}

    # ================================================================== one step

    def train_step(self, reals, latents: torch.Tensor, gen: torch.Generator) -> None:
        """One iteration.

        reals:   n_critic batches [B_local, C, H, W], uint8 (or float in [-1, 1]): a list, or stacked on dim 0
        latents: [n_critic (+1 unless reusing fakes), B_local, z_dim]
        gen:     generator for the step's other random numbers (interpolation weights, path-length directions)
        Each phase runs its batch in `accum` micro-batches and steps its optimizer once.
        """
        lo, n_critic = self.cfg.loss, self.cfg.loss.n_critic
        # G_main reuses the last D step's fakes with their graph; with micro-batches it regenerates them from the
        # same latents instead (G has not changed since: the same images), rather than keep every graph alive.
        reuse = self.cfg.train.reuse_fake
        d_reg_now = self.d_penalty and self.step_idx % lo.d_reg_interval == 0
        g_reg_now = self.g_penalty and self.step_idx % lo.g_reg_interval == 0
        self._step_skipped = torch.zeros((), device=self.device)

        # D phases.
        for k in range(n_critic):
            real = self._to_float(reals[k])
            keep_graph = reuse and k == n_critic - 1 and self.accum == 1
            fakes = self._phase_D_main(real, latents[k], gen, with_reg=d_reg_now and not self.d_reg_lazy,
                                       keep_graph=keep_graph)  # fmt: skip
            if d_reg_now and self.d_reg_lazy and k == n_critic - 1:
                self._phase_D_reg(real, fakes, gen)

        # G phases.
        if reuse and self.accum == 1:
            g_inputs = fakes  # with their graph
        else:
            g_inputs = latents[n_critic - 1 if reuse else n_critic].chunk(self.accum)
        self._phase_G_main(g_inputs, gen, with_reg=g_reg_now and not self.g_reg_lazy)
        if g_reg_now and self.g_reg_lazy:
            self._phase_G_reg(gen)

        # Skipped steps, counted on the device.
        c = self._skip_counts
        skipped = (self._step_skipped > 0).long()
        c[0] = (c[0] + 1) * skipped  # in a row
        c[1] = torch.maximum(c[1], c[0])  # the longest run since the host last looked
        c[2] += skipped

        # G_ema.
        step_nimg = self.cfg.train.batch * n_critic
        self.cur_nimg += step_nimg
        self.step_idx += 1
        t = self.cfg.train
        self.G_ema.update(ema_beta(step_nimg, self.cur_nimg, t.ema_kimg, t.ema_rampup))

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()

    def _generate(self, z: torch.Tensor, with_grad: bool) -> torch.Tensor:
        # With grad in G's own phase (its backward comes in G_main); without, the plain module.
        with torch.set_grad_enabled(with_grad), self.precision.autocast():
            return self.G(z) if with_grad else self.G_module(z)

    # ------------------------------------------------------------------ phases

    def _phase_D_main(self, real, z, gen, with_reg: bool, keep_graph: bool) -> list[torch.Tensor]:
        """D learns reals vs fakes of latents `z`; returns the fakes per micro-batch (with G's graph if asked)."""
        self.D.set_trainable(True)
        lo = self.cfg.loss
        r1_now = with_reg and lo.r1_gamma > 0
        fakes = []
        for i, (real_i, z_i) in enumerate(zip(real.chunk(self.accum), z.chunk(self.accum))):
            real = real_i
            fake = self._generate(z_i, with_grad=keep_graph)
            fakes.append(fake)
            fake = fake.detach()
            with self.D.micro_batch(i):
                if r1_now:  # R1 in the main step: the real logits are also the penalty's, so they take its forward
                    real = real.detach().requires_grad_(True)
                with self.precision.autocast():
                    real_logits = self.D.penalty(real) if r1_now else self.D(real)  # [B]
                    fake_logits = self.D(fake)  # [B]
                loss = self.loss.d_loss(real_logits.float(), fake_logits.float())
                self.stats.report("Loss/D/main", loss)
                self.stats.report("D/real_logit", real_logits)
                self.stats.report("D/fake_logit", fake_logits)
                # D(x) and D(G(z)): the mean probability D gives a real and a fake of being real (0.5 each when D
                # is lost).
                self.stats.report("D/real_prob", torch.sigmoid(real_logits.detach().float()))
                self.stats.report("D/fake_prob", torch.sigmoid(fake_logits.detach().float()))
                if with_reg:
                    loss = loss + self._d_penalties(real, real_logits, fake, gen, gain=1)
                self._backward("D", loss)
        self._step("D")
        return fakes

    def _phase_D_reg(self, real, fakes, gen) -> None:
        self.D.set_trainable(True)
        for i, (real_i, fake) in enumerate(zip(real.chunk(self.accum), fakes)):
            with self.D.micro_batch(i):
                real = real_i.detach().requires_grad_(True)
                real_logits = None
                if self.cfg.loss.r1_gamma > 0:
                    with self.precision.autocast():
                        real_logits = self.D.penalty(real)
                loss = self._d_penalties(real, real_logits, fake.detach(), gen, gain=self.cfg.loss.d_reg_interval)
                self._backward("D", loss)
        self._step("D")

    def _d_penalties(self, real, real_logits, fake, gen, gain: int) -> torch.Tensor:
        # gain = the regularisation interval: a penalty applied every N steps weighs N times as much.
        lo = self.cfg.loss
        scale = self.D.loss_scale()
        total = torch.zeros([], device=self.device)
        if lo.r1_gamma > 0:
            r1 = r1_penalty(input_gradients(real_logits, real, scale))  # [B]
            self.stats.report("Loss/D/r1", r1)
            # `real_logits * 0` ties every D parameter into this backward, as DDP requires.
            total = total + r1.mean() * (lo.r1_gamma / 2) * gain + real_logits.float().mean() * 0
        if lo.gp_weight > 0:
            u = torch.rand([real.shape[0], 1, 1, 1], generator=gen, device=self.device)
            x_hat = torch.lerp(real.detach(), fake.detach().float(), u).requires_grad_(True)
            with self.precision.autocast():
                logits = self.D.penalty(x_hat)
            gp = gradient_penalty(input_gradients(logits, x_hat, scale))  # [B]
            self.stats.report("Loss/D/gp", gp)
            total = total + gp.mean() * lo.gp_weight * gain + logits.float().mean() * 0
        return total

    def _phase_G_main(self, inputs, gen, with_reg: bool) -> None:
        """G learns to fool D; `inputs` per micro-batch: fakes with their graph (reused), or latents to generate."""
        self.D.set_trainable(False)  # D is frozen: G's backward must not touch D's gradients
        for i, x in enumerate(inputs):
            with self.G.micro_batch(i):
                fake = x if x.dim() == 4 else self._generate(x, with_grad=True)
                with self.precision.autocast():
                    fake_logits = self.D.frozen(fake)
                loss = self.loss.g_loss(fake_logits.float())
                self.stats.report("Loss/G/main", loss)
                if with_reg:
                    loss = loss + self._g_penalty(gen, gain=1)
                self._backward("G", loss)
        self._step("G")
        self.D.set_trainable(True)

    def _phase_G_reg(self, gen) -> None:
        self.D.set_trainable(False)
        for i in range(self.accum):
            with self.G.micro_batch(i):
                self._backward("G", self._g_penalty(gen, gain=self.cfg.loss.g_reg_interval))
        self._step("G")
        self.D.set_trainable(True)

    def _g_penalty(self, gen, gain: int) -> torch.Tensor:
        # Path length on the latent: ||J_G(z)^T y|| for random unit-variance image directions y should stay
        # near its running mean, so equal steps in z make equal changes in the image.
        lo, m = self.cfg.loss, self.cfg.model
        z = torch.randn([self.micro, m.z_dim], generator=gen, device=self.device).requires_grad_(True)
        with self.precision.autocast():
            img = self.G.penalty(z)  # [B, C, H, W]
        y = torch.randn(img.shape, generator=gen, device=self.device) / math.sqrt(img.shape[2] * img.shape[3])
        lengths = path_lengths(input_gradients(img.float() * y, z, self.G.loss_scale()))
        batch_mean = self.dist.all_reduce_mean(lengths.detach().mean().clone())  # the same on every rank
        self.pl_mean.lerp_(batch_mean, lo.pl_decay)
        penalty = (lengths - self.pl_mean).square()
        self.stats.report("Loss/G/pl", penalty)
        self.stats.report("G/pl_mean", self.pl_mean)
        return penalty.mean() * lo.pl_weight * gain + img.float().mean() * 0

    def _backward(self, net: str, loss) -> None:
        """One micro-batch's backward (gradients reduced across ranks with the step's last micro-batch).

        Every rank must skip the same updates. Gradients are reduced across ranks, so a non-finite gradient on one
        rank is non-finite on all; a non-finite loss on one rank is made into one: `poison` is 0 when the loss is
        finite and NaN when not, and multiplies one weight into the loss, so that weight's gradient becomes NaN
        everywhere after the reduction (no extra collective, no host sync). The gradient norm then decides, on
        the device, under DDP (nets.TorchNet) and DeepSpeed (zero.ZeroNet) alike.
        """
        if faults.fires("nan_loss", rank=self.dist.rank, step=self.step_idx, net=net):
            loss = loss * float("nan")
        first = self.nets[net].params[0]
        poison = torch.where(torch.isfinite(loss.detach()), 0.0, float("nan"))
        loss = loss + poison * first.view(-1)[0]
        self._mark(f"{net} backward")
        self.nets[net].backward(loss)

    def _step(self, net: str) -> None:
        """The network's optimizer step (skipped on the device when a gradient is not finite), and its stats."""
        scale = self.nets[net].loss_scale()
        if scale is not None:
            self.stats.report(f"{net}/loss_scale", scale)
        norm, skipped = self.nets[net].step()
        self.stats.report(f"{net}/grad_norm", norm)
        self.stats.report(f"{net}/skipped", skipped)
        self._step_skipped = torch.maximum(self._step_skipped, skipped)

    def _read_skips(self) -> int:
        """Read the device's skip counts into the host (a host sync: at log intervals and while a checkpoint
        waits); returns the longest run of skipped steps since the last read."""
        in_a_row, worst, total = self._skip_counts.tolist()
        self._skip_counts[1] = in_a_row  # the run still going on counts towards the next read's longest
        self.skips_in_a_row, self.skips_total = in_a_row, total
        return worst

    # ================================================================== the loop

    def draw(self):
        """The next step's inputs: reals from the stream, latents and a generator from (seed, rank, cur_nimg)."""
        t, lo = self.cfg.train, self.cfg.loss
        reals = [next(self.stream) for _ in range(lo.n_critic)]  # n_critic x [B_local, C, H, W], as streamed
        # After a rollback the steps draw other latents (else a deterministic blow-up would simply repeat).
        salt = (self.rollbacks,) if self.rollbacks else ()
        gen = rng.generator(t.seed, rng.STEP, self.dist.rank, self.cur_nimg, *salt, device=self.device)
        n_z = lo.n_critic + (0 if t.reuse_fake else 1)
        latents = torch.randn([n_z, self.batch_local, self.cfg.model.z_dim], generator=gen, device=self.device)
        return reals, latents, gen

    def fit(self, tracker: Tracker | None = None, stop=None, watchdog=None, on_step=None) -> dict[str, float]:
        """Train until `train.total_kimg`, with logs, samples and checkpoints on the way; returns the summary.

        stop:     a watchdog.StopSignals: ranks agree on a stop signal at a step boundary, save, raise Interrupted
        watchdog: a watchdog.Watchdog, told where this rank is (a rank that stops beating is named)
        on_step:  called after every step (tests record losses and hashes with it)
        """
        t = self.cfg.train
        self.tracker = tracker or NullTracker()
        self.tracker.step_offset = self.nimg_discarded
        self._skips_alerted = self.skips_total  # (a resumed run's earlier skips were reported by its first part)
        total_nimg = round(t.total_kimg * 1000)
        every = {
            "log": max(1, round(t.log_every_kimg * 1000)),
            "sample": max(1, round(t.sample_every_kimg * 1000)),
            "ckpt": max(1, round(t.ckpt_every_kimg * 1000)),
        }
        ckpts = CheckpointManager(self.run_dir, t.keep_ckpts, warn=self._warn) if self.run_dir else None
        self._beat = watchdog.beat if watchdog is not None else None
        # Inline metrics (eval.every_kimg > 0): built now, so a missing extractor fails before the first step.
        evaluator = self._make_evaluator() if self.cfg.eval.every_kimg > 0 else None
        if evaluator is not None:
            every["eval"] = max(1, round(self.cfg.eval.every_kimg * 1000))

        # Fixed latents for the sample grids: the same for the whole run, across resumes.
        self.fixed_z = torch.randn(
            [t.sample_num, self.cfg.model.z_dim], generator=rng.generator(t.seed, rng.SAMPLES)
        ).to(self.device)
        if self.run_dir is not None and self.dist.is_main and self.cur_nimg == 0:
            self._write_reals_grid()
            self._write_samples()

        start_nimg, start_time = self.cur_nimg, time.time()
        self._tick = (self.cur_nimg, time.time())
        last_stats: dict[str, float] = {}
        ckpt_pending = False
        if self.console is not None:
            self.console.start_bar(total_nimg, self.cur_nimg)
        while self.cur_nimg < total_nimg:
            self._phase_no = 0
            self._mark("step start")
            faults.kill_if("kill", step=self.step_idx)
            if faults.fires("usr1", step=self.step_idx):  # a stop signal at an exact step (gpu-check, tests)
                os.kill(os.getpid(), signal.SIGUSR1)
            if faults.fires("hang", step=self.step_idx):
                while True:  # a rank stuck for good (a dead file system, a deadlocked loader)
                    time.sleep(1)
            prev = self.cur_nimg
            batch = self.draw()
            self._mark("data ready")
            self.train_step(*batch)
            signum = stop.end_step() if stop is not None else 0
            if on_step is not None:
                on_step(self)
            done = self.cur_nimg >= total_nimg
            # An interval is due when this step crossed one of its multiples (and everything at the end).
            due = {name: done or prev // n != self.cur_nimg // n for name, n in every.items()}

            # Skipped steps are counted on the device; the host looks at log intervals, while a checkpoint is due or
            # waiting, at a stop and at the end (no other step waits for the GPU). A run of
            # train.max_consecutive_skips skipped steps seen there rolls back (and what was due is due again when
            # the steps after the checkpoint are trained again).
            if due["log"] or due["ckpt"] or ckpt_pending or signum or done:
                worst = self._read_skips()
                if worst >= t.max_consecutive_skips:
                    self._rollback(ckpts, f"{worst} steps in a row had non-finite losses or gradients")
                    ckpt_pending = False
                    continue
            ckpt_pending = ckpt_pending or due["ckpt"]

            # A checkpoint due during a streak of skipped steps waits for the first good step: a rollback must
            # go back to before the trouble, and the good checkpoints must not be purged by ones made during it.
            save_now = ckpts is not None and (signum or (ckpt_pending and (self.skips_in_a_row == 0 or done)))

            if due["log"]:
                last_stats = self._log_tick(total_nimg)
            if due["sample"] or due["ckpt"] or save_now or due.get("eval"):
                self.sync_buffers()
            if self.run_dir is not None and due["sample"] and self.dist.is_main:
                self._mark("writing a sample grid")
                self._write_samples()
            saved = None
            if save_now:
                ckpt_pending = False
                self._mark("saving a checkpoint")
                saved = self.save_checkpoint(ckpts)
                if saved is None:
                    self._rollback(ckpts, "the training state has non-finite values (not saved)")
                    continue
            if due.get("eval") and not signum:  # a stop is served first: an evaluation can take minutes
                self._evaluate(evaluator)
            if self.console is not None:
                self.console.advance(self.cur_nimg, _short(last_stats) if due["log"] else None)
            if signum and not done:  # (a signal at the very last step: the run is complete anyway)
                self._stopped(signum, saved, stop)
        if self.console is not None:
            self.console.close_bar()

        wall = time.time() - start_time
        return {
            "kimg": self.cur_nimg / 1000,
            "wall_s": wall,
            "img_per_sec": (self.cur_nimg - start_nimg) / max(wall, 1e-9),
            **last_stats,
        }

    def _mark(self, what: str) -> None:
        """Tell the watchdog where this rank is (see watchdog.py)."""
        if self._beat is not None:
            self._phase_no += 1
            self._beat(self.step_idx, self._phase_no, what)

    def _stopped(self, signum: int, saved: Path | None, stop) -> None:
        from distgan.watchdog import signal_name

        if self.console is not None:
            self.console.close_bar()
        took = f" {time.time() - stop.received_at:.1f} s after the signal" if stop.received_at else ""
        where = f"checkpoint {saved} committed{took}" if saved else "no run dir: nothing saved"
        raise Interrupted(
            f"stopped by {signal_name(signum)} at {self.cur_nimg / 1000:.3f} kimg; {where}; "
            "run the same command to resume"
        )

    def _rollback(self, ckpts: CheckpointManager | None, why: str) -> None:
        """Go back to the newest good checkpoint (every rank reaches this at the same step), or give up."""
        limit = self.cfg.train.max_rollbacks
        if self.rollbacks >= limit:
            self._give_up(
                f"{why} at {self.cur_nimg / 1000:.3f} kimg, after {self.rollbacks} rollback(s) "
                f"(train.max_rollbacks={limit}); lower the learning rates or try train.precision=fp32"
            )
        path = ckpts.latest_on_every_rank(self.dist) if ckpts is not None else None
        if path is None:
            self._give_up(f"{why} at {self.cur_nimg / 1000:.3f} kimg, and there is no checkpoint to roll back to")
        rollbacks, skips, nimg, discarded = self.rollbacks + 1, self.skips_total, self.cur_nimg, self.nimg_discarded
        self.load_checkpoint(path)
        self.rollbacks, self.skips_total = max(self.rollbacks, rollbacks), max(self.skips_total, skips)
        # The images since the checkpoint are trained again; W&B's step (tracking.py) must keep growing.
        self.nimg_discarded = discarded + nimg - self.cur_nimg
        self.tracker.step_offset = self.nimg_discarded
        self._reset_skip_counts()
        self.stats.reset()
        self._tick = (self.cur_nimg, time.time())
        self._warn(f"{why}; rolled back to {path.name} ({self.rollbacks} of train.max_rollbacks={limit})")
        self.tracker.alert(
            f"Rolled back ({self.rollbacks} of {limit})",
            f"{why} at {nimg / 1000:.3f} kimg; rolled back to {path.name} ({self.cur_nimg / 1000:.3f} kimg)",
        )

    def _give_up(self, msg: str) -> None:
        self.tracker.alert("Diverged: training stopped", msg, "ERROR")
        raise Diverged(msg)

    def _warn(self, msg: str) -> None:
        if self.console is not None and self.dist.is_main:
            self.console.print(f"warning: {msg}")

    def _log_tick(self, total_nimg: int) -> dict[str, float]:
        for name, count in self.stream.take_stats().items():  # data faults: summed over ranks, not averaged
            self.stats.report_sum(name, count)
        values = self.stats.reduce(self.dist)  # collective: every rank
        self._check_data(values)
        now = time.time()
        nimg0, t0 = self._tick
        self._tick = (self.cur_nimg, now)
        img_s = (self.cur_nimg - nimg0) / max(now - t0, 1e-9)
        values.update(
            {
                "Progress/step": self.step_idx,
                "Timing/img_per_sec": img_s,
                "Timing/sec_per_kimg": 1000 / max(img_s, 1e-9),
                "Timing/eta_min": max(total_nimg - self.cur_nimg, 0) / max(img_s, 1e-9) / 60,
                "Memory/peak_gb": _peak_memory_gb(self.device),
                "Progress/skipped_steps": self.skips_total,
                "Progress/rollbacks": self.rollbacks,
            }
        )
        if self.dist.is_main:
            kimg = self.cur_nimg / 1000
            if self.run_dir is not None:
                _append_jsonl(self.run_dir / "stats.jsonl", {"kimg": kimg, "nimg": self.cur_nimg, **values})
            self.tracker.log(values, kimg)
        # One alert per log interval that had skipped steps, however many: a person needs to know, not a count.
        new_skips, self._skips_alerted = self.skips_total - self._skips_alerted, self.skips_total
        if new_skips:
            self.tracker.alert(
                "Steps skipped: non-finite values",
                f"{new_skips} step(s) skipped for non-finite losses or gradients up to {self.cur_nimg / 1000:.3f} "
                f"kimg ({self.skips_total} in this run)",
            )
        return values

    def _check_data(self, values: dict[str, float]) -> None:
        """Stop the run (same decision on every rank) once too many samples were unreadable."""
        for key in ("samples", "bad"):
            self.data_totals[key] += int(values.get(f"Data/{key}", 0))
        seen, bad = self.data_totals["samples"], self.data_totals["bad"]
        if seen:
            values["Data/bad_fraction"] = bad / seen
        limit = self.cfg.data.max_bad_fraction
        if bad and bad > limit * seen:
            shards = sorted(set().union(*self.dist.all_gather_object(getattr(self.stream, "bad_shards", []))))
            more = f" and {len(shards) - 8} more" if len(shards) > 8 else ""
            raise DataError(
                f"{bad} of {seen} samples unreadable ({bad / seen:.1%} > data.max_bad_fraction={limit}): "
                f"{', '.join(shards[:8])}{more}"
            )

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average BatchNorm running statistics over ranks, before a snapshot uses them (a collective).

        DDP does not broadcast buffers before each forward (see distributed.py): in training mode they do not
        affect the output, and each rank's running stats track its own batches. Averaging them here gives
        the snapshot the estimate of all ranks' data, and identical buffers on every rank.
        """
        if self.dist.world_size == 1:
            return
        bufs = [b for m in (self.G_module, self.D_module) for b in m.buffers() if b.is_floating_point()]
        if bufs:
            packed = self.dist.all_reduce_mean(torch.cat([b.flatten() for b in bufs]))
            for b, new in zip(bufs, packed.split([b.numel() for b in bufs])):
                b.copy_(new.view_as(b))
        self.G_ema.copy_buffers()

    @torch.no_grad()
    def sample(self, z: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Images from the EMA generator: [N, C, H, W] in [-1, 1]."""
        return torch.cat([self.G_ema.module(part) for part in z.split(chunk)])

    def _write_samples(self) -> Path:
        from torchvision.utils import save_image

        path = self.run_dir / "samples" / f"fakes-{self.cur_nimg:09d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        images = self.sample(self.fixed_z).float().cpu()
        save_image(images, path, nrow=_grid_cols(len(images)), normalize=True, value_range=(-1, 1))
        self.tracker.log_image("Samples/fakes", path, self.cur_nimg / 1000)
        return path

    def _write_reals_grid(self) -> None:
        from torchvision.utils import save_image

        path = self.run_dir / "samples" / "reals.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        n = self.cfg.train.sample_num
        images = self.stream.peek(n) if hasattr(self.stream, "peek") else None
        if images is not None:
            save_image(images.float() / 255, path, nrow=_grid_cols(len(images)))

    # ================================================================== metrics

    def _make_evaluator(self):
        """The `eval.*` evaluator (every rank): its extractor loaded, the real features extracted or cached."""
        from distgan.metrics import parse_metrics
        from distgan.metrics.evaluator import Evaluator
        from distgan.metrics.features import make_extractor
        from distgan.metrics.sources import open_source, training_source

        e = self.cfg.eval
        real = open_source(e.real) if e.real else training_source(self.cfg)
        with self.dist.download_first():  # rank 0 fetches the Inception weights first if it must (shared caches)
            extractor = make_extractor(e.features, self.device, e.inception_weights or None)
        beat = lambda: self._mark("evaluating metrics")  # noqa: E731 (the watchdog hears from every batch)
        evaluator = Evaluator(parse_metrics(e.metrics), extractor, real, self.dist, num=e.num, batch=e.batch,
                              seed=e.seed, cache_dir=e.cache or None, beat=beat)  # fmt: skip
        evaluator.real_features()
        return evaluator

    def _evaluate(self, evaluator) -> dict[str, float]:
        """Metrics of G_ema now (a collective); rank 0 logs them as Metrics/* to the tracker and stats.jsonl."""
        from distgan.metrics.sources import GeneratorSource

        self._mark("evaluating metrics")
        fake = GeneratorSource(self.G_ema.module, self.cfg.model.z_dim, self.cfg.eval.seed, name="G_ema")
        values = {f"Metrics/{k}": v for k, v in evaluator.evaluate(fake).items()}
        if self.dist.is_main:
            kimg = self.cur_nimg / 1000
            if self.run_dir is not None:
                _append_jsonl(self.run_dir / "stats.jsonl", {"kimg": kimg, "nimg": self.cur_nimg, **values})
            self.tracker.log(values, kimg)
        return values

    # ================================================================== state

    def state_dict(self) -> dict:
        """The state every rank shares (rank 0 saves it): networks and optimizers (DDP; under ZeRO they are in
        DeepSpeed's files, see checkpoint_files), G_ema, scalers, counters, config."""
        return {
            "format": STATE_FORMAT,
            "strategy": self.strategy,
            **self.G.shared_state(),  # "G", "opt_G" (DDP)
            **self.D.shared_state(),
            "G_ema": self.G_ema.state_dict(),
            "scaler_G": self.G.scaler.state_dict(),
            "scaler_D": self.D.scaler.state_dict(),
            "cur_nimg": self.cur_nimg,
            "step": self.step_idx,
            "pl_mean": self.pl_mean.detach().cpu(),
            "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
            "config_digest": self.cfg.digest(),
            "tracker_run_id": self.tracker.run_id,
            "data_totals": dict(self.data_totals),
            "skips_total": self.skips_total,
            "rollbacks": self.rollbacks,
            "nimg_discarded": self.nimg_discarded,
        }

    def rank_state(self) -> dict:
        """What differs between ranks: its RNG states and its data-stream position."""
        return {
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
            "rng": rng.get_state(self.device),
            "stream": self.stream.state_dict(),
        }

    def load_state_dict(self, state: dict, read=None, names=()) -> None:
        """Restore from state.pt (`state`); under ZeRO also from DeepSpeed's files (`read(name, safe_globals)`,
        `names`: the checkpoint's files). A collective under ZeRO."""
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"training state format {state.get('format')}, this distgan reads {STATE_FORMAT}")
        saved = state.get("strategy", "ddp")
        if saved.startswith("zero") != self.strategy.startswith("zero"):
            raise CheckpointError(
                f"the checkpoint was trained with dist.strategy={saved} and this run uses {self.strategy}; "
                "DDP and ZeRO checkpoints hold the optimizer differently: resume with the same kind of strategy"
            )
        try:
            for net in self.nets.values():
                net.load(state, read, names)
            self.G_ema.load_state_dict(state["G_ema"])
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. a model change let through --allow-config-change
            first = " ".join(str(e).split())[:240]
            raise CheckpointError(f"the checkpoint's networks do not fit this config's model: {first}") from None
        # The optimizers' learning rates and betas come from this config, not the checkpoint (they are part of what
        # --allow-config-change may change; unchanged, they are the same values).
        for name, net in self.nets.items():
            for group in net.param_groups:
                group.update(self.hparams[name])
        for name, net in self.nets.items():
            if state[f"scaler_{name}"]:  # empty when the run that saved it did not scale
                net.scaler.load_state_dict(state[f"scaler_{name}"])
        self.cur_nimg = int(state["cur_nimg"])
        self.step_idx = int(state["step"])
        self.pl_mean.copy_(state["pl_mean"])
        self.data_totals = dict(state["data_totals"])
        self.skips_total = int(state["skips_total"])
        self.rollbacks = int(state["rollbacks"])
        self.nimg_discarded = int(state.get("nimg_discarded", 0))  # (absent from checkpoints of before W&B steps)
        self._reset_skip_counts()

    def _reset_skip_counts(self) -> None:
        self.skips_in_a_row = 0
        self._skip_counts.copy_(torch.tensor([0, 0, self.skips_total]))

    def load_rank_state(self, state: dict, same_world: bool) -> None:
        if same_world:
            rng.set_state(state["rng"], self.device)
        # Another world size: an in-memory stream's position is global and re-splits by itself; a shard stream
        # refuses with a clear error (its positions are per rank and loader worker).
        self.stream.load_state_dict(state["stream"])

    def checkpoint_files(self) -> dict[str, bytes]:
        """This rank's files of a checkpoint: its rank state; on rank 0 also the shared state and the export."""
        from distgan.export import generator_bytes

        files = {rank_file(self.dist.rank): _to_bytes(self.rank_state())}
        for net in self.nets.values():  # DeepSpeed's files of this rank under ZeRO (a collective); none under DDP
            files.update(net.rank_files())
        if self.dist.is_main:
            files["state.pt"] = _to_bytes(self.state_dict())
            files["generator.safetensors"] = generator_bytes(
                self.G_ema.module, dataclasses.asdict(self.cfg.model), self.cur_nimg
            )
        return files

    def save_checkpoint(self, ckpts: CheckpointManager) -> Path | None:
        """Commit a checkpoint of this step on every rank (a collective). None, and nothing written, when the
        state holds a non-finite value (the caller rolls back instead)."""
        if self.dist.host_sum(self._count_nonfinite()) > 0:
            return None
        return ckpts.save(self.dist, self.cur_nimg, self.checkpoint_files())

    def load_checkpoint(self, path: Path, shared: dict | None = None) -> None:
        """Restore from a committed checkpoint (every rank; `shared` when state.pt was already read)."""
        shared = shared if shared is not None else load_file(path, "state.pt")
        same_world = shared["world_size"] == self.dist.world_size
        if not same_world and self.strategy.startswith("zero"):
            raise CheckpointError(
                f"{path} was saved by {shared['world_size']} processes under ZeRO, whose optimizer state is "
                f"partitioned over them; resume it with {shared['world_size']} processes (this launch has "
                f"{self.dist.world_size})"
            )
        names = list(read_manifest(path)["files"])
        self.load_state_dict(shared, lambda name, safe_globals=(): load_file(path, name, safe_globals), names)
        self.load_rank_state(load_file(path, rank_file(self.dist.rank if same_world else 0)), same_world)

    @torch.no_grad()
    def _count_nonfinite(self) -> int:
        tensors = [*self.G.state_tensors(), *self.D.state_tensors(), *self.G_ema.state_dict().values()]
        floats = [t for t in tensors if t.is_floating_point()]
        return int(sum((~torch.isfinite(t)).sum() for t in floats)) if floats else 0


def _to_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _short(values: dict[str, float]) -> dict[str, str]:
    """The few numbers the progress bar shows."""
    keys = {"Timing/img_per_sec": "img/s", "Loss/D/main": "D", "Loss/G/main": "G"}
    return {label: f"{values[k]:.3g}" for k, label in keys.items() if k in values}


def _grid_cols(n: int) -> int:
    return max(1, int(math.ceil(math.sqrt(n))))


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _append_jsonl(path: Path, record: dict) -> None:
    import json

    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
