"""A rank SIGKILLed at each phase of a 2-rank checkpoint write (distgan/checkpoint.py's commit protocol) leaves
the run dir resumable: the newest checkpoint that verifies is the previous one (A) or the new one (B), never a
half-written one, and every file of it loads.

Each case is a real 2-process gloo job: both ranks build the smoke trainer, commit O (16 images) and A (32)
with keep=3, train one more step, then save B (48) with keep=1 and DISTGAN_FAULTS="ckpt.PHASE:rank=R", so rank R
kills itself at that phase of B's save and the other rank is left with a dead peer. keep=1 makes B's purge
delete both O and A; the kill `during_purge` lands after the first deletion (O), so A must still be there.
The control case sets no fault: B commits and the purge leaves B alone.

Cost: a process importing torch + Accelerate + torch._dynamo (Adam) takes ~4 s on this machine, so 15 spawned
pairs would take ~2 min. Instead one spawned "zygote" process does the imports once and os.fork()s the two
rank processes of each case from that state (what multiprocessing's forkserver does): each rank is still a
fresh process with its own PID and environment, joins a new process group through
`distgan.distributed.setup()` exactly as in a launch, and really dies by SIGKILL. The zygote only imports (no
torch op, no process group), so the forks start clean. It reaps both ranks of a case (killing them after a
deadline, which the test reports as a hang) and writes their exit statuses; each rank's stderr is kept.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

PHASES = ("before_files", "mid_file", "after_files", "after_manifest", "before_rename", "after_rename", "during_purge")
CASES = [(phase, rank) for rank in (0, 1) for phase in PHASES] + [(None, None)]  # last: control, no fault
NIMG = {"O": 16, "A": 32, "B": 48}
CASE_DEADLINE_S = 60


def _case_id(case) -> str:
    phase, rank = case
    return "control" if phase is None else f"{phase}-rank{rank}"


def _ckpt(run: Path, which: str) -> Path:
    return run / "checkpoints" / f"ckpt-{NIMG[which]:09d}"


def _tmp(run: Path) -> Path:
    return run / "checkpoints" / f".tmp-ckpt-{NIMG['B']:09d}"


# ---------------------------------------------------------------------- processes


def _rank_main(rank: int, world: int, port: int, run: str, fault: str | None) -> None:
    """One rank of a case: commit O and A, then save B with the fault armed (this rank or the other dies)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )  # fmt: skip
    os.environ.pop("DISTGAN_FAULTS", None)
    from distgan.checkpoint import CheckpointManager
    from support import make_trainer

    tr = make_trainer()
    assert tr.dist.world_size == world and tr.dist.rank == rank
    keep3 = CheckpointManager(run, keep=3)
    for which in ("O", "A"):
        tr.train_step(*tr.draw())
        assert tr.save_checkpoint(keep3) == _ckpt(Path(run), which)
    tr.train_step(*tr.draw())
    if fault:
        os.environ["DISTGAN_FAULTS"] = fault
    print(f"rank {rank}: saving B", file=sys.stderr, flush=True)
    path = tr.save_checkpoint(CheckpointManager(run, keep=1))
    print(f"rank {rank}: B returned {path}", file=sys.stderr, flush=True)


def _zygote(base: str, cases: list) -> None:
    """Import once, then fork both ranks of each case, reap them, and record how each ended."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (imported by the first Adam: 3 s)

    import distgan.checkpoint  # noqa: F401
    import distgan.distributed  # noqa: F401
    import distgan.export  # noqa: F401
    import distgan.training  # noqa: F401
    import support  # noqa: F401

    for case in cases:
        phase, kill_rank = case
        folder = Path(base) / _case_id(case)
        folder.mkdir(parents=True)
        fault = f"ckpt.{phase}:rank={kill_rank}" if phase else None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start = time.monotonic()
        pids = []
        for r in range(2):
            pid = os.fork()
            if pid == 0:  # the rank process: never returns into the zygote's code
                code = 1
                try:
                    fd = os.open(folder / f"rank{r}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    _rank_main(r, 2, port, str(folder / "run"), fault)
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        status: dict[int, int | str] = {}
        while len(status) < 2:
            for r, pid in enumerate(pids):
                if r not in status:
                    done, raw = os.waitpid(pid, os.WNOHANG)
                    if done:
                        status[r] = os.waitstatus_to_exitcode(raw)
            if len(status) < 2 and time.monotonic() - start > CASE_DEADLINE_S:
                for r, pid in enumerate(pids):
                    if r not in status:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        status[r] = "hung"
            time.sleep(0.02)
        result = {"pids": pids, "status": [status[0], status[1]], "seconds": time.monotonic() - start}
        (folder / "result.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Runs every case once (under a second each, after the zygote's ~5 s of imports); returns the base folder."""
    base = tmp_path_factory.mktemp("crash")
    ctx = mp.get_context("spawn")
    zygote = ctx.Process(target=_zygote, args=(str(base), CASES))
    zygote.start()
    zygote.join(timeout=CASE_DEADLINE_S * len(CASES) + 60)
    if zygote.is_alive():
        zygote.kill()
        zygote.join()
    assert zygote.exitcode == 0, f"the zygote failed ({zygote.exitcode})"
    return base


# ---------------------------------------------------------------------- the checks


