"""A training step never makes the host wait for the device, except at log intervals.

On a GPU every `.item()`, `bool(t)`, `float(t)` of a device tensor waits for all queued kernels, and the next
kernels start only after the host has read the value and issued them: the GPU idles once per read. All three go
through `aten._local_scalar_dense`, which a TorchDispatchMode sees on the CPU too (ENVIRONMENT.md), so the reads
are counted here: zero per step, on every path a step can take (fp32, bf16, fp16 with its loss scalers, lazy and
inline R1, WGAN-GP, path length, several critic steps, micro-batches, non-finite losses that skip an update), and
through the training loop between log intervals (distgan/host_reads.py counts them). The controls: the old ways of
deciding a skip (`bool(torch.isfinite(norm))`) and of reading the loss scale (`GradScaler.get_scale()`) are counted.
DeepSpeed decides its skips on the host itself (its overflow check reads the gradient norm): under ZeRO the
stated number of reads is DeepSpeed's, measured here so that a change shows.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_deepspeed
from distgan.host_reads import HostReads as ScalarReads
from support import make_trainer


def _reads_per_step(tr, steps: int = 3) -> list[list[str]]:
    tr.train_step(*tr.draw())  # warm up (lazy initialisations)
    out = []
    for _ in range(steps):
        inputs = tr.draw()  # the host's data preparation is not the device's step
        with ScalarReads() as reads:
            tr.train_step(*inputs)
        out.append(reads.where)
    return out


PATHS = {
    "fp32": (),
    "bf16": ("train.precision=bf16",),
    "fp16": ("train.precision=fp16",),
    "lazy r1 + path length + 2 critic steps": (
        "loss.r1_gamma=1",
        "loss.d_reg_interval=2",
        "loss.pl_weight=1",
        "loss.g_reg_interval=2",
        "loss.n_critic=2",
    ),  # fmt: skip
    "inline r1 under fp16": ("loss.r1_gamma=1", "loss.d_reg_interval=1", "train.precision=fp16"),
    "wgan-gp": ("loss.kind=wgan", "loss.gp_weight=10", "loss.d_reg_interval=1"),
    "micro-batches": (
        "train.batch_per_gpu=4",
        "loss.r1_gamma=1",
        "loss.d_reg_interval=1",
        "loss.pl_weight=1",
        "loss.g_reg_interval=1",
    ),  # fmt: skip
    # every ADA op on reals and fakes, its controller moving p every step from the signs of D's logits
    "ada, every op, adaptive p": ("augment.kind=ada", "augment.ops=bgcfnc", "augment.p=0.5",
                                  "augment.ada_interval=1", "loss.r1_gamma=1", "loss.d_reg_interval=1"),
    "diffaug": ("augment.kind=diffaug",),
}  # fmt: skip


@pytest.mark.parametrize("overrides", PATHS.values(), ids=PATHS.keys())
def test_a_step_reads_no_scalar_from_the_device(overrides):
    tr = make_trainer(*overrides)
    assert _reads_per_step(tr) == [[], [], []]


def test_a_skipped_update_is_decided_without_reading_a_scalar(monkeypatch):
    monkeypatch.setenv("DISTGAN_FAULTS", "nan_loss:step=2")
    tr = make_trainer()
    reads = _reads_per_step(tr)
    assert reads == [[], [], []]
    assert tr.guard._counts.tolist() == [0, 1, 1]  # step 2 was skipped (and counted on the device)


def test_the_old_ways_are_counted():
    """Controls: the skip decided on the host and the scale read as a number each count one read."""
    tr = make_trainer("train.precision=fp16")
    tr.train_step(*tr.draw())
    norm = torch.tensor(1.0)
    with ScalarReads() as reads:
        bool(torch.isfinite(norm))
        tr.D.scaler.get_scale()
    assert len(reads.where) == 2


def test_the_loop_reads_scalars_only_at_log_intervals(tmp_path):
    """Through Trainer.fit: between two log intervals (every 8 steps here) no read at all; at one, a few (the
    skip counts, the stats' reduction)."""
    tr = make_trainer("train.total_kimg=0.384", "train.log_every_kimg=0.128", "train.sample_every_kimg=100",
                      "train.ckpt_every_kimg=100", run_dir=tmp_path)  # fmt: skip
    reads = ScalarReads()
    draw = tr.draw

    def host_draw():  # the data pipeline's own host work is not a device sync
        reads.on = False
        try:
            return draw()
        finally:
            reads.on = True

    tr.draw = host_draw
    per_step = []

    def mark(t):
        per_step.append(len(reads.where))

    with reads:
        tr.fit(on_step=mark)
    counts = [b - a for a, b in zip([0, *per_step], per_step)]  # reads between consecutive on_step calls
    logged = {8, 16}  # steps after which a log interval (and the end at 24) fell: their reads land in the next
    assert len(counts) == 24
    quiet = [n for step, n in enumerate(counts[1:], start=1) if step not in logged]
    assert quiet == [0] * len(quiet), counts
    assert all(counts[s] > 0 for s in logged), counts  # control: the log intervals do read


def _zero_reads(rank, world):
    from distgan import distributed

    dist = distributed.setup("fp32", threads=1)
    out = {}
    for strategy in ("ddp", "zero2"):
        tr = make_trainer(f"dist.strategy={strategy}", dist=dist)
        out[strategy] = [len(r) for r in _reads_per_step(tr)]
    dist.close()
    return out


@pytest.mark.dist
@pytest.mark.deepspeed
def test_two_ranks_ddp_reads_nothing_and_zero_reads_only_deepspeeds_own():
    from support import run_ranks

    require_deepspeed()
    for r in run_ranks(_zero_reads, 2):
        assert r["ddp"] == [0, 0, 0]
        assert r["zero2"] == [ZERO_READS] * 3, r


# DeepSpeed 0.19's ZeRO-1/2 step reads the gradient norm on the host to decide an overflow
# (runtime/utils.py is_invalid_grad_norm, from stage_1_and_2.py step): one read per network step, G's and D's.
ZERO_READS = 2
