"""Real faults in real launches: a rank SIGKILLed under `torchrun --max-restarts`, a stop signal that reaches one
rank only, a hung rank, a W&B key that must never be written down, and resumes that must be refused (another
world size on a shard stream, a model the checkpoint cannot fill) or honoured (an allowed optimizer change).

Why here and not in unit tests: these are promises about processes (exit codes per rank, no orphaned loader
workers, how long a stop or a hang takes to turn into a committed checkpoint or an exit), which only hold or fail
with real processes, real signals and a real launcher. Each test prints its figure (`pytest -s` shows them) and
has a control that would come out differently if the mechanism under test were broken.

Two ranks are started either by torchrun (the restart test: it is torchrun's restart that is tested) or by hand as
two `python -m distgan.train` processes with the environment torchrun would give them, so each rank's PID, exit
code and stderr are known.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import BIN, REPO, cli_env, patience
from distgan.checkpoint import load_file, read_manifest, verify
from distgan.errors import EXIT_HUNG, EXIT_INTERRUPTED, EXIT_USER_ERROR
from support import distgan_processes

pytestmark = [pytest.mark.integration, pytest.mark.dist, pytest.mark.slow]

SMOKE = str(REPO / "configs" / "smoke.yaml")
TRAIN = [sys.executable, "-m", "distgan.train", "--config", SMOKE]
BATCH = 16  # configs/smoke.yaml: train.batch, loss.n_critic = 1

_started: list[subprocess.Popen] = []  # every process a test started, ended at teardown if it is still alive
_run_dirs: list[str] = []  # run dirs of launches whose children (ranks, loader workers) a failure could leave


@pytest.fixture(autouse=True)
def _end_started_processes():
    yield
    while _started:
        p = _started.pop()
        if p.poll() is None:
            p.kill()
            p.wait(patience(30))
    while _run_dirs:
        for pid in distgan_processes(_run_dirs.pop()):  # only processes of this test's own (unique) run dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """`world` processes of `args` started by hand as ranks 0..world-1 of one job; output in files."""

    def __init__(self, tmp_path: Path, args: list[str], world: int = 2, tag: str = "a", **env: str):
        port = str(free_port())
        self.procs, self.outs, self.errs = [], [], []
        self.started = time.time()
        for r in range(world):
            out, err = tmp_path / f"{tag}-rank{r}.out", tmp_path / f"{tag}-rank{r}.err"
            rank_env = cli_env(
                RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", **env,
            )  # fmt: skip
            with open(out, "wb") as fo, open(err, "wb") as fe:
                p = subprocess.Popen(args, cwd=tmp_path, env=rank_env, stdout=fo, stderr=fe)
            _started.append(p)
            self.procs.append(p)
            self.outs.append(out)
            self.errs.append(err)

    def stdout(self, r: int) -> str:
        return self.outs[r].read_text(errors="replace")

    def stderr(self, r: int) -> str:
        return self.errs[r].read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(
            f"--- rank {r} (exit {p.poll()}):\n{self.stdout(r)[-1500:]}\n{self.stderr(r)[-2500:]}"
            for r, p in enumerate(self.procs)
        )

    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self.procs]

    def wait(self, timeout: float = patience(180)) -> list[tuple[float, int]]:
        """(wall-clock time it ended, exit code) per rank; fails (after killing them) past `timeout`."""
        ends: dict[int, tuple[float, int]] = {}
        deadline = time.time() + timeout
        while len(ends) < len(self.procs):
            for r, p in enumerate(self.procs):
                if r not in ends and p.poll() is not None:
                    ends[r] = (time.time(), p.returncode)
            if time.time() > deadline:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
                pytest.fail(f"ranks still running after {timeout:.0f} s:\n{self.tails()}")
            time.sleep(0.05)
        return [ends[r] for r in range(len(self.procs))]

    def codes(self, timeout: float = patience(180)) -> list[int]:
        return [code for _, code in self.wait(timeout)]


def run_cli(args: list[str], cwd: Path, timeout: float = patience(180), **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def ckpt_names(run_dir: Path) -> list[str]:
    """Every entry of the checkpoints folder (temporary and trash folders included), sorted."""
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def ckpt_digest(run_dir: Path) -> dict[str, bytes]:
    """Every file under the checkpoints folder and its bytes (to show that nothing was touched)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "checkpoints").rglob("*"))
            if p.is_file()}  # fmt: skip


