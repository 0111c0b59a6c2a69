"""The launch forms docs/launching.md documents, run for real: each trains configs/smoke.yaml to a checkpoint
and a sample grid and reports the world size it ran with."""

import subprocess
import sys

import pytest

from conftest import BIN, REPO, cli_env, patience
from distgan.checkpoint import load_file

pytestmark = pytest.mark.integration

SMOKE = str(REPO / "configs" / "smoke.yaml")


def run(cmd, tmp_path, **env):
    p = subprocess.run(cmd, cwd=tmp_path, env=cli_env(**env), capture_output=True, text=True, timeout=patience(300))
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def check_run_dir(run_dir, world):
    log = (run_dir / "log.txt").read_text()
    assert f"world={world} " in log.splitlines()[0]
    assert (run_dir / "checkpoints" / "ckpt-000000128" / "state.pt").is_file()
    assert (run_dir / "samples" / "fakes-000000128.png").is_file()
    state = load_file(run_dir / "checkpoints" / "ckpt-000000128", "state.pt")  # hash-checked
    assert state["world_size"] == world and state["progress"]["cur_nimg"] == 128
    ranks = sorted(p.name for p in (run_dir / "checkpoints" / "ckpt-000000128").glob("rank-*.pt"))
    assert ranks == [f"rank-{r:05d}.pt" for r in range(world)]  # every rank wrote its own part
    assert (run_dir / "config.yaml").is_file()


def test_torchrun_two_cpu_processes(tmp_path):
    out = run(
        [str(BIN / "torchrun"), "--nproc_per_node=2", "-m", "distgan.train", "--config", SMOKE, "--run-dir", "run"],
        tmp_path,
    )
    assert "launcher=torchrun backend=gloo world=2" in out
    check_run_dir(tmp_path / "run", 2)


def test_accelerate_launch_two_cpu_processes(tmp_path):
    out = run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            str(REPO / "distgan" / "train.py"),
            "--config",
            SMOKE,
            "--run-dir",
            "run",
        ],
        tmp_path,
    )
    assert "launcher=accelerate backend=gloo world=2" in out
    check_run_dir(tmp_path / "run", 2)


def test_console_script_one_process_and_resume(tmp_path):
    out = run([str(BIN / "distgan"), "train", "--config", SMOKE, "--run-dir", "run"], tmp_path)
    assert "world=1" in out and "samples:" in out and "checkpoint:" in out
    check_run_dir(tmp_path / "run", 1)
    # A second start resumes from the latest checkpoint and trains on to the new total.
    out = run(
        [str(BIN / "distgan"), "train", "--config", SMOKE, "--run-dir", "run", "train.total_kimg=0.192"], tmp_path
    )
    assert "resumed from" in out and "ckpt-000000128" in out
    assert (tmp_path / "run" / "checkpoints" / "ckpt-000000192").is_dir()
    # The same command once more: nothing left to train, it says so and changes nothing.
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    out = run(
        [str(BIN / "distgan"), "train", "--config", SMOKE, "--run-dir", "run", "train.total_kimg=0.192"], tmp_path
    )
    assert "already trained to 0.192 kimg" in out and "done:" not in out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_changed_model_refuses_to_resume(tmp_path):
    run([sys.executable, "-m", "distgan.train", "--config", SMOKE, "--run-dir", "run"], tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "distgan.train", "--config", SMOKE, "--run-dir", "run", "model.dcgan.g_width=16"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert "model.dcgan.g_width: 8 -> 16" in p.stderr


def test_wandb_tracker_offline(tmp_path):
    run([str(BIN / "distgan"), "train", "--config", SMOKE, "--run-dir", "run", "log.tracker=wandb"], tmp_path)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    images = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/images/**/*.png"))
    assert len(images) >= 3  # sample grids at 0, 64 and 128 images
    assert "W&B:" in (tmp_path / "run" / "log.txt").read_text()


def test_torchrun_streams_seven_shards_on_two_ranks_of_two_workers(tmp_path):
    # The WebDataset deadlock case of ENVIRONMENT.md (7 shards, 2 ranks x 2 workers): must train, not hang.
    from support import write_shards

    write_shards(tmp_path / "shards", 7, 20, resolution=32)
    out = run(
        [str(BIN / "torchrun"), "--nproc_per_node=2", "-m", "distgan.train", "--config", SMOKE, "--run-dir", "run",
         "data.source=shards", "data.shards=shards", "data.workers=2"],
        tmp_path,
    )  # fmt: skip
    assert "data: 140 samples in 7 shards" in out and "2 loader workers per rank" in out
    check_run_dir(tmp_path / "run", 2)
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000128"
    parts = [load_file(ckpt, f"rank-{r:05d}.pt") for r in range(2)]
    assert [p["stream"]["batches"] for p in parts] == [8, 8]  # both ranks drew one batch per step


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        ("missing", "no manifest.json in missing"),
        ("small", "holds 16x16x3 images but the model is 32x32x3"),
        ("pipe:cat x.tar", "pipe: URL"),
    ],
)
def test_data_problems_are_one_line_and_exit_2_before_training(tmp_path, shards, message):
    from support import write_shards

    write_shards(tmp_path / "small", 2, 8, resolution=16)
    (tmp_path / "missing").mkdir()
    p = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node=2", "-m", "distgan.train", "--config", SMOKE, "--run-dir", "run",
         "data.source=shards", f"data.shards={shards}"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=patience(300),
    )  # fmt: skip
    errors = [line for line in p.stderr.splitlines() if line.startswith("distgan: error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr[-2000:]
    assert p.returncode != 0 and "]: Traceback" not in p.stderr  # no rank died with a traceback (torchrun may)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("late_rank", ["0", "none"])
def test_the_error_line_survives_rank_0_reporting_last(tmp_path, late_rank):
    """Every rank meets the same bad config; torchrun ends the others as soon as one exits. With rank 0 reaching its
    line 3 s after rank 1 (the `report.slow` fault), its line must still be printed: rank 1 waits for it."""
    env = cli_env(DISTGAN_FAULTS=f"report.slow:rank={late_rank}")
    p = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node=2", "-m", "distgan.train", "--config", SMOKE, "train.batch=-4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=patience(300),
    )  # fmt: skip
    errors = [line for line in p.stderr.splitlines() if line.startswith("distgan: error:")]
    assert len(errors) == 1 and "train.batch" in errors[0], p.stderr[-2000:]
    assert p.returncode != 0