def _expected(phase, kill_rank, survivor_log: str) -> str:
    """Which checkpoint must be the newest good one after this case."""
    if phase is None or (phase == "during_purge" and kill_rank == 0):
        return "B"  # committed (the marker was written before the purge began)
    if kill_rank == 0 or phase in ("before_files", "mid_file", "after_files"):
        return "A"  # rank 0 died before writing COMMITTED, or rank 1 died before the files gather
    # Rank 1 died right after the gather while rank 0 committed on its own: rank 0 needs nothing more from it
    # until the final broadcast, so B is committed unless the gather itself already failed on rank 0.
    # Where rank 0 failed says which (its traceback), so the expectation stays exact.
    if "in broadcast_object" in survivor_log:
        return "B"
    assert "in all_gather_object" in survivor_log, survivor_log[-3000:]
    return "A"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_killed_checkpoint_write_leaves_a_loadable_checkpoint(crashed, case):
    import torch

    from distgan.checkpoint import CheckpointManager, load_file, rank_file, verify

    phase, kill_rank = case
    folder = crashed / _case_id(case)
    run = folder / "run"
    result = json.loads((folder / "result.json").read_text())
    logs = [(folder / f"rank{r}.log").read_text() for r in range(2)]
    status = result["status"]

    # How the processes ended: the armed rank by SIGKILL, the other with an error (its peer is gone), none hung.
    assert all(f"rank {r}: saving B" in logs[r] for r in range(2)), logs  # both reached B's save (O, A done)
    if phase is None:
        assert status == [0, 0], logs
        assert all("B returned" in log for log in logs)
    else:
        survivor = 1 - kill_rank
        assert status[kill_rank] == -signal.SIGKILL, (status, logs[kill_rank][-3000:])
        assert status[survivor] not in (0, "hung", -signal.SIGKILL), (status, logs[survivor][-3000:])
        assert "Traceback" in logs[survivor] and "B returned" not in logs[survivor]
    for pid in result["pids"]:  # reaped by the zygote, which has exited: nothing is left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    # What the resume logic picks.
    warnings = []
    chosen = CheckpointManager(run, warn=warnings.append).latest()
    which = _expected(phase, kill_rank, logs[1 - kill_rank] if phase else "")
    assert chosen == _ckpt(run, which), (chosen, sorted(p.name for p in (run / "checkpoints").iterdir()))
    assert verify(chosen) is None
    state = load_file(chosen, "state.pt")
    assert (
        state["progress"]["cur_nimg"] == NIMG[which]
        and state["progress"]["step_idx"] == NIMG[which] // 16
        and state["world_size"] == 2
    )
    for r in range(2):
        part = load_file(chosen, rank_file(r))
        assert part["rank"] == r and part["world_size"] == 2
    names = {p.name for p in (run / "checkpoints").iterdir()}

    # The evidence that the kill happened in the named phase (and that A was never touched before B committed).
    if which == "A":
        assert {_ckpt(run, "O").name, _ckpt(run, "A").name} <= names  # no purge before a commit
        assert verify(_ckpt(run, "O")) is None
    if phase == "after_rename" and kill_rank == 0:
        assert sorted(names) == [_ckpt(run, w).name for w in ("O", "A", "B")]  # renamed, marker missing
        assert not (_ckpt(run, "B") / "COMMITTED").exists() and (_ckpt(run, "B") / "manifest.json").is_file()
        assert len(warnings) == 1 and _ckpt(run, "B").name in warnings[0] and "no completion marker" in warnings[0]
    else:
        assert warnings == []  # nothing else is named like a checkpoint without being one
    if which == "A" and not (phase == "after_rename" and kill_rank == 0):
        tmp = _tmp(run)
        assert _ckpt(run, "B").name not in names
        files = {p.name: p.stat().st_size for p in tmp.iterdir()} if tmp.exists() else {}
        full = {p.name: p.stat().st_size for p in _ckpt(run, "A").iterdir()}
        mine = rank_file(kill_rank)
        if phase == "before_files":
            assert tmp.is_dir() and mine not in files  # created by rank 0, the killed rank wrote nothing
        elif phase == "mid_file":
            assert 0 < files[mine] < full[mine] * 0.75  # half a file on disk, never referenced
            with pytest.raises(Exception):  # noqa: B017 (any failure: it is not a whole file)
                torch.load(tmp / mine, weights_only=True)
        elif phase == "after_files":
            assert torch.load(tmp / mine, weights_only=True)["rank"] == kill_rank  # whole, but no manifest
            assert "manifest.json" not in files
        elif kill_rank == 0:  # after_manifest, before_rename: complete, not yet in place
            assert "manifest.json" in files and files.keys() >= {"state.pt", "rank-00000.pt", "rank-00001.pt"}
    if which == "B":
        assert verify(_ckpt(run, "B")) is None
        if phase == "during_purge" and kill_rank == 0:
            # Killed after the purge removed the oldest: A is still there, whole, and O is gone completely.
            assert sorted(names) == [_ckpt(run, "A").name, _ckpt(run, "B").name]
            assert verify(_ckpt(run, "A")) is None
        else:  # rank 0 went through the whole purge: keep=1
            assert sorted(names) == [_ckpt(run, "B").name]
