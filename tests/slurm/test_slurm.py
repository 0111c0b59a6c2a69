"""slurm/train.sh on a real SLURM: clusters that this module starts (tests/slurm/slurm_cluster.py), real `sbatch`
jobs, real preemption signals and real requeues.

Every training job here runs the same 60 steps (configs/smoke.yaml, 2 ranks, deterministic kernels, one thread
per rank), so jobs launched in different ways can be compared with one uninterrupted job (the `straight`
fixture): the preempted-and-requeued job, the job of two launchers on one node and the preempted job on two
SLURM nodes (each in a network namespace of its own) must end with its weights and optimizer states bit for bit
(BatchNorm running statistics to 1e-6, see assert_same_training_state). The control of the requeue decision is a
stop whose checkpoint cannot be written: no requeue. Jobs are polled with `scontrol show job -o` every half
second (`sbatch --wait` polls slowly). About 4 minutes on 2 cores, most of it torch imports.

Without SLURM installed the module skips with the command that installs it; in CI (CI=true) that is a failure.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import torch

from conftest import REPO, cli_env, patience, require, require_deepspeed
from distgan import __version__
from distgan.checkpoint import load_file, rank_file, verify
from support import wandb_records

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.dist, pytest.mark.slow]

SCRIPT = str(REPO / "slurm" / "train.sh")
SMOKE = str(REPO / "configs" / "smoke.yaml")
BATCH = 16  # configs/smoke.yaml: train.batch (global)
TOTAL_NIMG = 960  # 60 steps
TRAIN = [f"train.total_kimg={TOTAL_NIMG / 1000}", "train.deterministic=true", "train.threads=1",
         "train.ckpt_every_kimg=0.32"]  # fmt: skip
FINAL = f"ckpt-{TOTAL_NIMG:09d}"
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


# ---------------------------------------------------------------------- the cluster and jobs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing()
    require(why is None, why or "")
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    left = c.stop()
    assert not left, f"the SLURM test cluster left behind (processes killed now): {left}"


def job_env(cluster, **extra: str) -> dict[str, str]:
    """What a user's shell would give sbatch (sbatch exports it into the job): this cluster, this test's python."""
    env = {k: v for k, v in cli_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=str(cluster.conf), DISTGAN_PYTHON=sys.executable)
    env.update(extra)
    return env


def sbatch(cluster, cwd: Path, sbatch_args: list[str], script_args: list[str], script: str = SCRIPT, **env: str) -> int:
    # The test node has 2 CPUs and EnforcePartLimits=ALL: the script's default --cpus-per-task=8 is refused at
    # submission, so a job here asks for 1 (SLURM's own default, what every job here had before that line)
    # unless the test says otherwise. Two tasks per node (two launchers) then still fit.
    if not any(a.startswith(("--cpus-per-task", "-c")) for a in sbatch_args):
        sbatch_args = ["--cpus-per-task=1", *sbatch_args]
    cwd.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(
        ["sbatch", "--parsable", *sbatch_args, script, *script_args],
        cwd=cwd, env=job_env(cluster, **env), capture_output=True, text=True, timeout=patience(60),
    )  # fmt: skip
    assert p.returncode == 0, f"sbatch failed: {p.stderr}"
    return int(p.stdout.strip().split(";")[0])


def job_log(cwd: Path, job: int) -> str:
    path = cwd / f"distgan-{job}.out"  # the script's --output=%x-%j.out, job name distgan
    return path.read_text(errors="replace") if path.is_file() else ""


def wait_job(cluster, job: int, cwd: Path, timeout: float = patience(240), until=DONE) -> dict[str, str]:
    """Poll until the job's state is one of `until`; its `scontrol show job` fields."""
    deadline = time.time() + timeout
    while True:
        info = cluster.job(job)
        if info["JobState"] in until:
            return info
        if time.time() > deadline:
            subprocess.run(["scancel", str(job)], env=job_env(cluster), capture_output=True)
            pytest.fail(f"job {job} still {info['JobState']} after {timeout:.0f} s:\n{job_log(cwd, job)[-4000:]}")
        time.sleep(0.5)


def run_job(cluster, cwd: Path, sbatch_args: list[str], script_args: list[str], **env: str):
    """Submit, wait for the end; (job id, its fields, its log, seconds from submit to end)."""
    t0 = time.time()
    job = sbatch(cluster, cwd, sbatch_args, script_args, **env)
    info = wait_job(cluster, job, cwd)
    return job, info, job_log(cwd, job), time.time() - t0


