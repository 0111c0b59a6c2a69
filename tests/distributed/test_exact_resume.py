"""A run stopped twice and resumed from its checkpoint files is the uninterrupted run, bit for bit, on 2 ranks.

Straight: 12 steps of 2 gloo ranks streaming from shards (a loader worker per rank, shuffle blocks of 5), in
deterministic mode. Resumed: the same 12 steps in three launches of fresh processes (a real stop each time):
0 -> 6 and save (next to the straight run, in the first launch), load -> 9 and save, load -> 12. Every save
is `Trainer.fit`'s final checkpoint in a run dir, every load goes through
`CheckpointManager.latest_on_every_rank` and `load_checkpoint`.
After every step and on every rank, the losses (their float bits) and sha256s of G, D, G_ema, the BatchNorm
buffers and both optimizers' states must be identical in the two runs.

The shards hold 256 samples (16 steps of 16 per epoch), so both resume points are inside epoch 0 and the data
position matters: the control loads the step-6 checkpoint but restarts the data stream from the beginning, and
its first step's losses differ. Further controls: the two ranks see different data (their losses differ) while
DDP keeps their parameters and optimizer states equal.

Every run samples every 3 steps (= BatchNorm buffers averaged over ranks at steps 3, 6, 9, 12), so the saves
at 6 and 9 sync buffers exactly where the straight run does too.

The same test runs under DDP and under ZeRO-2 (two DeepSpeed engines, saved and loaded through DeepSpeed's own
checkpoint code inside distgan's), the ZeRO-2 run with train.compile (compiled forwards do not change what a
checkpoint holds, and a resumed process compiles again): under ZeRO each rank's optimizer digest is of its own
partition, so the ranks' optimizer states differ (the control that the state really is partitioned) while each
matches its straight run.
And with every other family, two of them class-conditional on labelled shards (labels travel with their images
through the resume, and the fakes' labels are drawn from the same (seed, rank, images seen) after it), and with
ADA and DiffAugment.
"""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from conftest import require_deepspeed
from support import TINY, make_trainer, run_ranks, write_shards

pytestmark = pytest.mark.dist

N = 12  # steps of 16 images
SEGMENTS = (6, 9, 12)
# Augmentation cases: ADA with every op group from p = 0.2, its controller moving p every 4 steps by 16 * 4 / 500
# (so both resume points, after steps 6 and 9, fall between two moves: each rank's partial sums travel in its rank
# file); DiffAugment with all three policies.
AUGMENT = {
    "ada": ("augment.kind=ada", "augment.ops=bgcfnc", "augment.p=0.2", "augment.ada_interval=4",
            "augment.ada_kimg=0.5"),
    "diffaug": ("augment.kind=diffaug",),
}  # fmt: skip


def _args(folder, end_step, strategy):
    # "+classes": a class-conditional model on labelled shards; "+stylegan2": that family (support.TINY); "+ada":
    # that augmentation (AUGMENT); "+compile": train.compile=default
    strategy, *extras = strategy.split("+")
    return (
        f"dist.strategy={strategy}",
        *(["model.num_classes=auto"] if "classes" in extras else []),
        *(o for e in extras if e in TINY for o in TINY[e]),
        *(o for e in extras if e in AUGMENT for o in AUGMENT[e]),
        *(["train.compile=default"] if "compile" in extras else []),
        "data.source=shards",
        f"data.shards={folder}",
        "data.workers=1",
        "data.shuffle_buffer=5",
        "train.deterministic=true",
        f"train.total_kimg={end_step * 16 / 1000}",
        "train.sample_every_kimg=0.048",  # every 3 steps: buffers synced at 3, 6, 9, 12 in every run
        "train.ckpt_every_kimg=1000",  # only fit's final save
        "train.keep_ckpts=5",
    )


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _opt_digest(opt) -> str:
    sd = opt.state_dict()
    items = [(f"{i}.{k}", v) for i in sorted(sd["state"]) for k, v in sorted(sd["state"][i].items())]
    return _digest(items) + repr(sd["param_groups"])


def _bits(t) -> int:
    return int(t.detach().float().reshape(()).view(torch.int32).item())


def _snapshot(tr) -> dict:
    bufs = [(f"{n}.{k}", b) for n, m in (("G", tr.G_module), ("D", tr.D_module), ("E", tr.G_ema.module))
            for k, b in m.named_buffers()]  # fmt: skip
    return {
        "nimg": tr.cur_nimg,
        "loss_D": _bits(tr.stats.last("Loss/D/main")),
        "loss_G": _bits(tr.stats.last("Loss/G/main")),
        "G": _digest(tr.G_module.named_parameters()),
        "D": _digest(tr.D_module.named_parameters()),
        "G_ema": _digest(tr.G_ema.module.named_parameters()),
        "buffers": _digest(bufs),
        "opt_G": _opt_digest(tr.opt_G),
        "opt_D": _opt_digest(tr.opt_D),
        "p": None if tr.augment.p is None else _bits(tr.augment.p),
    }


def _launch(rank, world, folder, strategy, jobs):
    """One launch of fresh processes running `jobs` in turn, each (run_dir, end_step, resume, control): a
    trainer (resumed from the run dir's latest checkpoint) fits to `end_step`, which saves at the end."""
    from distgan import distributed

    assert "DISTGAN_FAULTS" not in os.environ
    dist = distributed.setup("fp32", threads=1, deterministic=True)
    return [_segment(dist, folder, strategy, *job) for job in jobs]


