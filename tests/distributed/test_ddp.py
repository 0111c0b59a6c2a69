"""Two real gloo processes training one model together (the launcher-free core of every multi-process run).

Each test includes the control that would make it fail: without gradient sync the ranks diverge, and a
2-rank step differs from a 1-rank step on a different batch split.
"""

import pytest
import torch

from support import TINY, flat, make_trainer, run_ranks

pytestmark = pytest.mark.dist

NO_BN = ("model.dcgan.norm=none",)


def _one_step(rank, world, overrides, reals, latents, sync):
    # reals: [1, 2B, C, H, W] and latents: [1, 2B, z] for the global batch; each rank takes its slice.
    from distgan import rng

    tr = make_trainer(*overrides, "train.batch=" + str(reals.shape[1]))
    b = reals.shape[1] // world
    sl = slice(rank * b, (rank + 1) * b)
    gen = rng.generator(0, rank)
    if sync:
        tr.train_step(reals[:, sl], latents[:, sl], gen)
    else:
        with tr.dist.no_sync(tr.G.wrapped), tr.dist.no_sync(tr.D.wrapped):
            tr.train_step(reals[:, sl], latents[:, sl], gen)
    return {"G": flat(tr.G_module), "D": flat(tr.D_module), "G0": None}


def _global_inputs(batch=16):
    g = torch.Generator().manual_seed(7)
    reals = (torch.rand([1, batch, 3, 32, 32], generator=g) * 255).to(torch.uint8)
    latents = torch.randn([1, batch, 16], generator=g)
    return reals, latents


# The batch-independent families (no BatchNorm, no minibatch statistics, no random noise inside G): DCGAN without
# its norms, and R3GAN with its pairing loss, R1 and R2 (a pair is a real and a fake of the same index: the split
# over ranks keeps pairs together). StyleGAN2 (minibatch std, per-rank noise) and BigGAN (BatchNorm) are not.
BATCH_FREE = {"dcgan": NO_BN, "r3gan": TINY["r3gan"]}


@pytest.mark.parametrize("family", sorted(BATCH_FREE))
def test_two_ranks_batch_b_equal_one_rank_batch_2b(family):
    overrides = BATCH_FREE[family]
    reals, latents = _global_inputs()
    [single] = run_ranks(_one_step, 1, overrides, reals, latents, True)
    two = run_ranks(_one_step, 2, overrides, reals, latents, True)
    init = make_trainer(*overrides)
    for net in ("G", "D"):
        assert not torch.equal(single[net], flat(getattr(init, net + "_module")))  # the step did change it
        assert torch.equal(two[0][net], two[1][net])  # ranks agree bit for bit
        torch.testing.assert_close(two[0][net], single[net], rtol=1e-5, atol=1e-6)
    # Control: the same 2-rank step without gradient all-reduce is not the 1-rank step.
    unsynced = run_ranks(_one_step, 2, overrides, reals, latents, False)
    assert not torch.allclose(unsynced[0]["G"], single["G"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unsynced[0]["D"], unsynced[1]["D"])


def _several_steps(rank, world, overrides, steps, sync):
    tr = make_trainer(*overrides)
    for _ in range(steps):
        if sync:
            tr.train_step(*tr.draw())
        else:
            with tr.dist.no_sync(tr.G.wrapped), tr.dist.no_sync(tr.D.wrapped):
                tr.train_step(*tr.draw())
    out = {"G": flat(tr.G_module), "D": flat(tr.D_module), "G_ema": flat(tr.G_ema.module)}

    def buffers():
        return torch.cat(
            [b.flatten().float() for b in [*tr.G_module.buffers(), *tr.D_module.buffers(), torch.zeros(0)]]
        )

    out["buffers_before_sync"] = buffers()
    tr.sync_buffers()  # what every snapshot does
    out["buffers"] = buffers()
    # G_ema samples with G's BatchNorm statistics: the same tensors' values, after every step and every sync.
    # (Under a multi-process CPU launch Accelerate names the device cpu:0, and a second `.to()` replaced G's
    # buffers: G_ema kept copying stale ones, and sampled with the initial statistics.)
    out["ema_buffers_match"] = all(torch.equal(a, b) for a, b in zip(tr.G_ema.module.buffers(), tr.G_module.buffers()))
    out["ema_buffers_moved"] = any(
        not torch.equal(b, fresh)
        for b, fresh in zip(tr.G_ema.module.buffers(), make_trainer(*overrides).G_module.buffers())
    )
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        (
            "loss.r1_gamma=1",
            "loss.d_reg_interval=2",
            "train.precision=bf16",
            "loss.pl_weight=1",
            "loss.g_reg_interval=2",
            "loss.n_critic=2",
        ),
        ("model.num_classes=auto", "loss.r1_gamma=1", "loss.d_reg_interval=2"),  # the shapes' 4 classes
        (*TINY["stylegan2"], "model.num_classes=auto", "train.precision=bf16", "train.channels_last=true"),
        (*TINY["biggan"], "model.num_classes=auto"),
        (*TINY["r3gan"], "model.num_classes=auto"),
        ("augment.kind=ada", "augment.p=0.5", "augment.ada_interval=1", "augment.ada_kimg=0.1"),
        (*TINY["stylegan2"], "augment.kind=diffaug"),
    ],
    ids=[
        "dcgan",
        "r1+pl+bf16+ncritic",
        "conditional",
        "stylegan2+bf16+channels_last",
        "biggan",
        "r3gan",
        "ada",
        "stylegan2+diffaug",
    ],  # fmt: skip
)
def test_parameters_identical_across_ranks_and_diverge_without_sync(overrides):
    synced = run_ranks(_several_steps, 2, overrides, 4, True)
    for net in ("G", "D", "G_ema"):
        assert torch.equal(synced[0][net], synced[1][net]), net
    if len(synced[0]["buffers"]):  # (R3GAN has no buffers at all)
        assert all(r["ema_buffers_match"] and r["ema_buffers_moved"] for r in synced)
        # Running statistics (BatchNorm's, StyleGAN2's w_avg) follow each rank's own batches until a snapshot
        # averages them; buffers that depend only on the weights (spectral norm's u, v) stay equal.
        assert not torch.equal(synced[0]["buffers_before_sync"], synced[1]["buffers_before_sync"])
        assert torch.equal(synced[0]["buffers"], synced[1]["buffers"])
        torch.testing.assert_close(
            synced[0]["buffers"], (synced[0]["buffers_before_sync"] + synced[1]["buffers_before_sync"]) / 2
        )
    unsynced = run_ranks(_several_steps, 2, overrides, 4, False)
    for net in ("G", "D"):
        assert not torch.equal(unsynced[0][net], unsynced[1][net]), net


