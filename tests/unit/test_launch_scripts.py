"""The launchers' own rules, without launching anything: launch/gpus.sh's GPU count per node (typed SLURM counts,
lists of types, CUDA_VISIBLE_DEVICES, nvidia-smi) and its choice of GLOO_SOCKET_IFNAME (the route to the
rendezvous host), and how slurm/launch_node.py applies them before torchrun starts (the --nproc-per-node=gpus
sentinel, DISTGAN_EXPECT_GPUS, a GLOO_SOCKET_IFNAME the user set is kept).

The shell functions run in bash with a PATH of fakes where the answer must not depend on this machine (its
GPUs, its routes): `ip` and `getent` that say what a cluster node would."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, patience, require

GPUS_SH = REPO / "launch" / "gpus.sh"
# Nothing of the caller's environment that the rules read: each case sets what it needs.
READ = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES", "GLOO_SOCKET_IFNAME",
        "DISTGAN_EXPECT_GPUS", "NPROC_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")  # fmt: skip


def bash(function: str, *args: str, path: str | None = None, **env: str) -> tuple[int, str]:
    """Run one function of launch/gpus.sh: (exit code, stdout)."""
    base = {k: v for k, v in os.environ.items() if k not in READ}
    if path is not None:
        base["PATH"] = path
    p = subprocess.run(["/bin/bash", "-c", 'source "$1" && shift && "$@"', "bash", str(GPUS_SH), function, *args],
                       env={**base, **env}, capture_output=True, text=True, timeout=patience(30))  # fmt: skip
    assert not p.stderr, p.stderr
    return p.returncode, p.stdout.strip()


def fake_bin(folder: Path, **scripts: str) -> str:
    """A folder of fake commands (name -> sh script body), plus the real tools the functions use; its path."""
    folder.mkdir(exist_ok=True)
    for tool in ("bash", "awk", "head", "grep"):
        (folder / tool).symlink_to(shutil.which(tool))
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return str(folder)


# ------------------------------------------------------------------ GPUs per node


@pytest.mark.parametrize(
    ("spec", "count"),
    [("4", 4), ("a100:4", 4), ("gpu:a100:4", 4), ("a100:2,v100:1", 3), ("gpu:a100:2,gpu:v100:1", 3), ("0", 0),
     ("08", 8)],
)  # fmt: skip
def test_gpu_count_reads_slurms_typed_counts(spec, count):
    assert bash("gpu_count", spec) == (0, str(count))


@pytest.mark.parametrize("spec", ["", "gpu", "a100:", "a100:x", "a100:2,v100"])
def test_gpu_count_refuses_what_it_cannot_read(spec):
    assert bash("gpu_count", spec) == (1, "")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # SLURM_GPUS_ON_NODE is this node's; it wins over the job's per-node request and over what is visible.
        ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
         "2 SLURM_GPUS_ON_NODE=2"),
        ({"SLURM_GPUS_ON_NODE": "0", "CUDA_VISIBLE_DEVICES": "0"}, "0 SLURM_GPUS_ON_NODE=0"),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, "4 SLURM_GPUS_PER_NODE=a100:4"),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:4"}, "4 SLURM_GPUS_PER_NODE=gpu:a100:4"),
        ({"SLURM_GPUS_PER_NODE": "a100:2,v100:1"}, "3 SLURM_GPUS_PER_NODE=a100:2,v100:1"),
        # A count it cannot read is not trusted: the next source answers.
        ({"SLURM_GPUS_PER_NODE": "a100", "CUDA_VISIBLE_DEVICES": "0,1"}, "2 CUDA_VISIBLE_DEVICES=0,1"),
        ({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d,GPU-5e6f"}, "3 CUDA_VISIBLE_DEVICES=GPU-1a2b,GPU-3c4d,GPU-5e6f"),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "0 CUDA_VISIBLE_DEVICES=NoDevFiles"),
        ({"CUDA_VISIBLE_DEVICES": ""}, "0 CUDA_VISIBLE_DEVICES="),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, "0 CUDA_VISIBLE_DEVICES=-1"),
        ({"CUDA_VISIBLE_DEVICES": "-1,0"}, "0 CUDA_VISIBLE_DEVICES=-1,0"),
    ],
)  # fmt: skip
def test_node_gpus_sources_in_order(tmp_path, env, expected):
    # A fake nvidia-smi on PATH: none of these cases may fall through to it (the source would say nvidia-smi).
    path = fake_bin(tmp_path / "bin", **{"nvidia-smi": "echo 'GPU 0: X'; echo 'GPU 1: X'; exit 0"})
    assert bash("node_gpus", path=path, **env) == (0, expected)


def test_node_gpus_falls_back_to_nvidia_smi_then_to_none(tmp_path):
    smi = "printf 'GPU 0: NVIDIA H100 (UUID: GPU-a)\\nGPU 1: NVIDIA H100 (UUID: GPU-b)\\n'"
    assert bash("node_gpus", path=fake_bin(tmp_path / "smi", **{"nvidia-smi": smi})) == (0, "2 nvidia-smi")
    assert bash("node_gpus", path=fake_bin(tmp_path / "none")) == (0, "0 CUDA_VISIBLE_DEVICES unset, no nvidia-smi")


# ------------------------------------------------------------------ GLOO_SOCKET_IFNAME

# What `ip` and `getent` say on a cluster node, per case: FAKE_ROUTE for `ip route get`, FAKE_ADDR for
# `ip -o addr show to`, and the hosts getent knows.
FAKE_IP = 'if [ "$1" = route ]; then [ -n "$FAKE_ROUTE" ] || exit 2; echo "$FAKE_ROUTE"; else echo "$FAKE_ADDR"; fi'
FAKE_GETENT = """case "$2" in
  head) echo "10.0.0.1        STREAM head" ;;
  node0) echo "127.0.1.1       STREAM node0" ;;
  127.0.0.1) echo "127.0.0.1       STREAM 127.0.0.1" ;;
  *) exit 2 ;;
