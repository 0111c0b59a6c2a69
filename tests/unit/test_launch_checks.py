"""What a launch must refuse before step 1 rather than discover on a GPU: a launcher that counted GPUs while this
process sees none (training would fall back to the CPU without a word), more processes than GPUs on a machine
(NCCL refuses two ranks on one GPU, but only once they first talk), bf16 on a GPU without bfloat16 arithmetic,
and a per-GPU batch that does not divide a process's share of the global batch."""

import pytest
import torch

from conftest import patience
from distgan.config import describe_batch, load_config, micro_batches
from distgan.distributed import bf16_problem, device_problem, expected_gpus, resolve_precision
from distgan.errors import ConfigError


def test_expected_gpus_come_from_the_launcher_or_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("DISTGAN_EXPECT_GPUS", raising=False)
    for visible, n in ((None, 0), ("", 0), ("NoDevFiles", 0), ("-1", 0), ("0", 1), ("0,1,3", 3), ("GPU-ab,GPU-cd", 2)):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert expected_gpus() == n, visible
    monkeypatch.setenv("DISTGAN_EXPECT_GPUS", "4")  # the launcher's own count wins
    assert expected_gpus() == 4
    monkeypatch.setenv("DISTGAN_EXPECT_GPUS", "0")
    assert expected_gpus() == 0


def test_gpus_counted_but_none_seen_or_more_processes_than_gpus_are_refused():
    assert "counted 2 GPU(s) on this machine but this process sees none" in device_problem(2, 0, 2)
    assert "4 processes on this machine but 2 GPU(s) visible" in device_problem(2, 2, 4)
    # Controls: a matching launch, and a CPU launch that asked for no GPU.
    assert device_problem(2, 2, 2) is None and device_problem(0, 0, 4) is None and device_problem(8, 8, 1) is None


def test_the_cli_refuses_a_gpu_launch_that_sees_no_gpu(tmp_path):
    """The whole path: CUDA_VISIBLE_DEVICES names a GPU this CPU machine does not have: exit 2, one line."""
    import subprocess
    import sys

    from conftest import REPO, cli_env

    p = subprocess.run(
        [sys.executable, "-m", "distgan.train", "--config", str(REPO / "configs" / "smoke.yaml"), "--run-dir",
         str(tmp_path / "run")],
        env=cli_env(CUDA_VISIBLE_DEVICES="0"), capture_output=True, text=True, timeout=patience(120),
    )  # fmt: skip
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # (never in CI)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("distgan:")]
    assert len(lines) == 1 and "counted 1 GPU(s) on this machine but this process sees none" in lines[0]
    assert "Traceback" not in p.stderr


def test_bf16_on_a_gpu_without_bfloat16_is_a_config_error(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    problem = bf16_problem("bf16", cuda)
    assert "Tesla V100-SXM2-32GB (compute capability 7.0) has no bfloat16 arithmetic" in problem
    assert bf16_problem("fp16", cuda) is None and bf16_problem("bf16", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert bf16_problem("bf16", cuda) is not None  # emulated bf16 does not count
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert bf16_problem("bf16", cuda) is None  # control: an Ampere-class GPU


def test_precision_auto_is_bf16_on_a_bfloat16_gpu_fp32_elsewhere_or_what_the_launcher_asked(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", use_cpu=False) == "bf16"  # an Ampere-class GPU
    assert resolve_precision("auto", use_cpu=True) == "fp32"  # a CPU: fp32, whatever the GPUs could do
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", use_cpu=False) == "fp32"  # emulated bf16 only (a V100): fp32, not fp16
    for mode in ("fp32", "bf16", "fp16"):  # a named precision is kept, on any device
        assert resolve_precision(mode, use_cpu=True) == resolve_precision(mode, use_cpu=False) == mode
    for launched in ("bf16", "fp16"):  # `accelerate launch --mixed_precision X`: auto follows it
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
        assert resolve_precision("auto", use_cpu=True) == launched
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_precision("auto", use_cpu=True) == "fp32"


def test_the_default_precision_runs_fp32_on_the_cpu_and_the_config_records_it():
    from support import make_trainer

    tr = make_trainer()
    assert tr.precision.mode == "fp32" and tr.cfg.train.precision == "fp32"
    assert load_config(None, []).train.precision == "auto"


def test_the_global_batch_splits_into_per_gpu_micro_batches():
    assert micro_batches(64, 8, 0) == (8, 8, 1)  # the default: each process's whole share at once
    assert micro_batches(512, 8, 16) == (64, 16, 4)  # 4 micro-batches of 16 accumulate into one step
    assert micro_batches(64, 8, 32) == (8, 8, 1)  # a cap above the share changes nothing
    cfg = load_config(None, ["train.batch=96", "train.batch_per_gpu=20"])
    with pytest.raises(ConfigError, match=r"48 per process, which micro-batches of train.batch_per_gpu=20 do not"):
        cfg.validate(world_size=2)
    load_config(None, ["train.batch=96", "train.batch_per_gpu=16"]).validate(world_size=2)
    lines = describe_batch(load_config(None, ["train.batch=64"]), 8)
    assert lines[0] == "batch: 64 per step = 8 per process x 8 processes"
    assert lines[1].startswith("warning: BatchNorm sees 8 images per forward on each process")
    lines = describe_batch(load_config(None, ["train.batch=1024", "train.batch_per_gpu=32"]), 8)
    assert lines == [
        "batch: 1024 per step = 128 per process x 8 processes, in 4 micro-batches of 32 (train.batch_per_gpu)"
    ]