def _count_syncs(rank, world, overrides, steps):
    # A DDP communication hook sees every gradient bucket all-reduce: count them per network.
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    tr = make_trainer(*overrides)
    counts = {"G": 0, "D": 0}

    def counting(name):
        def hook(state, bucket):
            counts[name] += 1
            return allreduce_hook(state, bucket)

        return hook

    tr.G.wrapped.register_comm_hook(None, counting("G"))
    tr.D.wrapped.register_comm_hook(None, counting("D"))
    for _ in range(steps):
        tr.train_step(*tr.draw())
    return counts


def test_gradients_synced_once_per_phase():
    # The smoke networks fit in one DDP bucket, so one phase = one all-reduce.
    assert run_ranks(_count_syncs, 2, (), 3) == [{"G": 3, "D": 3}] * 2
    # n_critic=2 and lazy R1 every 2nd step (steps 0 and 2): D 3*2 main + 2 reg; G unchanged.
    over = ("loss.n_critic=2", "loss.r1_gamma=1", "loss.d_reg_interval=2")
    assert run_ranks(_count_syncs, 2, over, 3)[0] == {"G": 3, "D": 8}
    # Penalties folded into the main step (interval 1) add no sync.
    over = ("loss.r1_gamma=1", "loss.d_reg_interval=1", "loss.pl_weight=1", "loss.g_reg_interval=1")
    assert run_ranks(_count_syncs, 2, over, 3)[0] == {"G": 3, "D": 3}
    # Micro-batches (train.batch_per_gpu=2: 4 per rank's 8) reduce once per phase, in the last one's backward.
    assert run_ranks(_count_syncs, 2, ("train.batch_per_gpu=2",), 3)[0] == {"G": 3, "D": 3}


def _accumulated(rank, world, per_gpu, overrides=()):
    tr = make_trainer(*NO_BN, "loss.r1_gamma=1", "loss.d_reg_interval=1", f"train.batch_per_gpu={per_gpu}", *overrides)
    for _ in range(3):
        tr.train_step(*tr.draw())
    return {"G": flat(tr.G_module), "D": flat(tr.D_module), "accum": tr.accum}


def test_micro_batches_accumulate_to_the_whole_batchs_step():
    """train.batch_per_gpu splits a rank's share into micro-batches whose gradients accumulate into one step: the
    same step as the whole share at once (float rounding apart), on 1 process and on 2 ranks, ranks identical."""
    for world in (1, 2):
        whole = run_ranks(_accumulated, world, 0)
        parts = run_ranks(_accumulated, world, 2)
        assert whole[0]["accum"] == 1 and parts[0]["accum"] == 16 // world // 2
        for net in ("G", "D"):
            assert torch.equal(parts[0][net], parts[-1][net])
            torch.testing.assert_close(parts[0][net], whole[0][net], rtol=1e-5, atol=1e-6)
    # Control: micro-batches that each step (no accumulation: a step of 2 images, 4 times less data) differ.
    small = run_ranks(_accumulated, 1, 0, ("train.batch=2",))
    assert not torch.allclose(small[0]["G"], whole[0]["G"], rtol=1e-5, atol=1e-6)


def _fp16_overflow_on_one_rank(rank, world):
    tr = make_trainer("train.precision=fp16")
    tr.G.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    tr.D.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    reals, latents, gen = tr.draw()
    tr.train_step(reals, latents, gen)  # a normal step at a safe scale
    before = {"G": flat(tr.G_module), "D": flat(tr.D_module)}
    reals, latents, gen = tr.draw()
    reals = [tr._reals(r)[0] for r in reals]  # as floats in [-1, 1]
    if rank == 1:
        reals[0][0] = 1e30  # only rank 1's D sees a poisoned real image -> inf gradients there
    tr.train_step(reals, latents, gen)
    stats = tr.stats.reduce(tr.dist)
    return {
        "D_same": torch.equal(before["D"], flat(tr.D_module)),
        "G_same": torch.equal(before["G"], flat(tr.G_module)),
        "D_scale": tr.D.scaler.get_scale(),
        "G_scale": tr.G.scaler.get_scale(),
        "D": flat(tr.D_module),
        "G": flat(tr.G_module),
        "D_skipped": stats["D/skipped"],
    }


def test_fp16_overflow_on_one_rank_skips_on_every_rank():
    r0, r1 = run_ranks(_fp16_overflow_on_one_rank, 2)
    for r in (r0, r1):
        assert r["D_same"] and r["D_scale"] == 4.0  # D skipped and backed off, on both ranks
        assert not r["G_same"] and r["G_scale"] == 8.0  # G's own scaler saw no overflow and stepped
    assert torch.equal(r0["D"], r1["D"]) and torch.equal(r0["G"], r1["G"])
