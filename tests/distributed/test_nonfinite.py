"""Non-finite losses: skipped on every rank together, rolled back after too many in a row, a clear stop after that.

Faults are real: DISTGAN_FAULTS makes `Trainer._optimize` multiply a loss by NaN at an exact rank and step
(distgan/faults.py), in 2 gloo ranks trained through `Trainer.fit`, or in the CLI.

- Skip: a NaN (or Inf) D loss on rank 1 at step 3 makes both ranks skip D's update there (rank 0's own loss is
  finite: the skip reaches it through the all-reduced gradients); G still steps, D steps again at step 4, and
  the ranks stay identical. Control: the same run without the fault updates D at step 3.
- Rollback: 3 skipped steps in a row (train.max_consecutive_skips=3) go back to the last checkpoint and train on
  to the end with fresh latents. Control: with max_consecutive_skips=4 the same 3 skips do not roll back.
- Diverged: a NaN that persists through train.max_rollbacks rollbacks ends the CLI with exit code 4 and one line;
  the last committed checkpoint still verifies and holds finite values only. A NaN before the first checkpoint
  has nothing to roll back to: exit code 4 too.
Skip and rollback run under DDP and under ZeRO-2 (DeepSpeed skips a non-finite gradient norm itself; the
rollback reloads its engines through DeepSpeed's load_checkpoint).
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_env, patience, require_deepspeed
from support import flat, make_trainer, run_ranks

pytestmark = pytest.mark.dist

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _digest(module) -> str:
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _weights(tr) -> dict:
    """The final weights, flat, per network (compared across ranks and variants)."""
    return {"D": flat(tr.D_module), "G": flat(tr.G_module), "G_ema": flat(tr.G_ema.module)}


def _record(tr) -> dict:
    return {
        "step": tr.step_idx,
        "nimg": tr.cur_nimg,
        "D_skipped": float(tr.stats.last("D/skipped")),
        "G_skipped": float(tr.stats.last("G/skipped")),
        "loss_D_finite": bool(torch.isfinite(tr.stats.last("Loss/D/main"))),
        "rollbacks": tr.rollbacks,
        "D": _digest(tr.D_module),
        "G": _digest(tr.G_module),
    }


class _InfDLossAt:
    """The trainer's loss, with D's loss made +Inf on one rank at one step."""

    def __init__(self, loss, tr, rank, step):
        self.loss, self.tr, self.rank, self.step = loss, tr, rank, step

    def d_loss(self, real_logits, fake_logits):
        out = self.loss.d_loss(real_logits, fake_logits)
        hit = self.tr.dist.rank == self.rank and self.tr.step_idx == self.step
        return out * float("inf") if hit else out

    def __getattr__(self, name):  # g_loss, relativistic, ...: the wrapped loss's
        return getattr(self.loss, name)


STRATEGIES = ["ddp", pytest.param("zero2", marks=pytest.mark.deepspeed)]


def _skip_runs(rank, world, strategy):
    """Three 6-step runs in the same processes: NaN fault, Inf loss, no fault."""
    from distgan import distributed

    dist = distributed.setup("fp32", threads=1)
    out = {}
    for variant in ("nan", "inf", "none"):
        os.environ["DISTGAN_FAULTS"] = "nan_loss:rank=1:step=3:net=D" if variant == "nan" else ""
        tr = make_trainer("train.total_kimg=0.096", f"dist.strategy={strategy}", dist=dist)
        if variant == "inf":
            tr.loss = _InfDLossAt(tr.loss, tr, rank=1, step=3)
        steps = [{"step": 0, "D": _digest(tr.D_module), "G": _digest(tr.G_module)}]
        tr.fit(on_step=lambda t, rec=steps: rec.append(_record(t)))
        out[variant] = {"steps": steps, "skips_total": tr.skips_total, **_weights(tr)}
    os.environ.pop("DISTGAN_FAULTS")
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nonfinite_d_loss_on_one_rank_skips_d_on_every_rank(strategy):
    if strategy != "ddp":
        require_deepspeed()
    out = run_ranks(_skip_runs, 2, strategy)
    for variant in ("nan", "inf"):
        for rank, r in enumerate(out):
            steps = r[variant]["steps"]  # steps[k]: after k steps; step 3 is steps[4]
            assert [s["step"] for s in steps] == list(range(7))
            assert [s["D_skipped"] for s in steps[1:]] == [0, 0, 0, 1, 0, 0], (variant, rank)
            assert [s["G_skipped"] for s in steps[1:]] == [0] * 6
            assert steps[4]["loss_D_finite"] == (rank == 0 or variant == "nan")  # the fault hits after the report
            assert steps[4]["D"] == steps[3]["D"]  # D not updated at step 3
            assert steps[4]["G"] != steps[3]["G"]  # G was
            assert steps[5]["D"] != steps[4]["D"]  # D steps again at step 4 (no NaN left in its gradients)
            for k in (1, 2, 3, 5, 6):
                assert steps[k]["D"] != steps[k - 1]["D"]
            # Before the fault the run is the fault-free one.
            assert steps[3]["D"] == r["none"]["steps"][3]["D"]
            assert r[variant]["skips_total"] == 1
            for net in ("D", "G", "G_ema"):
                assert torch.isfinite(r[variant][net]).all()
        for net in ("D", "G", "G_ema"):
            assert torch.equal(out[0][variant][net], out[1][variant][net]), (variant, net)
        assert [s["D"] for s in out[0][variant]["steps"]] == [s["D"] for s in out[1][variant]["steps"]]
    # Control: without the fault, nothing is skipped and D changes at step 3.
    for r in out:
        steps = r["none"]["steps"]
        assert [s["D_skipped"] for s in steps[1:]] == [0] * 6
        assert steps[4]["D"] != steps[3]["D"]
        assert r["none"]["skips_total"] == 0


# ---------------------------------------------------------------------------------------------------- rollback

# 12 steps, checkpoints every 4 (after steps 3, 7, 11: ckpt-000000064, -128, -192), logs every 2. Steps 5-7 fail:
# the 3rd skip in a row (step 7) rolls back before step 7's checkpoint is due, to ckpt-000000064.
ROLLBACK = ("train.total_kimg=0.192", "train.ckpt_every_kimg=0.064", "train.max_rollbacks=1", "train.keep_ckpts=5")
# nan_loss is reached twice per step (D_main, G_main; the smoke config has no penalty phases), so steps 6-8 are its
# calls 11-16 the first time; after the rollback to step 4, steps 5-7 are calls 19-24 and train normally.
FIRST_TIME_ONLY = "nan_loss:rank=1:step=5-7:nth=11-16"


def _rollback_runs(rank, world, root, strategy):
    from distgan import distributed
    from distgan.console import Console

    dist = distributed.setup("fp32", threads=1)
    out = {}
    for name, skips, spec in (("rollback", 3, FIRST_TIME_ONLY), ("control", 4, "nan_loss:rank=1:step=5-7")):
        run_dir = Path(root) / name
        os.environ["DISTGAN_FAULTS"] = spec
        tr = make_trainer(*ROLLBACK, f"train.max_consecutive_skips={skips}", f"dist.strategy={strategy}",
                          run_dir=run_dir, dist=dist)  # fmt: skip
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        tr.console = Console(dist.is_main, run_dir / "log.txt", "none")
        steps = []
        tr.fit(on_step=lambda t, rec=steps: rec.append(_record(t)))
        counters = {"rollbacks": tr.rollbacks, "nimg": tr.cur_nimg, "step": tr.step_idx}
        out[name] = {"steps": steps, **counters, **_weights(tr)}
    os.environ.pop("DISTGAN_FAULTS")
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_consecutive_skips_roll_back_to_the_last_checkpoint_and_train_on(tmp_path, strategy):
    import json

    from distgan.checkpoint import CheckpointManager

    if strategy != "ddp":
        require_deepspeed()
    out = run_ranks(_rollback_runs, 2, str(tmp_path), strategy)
    for r in out:
        rb = r["rollback"]
        # Steps 0-7 (step_idx 1-8); the 3rd skip in a row rolls back to step_idx 4 (ckpt-000000064); steps 4-11.
        assert [s["step"] for s in rb["steps"]] == [*range(1, 9), *range(5, 13)]
        skipped = [s["D_skipped"] for s in rb["steps"]]
        assert skipped == [0] * 5 + [1, 1, 1] + [0] * 8  # the fault fired the first time through steps 5-7 only
        assert [s["G_skipped"] for s in rb["steps"]] == skipped  # no net= in the spec: G's loss too
        assert [s["rollbacks"] for s in rb["steps"]] == [0] * 8 + [1] * 8
        assert rb["rollbacks"] == 1 and rb["nimg"] == 192 and rb["step"] == 12
        # After the rollback step 4 drew other latents than the first time (else a blow-up would just repeat).
        assert rb["steps"][8]["step"] == rb["steps"][4]["step"] == 5
        assert rb["steps"][8]["D"] != rb["steps"][4]["D"]
        for net in ("D", "G", "G_ema"):
            assert torch.isfinite(rb[net]).all()
        # Control: the same three skips under max_consecutive_skips=4 do not roll back.
        ctl = r["control"]
        assert [s["step"] for s in ctl["steps"]] == list(range(1, 13))
        assert [s["D_skipped"] for s in ctl["steps"]] == [0] * 5 + [1, 1, 1] + [0] * 4
        assert ctl["rollbacks"] == 0 and ctl["nimg"] == 192
    for name in ("rollback", "control"):
        for net in ("D", "G", "G_ema"):
            assert torch.equal(out[0][name][net], out[1][name][net]), (name, net)

    run = tmp_path / "rollback"
    log = (run / "log.txt").read_text()
    assert (
        "warning: 3 steps in a row had non-finite losses or gradients; "
        "rolled back to ckpt-000000064 (1 of train.max_rollbacks=1)" in log
    )
    assert log.count("rolled back") == 1
    control_log = tmp_path / "control" / "log.txt"  # the console writes it only when it prints something
    assert not control_log.exists() or "rolled back" not in control_log.read_text()
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert records[-1]["nimg"] == 192 and records[-1]["Progress/rollbacks"] == 1
    skipped = [r["Progress/skipped_steps"] for r in records]
    assert skipped == sorted(skipped) and skipped[-1] == 3  # the count survives the rollback
    # In the control, the checkpoint due after step 8 (128 images) fell in the skip streak: it waited for the first
    # good step (144), so nothing saved mid-streak can become a rollback target.
    assert [p.name for p in CheckpointManager(tmp_path / "control").committed()] == [
        "ckpt-000000064",
        "ckpt-000000144",
        "ckpt-000000192",
    ]
    assert [p.name for p in CheckpointManager(run).committed()] == [
        "ckpt-000000064",
        "ckpt-000000128",
        "ckpt-000000192",
    ]


# ---------------------------------------------------------------------------------------------------- diverged


def _cli(run_dir, faults, *overrides):
    cmd = [sys.executable, "-m", "distgan.train", "--config", SMOKE, "--run-dir", str(run_dir), *overrides]
    return subprocess.run(
        cmd,
        cwd=run_dir.parent,
        env=cli_env(DISTGAN_FAULTS=faults),
        capture_output=True,
        text=True,
        timeout=patience(120),
    )


def _all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(_all_finite(v) for v in obj)
    return not isinstance(obj, float) or obj == obj and abs(obj) != float("inf")


def _one_line(p) -> str:
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("distgan:")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def test_nan_through_every_rollback_exits_4_and_keeps_the_last_checkpoint(tmp_path):
    from distgan.checkpoint import CheckpointManager, load_file, verify

    run = tmp_path / "run"
    # ckpt-000000064 after step 3; from step 5 on every D and G loss is NaN: 2 skips, rollback, twice, then stop.
    p = _cli(run, "nan_loss:step=5-", "train.max_consecutive_skips=2", "train.max_rollbacks=2")
    assert p.returncode == 4, p.stdout[-3000:] + p.stderr[-3000:]
    line = _one_line(p)
    # The host reads the skip counts at log intervals (every 2 steps): at 0.096 kimg 1 skip, at 0.128 kimg 3.
    assert line.startswith("distgan: 3 steps in a row had non-finite losses or gradients at 0.128 kimg")
    assert "after 2 rollback(s) (train.max_rollbacks=2)" in line
    log = (run / "log.txt").read_text()
    assert log.count("rolled back to ckpt-000000064") == 2
    assert "(2 of train.max_rollbacks=2)" in log
    [ckpt] = CheckpointManager(run).committed()
    assert ckpt.name == "ckpt-000000064" and verify(ckpt) is None
    state = load_file(ckpt, "state.pt")
    assert state["progress"]["cur_nimg"] == 64 and _all_finite(state)
    assert _all_finite(load_file(ckpt, "rank-00000.pt"))

    # Control, and the other way to give up: NaN from step 1, before the first checkpoint (after step 3).
    run = tmp_path / "early"
    p = _cli(run, "nan_loss:step=1-", "train.max_consecutive_skips=2", "train.max_rollbacks=2")
    assert p.returncode == 4, p.stdout[-3000:] + p.stderr[-3000:]
    line = _one_line(p)
    assert line.startswith("distgan: 3 steps in a row had non-finite losses or gradients at 0.064 kimg")
    assert "no checkpoint to roll back to" in line
    assert CheckpointManager(run).candidates() == []