def stats_nimg(run_dir: Path) -> list[int]:
    path = run_dir / "stats.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["nimg"] for line in path.read_text().splitlines() if line.endswith("}")]


def resumed_from(text: str) -> Path:
    found = re.findall(r"resumed from (\S+/ckpt-\d+) at ", text)
    assert len(found) == 1, f"expected one 'resumed from' line:\n{text[-3000:]}"
    return Path(found[0])


def nimg_of(ckpt: Path) -> int:
    return int(Path(ckpt).name.split("-")[1])


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("distgan: error:")]


class ProcessWatcher:
    """Records, every 50 ms until stopped, every process distgan_processes(marker) finds (pid -> parent pid)."""

    def __init__(self, marker: str):
        self.marker, self.seen = marker, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.update(distgan_processes(self.marker))
            time.sleep(0.05)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.seen


def shard_args(tmp_path: Path) -> list[str]:
    """4 shards of 40 32x32 images (written once per test dir), streamed by 1 loader worker per rank."""
    from support import write_shards

    if not (tmp_path / "shards" / "manifest.json").is_file():
        write_shards(tmp_path / "shards", 4, 40, resolution=32)
    return ["data.source=shards", f"data.shards={tmp_path / 'shards'}", "data.workers=1"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """A finished one-process smoke run (in-memory shapes, checkpoints at 64 and 128 images); tests copy it."""
    base = tmp_path_factory.mktemp("base")
    p = run_cli([*TRAIN, "--run-dir", str(base / "run")], base)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert ckpt_names(base / "run") == ["ckpt-000000064", "ckpt-000000128"]
    return base / "run"


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------- 1. a rank SIGKILLed mid-run


def test_sigkill_of_one_rank_restarts_from_last_checkpoint_without_orphans(tmp_path):
    """torchrun --max-restarts=1: rank 1 is SIGKILLed at the start of step K (first attempt only); torchrun stops
    rank 0, restarts both, they resume from the newest committed checkpoint and finish. Loader workers are
    running (shard stream, 1 worker per rank), and no process of the run may outlive torchrun."""
    kill_step, every, total = 23, 0.08, 0.64  # 40 steps, a checkpoint every 5 steps
    run_dir = tmp_path / "run"
    cmd = [
        str(BIN / "torchrun"), "--nproc_per_node=2", "--max-restarts=1", "-m", "distgan.train", "--config", SMOKE,
        "--run-dir", str(run_dir), f"train.total_kimg={total}", f"train.ckpt_every_kimg={every}",
        *shard_args(tmp_path),
    ]  # fmt: skip
    log = tmp_path / "torchrun.log"
    watcher = ProcessWatcher(str(run_dir))
    _run_dirs.append(str(run_dir))
    t0 = time.time()
    with open(log, "wb") as f:
        p = subprocess.Popen(
            cmd, cwd=tmp_path, env=cli_env(DISTGAN_FAULTS=f"kill:rank=1:step={kill_step}:attempt=0"),
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    _started.append(p)
    try:
        code = p.wait(timeout=patience(120))
    except subprocess.TimeoutExpired:
        p.terminate()  # torchrun passes SIGTERM on to its workers; the fixture ends what is left
        p.wait(patience(30))
        pytest.fail(f"torchrun still running after 120 s (a restarted rank stuck?):\n{log.read_text()[-5000:]}")
    finally:
        seen = watcher.stop()
    wall = time.time() - t0
    out = log.read_text(errors="replace")
    left = distgan_processes(str(run_dir))

    stale = "connectFullMesh failed" in out  # the restart's ranks tried to reach the killed attempt's addresses
    assert code == 0, out[-5000:] + ("\n(the restarted process group did not connect)" if stale else "")
    # Control: the fault really fired on the first attempt (rank 1 died of SIGKILL), after the run had gone past
    # the checkpoint it later resumed from: stats.jsonl goes up to the kill, then starts again lower.
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", out), out[-5000:]
    ckpt = resumed_from(out)
    assert ckpt.parent == run_dir / "checkpoints"
    nimgs = stats_nimg(run_dir)
    drop = next((i for i in range(1, len(nimgs)) if nimgs[i] <= nimgs[i - 1]), None)
    assert drop is not None, nimgs  # the restart logged a position again
    reached = nimgs[drop - 1]
    kill_nimg = kill_step * BATCH
    lost = kill_nimg - nimg_of(ckpt)
    print(
        f"\nSIGKILL of rank 1 at step {kill_step} ({kill_nimg} images; stats logged up to {reached}): resumed from "
        f"{ckpt.name}, {lost} images lost (checkpoint interval {round(every * 1000)}); torchrun took {wall:.1f} s"
    )
    assert nimg_of(ckpt) < reached <= kill_nimg
    assert 0 <= lost <= round(every * 1000)
    final = run_dir / "checkpoints" / f"ckpt-{round(total * 1000):09d}"
    assert verify(final) is None
    assert load_file(final, "state.pt")["progress"]["cur_nimg"] == round(total * 1000)

    # No orphans. Control: the watcher did see the processes it looks for: torchrun, 2 ranks per attempt, and
    # their loader workers (forked, same command line), so a lingering worker would have been found.
    ranks = {pid for pid, ppid in seen.items() if ppid == p.pid}
    workers = {pid for pid, ppid in seen.items() if ppid in ranks}
    print(f"processes seen: torchrun + {len(ranks)} ranks + {len(workers)} loader workers; alive after: {left}")
    assert p.pid in seen and len(ranks) >= 4 and len(workers) >= 2, seen
    assert left == {}, f"processes of the run still alive after torchrun returned: {left}"


# ---------------------------------------------------------------------- 2. a stop signal to one rank


@pytest.mark.parametrize(
    ("signum", "target"),
    [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)],
    ids=["SIGUSR1-rank1", "SIGTERM-rank0"],
)
def test_stop_signal_to_one_rank_saves_on_all_and_resumes(tmp_path, signum, target):
    """A stop signal sent to one rank's PID only: both ranks agree at the next step, commit the same checkpoint,
    exit 3; the same command (with a lower total, a change a resume accepts) continues from exactly there."""
    run_dir = tmp_path / "run"
    # No periodic checkpoint (ckpt_every far beyond the total): the checkpoint after the signal is the signal's.
    args = [*TRAIN, "--run-dir", str(run_dir), "train.ckpt_every_kimg=1000", "train.sample_every_kimg=1000"]
    ranks = Ranks(tmp_path, [*args, "train.total_kimg=100"])

    # Under way: stats logged (every 2 steps). Control: without a signal it keeps training (more stats lines
    # come, the processes stay alive): the stop below is the signal's doing.
    deadline = time.time() + patience(120)
    while len(stats_nimg(run_dir)) < 2:
        assert all(ranks.alive()) and time.time() < deadline, ranks.tails()
        time.sleep(0.02)
    seen = len(stats_nimg(run_dir))
    while len(stats_nimg(run_dir)) < seen + 2:
        assert all(ranks.alive()) and time.time() < deadline, ranks.tails()
        time.sleep(0.02)
    assert all(ranks.alive()) and ckpt_names(run_dir) == []
    before = stats_nimg(run_dir)[-1]
    sent = time.time()
    os.kill(ranks.procs[target].pid, signum)
    ends = ranks.wait(patience(120))

    name = signal.Signals(signum).name
    assert [code for _, code in ends] == [EXIT_INTERRUPTED] * 2, ranks.tails()
    stops = [line for r in range(2) for line in ranks.stderr(r).splitlines() if f"stopped by {name}" in line]
    assert len(stops) == 1 and stops[0].startswith(f"distgan: stopped by {name} at "), ranks.tails()
    assert "Traceback" not in ranks.stderr(0) + ranks.stderr(1), ranks.tails()

    # One new checkpoint, committed by both ranks at the same step, at or after the last logged position.
    names = [n for n in ckpt_names(run_dir) if n.startswith("ckpt-")]
    assert len(names) == 1 and ckpt_names(run_dir) == names, ckpt_names(run_dir)
    ckpt = run_dir / "checkpoints" / names[0]
    nimg = nimg_of(ckpt)
    assert verify(ckpt) is None
    assert sorted(read_manifest(ckpt)["files"]) == [
        "generator.safetensors", "rank-00000.pt", "rank-00001.pt", "state.pt",
    ]  # fmt: skip
    assert load_file(ckpt, "state.pt")["progress"]["cur_nimg"] == nimg and read_manifest(ckpt)["nimg"] == nimg
    for r in range(2):
        part = load_file(ckpt, f"rank-{r:05d}.pt")
        assert part["rank"] == r and part["stream"]["position"] == nimg  # both ranks stopped after the same step
    assert before <= nimg < 100_000
    saved_s = (ckpt / "COMMITTED").stat().st_mtime - sent
    exit_s = max(t for t, _ in ends) - sent
    print(
        f"\n{name} to rank {target}: last logged {before} images, checkpoint at {nimg}; signal to committed "
        f"{saved_s:.2f} s, to both exited {exit_s:.2f} s"
    )
    # (How fast is the machine's business: the checkpoint is the signal's, at a step of the 100-kimg run above.)

    # The same command again resumes from exactly that checkpoint and finishes.
    total = (nimg + 2 * BATCH) / 1000
    again = Ranks(tmp_path, [*args, f"train.total_kimg={total}"], tag="b")
    assert again.codes(patience(120)) == [0, 0], again.tails()
    assert resumed_from(again.stdout(0)) == ckpt
    final = run_dir / "checkpoints" / f"ckpt-{nimg + 2 * BATCH:09d}"
    assert verify(final) is None


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def test_stop_signal_to_a_rank_and_its_loader_workers_still_saves(tmp_path):
    """Schedulers signal every process of a job: a rank's loader workers get the SIGTERM too. They must leave
    stopping to their rank (a worker killed by it used to fail the rank before it could save, exit 1, nothing
    saved). Control: the workers exist and are signalled; the rank still saves and both ranks exit 3."""
    from support import write_shards

    write_shards(tmp_path / "shards", 4, 64, resolution=32)
    run_dir = tmp_path / "run"
    data = ["data.source=shards", f"data.shards={tmp_path / 'shards'}", "data.workers=1"]
    args = [*TRAIN, "--run-dir", str(run_dir), "train.ckpt_every_kimg=1000", "train.sample_every_kimg=1000", *data]
    args.append("train.total_kimg=100")
    ranks = Ranks(tmp_path, args)
    deadline = time.time() + patience(120)
    while len(stats_nimg(run_dir)) < 2:
        assert all(ranks.alive()) and time.time() < deadline, ranks.tails()
        time.sleep(0.05)
    target = ranks.procs[1].pid
    workers = _children(target)
    assert workers, "rank 1 has no loader worker to signal"
    for pid in [target, *workers]:
        os.kill(pid, signal.SIGTERM)
    codes = ranks.codes(patience(120))
    assert codes == [EXIT_INTERRUPTED] * 2, ranks.tails()
    assert "Traceback" not in ranks.stderr(0) + ranks.stderr(1), ranks.tails()
    names = [n for n in ckpt_names(run_dir) if n.startswith("ckpt-")]
    assert len(names) == 1 and verify(run_dir / "checkpoints" / names[0]) is None
    print(f"\nSIGTERM to rank 1 and its {len(workers)} loader worker(s): exit codes {codes}, saved {names[0]}")


# ---------------------------------------------------------------------- 3. a hung rank


@pytest.mark.parametrize("hung", [1, 0], ids=["rank1-hangs", "rank0-hangs"])
def test_hung_rank_is_named_and_every_rank_exits_5(tmp_path, hung):
    """One rank sleeps forever at the start of step 5; with train.hang_timeout_s=5 both ranks exit 5 within
    seconds of the timeout (not gloo's 30 min), and the error names the hung rank, never the one that waited.
    Rank 0 hanging matters apart: it hosts the watchdog's key-value store."""
    timeout, other = 5, 1 - hung
    run_dir = tmp_path / "run"
    ranks = Ranks(
        tmp_path, [*TRAIN, "--run-dir", str(run_dir), f"train.hang_timeout_s={timeout}"],
        DISTGAN_FAULTS=f"hang:rank={hung}:step=5",
    )  # fmt: skip
    ends = ranks.wait(timeout + 120)
    # The hang began right after step 4's log line and checkpoint (64 images): that is the last progress.
    assert stats_nimg(run_dir)[-1] == 4 * BATCH and ckpt_names(run_dir)[-1] == f"ckpt-{4 * BATCH:09d}"
    last_progress = (run_dir / "stats.jsonl").stat().st_mtime
    detect = [t - last_progress for t, _ in ends]
    errors = error_lines(ranks.stderr(0)) + error_lines(ranks.stderr(1))
    print(
        f"\nhang of rank {hung} (train.hang_timeout_s={timeout}): exit codes {[code for _, code in ends]}, "
        f"{detect[0]:.1f} s and {detect[1]:.1f} s after the last progress; whole launch "
        f"{max(t for t, _ in ends) - ranks.started:.1f} s; error lines: {errors}"
    )
    assert [code for _, code in ends] == [EXIT_HUNG] * 2, ranks.tails()
    assert all(timeout - 1 <= d <= timeout + 15 for d in detect), detect
    named = [line for line in errors if " hung: " in line]
    assert len(named) == 1 and named[0].startswith(f"distgan: error: rank {hung} hung: rank {hung} in step 5"), errors
    assert not [line for line in errors if line.startswith(f"distgan: error: rank {other} ")], errors


def test_watchdog_stays_quiet_on_a_healthy_run_longer_than_its_timeout(tmp_path):
    """Control for the hang test: the same timeout on a run without the fault that trains longer than the timeout
    (so a watchdog that counted from the start, not from the last step, would fire) completes."""
    timeout = 5
    ranks = Ranks(
        tmp_path,
        [*TRAIN, "--run-dir", str(tmp_path / "run"), f"train.hang_timeout_s={timeout}", "train.total_kimg=9.6",
         "train.log_every_kimg=0.96", "train.ckpt_every_kimg=4.8", "train.sample_every_kimg=4.8"],
    )  # fmt: skip
    assert ranks.codes(patience(180)) == [0, 0], ranks.tails()
    m = re.search(r"done: 9\.600 kimg in (\d+)m(\d+)s", ranks.stdout(0))
    assert m, ranks.tails()
    trained = int(m[1]) * 60 + int(m[2])
    print(f"\nhealthy run with train.hang_timeout_s={timeout}: trained {trained} s, exit 0 on both ranks")
    assert trained > timeout  # else this control proves nothing
    assert error_lines(ranks.stderr(0) + ranks.stderr(1)) == []


# ---------------------------------------------------------------------- 4. the W&B key


def count_in_tree(folder: Path, needle: bytes) -> tuple[int, int, int]:
    """(occurrences of needle, files searched, bytes searched) over every file under folder, binary included."""
    hits = files = size = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += data.count(needle)
            files += 1
            size += len(data)
    return hits, files, size


def test_wandb_api_key_is_never_written(tmp_path):
    """WANDB_API_KEY (a canary of the real key's 40 characters) is in the environment of a W&B run: it must not
    appear in any file of the run dir (checkpoints, exports, config, logs, W&B's own offline files) nor in what
    the run prints."""
    secret = uuid.uuid4().hex[:25]
    canary = "distgan-canary-" + secret
    assert len(canary) == 40
    run_dir = tmp_path / "run"
    p = run_cli(
        [*TRAIN, "--run-dir", str(run_dir), "log.tracker=wandb", "log.wandb_mode=offline"], tmp_path,
        WANDB_API_KEY=canary,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B really ran, with the key around

    # Control: the search finds the canary when it is there.
    scratch = run_dir / "wandb" / "scratch.bin"
    scratch.write_bytes(b"\x00\x01" + canary.encode() + b"\xff")
    assert count_in_tree(run_dir, canary.encode())[0] == 1
    assert count_in_tree(run_dir, secret.encode())[0] == 1
    scratch.unlink()

    hits, files, size = count_in_tree(run_dir, canary.encode())
    hits_secret = count_in_tree(run_dir, secret.encode())[0]
    printed = (p.stdout + p.stderr).count(secret)
    print(f"\nW&B key canary: {hits + hits_secret} hits in {files} files ({size} bytes), {printed} in the output")
    assert files >= 10 and size > 10_000
    assert (hits, hits_secret, printed) == (0, 0, 0)


# ---------------------------------------------------------------------- 5. resume with another world size


def test_shard_run_resumes_on_another_world_size(tmp_path):
    """A shard stream's checkpoint holds its global position (data/position.py): a 1-process run resumed on 2 ranks
    re-splits it, says so, and trains on to the end (which samples: tests/distributed/test_shard_stream.py)."""
    run_dir = tmp_path / "run"
    data = shard_args(tmp_path)
    p = run_cli([*TRAIN, "--run-dir", str(run_dir), *data], tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert ckpt_names(run_dir) == ["ckpt-000000064", "ckpt-000000128"]
    saved = load_file(run_dir / "checkpoints" / "ckpt-000000128", "state.pt")["data_position"]
    assert saved["kind"] == "shard-position" and saved["shards"] == 4

    ranks = Ranks(tmp_path, [*TRAIN, "--run-dir", str(run_dir), *data, "train.total_kimg=0.192"])
    assert ranks.codes(patience(120)) == [0, 0], ranks.tails()
    assert resumed_from(ranks.stdout(0)) == run_dir / "checkpoints" / "ckpt-000000128"
    line = next(x for x in ranks.stdout(0).splitlines() if "re-split" in x)
    print(f"\nshard run resumed on 2 ranks: {line}")
    assert "1 rank x 1 loader worker re-split over 2 x 1: 32 samples of the current epoch left" in line
    final = run_dir / "checkpoints" / "ckpt-000000192"
    assert verify(final) is None
    state = load_file(final, "state.pt")
    assert state["world_size"] == 2 and state["progress"]["cur_nimg"] == 192
    assert state["data_position"]["gen"] == 1  # the position of the re-split layout, ready for the next change


def test_in_memory_run_resumes_on_another_world_size(tmp_path, one_process_run):
    """Control for the refusal above: the in-memory dataset's position is global, so the same resume onto 2 ranks
    works and continues from the same image count."""
    run_dir = copy_run(one_process_run, tmp_path)
    ranks = Ranks(tmp_path, [*TRAIN, "--run-dir", str(run_dir), "train.total_kimg=0.192"])
    assert ranks.codes(patience(120)) == [0, 0], ranks.tails()
    assert resumed_from(ranks.stdout(0)) == run_dir / "checkpoints" / "ckpt-000000128"
    final = run_dir / "checkpoints" / "ckpt-000000192"
    assert verify(final) is None
    state = load_file(final, "state.pt")
    assert state["world_size"] == 2 and state["progress"]["cur_nimg"] == 192
    assert [load_file(final, f"rank-{r:05d}.pt")["stream"]["position"] for r in range(2)] == [192, 192]


# ---------------------------------------------------------------------- 6. resume with another config
# (tests/integration/test_launch.py::test_changed_model_refuses_to_resume covers the refusal naming the key.)


def test_allowed_optimizer_change_is_used_after_resume(tmp_path, one_process_run):
    """optim.lr_g changed on resume: refused without --allow-config-change (nothing touched); with it the run
    resumes and trains with the new learning rate (what config.yaml and the checkpoint's config then say)."""
    run_dir = copy_run(one_process_run, tmp_path)
    config_before, ckpts_before = (run_dir / "config.yaml").read_text(), ckpt_digest(run_dir)
    cmd = [*TRAIN, "--run-dir", str(run_dir), "optim.lr_g=0.0001", "train.total_kimg=0.192"]

    # Control: without the flag the change is refused, and the run dir is left as it was.
    p = run_cli(cmd, tmp_path)
    assert p.returncode == EXIT_USER_ERROR and "optim.lr_g: 0.0002 -> 0.0001" in p.stderr, p.stderr[-3000:]
    assert (run_dir / "config.yaml").read_text() == config_before and ckpt_digest(run_dir) == ckpts_before

    p = run_cli([*TRAIN, "--allow-config-change", *cmd[len(TRAIN) :]], tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert resumed_from(p.stdout) == run_dir / "checkpoints" / "ckpt-000000128"
    state = load_file(run_dir / "checkpoints" / "ckpt-000000192", "state.pt")
    used = [g["lr"] for g in state["G"]["optimizer"]["param_groups"]]
    print(f"\nresumed with optim.lr_g=0.0001 allowed: config says {state['config']['optim']['lr_g']}, Adam used {used}")
    assert state["config"]["optim"]["lr_g"] == 0.0001
    assert used == [0.0001], "the resumed optimizer kept the checkpoint's learning rate, not the config's"


def test_allowed_model_change_that_cannot_load_is_one_line_exit_2(tmp_path, one_process_run):
    """--allow-config-change with a model whose weights cannot take the checkpoint's (another width): a user
    mistake, so exit 2 with one line, no traceback, and the run dir (checkpoints, config.yaml) untouched."""
    run_dir = copy_run(one_process_run, tmp_path)
    config_before, ckpts_before = (run_dir / "config.yaml").read_text(), ckpt_digest(run_dir)
    p = run_cli([*TRAIN, "--allow-config-change", "--run-dir", str(run_dir), "model.dcgan.g_width=16"], tmp_path)
    print(f"\n--allow-config-change model.dcgan.g_width=16: exit {p.returncode}; {error_lines(p.stderr)[:1]}")
    assert p.returncode == EXIT_USER_ERROR, p.stderr[-3000:]
    assert len(error_lines(p.stderr)) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert ckpt_digest(run_dir) == ckpts_before
    assert (run_dir / "config.yaml").read_text() == config_before, "config.yaml rewritten by a run that never started"