def weights(ckpt: Path) -> dict[str, dict]:
    state = load_file(ckpt, "state.pt")
    return {"G": state["G"]["module"], "D": state["D"]["module"], "G_ema": state["G_ema"]}


RUNNING_STATS = ("running_mean", "running_var")


def assert_close_stats(x, y, name: str) -> None:
    """BatchNorm running statistics equal up to rounding: within 1e-6 of the buffer's largest value. Not of each
    entry: an entry of 0.0004 in a buffer of 0.077 differed by 5.2e-10 in one CI run, a rounding of the buffer's
    scale that a per-entry relative bound called a failure."""
    err, scale = (x - y).abs().max(), y.abs().max()
    assert err <= 1e-6 * scale, f"{name}: {err} of {scale}"


def assert_same_training_state(a: Path, b: Path) -> None:
    """G, D, G_ema and both optimizers' states of two checkpoints are equal bit for bit, except BatchNorm running
    statistics, which must agree to 1e-6 of each buffer's largest value (assert_close_stats): the trainer averages
    them over the ranks at every snapshot, so a stop between two scheduled snapshots averages once more, and the
    resumed ranks start from that average instead of their own values. The average is linear in them, so it is the
    same number, rounded differently (measured: 9.3e-10 on one buffer of 0.0099). They never enter a training-mode
    forward, so the weights stay exact."""
    sa, sb = load_file(a, "state.pt"), load_file(b, "state.pt")
    nets = {net: (sa[net]["module"], sb[net]["module"]) for net in ("G", "D")} | {"G_ema": (sa["G_ema"], sb["G_ema"])}
    for net, (na, nb) in nets.items():
        assert na.keys() == nb.keys()
        for k, x in na.items():
            y = nb[k]
            if k.endswith(RUNNING_STATS):
                assert_close_stats(x, y, f"{net}.{k}")
            else:
                assert torch.equal(x, y), f"{net}.{k} differs between {a} and {b}"
    for opt in ("G", "D"):
        xs, ys = sa[opt]["optimizer"]["state"], sb[opt]["optimizer"]["state"]
        assert xs.keys() == ys.keys()
        for i in xs:
            for k, x in xs[i].items():
                assert torch.equal(x, ys[i][k]) if torch.is_tensor(x) else x == ys[i][k], f"{opt}[{i}].{k} differs"


