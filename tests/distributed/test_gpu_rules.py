"""NCCL's rules, checked on a CPU: what a multi-GPU job does at a checkpoint, a stop, a rollback, a log interval, an
evaluation and a scaling benchmark must not break them.

NCCL accepts CUDA tensors only, so a collective on a host tensor through the default group passes every gloo test
and crashes the first multi-GPU run (before this issue: every periodic checkpoint, the save after SIGUSR1 and every
rollback). `DISTGAN_EMULATE_NCCL=1` (distgan/distributed/strict.py) makes such calls fail here too: each 2-rank run
below goes through those paths under it. The controls break one rule the way the old code did (a collective on a
tensor Dist did not place on the group's device; an object collective on the default group) and the same run
fails with NcclRuleError, so the check is not a given. A static test checks that nothing outside
distgan/distributed/ talks to torch.distributed directly.
"""

from __future__ import annotations

import ast
import os
import signal
from pathlib import Path

import pytest

from conftest import REPO
from support import make_trainer, run_ranks

pytestmark = pytest.mark.dist


def _job(rank, world, root, broken):
    """Checkpoints, stats, a rollback, a stop signal and metrics in one 2-rank life, under NCCL emulation."""
    os.environ["DISTGAN_EMULATE_NCCL"] = "1"
    from distgan import distributed
    from distgan.console import Console
    from distgan.distributed.strict import NcclRuleError
    from distgan.errors import Interrupted
    from distgan.watchdog import StopSignals

    if broken == "placement":  # the old Dist: the caller's tensor goes to the default group as it is
        distributed.Dist.group_tensor = lambda self, t: t  # (this process only: a spawned rank)
    dist = distributed.setup("fp32", threads=1)
    if broken == "objects":  # the old Dist: objects through the default group
        dist.control = None
    run_dir = Path(root) / broken
    run_dir.mkdir(parents=True, exist_ok=True)
    done = []
    try:
        # 12 steps: checkpoints every 4 (each one all-reduces the non-finite count, gathers the ranks' file reports
        # and broadcasts the outcome), stats every 2, path length every 2 (its mean is all-reduced); NaN losses at
        # steps 5-7 on rank 1 roll back to the checkpoint of step 4 (every rank agrees on the latest checkpoint).
        # Backwards per step: D_main, G_main, and G_reg at even steps: steps 5-7 are calls 14-20 the first time.
        os.environ["DISTGAN_FAULTS"] = "nan_loss:rank=1:step=5-7:nth=14-20"
        tr = make_trainer("train.total_kimg=0.192", "train.ckpt_every_kimg=0.064", "train.max_consecutive_skips=3",
                          "loss.pl_weight=1", "loss.g_reg_interval=2", run_dir=run_dir, dist=dist)  # fmt: skip
        tr.console = Console(dist.is_main, run_dir / "log.txt", "none")
        tr.fit()
        done.append(("trained", tr.cur_nimg, tr.rollbacks))
        # A stop signal to rank 1 only: the ranks agree on it and save the same step.
        os.environ["DISTGAN_FAULTS"] = ""
        tr = make_trainer("train.total_kimg=100", run_dir=Path(root) / f"{broken}-stop", dist=dist)
        stop = StopSignals(dist)

        def signal_once(t):
            if rank == 1 and t.step_idx == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

        try:
            tr.fit(stop=stop, on_step=signal_once)
        except Interrupted as e:
            done.append(("stopped", tr.cur_nimg, str(e).split(";")[0]))
        finally:
            stop.close()
        # Metrics: every rank extracts its share of the features; they are gathered to rank 0.
        done.append(("metrics", _metrics(tr, dist, Path(root))))
        return {"done": done, "error": None}
    except NcclRuleError as e:
        return {"done": done, "error": str(e)}
    finally:
        os.environ.pop("DISTGAN_FAULTS", None)