esac"""


@pytest.fixture
def fake_net(tmp_path):
    return fake_bin(tmp_path / "net", ip=FAKE_IP, getent=FAKE_GETENT)


@pytest.mark.parametrize(
    ("host", "machines", "route", "addr", "expected"),
    [
        # Another node: the interface of the route to the head.
        ("head", "", "10.0.0.1 via 10.0.0.254 dev ib0 src 10.0.0.7 uid 0", "", (0, "ib0")),
        ("head", "4", "10.0.0.1 dev eth0 src 10.0.0.7 uid 0", "", (0, "eth0")),
        # The head node itself: the route is `local ... dev lo`, but the others reach the interface holding the
        # address (a veth's name carries @ifN in some listings).
        ("head", "4", "local 10.0.0.1 dev lo src 10.0.0.1 uid 0",
         "3: eth1@if9    inet 10.0.0.1/24 brd 10.0.0.255 scope global eth1", (0, "eth1")),
        # Everything on this machine: loopback is right.
        ("127.0.0.1", "", "local 127.0.0.1 dev lo src 127.0.0.1 uid 0", "", (0, "lo")),
        ("node0", "1", "local 127.0.1.1 dev lo src 127.0.0.1 uid 0", "", (0, "lo")),
    ],
)  # fmt: skip
def test_gloo_ifname_is_the_interface_that_reaches_the_rendezvous_host(fake_net, host, machines, route, addr,
                                                                       expected):  # fmt: skip
    assert bash("gloo_ifname", host, machines, path=fake_net, FAKE_ROUTE=route, FAKE_ADDR=addr) == expected


@pytest.mark.parametrize(
    ("host", "machines", "route", "addr", "why"),
    [
        # Debian's 127.0.1.1 line for the host's own name, on a job of several machines: no choice.
        ("node0", "", "local 127.0.1.1 dev lo src 127.0.0.1 uid 0", "",
         "the rendezvous host node0 resolves to 127.0.1.1 (loopback) on this machine, which the other machines "
         "cannot reach"),
        ("node0", "2", "local 127.0.1.1 dev lo src 127.0.0.1 uid 0", "", "resolves to 127.0.1.1 (loopback)"),
        ("nowhere", "", "", "", "cannot resolve the rendezvous host nowhere"),
        ("head", "", "", "", "`ip route get 10.0.0.1` names no interface"),
        ("head", "", "local 10.0.0.1 dev lo src 10.0.0.1 uid 0", "", "no interface holds 10.0.0.1"),
    ],
)  # fmt: skip
def test_gloo_ifname_says_why_it_chose_none(fake_net, host, machines, route, addr, why):
    code, out = bash("gloo_ifname", host, machines, path=fake_net, FAKE_ROUTE=route, FAKE_ADDR=addr)
    assert code == 1 and why in out, out


def test_gloo_ifname_on_this_machines_loopback():
    # For real: the tests' multi-launcher setups meet on 127.0.0.1, where lo is the right interface.
    require(shutil.which("ip") is not None and shutil.which("getent") is not None, "no `ip`/`getent` (iproute2)")
    assert bash("gloo_ifname", "127.0.0.1") == (0, "lo")
    assert bash("gloo_ifname", "localhost") == (0, "lo")


# ------------------------------------------------------------------ slurm/launch_node.py before torchrun


@pytest.fixture
def launch_node(monkeypatch):
    spec = importlib.util.spec_from_file_location("launch_node", REPO / "slurm" / "launch_node.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key in READ:  # (set, then removed: monkeypatch then also removes what prepare() exports)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return module


def node_args(nproc: str, endpoint: str = "127.0.0.1:29400"):
    from torch.distributed.run import parse_args

    return parse_args([f"--nproc-per-node={nproc}", "--nnodes=2", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint={endpoint}", "-m", "distgan.train"])  # fmt: skip


@pytest.mark.parametrize(
    ("env", "nproc", "expect"),
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, "4", "4"),
        ({"SLURM_GPUS_PER_NODE": "a100:2,v100:1"}, "3", "3"),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "1", "0"),  # a CPU node: one process, no GPU expected
        ({"CUDA_VISIBLE_DEVICES": ""}, "1", "0"),
    ],
)
def test_launch_node_replaces_the_sentinel_with_its_nodes_gpus(launch_node, monkeypatch, env, nproc, expect):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = node_args("gpus")
    line = launch_node.prepare(args)
    assert args.nproc_per_node == nproc, line
    assert os.environ["DISTGAN_EXPECT_GPUS"] == expect
    assert f": {nproc} process(es) (" in line and f"DISTGAN_EXPECT_GPUS={expect}," in line


def test_launch_node_keeps_a_given_count_and_still_exports_the_gpus(launch_node, monkeypatch):
    # NPROC_PER_NODE=3 on a node with 2 GPUs: 3 processes as asked, DISTGAN_EXPECT_GPUS=2, so distgan refuses
    # to put two processes on one GPU; on a CPU node the same count expects 0 GPUs.
    monkeypatch.setenv("NPROC_PER_NODE", "3")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    args = node_args("3")
    assert "3 process(es) (NPROC_PER_NODE), DISTGAN_EXPECT_GPUS=2," in launch_node.prepare(args)
    assert args.nproc_per_node == "3" and os.environ["DISTGAN_EXPECT_GPUS"] == "2"
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    monkeypatch.delenv("DISTGAN_EXPECT_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "DISTGAN_EXPECT_GPUS=0," in launch_node.prepare(node_args("3"))


def test_launch_node_keeps_what_the_user_exported(launch_node, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib7")
    monkeypatch.setenv("DISTGAN_EXPECT_GPUS", "0")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    line = launch_node.prepare(node_args("gpus"))
    assert "2 process(es)" in line and "DISTGAN_EXPECT_GPUS=0 (yours)" in line
    assert "GLOO_SOCKET_IFNAME=ib7 (yours)" in line
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib7" and os.environ["DISTGAN_EXPECT_GPUS"] == "0"


def test_launch_node_chooses_lo_for_a_loopback_rendezvous(launch_node, monkeypatch):
    require(shutil.which("ip") is not None and shutil.which("getent") is not None, "no `ip`/`getent` (iproute2)")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    line = launch_node.prepare(node_args("1", "127.0.0.1:29400"))
    assert "GLOO_SOCKET_IFNAME=lo (route to 127.0.0.1)" in line and os.environ["GLOO_SOCKET_IFNAME"] == "lo"


@pytest.mark.parametrize(
    ("endpoint", "host"),
    [("node7:29400", "node7"), ("10.0.0.1:29400", "10.0.0.1"), ("[fd00::1]:29400", "fd00::1"), ("node7", "node7")],
)
def test_launch_node_reads_the_rendezvous_host(launch_node, endpoint, host):
    assert launch_node.rendezvous_host(node_args("1", endpoint)) == host


def test_launch_node_warns_once_when_it_chooses_no_interface(launch_node, monkeypatch, tmp_path, capsys):
    # The rendezvous host's name resolves to loopback here, on a job of 2 nodes: left unset, one warning line.
    monkeypatch.setenv("PATH", fake_bin(tmp_path / "net", ip=FAKE_IP, getent=FAKE_GETENT))
    monkeypatch.setenv("FAKE_ROUTE", "local 127.0.1.1 dev lo src 127.0.0.1 uid 0")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    assert launch_node.choose_gloo_ifname("node0", "node0") == "GLOO_SOCKET_IFNAME unset"
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("distgan-slurm: warning: GLOO_SOCKET_IFNAME left unset on node0: ")
    assert "resolves to 127.0.1.1 (loopback)" in err[0] and "Export GLOO_SOCKET_IFNAME=<interface>" in err[0]
