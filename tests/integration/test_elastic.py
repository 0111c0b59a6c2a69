"""Elastic: a torchrun job that loses a machine goes on with fewer processes, from its last checkpoint.

Two "machines" on loopback: two `launch/torchrun.sh` launchers with `NNODES=1:2` (torchrun's `--nnodes=1:2`, c10d
rendezvous), one process each, `MAX_RESTARTS=1`. Once a checkpoint is committed, the launcher that does not host
the rendezvous store is SIGKILLed together with its training process (a machine gone, nothing of it left to say
goodbye). The survivor's rank must fail (its collective loses its peer), its agent must re-form the rendezvous
with itself alone and restart it with WORLD_SIZE=1, and that process must resume from the last committed
checkpoint and train to train.total_kimg, alone. The data are shards (1 loader worker per rank): the survivor
re-splits the checkpoint's global stream position over its 1 x 1 (data/position.py).

What makes the kill land at a known place: the killed launcher's process hangs at a given step on its first attempt
(DISTGAN_FAULTS=hang, set in that launcher's environment only), so the job cannot get past that step, and the
checkpoint before it is the newest one when the kill comes, whatever the machine's speed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, cli_env, patience
from distgan.checkpoint import load_file, rank_file, verify
from support import distgan_processes, write_shards

pytestmark = [pytest.mark.integration, pytest.mark.dist, pytest.mark.slow]

WRAPPER = str(REPO / "launch" / "torchrun.sh")
SMOKE = str(REPO / "configs" / "smoke.yaml")
BATCH = 16  # configs/smoke.yaml: train.batch (global)
TOTAL_NIMG = 320  # 20 steps
HANG_STEP = 9  # the lost machine's process stops at the start of step 9 ...
LAST_CKPT = 128  # ... so the newest committed checkpoint is that of step 8 (train.ckpt_every_kimg=0.064)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(run_dir: Path, pid: int) -> list[int]:
    """The live training processes (distgan.train) of this run dir that `pid` started (not their loader workers)."""
    return [p for p, parent in distgan_processes(str(run_dir)).items() if parent == pid]


def run_processes(run_dir: Path) -> list[int]:
    """Live (not zombie) training processes of this run dir (and their loader workers), whoever started them."""
    return list(distgan_processes(str(run_dir)))


class Workers:
    """Records, every 50 ms, the training processes a launcher starts: pid -> (first seen, last seen alive)."""

    def __init__(self, run_dir: Path, launcher: int):
        self.run_dir, self.launcher, self.seen = run_dir, launcher, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for pid in children(self.run_dir, self.launcher):
                first, _ = self.seen.get(pid, (now, now))
                self.seen[pid] = (first, now)
            time.sleep(0.05)

    def stop(self) -> list[tuple[int, float, float]]:
        self._stop.set()
        self._thread.join()
        return sorted(((pid, first, last) for pid, (first, last) in self.seen.items()), key=lambda w: w[1])


def test_torchrun_elastic_job_loses_a_machine_and_finishes_on_the_survivor(tmp_path):
    run_dir = tmp_path / "run"
    port = str(free_port())
    # last_call_timeout: how long a rendezvous with MIN (1) machines waits for more. It decides whether the first
    # round has both launchers (they start together; the second joins within seconds), and it is what the
    # survivor's restart waits before going on alone. Keep-alive 1 s x 3: the lost machine is dropped after ~3 s.
    rdzv = f"last_call_timeout={round(patience(3))},keep_alive_interval=1,keep_alive_max_attempt=3"
    common = {"NNODES": "1:2", "NPROC_PER_NODE": "1", "MAX_RESTARTS": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": port, "RDZV_ID": "elastic", "OMP_NUM_THREADS": "1",
              "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    write_shards(tmp_path / "shards", 4, 40, resolution=32)  # 160 samples: the kill at 128 is in epoch 0
    cmd = [WRAPPER, "--config", SMOKE, "--run-dir", str(run_dir), f"train.total_kimg={TOTAL_NIMG / 1000}",
           "train.ckpt_every_kimg=0.064", "train.sample_every_kimg=1", "train.threads=1", "data.source=shards",
           f"data.shards={tmp_path / 'shards'}", "data.workers=1"]  # fmt: skip
    envs = {
        "host": cli_env(**common, RDZV_CONF=f"is_host=true,{rdzv}"),
        "lost": cli_env(**common, RDZV_CONF=f"is_host=false,{rdzv}", DISTGAN_FAULTS=f"hang:step={HANG_STEP}:attempt=0"),
    }
    procs, logs = {}, {}
    t0 = time.time()
    try:
        for name, env in envs.items():
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "wb") as f:
                procs[name] = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
        workers = Workers(run_dir, procs["host"].pid)  # (the wrapper execs torchrun: its pid is the launcher's)

        def out(name: str) -> str:
            return logs[name].read_text(errors="replace")

        # Both launchers trained together up to the hang; the checkpoint before it is committed.
        committed = run_dir / "checkpoints" / f"ckpt-{LAST_CKPT:09d}" / "COMMITTED"
        deadline = time.time() + patience(90)
        while not committed.is_file():
            assert all(p.poll() is None for p in procs.values()), out("host")[-3000:] + out("lost")[-3000:]
            assert time.time() < deadline, f"no checkpoint {LAST_CKPT} after 90 s:\n{out('host')[-3000:]}"
            time.sleep(0.05)
        # rank 0 prints (either launcher's process may have it: the c10d rendezvous numbers them).
        rank0 = [name for name in procs if "world=2" in out(name)]
        assert len(rank0) == 1, out("host")[-3000:] + out("lost")[-3000:]
        newest = sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*") if (p / "COMMITTED").is_file())[-1]
        assert newest == f"ckpt-{LAST_CKPT:09d}", newest

        # The machine is gone: its launcher and its training process, at once, no signal handlers run.
        lost = procs["lost"].pid
        lost_workers = children(run_dir, lost)
        assert len(lost_workers) == 1, lost_workers
        killed = time.time()
        for pid in (lost, *lost_workers):
            os.kill(pid, signal.SIGKILL)
        procs["lost"].wait(patience(10))

        code = procs["host"].wait(patience(120))
        left = run_processes(run_dir)  # (none: torchrun ends its processes, the lost one died with its machine)
    finally:
        for p in procs.values():  # (a failed test: nothing of it may stay, the hung process least of all)
            if p.poll() is None:
                p.kill()
                p.wait(patience(30))
        for pid in run_processes(run_dir):
            os.kill(pid, signal.SIGKILL)
        seen = workers.stop() if "workers" in locals() else []
    ended = time.time()
    text = logs["host"].read_text(errors="replace")
    assert code == 0, text[-5000:]

    # The survivor's first process noticed the loss and failed, so its agent re-formed the group; the second
    # process ran alone (world 1) from the checkpoint of the hang.
    assert len(seen) == 2, seen
    (_, _, first_last), (_, second_first, _) = seen
    noticed, restarted = first_last - killed, second_first - killed
    failed = re.findall(r"failed \(exitcode: (-?\d+)\) local_rank: 0", text)
    print(f"\nlost machine SIGKILLed {killed - t0:.1f} s after the start (rank 0 was on the {rank0[0]} launcher); "
          f"the survivor's rank exited {noticed:.1f} s later (exit codes {failed}), its agent restarted it alone "
          f"{restarted:.1f} s after the kill, done {ended - killed:.1f} s after the kill")  # fmt: skip
    assert failed and failed[0] not in ("0", "-9"), text[-5000:]
    starts = re.findall(r"launcher=torchrun backend=(\w+) world=(\d+)", text)
    assert starts[-1] == ("none", "1"), starts
    resumed = re.findall(r"resumed from (\S+) at ([\d.]+) kimg", text)
    assert resumed == [(str(run_dir / "checkpoints" / f"ckpt-{LAST_CKPT:09d}"), f"{LAST_CKPT / 1000:.3f}")], resumed
    assert "batch: 16 per step = 16 per process x 1 process" in text, text[-3000:]
    split = "data: the position of 2 ranks x 1 loader worker re-split over 1 x 1: 32 samples of the current epoch left"
    assert split in text, text[-3000:]

    # Finished alone: the final checkpoint of one rank, at the total, the global batch kept (20 steps of 16).
    final = run_dir / "checkpoints" / f"ckpt-{TOTAL_NIMG:09d}"
    assert verify(final) is None, verify(final)
    state = load_file(final, "state.pt")
    assert state["world_size"] == 1, state["world_size"]
    assert (state["progress"]["cur_nimg"], state["progress"]["step_idx"]) == (TOTAL_NIMG, TOTAL_NIMG // BATCH)
    assert not (final / rank_file(1)).exists()
    assert left == [], f"processes of the run alive after the survivor's torchrun ended: {left}"