def _metrics(tr, dist, root):
    from metrics_support import save_tinynet

    from distgan.metrics.evaluator import Evaluator
    from distgan.metrics.features import make_extractor
    from distgan.metrics.sources import GeneratorSource

    net = root / f"net-{dist.rank}.pt"
    save_tinynet(net)
    ev = Evaluator(["is"], make_extractor(f"torchscript:{net}"), None, dist, num=20, batch=8)
    return ev.evaluate(GeneratorSource(tr.G_ema.module, tr.cfg.model.z_dim, seed=0))["is"]


def test_a_gpu_jobs_collectives_keep_nccls_rules(tmp_path):
    ok = run_ranks(_job, 2, str(tmp_path), "none")
    for r in ok:
        assert r["error"] is None, r["error"]
        kinds = [d[0] for d in r["done"]]
        assert kinds == ["trained", "stopped", "metrics"], r["done"]
        assert r["done"][0][1:] == (192, 1)  # trained to the end, through one rollback
        assert r["done"][1][2].startswith("stopped by SIGUSR1 at")
    assert ok[0]["done"] == ok[1]["done"]  # the same steps, the same checkpoint, the same metric on both ranks

    # Controls: the old ways fail under the emulation (on gloo alone they would pass, and crash on NCCL).
    broken = run_ranks(_job, 2, str(tmp_path), "placement")
    assert all("Dist did not place on the group's device" in (r["error"] or "") for r in broken), broken
    assert all(r["done"] == [] for r in broken)  # (the first step's path-length mean already broke it)
    objects = run_ranks(_job, 2, str(tmp_path), "objects")
    assert all("object collectives go through Dist's gloo control group" in (r["error"] or "") for r in objects)


def _bench(rank, world):
    os.environ["DISTGAN_EMULATE_NCCL"] = "1"
    from distgan.bench import scale

    return scale._allreduce_child(rank, world, [4096, 65536], 2, 1)


def test_the_scaling_benchs_all_reduces_keep_nccls_rules():
    times = run_ranks(_bench, 2)
    assert all(len(t) == 2 and all(x > 0 for x in t) for t in times)


def test_nothing_outside_distributed_calls_torch_distributed():
    """torch.distributed is used in distgan/distributed/ only (the rule above needs one place that places
    tensors); elsewhere a mention in a string or comment is fine, an import or an attribute access is not."""
    offenders = []
    for path in sorted((REPO / "distgan").rglob("*.py")):
        if "distributed" in path.relative_to(REPO / "distgan").parts[:1]:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            hit = (
                isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed")
                or isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names)
                or isinstance(node, ast.Attribute) and node.attr == "distributed"
                and isinstance(node.value, ast.Name) and node.value.id == "torch"
            )  # fmt: skip
            if hit:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def _turns(rank, world, log, how):
    import dataclasses
    import time

    from distgan import distributed

    dist = distributed.setup("fp32", threads=1)
    dist = dataclasses.replace(dist, local_rank=rank % 2)  # two "nodes" of two processes: ranks {0, 1}, {2, 3}
    with getattr(dist, how)():
        with open(log, "a") as f:
            f.write(f"{rank} start\n")
        time.sleep(0.3)  # (a download)
        with open(log, "a") as f:
            f.write(f"{rank} end\n")
    dist.close()


def test_downloads_happen_once_per_job_then_once_per_other_node(tmp_path):
    """download_first: rank 0 alone (a shared file system gets one download), then the first process of every other
    node (a node-local folder gets its own), then the rest. Control: local_main_first lets the first processes of
    both nodes download into what may be one shared folder at the same time."""
    log = tmp_path / "order.txt"
    run_ranks(_turns, 4, str(log), "download_first")
    events = log.read_text().split("\n")[:-1]
    assert events[:4] == ["0 start", "0 end", "2 start", "2 end"], events
    assert sorted(events[4:]) == ["1 end", "1 start", "3 end", "3 start"]
    log.unlink()
    run_ranks(_turns, 4, str(log), "local_main_first")
    events = log.read_text().split("\n")[:-1]
    assert sorted(events[:2]) == ["0 start", "2 start"], events  # both nodes' first processes at once
