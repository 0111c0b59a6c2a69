"""The launch/ folder, for real: every Accelerate config loads through Accelerate's own loader with the values
docs/launching.md promises; the DeepSpeed configs make `accelerate launch` export what dist.strategy=auto reads;
the CPU config and launch/torchrun.sh train configs/smoke.yaml on 2 ranks; and the multi-node Accelerate config and the
wrapper's multi-node mode join two launchers on loopback into one world of 2."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import BIN, REPO, cli_env, patience, require
from distgan.checkpoint import load_file

pytestmark = pytest.mark.integration

SMOKE = str(REPO / "configs" / "smoke.yaml")
CONFIGS = REPO / "launch" / "accelerate"
WRAPPER = str(REPO / "launch" / "torchrun.sh")
TRAIN = str(REPO / "distgan" / "train.py")

# What each file must say: (distributed_type, num_processes, num_machines, machine_rank, mixed_precision,
# ZeRO stage or None).
EXPECTED = {
    "cpu_2proc.yaml": ("MULTI_GPU", 2, 1, 0, "no", None),
    "ddp_1node.yaml": ("MULTI_GPU", 8, 1, 0, "no", None),
    "ddp_2nodes.yaml": ("MULTI_GPU", 16, 2, 0, "no", None),
    "zero1_bf16.yaml": ("DEEPSPEED", 8, 1, 0, "bf16", 1),
    "zero2_bf16.yaml": ("DEEPSPEED", 8, 1, 0, "bf16", 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra):
    # The venv's bin first on PATH: the wrapper finds this venv's torchrun. No GPU: both ranks on the CPU.
    base = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "CUDA_VISIBLE_DEVICES": ""}
    return cli_env(**{**base, **extra})


def run(cmd, tmp_path, **extra):
    p = subprocess.run(cmd, cwd=tmp_path, env=env(**extra), capture_output=True, text=True, timeout=patience(300))
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def run_pair(cmds, tmp_path, extras=({}, {})):
    """Two launchers at once (two 'machines' on loopback); both must finish cleanly."""
    procs = [
        subprocess.Popen(c, cwd=tmp_path, env=env(**x), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c, x in zip(cmds, extras)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=patience(300))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"{p.args} failed ({p.returncode}):\n{out[-3000:]}"
    return outs


def check_two_rank_run(run_dir, launcher):
    """Trained 8 steps on 2 ranks over gloo, each rank writing its own checkpoint part."""
    first = (run_dir / "log.txt").read_text().splitlines()[0]
    assert f"launcher={launcher} backend=gloo world=2 " in first, first
    ckpt = run_dir / "checkpoints" / "ckpt-000000128"
    state = load_file(ckpt, "state.pt")  # hash-checked
    assert state["world_size"] == 2 and state["progress"]["cur_nimg"] == 128
    assert sorted(p.name for p in ckpt.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]


# ------------------------------------------------------------------ the files themselves


def test_every_accelerate_config_is_checked_here():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_through_accelerates_own_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file  # refuses unknown keys

    cfg = load_config_from_file(str(CONFIGS / name))
    dtype, procs, machines, machine_rank, precision, stage = EXPECTED[name]
    assert cfg.distributed_type.value == dtype
    assert (cfg.num_processes, cfg.num_machines, cfg.machine_rank) == (procs, machines, machine_rank)
    assert cfg.mixed_precision == precision  # "no" must stay a string (YAML's bare no is False)
    assert cfg.use_cpu is False
    if stage is None:
        assert cfg.deepspeed_config in (None, {})
    else:
        assert cfg.deepspeed_config["zero_stage"] == stage
        assert cfg.deepspeed_config["gradient_accumulation_steps"] == 1
    if machines > 1:
        # Every machine must agree on the rendezvous: a fixed address and port (not 0, which picks one locally).
        assert cfg.main_process_ip and cfg.main_process_port == 29500 and cfg.rdzv_backend == "static"
    else:
        assert cfg.main_process_port == 0  # a free port: two jobs on one machine do not collide


# Each process writes its own file: lines two processes print to one pipe can interleave.
PROBE = """import json, os
keys = [k for k in os.environ if k.startswith("ACCELERATE_") or k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")]
with open(f"probe-{os.environ['RANK']}.json", "w") as f:
    json.dump({k: os.environ[k] for k in keys}, f)
"""


@pytest.mark.deepspeed
def test_deepspeed_config_launches_two_processes_with_what_strategy_auto_reads(tmp_path):
    # Launched for real (on a CPU machine too: accelerate's DeepSpeed launcher is torchrun), with a probe in
    # place of the trainer: the environment each process gets is what distgan decides its strategy from.
    # ZeRO-2 only: zero1_bf16.yaml differs by its zero_stage, checked by the loader test above (Accelerate
    # exports that value as it is).
    require(importlib.util.find_spec("deepspeed") is not None, "deepspeed is not installed (accelerate needs it)")
    stage = 2
    (tmp_path / "probe.py").write_text(PROBE)
    run(
        [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / f"zero{stage}_bf16.yaml"),
         "--num_processes", "2", "probe.py"],
        tmp_path,
    )  # fmt: skip
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("probe-*.json"))]
    assert sorted(e["RANK"] for e in seen) == ["0", "1"]
    for e in seen:
        assert e["WORLD_SIZE"] == "2" and e["LOCAL_WORLD_SIZE"] == "2"
        assert e["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert e["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
        assert e["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # distgan under exactly that environment: dist.strategy=auto picks ZeRO-2; bf16 and the default (auto) run
    # bf16, an explicit fp32 is refused (a config that names its precision decides).
    from distgan import launcher
    from distgan.distributed import resolve_precision
    from distgan.errors import LaunchError

    with pytest.MonkeyPatch.context() as mp:
        for k, v in seen[0].items():
            mp.setenv(k, v)
        assert launcher.resolve_strategy("auto", "bf16") == f"zero{stage}"
        launcher.check_precision("bf16")
        launcher.check_precision("auto")
        assert resolve_precision("auto", use_cpu=True) == "bf16"
        with pytest.raises(LaunchError, match="train.precision=bf16"):
            launcher.check_precision("fp32")


# ------------------------------------------------------------------ launched for real


def test_cpu_config_trains_on_two_gloo_ranks(tmp_path):
    out = run(
        [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"), TRAIN,
         "--config", SMOKE, "--run-dir", "run"],
        tmp_path,
    )  # fmt: skip
    assert "launcher=accelerate backend=gloo world=2 device=cpu " in out
    check_two_rank_run(tmp_path / "run", "accelerate")


def test_torchrun_wrapper_defaults_to_two_cpu_processes(tmp_path):
    out = run([WRAPPER, "--config", SMOKE, "--run-dir", "run"], tmp_path)
    assert "--nproc_per_node=2" in out and "--standalone" in out and "-m distgan.train --config" in out
    check_two_rank_run(tmp_path / "run", "torchrun")


def test_multi_node_accelerate_config_joins_two_launchers_on_loopback(tmp_path):
    # Two 'machines' of one process each: machine_rank 0 and 1 of the shipped file, only the address, port and
    # total processes overridden on the command line as the file's comments tell a user to edit them.
    port = str(free_port())
    cmds = [
        [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "ddp_2nodes.yaml"),
         "--machine_rank", str(r), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, TRAIN, "--config", SMOKE, "--run-dir", "run"]
        for r in (0, 1)
    ]  # fmt: skip
    main, other = run_pair(cmds, tmp_path)
    assert "launcher=accelerate backend=gloo world=2" in main  # rank 0 lives on machine 0 and prints
    assert "done:" not in other  # the other machine's rank trains silently
    check_two_rank_run(tmp_path / "run", "accelerate")


def test_torchrun_wrapper_multi_node_c10d_on_loopback(tmp_path):
    node = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [WRAPPER, "--config", SMOKE, "--run-dir", "run"]
    outs = run_pair([cmd, cmd], tmp_path, ({**node, "RDZV_ID": "t"}, {**node, "RDZV_ID": "t"}))
    assert all("--nnodes=2" in o and "--rdzv_backend=c10d" in o for o in outs)
    # gloo bound to the interface that reaches MASTER_ADDR: loopback here; no GPU visible, none expected.
    assert all("launch/torchrun.sh: DISTGAN_EXPECT_GPUS=0 GLOO_SOCKET_IFNAME=lo " in o for o in outs), outs[0][-2000:]
    assert sum("launcher=torchrun backend=gloo world=2" in o for o in outs) == 1  # one of them got rank 0
    check_two_rank_run(tmp_path / "run", "torchrun")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"NNODES": "2"}, "NNODES=2 needs MASTER_ADDR (the rendezvous host every machine reaches)"),
        ({"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "NODE_RANK": "2"}, "NODE_RANK=2 is not in 0..1"),
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0 is not a positive integer"),
        ({"NNODES": "two"}, "NNODES=two is not a positive integer nor MIN:MAX"),
        ({"NNODES": "1:2"}, "NNODES=1:2 needs MASTER_ADDR (the rendezvous host every machine reaches)"),
        ({"NNODES": "3:2", "MASTER_ADDR": "127.0.0.1"}, "NNODES=3:2: MIN is above MAX"),
        (
            {"NNODES": "1:2", "MASTER_ADDR": "127.0.0.1", "NODE_RANK": "0"},
            "NNODES=1:2 (elastic) takes no NODE_RANK: the c10d rendezvous numbers the machines",
        ),
        ({"MAX_RESTARTS": "many"}, "MAX_RESTARTS=many is not a number"),
    ],
)
def test_torchrun_wrapper_refuses_bad_settings_before_starting_anything(tmp_path, extra, message):
    p = subprocess.run([WRAPPER, "--config", SMOKE], cwd=tmp_path, env=env(**extra), capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == f"launch/torchrun.sh: error: {message}", p.stderr


# A fake torchrun: the command it was given and the environment the training processes would inherit from it.
FAKE_TORCHRUN = """#!PYTHON
import os, sys
print('ARGS', *sys.argv[1:])
print('ENV', *(f"{k}={os.environ.get(k)}" for k in ("DISTGAN_EXPECT_GPUS", "GLOO_SOCKET_IFNAME")))
""".replace("PYTHON", sys.executable, 1)


def fake_torchrun(tmp_path) -> str:
    fake = tmp_path / "fake_torchrun"
    fake.write_text(FAKE_TORCHRUN)
    fake.chmod(0o755)
    return str(fake)


def test_torchrun_wrapper_counts_visible_gpus(tmp_path):
    # The GPU count decides nproc without importing torch, and is exported as DISTGAN_EXPECT_GPUS (0 without
    # GPUs, also where CPU_PROCS processes run): distgan refuses to start without the GPUs it was counted.
    fake = fake_torchrun(tmp_path)
    for visible, nproc, gpus in (("0,1,2", "3", "3"), ("", "2", "0"), ("-1", "2", "0"), ("NoDevFiles", "2", "0")):
        out = run([WRAPPER, "--config", SMOKE], tmp_path, TORCHRUN=fake, CUDA_VISIBLE_DEVICES=visible)
        assert f"ARGS --nproc_per_node={nproc} " in out, (visible, out)
        assert f"ENV DISTGAN_EXPECT_GPUS={gpus} GLOO_SOCKET_IFNAME=None" in out, (visible, out)
        assert f"launch/torchrun.sh: DISTGAN_EXPECT_GPUS={gpus} {fake} --nproc_per_node={nproc} " in out, out
    # NPROC_PER_NODE does not change what is expected: 4 processes on 2 GPUs are distgan's to refuse.
    out = run([WRAPPER, "--config", SMOKE], tmp_path, TORCHRUN=fake, CUDA_VISIBLE_DEVICES="0,1", NPROC_PER_NODE="4")
    assert "ARGS --nproc_per_node=4 " in out and "ENV DISTGAN_EXPECT_GPUS=2 " in out, out


def test_torchrun_wrapper_elastic_form(tmp_path):
    """NNODES=MIN:MAX: torchrun's --nnodes=MIN:MAX with the c10d rendezvous, 3 restarts unless MAX_RESTARTS says
    otherwise, RDZV_CONF as --rdzv_conf; the gloo interface as for several machines, also on one. (Losing a machine
    for real: tests/integration/test_elastic.py.)"""
    fake = fake_torchrun(tmp_path)
    elastic = {"NNODES": "1:4", "MASTER_ADDR": "127.0.0.1", "RDZV_ID": "j", "TORCHRUN": fake}
    out = run([WRAPPER, "--config", SMOKE], tmp_path, **elastic)
    assert ("ARGS --nproc_per_node=2 --max_restarts=3 --nnodes=1:4 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:29500 "
            "--rdzv_id=j -m distgan.train") in out, out  # fmt: skip
    assert "ENV DISTGAN_EXPECT_GPUS=0 GLOO_SOCKET_IFNAME=lo" in out, out
    out = run([WRAPPER, "--config", SMOKE], tmp_path, **elastic, MAX_RESTARTS="1", RDZV_CONF="last_call_timeout=5")
    assert "--max_restarts=1 --nnodes=1:4 " in out and " --rdzv_conf=last_call_timeout=5 -m distgan.train" in out, out
    # Not elastic: no restarts unless asked, as before.
    out = run([WRAPPER, "--config", SMOKE], tmp_path, **{**elastic, "NNODES": "2"})
    assert "ARGS --nproc_per_node=2 --max_restarts=0 --nnodes=2 " in out and "rdzv_conf" not in out, out


def test_torchrun_wrapper_sets_gloo_interface_for_several_machines_only(tmp_path):
    fake = fake_torchrun(tmp_path)
    several = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "TORCHRUN": fake}
    # One machine: gloo's default is fine, nothing set.
    out = run([WRAPPER, "--config", SMOKE], tmp_path, TORCHRUN=fake)
    assert "GLOO_SOCKET_IFNAME=None" in out and "GLOO_SOCKET_IFNAME=" not in out.split("ENV")[0], out
    # Several: the interface of the route to MASTER_ADDR (loopback here), in the start line too.
    out = run([WRAPPER, "--config", SMOKE], tmp_path, **several)
    assert "ENV DISTGAN_EXPECT_GPUS=0 GLOO_SOCKET_IFNAME=lo" in out, out
    assert "launch/torchrun.sh: DISTGAN_EXPECT_GPUS=0 GLOO_SOCKET_IFNAME=lo " in out, out
    # What the user exported is kept, both of them.
    out = run([WRAPPER, "--config", SMOKE], tmp_path, **several, GLOO_SOCKET_IFNAME="ib7", DISTGAN_EXPECT_GPUS="0")
    assert "ENV DISTGAN_EXPECT_GPUS=0 GLOO_SOCKET_IFNAME=ib7" in out and "warning" not in out, out