def _segment(dist, folder, strategy, run_dir, end_step, resume, control):
    from distgan.checkpoint import CheckpointManager

    tr = make_trainer(*_args(folder, end_step, strategy), run_dir=run_dir, dist=dist)
    ckpts = CheckpointManager(Path(run_dir))
    loaded = None
    if resume:
        loaded = ckpts.latest_on_every_rank(dist)
        tr.load_checkpoint(loaded)
    start = tr.step_idx
    steps = {}
    tr.fit(on_step=lambda t: steps.__setitem__(t.step_idx, _snapshot(t)))
    tr.stream.close()
    out = {"start": start, "steps": steps, "loaded": loaded and loaded.name, "saved": ckpts.latest().name}

    if control:  # the same checkpoint, but the data stream starts over from the beginning of the shards
        c = make_trainer(*_args(folder, end_step, strategy), dist=dist)
        fresh = c.stream.state_dict()
        c.load_checkpoint(loaded)
        c.stream.load_state_dict(fresh)
        c.train_step(*c.draw())
        c.stream.close()
        out["control"] = {"step": c.step_idx, **_snapshot(c)}
    return out


@pytest.mark.parametrize(
    "strategy",
    # DCGAN under ZeRO-2 here, compiled (train.compile: the compiled main phases beside the eager R1-free recipe,
    # every launch compiling afresh); DCGAN under DDP resumes exactly in tests/slurm/test_slurm.py's preemption
    # tests and `gpu-check --dry`'s stop + resume; labels through a resume: the conditional family variants
    [pytest.param("zero2+compile", marks=pytest.mark.deepspeed),
     # the other families, each with what it carries across a resume: StyleGAN2 its w_avg, noise and style-mixing
     # draws (torch's generator, in the rank state) and path-length mean; BigGAN spectral norm's u and v and
     # BatchNorm statistics; R3GAN its ramped lr and R1 weight (functions of the images seen)
     # augmentation too (ADA's p and each rank's partial sums; DiffAugment's draws from the step's generator)
     "ddp+stylegan2+classes", "ddp+biggan+classes+ada", "ddp+r3gan+diffaug"],
)  # fmt: skip
def test_stopped_twice_and_resumed_equals_straight_bit_for_bit(tmp_path, strategy):
    if strategy.startswith("zero"):
        require_deepspeed()
    folder = tmp_path / "shards"
    # 256 samples: an epoch is 16 steps, longer than the run; "+classes": labelled 0-4 by id, a conditional model
    labels = {"label": lambda i: i % 5, "num_classes": 5} if "+classes" in strategy else {}
    write_shards(folder, 8, 32, resolution=32, **labels)
    run = str(tmp_path / "resumed")
    # Launch 1: the straight run (its own run dir), and the resumed run's first segment. Launches 2 and 3 are
    # fresh processes that know only the resumed run dir.
    jobs = [(str(tmp_path / "straight"), N, False, False), (run, 6, False, False)]
    first = run_ranks(_launch, 2, str(folder), strategy, jobs)
    straight = [r[0] for r in first]
    seg = [[r[1] for r in first]]
    seg.append([r[0] for r in run_ranks(_launch, 2, str(folder), strategy, [(run, SEGMENTS[1], True, True)])])
    seg.append([r[0] for r in run_ranks(_launch, 2, str(folder), strategy, [(run, SEGMENTS[2], True, False)])])

    # Each launch resumed from the previous one's final checkpoint, on both ranks.
    names = [f"ckpt-{s * 16:09d}" for s in SEGMENTS]
    for i, launch in enumerate(seg):
        for r in launch:
            assert r["start"] == (0, *SEGMENTS)[i]
            assert r["loaded"] == (None, *names)[i]
            assert r["saved"] == names[i]
            assert sorted(r["steps"]) == list(range((0, *SEGMENTS)[i] + 1, SEGMENTS[i] + 1))

    for rank in range(2):
        resumed = {k: v for launch in seg for k, v in launch[rank]["steps"].items()}
        assert sorted(resumed) == sorted(straight[rank]["steps"]) == list(range(1, N + 1))
        for step, want in straight[rank]["steps"].items():
            got = resumed[step]
            for key in want:
                assert got[key] == want[key], f"rank {rank} step {step}: {key} differs after resume"

    # Control: the step-6 checkpoint with the data stream reset draws other reals, so its losses differ.
    for rank in range(2):
        ctl, want = seg[1][rank]["control"], straight[rank]["steps"][SEGMENTS[0] + 1]
        assert ctl["step"] == SEGMENTS[0] + 1 and ctl["nimg"] == want["nimg"]
        assert ctl["loss_D"] != want["loss_D"] and ctl["loss_G"] != want["loss_G"]
        assert ctl["D"] != want["D"]

    # The ranks see different data but keep identical parameters, and identical optimizer states under DDP;
    # under ZeRO each rank holds its own partition of them.
    for step, r0 in straight[0]["steps"].items():
        r1 = straight[1]["steps"][step]
        assert r0["loss_D"] != r1["loss_D"] and r0["loss_G"] != r1["loss_G"], step
        for key in ("G", "D", "G_ema", "p"):  # ADA's p: the same on every rank at every step
            assert r0[key] == r1[key], (step, key)
        for key in ("opt_G", "opt_D"):
            assert (r0[key] == r1[key]) == strategy.startswith("ddp"), (step, key)
    # And the networks did train: every step changed them.
    digests = [straight[0]["steps"][s]["D"] for s in range(1, N + 1)]
    assert len(set(digests)) == N
    if "+ada" in strategy:  # p moved, and only at the controller's steps (4, 8, 12)
        ps = [straight[0]["steps"][s]["p"] for s in range(1, N + 1)]
        ps = [torch.tensor(0.2).item(), *torch.tensor(ps, dtype=torch.int32).view(torch.float32).tolist()]
        moves = [s for s in range(1, N + 1) if ps[s] != ps[s - 1]]
        assert moves and set(moves) <= {4, 8, 12}, ps