def stats_nimg(run_dir: Path) -> list[int]:
    return [json.loads(line)["nimg"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def check_finished(run_dir: Path, world: int) -> Path:
    """The run ended at TOTAL_NIMG with a verified checkpoint of every rank; returns that checkpoint."""
    ckpt = run_dir / "checkpoints" / FINAL
    assert verify(ckpt) is None, verify(ckpt)
    state = load_file(ckpt, "state.pt")
    assert (state["progress"]["cur_nimg"], state["progress"]["step_idx"], state["world_size"]) == (
        TOTAL_NIMG,
        TOTAL_NIMG // BATCH,
        world,
    )
    for r in range(world):
        assert load_file(ckpt, rank_file(r))["rank"] == r
    assert not (ckpt / rank_file(world)).exists()
    return ckpt


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory):
    """The reference: one uninterrupted job, one launcher with 2 CPU ranks."""
    cwd = tmp_path_factory.mktemp("straight")
    job, info, log, took = run_job(cluster, cwd, [], [SMOKE, *TRAIN], NPROC_PER_NODE="2")
    print(f"\nuninterrupted 2-rank job: {took:.1f} s from sbatch to COMPLETED")
    return {"job": job, "info": info, "log": log, "cwd": cwd, "run_dir": cwd / "runs" / "smoke"}


# ---------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    """Outside SLURM too: no config, a missing file, no job around it. No SLURM needed."""
    cases = [([], "no CONFIG given"), (["nope.yaml"], "config file 'nope.yaml' not found"),
             (["--run-dir", "x"], "the first argument must be the config file"),
             ([SMOKE], "not inside a SLURM job")]  # fmt: skip
    env = {k: v for k, v in cli_env().items() if not k.startswith("SLURM_")}
    for args, message in cases:
        p = subprocess.run(["bash", SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert p.stderr.splitlines() == [p.stderr.strip()] and message in p.stderr, (args, p.stderr)
        assert p.stderr.startswith("distgan-slurm: error: "), p.stderr


def test_job_with_a_missing_config_fails_with_exit_2(cluster, tmp_path):
    job, info, log, _ = run_job(cluster, tmp_path, [], ["configs/none.yaml"])
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0")
    assert "distgan-slurm: error: config file 'configs/none.yaml' not found" in log, log


# ---------------------------------------------------------------------- sizes


def test_sizes_come_from_slurm(cluster, tmp_path):
    """Dry runs (DISTGAN_DRY_RUN=1: the script prints its launch and exits): processes per node from
    NPROC_PER_NODE, else this node's GPUs (the test cluster has 2 that do not exist), else 1, logged as a count per
    node while each node's launcher gets --nproc-per-node=gpus to count its own; the head node and port; the CPUs
    per task and a warning when they are fewer than the processes; the python. More than one launcher per node
    with GPUs is refused."""
    cases = {
        "cpu": ([], {}),
        "gres": (["--gres=gpu:2"], {}),
        "gpus-per-node": (["--gpus-per-node=1"], {}),
        "nproc": (["--gres=gpu:2", "--cpus-per-task=2"], {"NPROC_PER_NODE": "3", "MASTER_PORT": "23456"}),
        "two-tasks-cpu": (["--ntasks-per-node=2"], {}),
        "two-tasks-gpus": (["--ntasks-per-node=2", "--gres=gpu:2"], {}),
        "python": ([], {"DISTGAN_PYTHON": ""}),
    }
    jobs = {name: sbatch(cluster, tmp_path, args, [SMOKE], DISTGAN_DRY_RUN="1", **env)
            for name, (args, env) in cases.items()}  # fmt: skip
    logs, infos = {}, {}
    for name, job in jobs.items():
        infos[name] = wait_job(cluster, job, tmp_path, timeout=patience(120))
        logs[name] = job_log(tmp_path, job)

    def sizes(name):
        found = re.search(r"(\d+) launcher\(s\) x (\d+) process\(es\) per node \(([^)]*)\), world ([^,]+), "
                          r"rendezvous (\S+)", logs[name])  # fmt: skip
        assert found and infos[name]["ExitCode"] == "0:0", logs[name]
        return int(found[1]), int(found[2]), found[3], found[4], found[5]

    counted = "each node's launcher counts its own"
    assert sizes("cpu")[:4] == (1, 1, f"no GPU here, one CPU process; {counted}; NPROC_PER_NODE=N for N", "1")
    assert sizes("cpu")[4] == f"127.0.0.1:{20000 + jobs['cpu'] % 10000}"  # the head's NodeAddr, port from job id
    assert sizes("gres")[:4] == (1, 2, f"one per GPU, here SLURM_GPUS_ON_NODE=2; {counted}", "2")
    assert sizes("gpus-per-node")[:4] == (1, 1, f"one per GPU, here SLURM_GPUS_ON_NODE=1; {counted}", "1")
    assert sizes("two-tasks-cpu")[:4] == (2, 1, f"no GPU here, one CPU process; {counted}; NPROC_PER_NODE=N for N",
                                          "2 if every node is like this one")  # fmt: skip
    assert sizes("nproc") == (1, 3, "NPROC_PER_NODE", "3", "127.0.0.1:23456")
    # Without NPROC_PER_NODE every node's launcher counts its own GPUs (the sentinel), CPU nodes included.
    for name in ("cpu", "gres", "gpus-per-node"):
        assert "--nnodes=1 --nproc-per-node=gpus " in logs[name], logs[name]
    assert "--nnodes=2 --nproc-per-node=gpus " in logs["two-tasks-cpu"], logs["two-tasks-cpu"]
    assert "--nnodes=1 --nproc-per-node=3" in logs["nproc"] and f"--rdzv-id=distgan-{jobs['nproc']}" in logs["nproc"]
    # CPUs per task: what the job got, and a warning when fewer than the processes of a node.
    assert "; 1 CPU(s) per task (--cpus-per-task)" in logs["cpu"] and "warning" not in logs["cpu"]
    assert "; 2 CPU(s) per task (--cpus-per-task)" in logs["nproc"], logs["nproc"]
    assert "warning: 2 CPU(s) per task for 3 process(es) per node" in logs["nproc"], logs["nproc"]
    assert infos["two-tasks-gpus"]["ExitCode"] == "2:0", logs["two-tasks-gpus"]
    assert "each task is one node's launcher and takes every GPU" in logs["two-tasks-gpus"]
    # Without DISTGAN_PYTHON (and no virtualenv active): this repository's .venv, as `make install` makes it.
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists():
        assert f"python {venv};" in logs["python"], logs["python"]


def test_cpus_per_task_default(cluster, tmp_path):
    """The script asks for 8 CPUs per task unless told otherwise (sbatch -v shows what it read from the #SBATCH
    line). This test node has 2, so SLURM (EnforcePartLimits=ALL) refuses the job at submission, which is why
    every other job here passes --cpus-per-task; on a node with 8 or more the dry run reports them."""
    p = subprocess.run(["sbatch", "-v", "--parsable", SCRIPT, SMOKE], cwd=tmp_path, capture_output=True, text=True,
                       env=job_env(cluster, DISTGAN_DRY_RUN="1"), timeout=patience(60))  # fmt: skip
    assert re.search(r"cpus-per-task\s*: 8\b", p.stderr), p.stderr
    cpus = int(slurm_cluster.node_hardware()["CPUs"])
    if cpus < 8:
        assert p.returncode != 0 and "More processors requested than permitted" in p.stderr, p.stderr
    else:
        job = int(p.stdout.strip().split(";")[0])
        wait_job(cluster, job, tmp_path, timeout=patience(120))
        assert "; 8 CPU(s) per task (--cpus-per-task)" in job_log(tmp_path, job)


def test_each_nodes_launcher_counts_its_own_gpus(cluster, tmp_path):
    """Uneven nodes, played by two launchers in one srun step (two tasks on the test node, its 2 fake GPUs): task 0
    sees SLURM's SLURM_GPUS_ON_NODE=2, task 1 is told 1 (per-task environment, as a node with 1 GPU would have).
    With --nproc-per-node=gpus, as slurm/train.sh passes it, each launcher starts one process per GPU of its own
    node, the c10d rendezvous joins 2 + 1 processes into one world of 3 (a gloo all-reduce over it), and every
    process inherits its node's DISTGAN_EXPECT_GPUS and GLOO_SOCKET_IFNAME=lo (the rendezvous is on loopback)."""
    (tmp_path / "probe.py").write_text(UNEVEN_PROBE)
    port = slurm_cluster.free_port()
    (tmp_path / "job.sh").write_text(f"""#!/bin/bash
srun --ntasks=2 bash -c 'if [[ $SLURM_PROCID == 1 ]]; then export SLURM_GPUS_ON_NODE=1; fi; exec "$@"' bash \\
    {sys.executable} -u {REPO / "slurm" / "launch_node.py"} --nnodes=2 --nproc-per-node=gpus --max-restarts=0 \\
    --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{port} --rdzv-id=uneven probe.py
""")
    job = sbatch(cluster, tmp_path, ["--ntasks=2", "--ntasks-per-node=2", "--gres=gpu:2", "--output=uneven.out"],
                 [], script=str(tmp_path / "job.sh"))  # fmt: skip
    info = wait_job(cluster, job, tmp_path, timeout=patience(120))
    log = (tmp_path / "uneven.out").read_text()
    assert info["ExitCode"] == "0:0", log[-3000:]
    for task, n in ((0, 2), (1, 1)):
        assert (f"launcher {task} of 2 on localhost: {n} process(es) (one per GPU: SLURM_GPUS_ON_NODE={n}), "
                f"DISTGAN_EXPECT_GPUS={n}, GLOO_SOCKET_IFNAME=lo (route to 127.0.0.1)") in log, log[-3000:]  # fmt: skip
    seen = sorted((json.loads(p.read_text()) for p in tmp_path.glob("probe-*.json")), key=lambda e: int(e["RANK"]))
    assert [e["RANK"] for e in seen] == ["0", "1", "2"], seen
    assert {e["WORLD_SIZE"] for e in seen} == {"3"} and {e["sum"] for e in seen} == {3.0}
    assert {e["GLOO_SOCKET_IFNAME"] for e in seen} == {"lo"}
    by_node = sorted((e["LOCAL_WORLD_SIZE"], e["DISTGAN_EXPECT_GPUS"], e["LOCAL_RANK"]) for e in seen)
    assert by_node == [("1", "1", "0"), ("2", "2", "0"), ("2", "2", "1")], by_node


# Each process writes its own file (two processes' lines can interleave in one pipe).
UNEVEN_PROBE = """import json, os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "DISTGAN_EXPECT_GPUS", "GLOO_SOCKET_IFNAME")
with open(f"probe-{os.environ['RANK']}.json", "w") as f:
    json.dump({**{k: os.environ.get(k) for k in keys}, "sum": t.item()}, f)
dist.destroy_process_group()
"""


# ---------------------------------------------------------------------- a job trains


def test_job_trains_two_cpu_ranks_to_completion(straight):
    """sbatch slurm/train.sh configs/smoke.yaml with NPROC_PER_NODE=2: COMPLETED, a verified final checkpoint
    of both ranks, world 2 on gloo, the run dir under the submit directory, no requeue."""
    info, log = straight["info"], straight["log"]
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    check_finished(straight["run_dir"], world=2)
    assert "launcher=torchrun backend=gloo world=2" in log
    assert "1 launcher(s) x 2 process(es) per node (NPROC_PER_NODE), world 2" in log
    assert "distgan-slurm: launcher 0 of 1 on localhost: 2 process(es) (NPROC_PER_NODE), DISTGAN_EXPECT_GPUS=0, " \
           "GLOO_SOCKET_IFNAME=lo (route to 127.0.0.1)" in log  # fmt: skip
    assert "training finished (exit code 0)" in log and "requeue" not in log.replace("--requeue", "")
    assert stats_nimg(straight["run_dir"]) == list(range(32, TOTAL_NIMG + 1, 32))


# ---------------------------------------------------------------------- preemption


def usr1_once_training(cluster, job: int, cwd: Path, run_dir: Path) -> float:
    """`scancel --signal=USR1 --batch` (what `--signal=B:USR1@120` does) once the job's first stats line is
    written (2 steps of 60); when it was sent."""
    deadline = time.time() + patience(120)
    while not ((run_dir / "stats.jsonl").is_file() and (run_dir / "stats.jsonl").read_text().strip()):
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), job_log(cwd, job)
        assert time.time() < deadline, f"no training after 120 s:\n{job_log(cwd, job)}"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=job_env(cluster), check=True)
    return time.time()


def preempt(cluster, job: int, cwd: Path, run_dir: Path, resize: tuple[str, ...] = ()) -> dict:
    """Send the job's batch shell USR1 once it has trained a little (its first stats line: 2 steps of 60), check
    the stop it leads to (one checkpoint, mid-run, a rank exiting 3, the job requeued), start the requeued job
    without SLURM's ~120 s hold (after `scontrol update JobId=N *resize` while it waits, if given), and wait for
    its end. What happened, for the test to judge."""
    signalled = usr1_once_training(cluster, job, cwd, run_dir)
    info = wait_job(cluster, job, cwd, timeout=patience(90), until=("PENDING", *DONE))
    requeued = time.time()
    log = job_log(cwd, job)
    assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), log[-4000:]
    stopped = re.findall(r"stopped by SIGUSR1 at ([\d.]+) kimg; checkpoint (\S+) committed", log)
    assert len(stopped) == 1, log[-4000:]
    stop_kimg, stop_ckpt = stopped[0]
    stop_nimg = round(float(stop_kimg) * 1000)
    assert 0 < stop_nimg < TOTAL_NIMG, f"the signal did not land mid-run (stopped at {stop_nimg} images)"
    assert Path(stop_ckpt).name == f"ckpt-{stop_nimg:09d}" and verify(cwd / stop_ckpt) is None
    stop_state = load_file(cwd / stop_ckpt, "state.pt")  # (read now: later checkpoints purge it)
    assert stop_state["progress"]["step_idx"] == stop_nimg // BATCH
    node_codes = re.findall(r"failed on this node, exit codes \[([-\d, ]*)\]", log)
    # One rank's exit code 3 is the proof of the commit (launch_node.py); a node whose launcher is torn down
    # while its rank exits (the rendezvous host left first) may report less, so not every node has to say 3.
    assert any("3" in codes.split(", ") for codes in node_codes), node_codes

    if resize:  # (the hold keeps it pending for ~120 s: the update comes first)
        cluster.scontrol("update", f"JobId={job}", *resize)
    # SLURM holds a requeued job ~120 s unless told to start it now (at least 3 s after the requeue).
    while cluster.job(job)["JobState"] == "PENDING":
        if time.time() - requeued > 3:
            cluster.start_now(job)
        time.sleep(1)
    info = wait_job(cluster, job, cwd)
    log = job_log(cwd, job)
    print(f"\nUSR1 at {stop_nimg} images; requeued {requeued - signalled:.1f} s after the signal; COMPLETED "
          f"{time.time() - requeued:.1f} s after the requeue")  # fmt: skip
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    return {"log": log, "stop_kimg": stop_kimg, "stop_ckpt": stop_ckpt, "stop_nimg": stop_nimg,
            "stop_state": stop_state, "node_codes": node_codes}  # fmt: skip


