"""Training, split by job (each file short, and read top to bottom):

trainer.py    Trainer: the run's parts put together once (networks, Nets, optimizers, G_ema, step, guard,
              snapshots, the state registry) and train_step: the phases of step.py over one batch
step.py       the GAN step as data: the phase table (D_main, D_reg, G_main, G_reg) and run_G / run_D, the two
              functions every forward goes through
loop.py       fit(): the loop as an outline (step, logs, snapshots, checkpoints, metrics, rollbacks, stops)
guard.py      the non-finite policy: skipped updates decided and counted on the device, rollbacks
snapshots.py  sample grids on fixed latents (a row per class when conditional), reals, BatchNorm averaging
state.py      the registry of stateful parts that a checkpoint saves and loads, each with its own version
"""

from distgan.training.trainer import Trainer

__all__ = ["Trainer"]
