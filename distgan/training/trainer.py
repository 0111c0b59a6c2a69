"""The Trainer: the parts of a run, put together once, and one step over them.

    tr = Trainer(cfg, dist, stream, run_dir, console)
    tr.train_step(*tr.draw())        # one step: the phases of step.py over one batch
    tr.fit(tracker, stop, watchdog)  # the loop (loop.py): steps, logs, snapshots, checkpoints, to total_kimg

What it holds: G and D (plain modules, and the `Net` handles that wrap them in DDP or a DeepSpeed engine under the
strategy `dist` carries), G_ema, one Adam per network, the step (step.py), D's input augmentation and ADA's controller
(distgan/augment), the non-finite guard (guard.py), the snapshots (snapshots.py), the stats collector, and the registry
of every stateful part (state.py), which is all a checkpoint saves and loads. Progress is counted in real images shown
to D (`cur_nimg`); all random numbers of a step derive from (seed, rank, cur_nimg) so a resumed run draws what the
uninterrupted run drew.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from distgan import faults, launcher, rng, schedule
from distgan.augment.controller import Augmentation
from distgan.checkpoint import load_file, rank_file, read_manifest
from distgan.config import micro_batches
from distgan.distributed import resolve_precision
from distgan.distributed.nets import make_adam
from distgan.ema import EMA, ema_beta
from distgan.errors import CheckpointError
from distgan.losses import LOSSES
from distgan.models import build_discriminator, build_generator
from distgan.stats import Collector
from distgan.tracking import NullTracker, Tracker
from distgan.training import loop
from distgan.training.guard import NonFiniteGuard
from distgan.training.snapshots import Snapshots
from distgan.training.state import Files, StateRegistry, Values, upgrade_v2
from distgan.training.step import GANStep, MicroBatch, d_regularised, phases


class Trainer:
    def __init__(self, cfg, dist, stream, run_dir: Path | None = None, console=None, class_probs=None):
        t, lo = cfg.train, cfg.loss
        # Strategy and precision were decided once, when the process group was set up (distributed.setup): the
        # config must be the one they were decided from.
        precision = resolve_precision(t.precision, dist.device.type == "cpu")
        want = (precision, launcher.resolve_strategy(cfg.dist.strategy, precision))
        if (dist.precision.mode, dist.strategy) != want:
            raise ValueError(
                f"the process group was set up for {dist.precision.mode}/{dist.strategy} but the config asks for "
                f"{want[0]}/{want[1]} (use dist.configured(...) to train another config in the same group)"
            )
        self.cfg, self.dist, self.stream = cfg, dist, stream
        self._shard_stream = hasattr(stream, "global_position")  # (its position re-splits: data/position.py)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.console = console
        self.device = dist.device
        self.precision = dist.precision
        t.precision = dist.precision.mode  # `auto` made concrete: the run dir's config and checkpoints say which
        self.strategy = cfg.dist.strategy = dist.strategy
        # The batch: train.batch images per step over all ranks; each rank's share runs in `accum` micro-batches of
        # `micro` images (train.batch_per_gpu caps a forward's size; gradients accumulate over the micro-batches).
        self.batch_local, self.micro, self.accum = micro_batches(t.batch, dist.world_size, t.batch_per_gpu)

        # Construct networks: identical initial weights on every rank (DDP would broadcast rank 0's anyway).
        torch.manual_seed(rng.derive_seed(t.seed, rng.INIT))
        # train.channels_last: 4-d weights (and below, the reals) in NHWC; activations follow the weights. Not
        # under ZeRO: DeepSpeed's engines broadcast and flatten the parameters through byte views that need the
        # default layout (and would hand the weights back in it).
        channels_last = t.channels_last and not dist.strategy.startswith("zero")
        if t.channels_last and not channels_last and console is not None:
            console.print(f"warning: train.channels_last is not applied under {dist.strategy} (DeepSpeed's flat "
                          "parameter buffers take the default layout)")  # fmt: skip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.G_module = build_generator(cfg.model).to(self.device, memory_format=self.memory_format)
        self.D_module = build_discriminator(cfg.model).to(self.device, memory_format=self.memory_format)
        self.G_ema = EMA(self.G_module)

        # One Adam per network, fused where torch has the kernel (one kernel per update, and an update skipped on
        # the device for a non-finite gradient); lazy regularisation rescales lr and betas.
        d_lazy = d_regularised(lo) and lo.d_reg_interval > 1
        g_lazy = lo.pl_weight > 0 and lo.g_reg_interval > 1
        o = cfg.optim
        self._reg_interval = {"G": lo.g_reg_interval if g_lazy else None, "D": lo.d_reg_interval if d_lazy else None}
        self.hparams = {"G": self._adam_hparams(o.lr_g, self._reg_interval["G"]),
                        "D": self._adam_hparams(o.lr_d, self._reg_interval["D"])}  # fmt: skip
        # Ramped hyper-parameters (schedule.*): set at every step when any ramps.
        self.scheduled = schedule.describe(cfg) is not None
        self._ramped = [name for name in schedule.RAMPED if getattr(cfg.schedule, name).shape != "constant"]
        self.ema_kimg = cfg.train.ema_kimg
        self.opt_G = make_adam(self.G_module.parameters(), **self.hparams["G"], device=self.device)
        self.opt_D = make_adam(self.D_module.parameters(), **self.hparams["D"], device=self.device)

        # Distribute across processes: G and D as DDP modules (or plain ones in a world of one), or as two
        # DeepSpeed ZeRO engines, each with its own loss scaler; the phases only say what each forward is for.
        self.G = dist.make_net("G", self.G_module, self.opt_G, self.micro, self.accum)
        self.D = dist.make_net("D", self.D_module, self.opt_D, self.micro, self.accum)
        self.nets = {"G": self.G, "D": self.D}
        self._compiles_first: int | None = None  # compilations after the first step (loop.py), and warned of
        self._recompiles_seen = 0
        self._compile0 = 0.0  # compile seconds of this process before the current fit (loop.py)
        if t.compile != "none":  # train.compile: the main phases' forwards (distributed/compiled.py)
            for net in self.nets.values():
                net.compile(t.compile)
            if console is not None:
                console.print(f"train.compile={t.compile}: G and D compile during the first step (minutes on a "
                              "CPU); that time is logged as Compile/seconds and kept out of img/s")  # fmt: skip
        # Randomness inside the networks' forwards (StyleGAN2's noise inputs and style mixing) comes from torch's
        # global generator: seeded here per rank, after the strategy's setup (DeepSpeed's engines draw from it),
        # so the ranks draw different noise, DDP and ZeRO the same, and a checkpoint's rank state carries it on.
        torch.manual_seed(rng.derive_seed(t.seed, rng.FORWARD, dist.rank))

        # The step, the guard, the snapshots.
        self.stats = Collector(self.device)
        self.phases = phases(cfg)
        self.step = GANStep(cfg, self.G, self.D, LOSSES[lo.kind], self.precision, self.stats, dist, self.micro,
                            self.accum)  # fmt: skip
        self.augment = Augmentation(cfg, dist, self.stats)
        self.step.augment = self.augment if self.augment.pipe is not None else None
        if class_probs is not None:
            self.step.class_probs = torch.as_tensor(class_probs, dtype=torch.float32, device=self.device)
        self.guard = NonFiniteGuard(self.device)
        self.snapshots = Snapshots(cfg, self.G_ema, (self.G_module, self.D_module), dist, self.run_dir)

        # Progress (all part of the checkpoint).
        self.cur_nimg = 0
        self.step_idx = 0
        self.nimg_discarded = 0  # images trained and thrown away by rollbacks: W&B's step is cur_nimg + this
        self.data_totals = {"samples": 0, "bad": 0}  # over all ranks, for data.max_bad_fraction
        self.tracker: Tracker = NullTracker()
        self._beat = None  # the watchdog's beat(step, phase, what), during fit
        self._phase_no = 0

        # Every stateful part, once: what a checkpoint saves and loads (state.py).
        self.state = StateRegistry()
        self.state.register("G", self.G, version=self.G.version)
        self.state.register("D", self.D, version=self.D.version)
        self.state.register("G_ema", self.G_ema)
        self.state.register("progress", Values(self, "cur_nimg", "step_idx", "nimg_discarded"))
        self.state.register("step", self.step, version=self.step.version)
        self.state.register("guard", self.guard, version=self.guard.version)
        self.state.register("data_health", Values(self, "data_totals"))
        self.rng_state = _RNGState(self.device, t.seed, dist.rank)
        self.rng_state.cur_nimg = lambda: self.cur_nimg
        self.state.register("rng", self.rng_state, scope="rank")
        # The stream's position: each rank's exact place (rank scope), and a shard stream's global position built
        # from all of them (shared: what a resume on another ranks x workers re-splits; data/position.py).
        self.data_position = _GlobalPosition()
        self.state.register("data_position", self.data_position, missing=lambda: None)
        self.state.register("stream", _StreamPosition(self), scope="rank")
        # (Checkpoints from before augmentation have neither part: p then starts at augment.p, the sums at 0.)
        self.state.register("augment", self.augment, version=self.augment.version, missing=lambda: None)
        self.state.register("augment_sums", self.augment.rank_part(), scope="rank", missing=lambda: None)

    def _adam_hparams(self, lr: float, reg_interval: int | None, beta2: float | None = None) -> dict:
        # Lazy regularisation steps the optimizer interval+1 times per interval steps: rescale lr and betas so
        # the effective step size and momentum horizon are unchanged (StyleGAN2, Karras et al. 2020, app. B).
        o = self.cfg.optim
        ratio = reg_interval / (reg_interval + 1) if reg_interval else 1.0
        beta2 = o.beta2 if beta2 is None else beta2
        return {"lr": lr * ratio, "betas": (o.beta1**ratio, beta2**ratio), "eps": o.eps}

    def _apply_schedules(self) -> None:
        """Set this step's ramped hyper-parameters (schedule.py): functions of cur_nimg, so a resumed run sets
        the same values at the same step. Adam reads lr and betas from its param groups at each step (under ZeRO
        too: DeepSpeed's optimizer steps the same torch Adam)."""
        v = schedule.values(self.cfg, self.cur_nimg)
        for net, opt in (("G", self.opt_G), ("D", self.opt_D)):
            hp = self._adam_hparams(v[f"lr_{net.lower()}"], self._reg_interval[net], v["beta2"])
            for group in opt.param_groups:
                group["lr"], group["betas"] = hp["lr"], hp["betas"]
        self.step.r1_gamma, self.step.r2_gamma = v["r1_gamma"], v["r2_gamma"]
        self.ema_kimg = v["ema_kimg"]
        self.augment.set_p(v["augment_p"])
        for name in self._ramped:  # the dashboard's Schedule/ panels: the values this interval trained with
            self.stats.report(f"Schedule/{name}", v[name])

    # the loss functions, the skip counters: attributes of the parts that own them
    @property
    def loss(self):
        return self.step.loss

    @loss.setter
    def loss(self, value) -> None:
        self.step.loss = value

    @property
    def skips_total(self) -> int:
        return self.guard.skips_total

    @property
    def rollbacks(self) -> int:
        return self.guard.rollbacks

    # ================================================================== one step

    def draw(self):
        """The next step's inputs: n_critic batches from the stream, latents (and labels for the fakes) and a
        generator, all from (seed, rank, cur_nimg)."""
        t, lo = self.cfg.train, self.cfg.loss
        reals = [next(self.stream) for _ in range(lo.n_critic)]  # n_critic Batches [B_local], as streamed
        # After a rollback the steps draw other latents (else a deterministic blow-up would simply repeat).
        salt = (self.guard.rollbacks,) if self.guard.rollbacks else ()
        gen = rng.generator(t.seed, rng.STEP, self.dist.rank, self.cur_nimg, *salt, device=self.device)
        n_z = lo.n_critic + (0 if t.reuse_fake else 1)
        latents = torch.randn([n_z, self.batch_local, self.cfg.model.z_dim], generator=gen, device=self.device)
        labels = self.step.draw_labels(n_z * self.batch_local, gen)
        if labels is not None:
            latents = (latents, labels.view(n_z, self.batch_local))
        return reals, latents, gen

    def train_step(self, reals, latents, gen: torch.Generator) -> None:
        """One step: every phase of step.py due at this step, in order; then G_ema.

        reals:   n_critic Batches (or image tensors) [B_local, C, H, W], uint8 (or float in [-1, 1])
        latents: [n_critic (+1 unless reusing fakes), B_local, z_dim], or (that, labels [n, B_local]) if conditional
        gen:     generator for the step's other random numbers (interpolation weights, path-length directions)
        """
        z, fake_c = latents if isinstance(latents, tuple) else (latents, None)
        n_critic = self.cfg.loss.n_critic
        if self.scheduled:
            self._apply_schedules()
        self.guard.begin_step()
        for phase in self.phases:
            if self.step_idx % phase.every:
                continue
            for k in range(phase.repeat):
                # D's phases take reals (D_main the k-th critic batch, D_reg the last); G's the fakes' latents,
                # and under a relativistic loss G_main the last critic batch's reals too (each fake has its pair).
                critic = k if phase.name == "D_main" else n_critic - 1
                wants_reals = phase.net == "D" or (phase.name == "G_main" and self.step.loss.relativistic)
                real, real_c = self._reals(reals[critic]) if wants_reals else (None, None)
                zi = critic if phase.net == "D" or self.cfg.train.reuse_fake else n_critic
                self._run_phase(phase, real, real_c, z[zi], fake_c[zi] if fake_c is not None else None, gen,
                                critic, last=critic == n_critic - 1)  # fmt: skip
        self.guard.end_step()

        # G_ema.
        step_nimg = self.cfg.train.batch * n_critic
        self.cur_nimg += step_nimg
        self.step_idx += 1
        self.augment.after_step(self.step_idx)
        t = self.cfg.train
        self.G_ema.update(ema_beta(step_nimg, self.cur_nimg, self.ema_kimg, t.ema_rampup))

    def _run_phase(self, phase, real, real_c, z, fake_c, gen, critic: int, last: bool) -> None:
        """Train `phase.net` on the phase's loss, micro-batch by micro-batch, then step it. D is frozen during G's
        phases (G's backward must not touch D's gradients); G stays trainable in D's, whose fakes are detached (the
        last D step may keep G's graph for G_main to reuse)."""
        net = self.nets[phase.net]
        self.D.set_trainable(phase.net == "D")
        parts = lambda x: x.chunk(self.accum) if x is not None else [None] * self.accum  # noqa: E731
        for i, (r, rc, zi, fc) in enumerate(zip(parts(real), parts(real_c), parts(z), parts(fake_c))):
            mb = MicroBatch(i, r, rc, zi, fc, critic=critic, last_critic=last)
            with net.micro_batch(i):
                loss = phase.loss(self.step, mb, gen)
                self._backward(phase.net, loss)
        scale = net.loss_scale()
        if scale is not None:
            self.stats.report(f"{phase.net}/loss_scale", scale)
        norm, skipped = net.step()
        self.stats.report(f"{phase.net}/grad_norm", norm)
        self.stats.report(f"{phase.net}/skipped", skipped)
        self.guard.record(skipped)
        self.D.set_trainable(True)

    def _backward(self, net: str, loss: torch.Tensor) -> None:
        """One micro-batch's backward; a non-finite loss on any rank skips the update on every rank (guard.py)."""
        if faults.fires("nan_loss", rank=self.dist.rank, step=self.step_idx, net=net):
            loss = loss * float("nan")
        loss = self.guard.poison(loss, self.nets[net].params[0])
        self._mark(f"{net} backward")
        self.nets[net].backward(loss)

    def _reals(self, batch):
        """(images as float in [-1, 1] on the device, labels or None) of a streamed batch."""
        images, labels = (batch.images, batch.labels) if hasattr(batch, "images") else (batch, None)
        x = images.to(self.device, non_blocking=True)
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        x = x.contiguous(memory_format=self.memory_format)
        if not self.cfg.model.num_classes:
            labels = None
        elif labels is not None:
            labels = labels.to(self.device, non_blocking=True)
        return x, labels

    # ================================================================== the loop (loop.py)

    def fit(self, tracker: Tracker | None = None, stop=None, watchdog=None, on_step=None) -> dict[str, float]:
        """Train until train.total_kimg with logs, samples and checkpoints (loop.fit); returns the summary."""
        return loop.fit(self, tracker, stop, watchdog, on_step)

    def _mark(self, what: str) -> None:
        """Tell the watchdog where this rank is (see watchdog.py)."""
        if self._beat is not None:
            self._phase_no += 1
            self._beat(self.step_idx, self._phase_no, what)

    def sync_buffers(self) -> None:
        self.snapshots.sync_buffers()

    def sample(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.snapshots.sample(z, c)

    # ================================================================== checkpoints

    def state_dict(self) -> dict:
        """state.pt: every shared part (rank 0 saves it; the networks and optimizers whole, under ZeRO also in
        DeepSpeed's per-rank files), and what identifies the run (config, strategy, world size, W&B run)."""
        return {
            **self.state.state_dict("shared"),
            "strategy": self.strategy,
            "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
            "config_digest": self.cfg.digest(),
            "tracker_run_id": self.tracker.run_id,
        }

    def rank_state(self) -> dict:
        """What differs between ranks: its RNG states and its data-stream position."""
        return {**self.state.state_dict("rank"), "rank": self.dist.rank, "world_size": self.dist.world_size}

    def checkpoint_files(self) -> dict[str, bytes]:
        """This rank's files of a checkpoint: its rank state; on rank 0 also the shared state and the export."""
        from distgan.export import generator_bytes

        states = self.dist.all_gather_object(self.stream.state_dict()) if self._shard_stream else None
        self.data_position.value = self.stream.global_position(states) if states else None
        files = {rank_file(self.dist.rank): _to_bytes(self.rank_state())}
        files.update(self.state.files())  # DeepSpeed's files of this rank under ZeRO (a collective); none under DDP
        if self.dist.is_main:
            files["state.pt"] = _to_bytes(self.state_dict())
            model = self.cfg.to_dict()["model"]
            files["generator.safetensors"] = generator_bytes(self.G_ema.module, model, self.cur_nimg)
        return files

    def save_checkpoint(self, ckpts) -> Path | None:
        """Commit a checkpoint of this step on every rank (a collective). None, and nothing written, when the
        state holds a non-finite value (the caller rolls back instead)."""
        if self.dist.host_sum(self._count_nonfinite()) > 0:
            return None
        return ckpts.save(self.dist, self.cur_nimg, self.checkpoint_files())

    def load_checkpoint(self, path: Path, shared: dict | None = None) -> None:
        """Restore from a committed checkpoint (every rank; `shared` when state.pt was already read)."""
        shared = shared if shared is not None else load_file(path, "state.pt")
        same_world = shared["world_size"] == self.dist.world_size
        rank = load_file(path, rank_file(self.dist.rank if same_world else 0))
        names = list(read_manifest(path)["files"])
        files = Files(names, lambda name, safe_globals=(): load_file(path, name, safe_globals))
        self.load_state_dict(shared, rank, files, same_world)

    def load_state_dict(self, shared: dict, rank: dict | None = None, files: Files | None = None,
                        same_world: bool = True) -> None:  # fmt: skip
        if shared.get("format") == 2:  # a checkpoint of distgan's previous layout
            shared, rank = upgrade_v2(shared, rank)
        if shared.get("format") != 3:
            raise CheckpointError(f"training state format {shared.get('format')}, this distgan reads 2 and 3")
        # A ZeRO checkpoint holds each network whole too (zero.py), and resumes on any world size, under ZeRO or DDP;
        # one from a distgan before that holds the optimizer only as DeepSpeed's partitions of the ranks that saved it.
        saved = shared.get("strategy", "ddp")
        as_saved = same_world and self.strategy.startswith("zero")
        if saved.startswith("zero") and not as_saved and any("module" not in shared[n] for n in ("G", "D")):
            was = f"{shared.get('world_size', '?')} processes under dist.strategy={saved}"
            raise CheckpointError(
                f"the checkpoint was saved by {was} by an older distgan that kept the optimizer state only as "
                f"DeepSpeed's per-rank partitions; resume it with {was} (this launch: {self.dist.world_size} under "
                f"{self.strategy})"
            )
        # Another world size: an in-memory stream's position is global and re-splits by itself (rank 0's file); a
        # shard stream re-splits the checkpoint's global position; the RNG states belong to the old ranks: each rank
        # starts one of its own, from (seed, rank, cur_nimg) (_RNGState).
        self.rng_state.skip = not same_world
        self.data_position.value = None
        try:
            self.state.load_state_dict(shared, rank, files)
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. a model change let through --allow-config-change
            first = " ".join(str(e).split())[:240]
            raise CheckpointError(f"the checkpoint's networks do not fit this config's model: {first}") from None
        finally:
            self.rng_state.skip = False
        if not same_world and self.dist.rank != 0:
            # ADA's sign sums since its last adjustment: every rank read rank 0's; keep them once (rank 0's).
            self.augment.signs.zero_()
        # The optimizers' learning rates and betas come from this config, not the checkpoint (they are part of what
        # --allow-config-change may change; unchanged, they are the same values).
        for name, net in self.nets.items():
            for group in net.param_groups:
                group.update(self.hparams[name])
        self.guard.reset()

    @torch.no_grad()
    def _count_nonfinite(self) -> int:
        tensors = [*self.G.state_tensors(), *self.D.state_tensors(), *self.G_ema.state_dict().values()]
        floats = [t for t in tensors if t.is_floating_point()]
        return int(sum((~torch.isfinite(t)).sum() for t in floats)) if floats else 0


class _RNGState:
    """This process's global RNG states (rank scope), which the networks' own random draws use (StyleGAN2's noise).

    On the same world size each rank continues its saved states. On another, those belong to ranks that no longer
    exist (or not the same ones): each rank seeds a fresh state from (seed, rank, images seen at the checkpoint), so
    the run is reproducible (the same checkpoint resumed on the same count draws the same numbers) and draws no
    stream twice (not the one its rank started with at 0 kimg). The step's latents, labels and augmentations never
    depended on these states: they are drawn from (seed, rank, cur_nimg) at every step (rng.py)."""

    def __init__(self, device, seed: int, rank: int):
        self.device, self.seed, self.rank, self.skip = device, seed, rank, False
        self.cur_nimg = lambda: 0  # set by the trainer: the checkpoint's image count, loaded before this part

    def state_dict(self) -> dict:
        return rng.get_state(self.device)

    def load_state_dict(self, state: dict) -> None:
        if not self.skip:
            rng.set_state(state, self.device)
        else:
            torch.manual_seed(rng.derive_seed(self.seed, rng.FORWARD, self.rank, self.cur_nimg()))


class _GlobalPosition:
    """A shard stream's global position (shared scope; None for the in-memory streams, whose own is global)."""

    def __init__(self):
        self.value: dict | None = None

    def state_dict(self) -> dict | None:
        return self.value

    def load_state_dict(self, state: dict | None) -> None:
        self.value = state


class _StreamPosition:
    """The data stream's position (rank scope): exact on the same ranks x workers, else (a shard stream) the
    checkpoint's global position re-split."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        return self.trainer.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        tr = self.trainer
        if tr._shard_stream:
            tr.stream.load_state_dict(state, tr.data_position.value)
        else:
            tr.stream.load_state_dict(state)


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