def test_preemption_checkpoints_requeues_and_resumes_exactly(cluster, straight, tmp_path):
    """`scancel --signal=USR1 --batch` mid-run (what `--signal=B:USR1@120` does before the time limit): the ranks
    commit one checkpoint, the script requeues the job, the requeued job resumes from it and completes. No step is
    lost or repeated, the log and the W&B run continue, and the weights equal the uninterrupted job's bit for bit."""
    job = sbatch(cluster, tmp_path, [], [SMOKE, *TRAIN, "log.tracker=wandb"], NPROC_PER_NODE="2")
    run_dir = tmp_path / "runs" / "smoke"
    stop = preempt(cluster, job, tmp_path, run_dir)
    log, stop_kimg, stop_ckpt, stop_state = stop["log"], stop["stop_kimg"], stop["stop_ckpt"], stop["stop_state"]

    # The requeued job resumed from exactly the checkpoint of the stop, once.
    assert re.findall(r"resumed from (\S+) at ([\d.]+) kimg", log) == [(stop_ckpt, stop_kimg)], log[-4000:]

    # The script's story, both attempts in one appended job log.
    order = ["attempt 0 on localhost", "SIGUSR1 (time limit or preemption ahead)", "stopped by SIGUSR1",
             "checkpoint committed after SIGUSR1: requeueing", "attempt 1 on localhost", "resumed from",
             "training finished (exit code 0)"]  # fmt: skip
    at = [log.find(line) for line in order]
    assert -1 not in at and at == sorted(at), list(zip(order, at))

    # Nothing lost, nothing repeated: one stats line per 32 images, the step counter, the same weights (and, the
    # control, weights that did move after the stop: equal final weights are not a given).
    ckpt = check_finished(run_dir, world=2)
    assert stats_nimg(run_dir) == list(range(32, TOTAL_NIMG + 1, 32))
    assert_same_training_state(ckpt, straight["run_dir"] / "checkpoints" / FINAL)
    final_g = weights(ckpt)["G"]
    assert any(not bool((stop_state["G"]["module"][k] == final_g[k]).all()) for k in final_g)

    # rank 0's log.txt has both attempts. W&B: one offline run per attempt, both complete (an exit record: the
    # first attempt's rank 0 is still flushing it when torchrun terminates it, see launch_node.py), the same run
    # id, and together one stats row per 32 images, none twice.
    text = (run_dir / "log.txt").read_text()
    assert text.count(f"distgan {__version__}: launcher=torchrun") == 2 and "resumed from" in text
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].name == files[1].name, [str(f) for f in files]
    rows, run_ids = [], set()
    for f in files:
        records = list(wandb_records(f))
        assert records[-1].WhichOneof("record_type") == "exit", f"{f} is incomplete"
        run_ids |= {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
                if "Loss/D/main" in row:
                    rows.append(round(float(row["Progress/kimg"]) * 1000))
    assert run_ids == {files[0].name[4:-6]}, run_ids
    assert rows == list(range(32, TOTAL_NIMG + 1, 32)), rows


def test_a_stop_without_a_committed_checkpoint_is_not_requeued(cluster, tmp_path):
    """The control of the requeue decision: the same signal, but the stop's checkpoint cannot be written (rank 1's
    disk is "full", DISTGAN_FAULTS=enospc): the trainer exits 2, not 3, and the script must not requeue."""
    job = sbatch(cluster, tmp_path, [], [SMOKE, *TRAIN], NPROC_PER_NODE="2", DISTGAN_FAULTS="enospc:rank=1")
    usr1_once_training(cluster, job, tmp_path, tmp_path / "runs" / "smoke")
    info = wait_job(cluster, job, tmp_path)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log[-4000:]
    assert "SIGUSR1 (time limit or preemption ahead)" in log and "not saved" in log, log[-4000:]
    assert "exited with code 2, not 3 (no checkpoint confirmed): not requeued" in log, log[-3000:]
    assert "requeueing" not in log


def test_requeued_job_with_fewer_tasks_resumes_on_them(cluster, tmp_path):
    """A job of two launchers (two tasks, one rank each: two nodes played on one) is preempted mid-run; while the
    requeued job waits, it is made smaller (`scontrol update JobId=N NumTasks=1 TasksPerNode=1`, what a cluster that
    hands a job back on fewer nodes amounts to). It must start one launcher, resume the stop's checkpoint on one
    process (world 1, the in-memory dataset's position re-split) and finish with the global batch unchanged: the
    same images per step, the same step count, one stats line per interval. Control: sbatch's SLURM_NTASKS in the
    requeued job still says 2 (the log line says so); going by it, the script started two launchers again (on this
    one node SLURM let the second task run on the job's spare CPU: no error, the old size, measured)."""
    job = sbatch(cluster, tmp_path, ["--ntasks=2", "--ntasks-per-node=2"], [SMOKE, *TRAIN], NPROC_PER_NODE="1")
    run_dir = tmp_path / "runs" / "smoke"
    stop = preempt(cluster, job, tmp_path, run_dir, resize=("NumTasks=1", "TasksPerNode=1"))
    log = stop["log"]
    first, again = log.split(f"job {job} attempt 1 on localhost")
    assert "2 launcher(s) x 1 process(es) per node (NPROC_PER_NODE), world 2" in first, first[-3000:]
    assert "launcher=torchrun backend=gloo world=2" in first and "srun --ntasks=2 " in first
    assert again.startswith(": 1 launcher(s) x 1 process(es) per node (NPROC_PER_NODE), world 1, "), again[:500]
    assert "the job was submitted with 2 task(s) and now has 1 (SLURM_TASKS_PER_NODE=1)" in again.splitlines()[0]
    assert "srun --ntasks=1 " in again and "--nnodes=1 --nproc-per-node=1 " in again, again[-3000:]
    assert "launcher=torchrun backend=none world=1" in again and "batch: 16 per step = 16 per process x 1 process" \
        in again, again[-3000:]  # fmt: skip
    assert re.findall(r"resumed from (\S+) at ([\d.]+) kimg", log) == [(stop["stop_ckpt"], stop["stop_kimg"])]
    print(f"stopped at {stop['stop_nimg']} images on 2 tasks, resumed and finished on 1")
    assert stop["stop_state"]["world_size"] == 2
    check_finished(run_dir, world=1)
    assert stats_nimg(run_dir) == list(range(32, TOTAL_NIMG + 1, 32))


# ---------------------------------------------------------------------- two launchers


def test_two_launchers_rendezvous_like_two_nodes(cluster, straight, tmp_path):
    """The multi-node code path on one machine: two tasks, so two launchers (one per "node") that meet in the c10d
    rendezvous on the head's address over loopback, one rank each. The result must be the uninterrupted 2-rank
    job's, bit for bit: the two launchers' ranks trained one model together."""
    job, info, log, took = run_job(cluster, tmp_path, ["--ntasks=2", "--ntasks-per-node=2"], [SMOKE, *TRAIN],
                                   NPROC_PER_NODE="1")  # fmt: skip
    print(f"\ntwo launchers x 1 rank: {took:.1f} s from sbatch to COMPLETED")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "2 launcher(s) x 1 process(es) per node (NPROC_PER_NODE), world 2" in log
    assert "srun --ntasks=2" in log and "--nnodes=2 --nproc-per-node=1" in log
    for i in range(2):
        assert f"distgan-slurm: launcher {i} of 2 on localhost: 1 process(es)" in log, log[-3000:]
    assert "launcher=torchrun backend=gloo world=2" in log
    ckpt = check_finished(tmp_path / "runs" / "smoke", world=2)
    assert_same_training_state(ckpt, straight["run_dir"] / "checkpoints" / FINAL)


# ---------------------------------------------------------------------- two SLURM nodes


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A second cluster: nodes n1 and n2, each in a network namespace of its own, joined by a bridge."""
    why = slurm_cluster.missing()
    require(why is None, why or "")
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm2"), netns_nodes=2)
    try:
        c.start()
    except (RuntimeError, OSError) as e:  # no `ip`, no network namespaces allowed, a daemon that would not start
        c.stop()
        require(False, f"no two-node SLURM on this machine: {str(e).splitlines()[0]}")
    yield c
    left = c.stop()
    assert not left, f"the two-node SLURM test cluster left behind (processes killed now): {left}"


def test_two_slurm_nodes_train_preempt_and_resume(two_nodes, straight, tmp_path):
    """`sbatch --nodes=2`: one launcher per node, each node with its own network (ranks reach each other over
    the bridge, at the addresses SLURM knows the nodes by, not over loopback). Preempted mid-run like the one-node
    job, the ranks of both nodes commit one checkpoint, the requeued job resumes on both nodes, and the weights
    are again the uninterrupted one-node job's, bit for bit."""
    job = sbatch(two_nodes, tmp_path, ["--nodes=2"], [SMOKE, *TRAIN], NPROC_PER_NODE="1")
    stop = preempt(two_nodes, job, tmp_path, tmp_path / "runs" / "smoke")
    log = stop["log"]
    head = two_nodes.nodes["n1"]
    assert log.count(f"on n1 n2: 2 launcher(s) x 1 process(es) per node (NPROC_PER_NODE), world 2, "
                     f"rendezvous {head}:") == 2  # fmt: skip
    for node in ("n1", "n2"):  # both attempts, both nodes
        assert log.count(f"distgan-slurm: launcher {int(node[1]) - 1} of 2 on {node}: 1 process(es)") == 2, log[-3000:]
    # gloo on the nodes' own network: n2 routes to the head through its eth0; on n1 (the head) the route to its
    # own address is `local ... dev lo`, and the interface the others reach is the one holding it, eth0 too.
    assert log.count(f"GLOO_SOCKET_IFNAME=eth0 (route to {head})") == 4, log[-3000:]
    print(f"exit codes per node launcher: {stop['node_codes']}")
    ckpt = check_finished(tmp_path / "runs" / "smoke", world=2)
    assert_same_training_state(ckpt, straight["run_dir"] / "checkpoints" / FINAL)


# ---------------------------------------------------------------------- DeepSpeed in a job


def test_zero2_job_preempted_and_resumed_trains_what_the_ddp_job_trains(cluster, straight, tmp_path):
    """The same preemption under dist.strategy=zero2: the ranks commit DeepSpeed's files inside the checkpoint,
    the requeued job reloads them through DeepSpeed, and the weights at the end are the uninterrupted DDP job's
    bit for bit (with 2 ranks ZeRO-2 averages gradients exactly as DDP does; tests/distributed/test_deepspeed.py),
    BatchNorm running statistics to 1e-6 as above."""
    require_deepspeed()
    job = sbatch(cluster, tmp_path, [], [SMOKE, *TRAIN, "dist.strategy=zero2"], NPROC_PER_NODE="2")
    stop = preempt(cluster, job, tmp_path, tmp_path / "runs" / "smoke")
    assert "precision=fp32 strategy=zero2" in stop["log"]
    assert re.findall(r"resumed from (\S+) at", stop["log"]) == [stop["stop_ckpt"]]
    ckpt = check_finished(tmp_path / "runs" / "smoke", world=2)
    state, want = load_file(ckpt, "state.pt"), load_file(straight["run_dir"] / "checkpoints" / FINAL, "state.pt")
    assert state["strategy"] == "zero2"
    nets = {net: load_file(ckpt, f"ds-{net}-mp_rank_00_model_states.pt")["module"] for net in ("G", "D")}
    nets["G_ema"] = state["G_ema"]
    for net, sd in nets.items():
        for k, x in sd.items():
            y = want[net][k] if net == "G_ema" else want[net]["module"][k]
            if k.endswith(RUNNING_STATS):
                assert_close_stats(x, y, f"{net}.{k}")
            else:
                assert torch.equal(x, y), f"{net}.{k} differs from the DDP job's"
