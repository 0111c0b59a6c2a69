"""One node's launcher under slurm/train.sh: torchrun (same arguments), with the changes SLURM needs.

slurm/train.sh starts this once per node through `srun`; it runs torchrun's own `run()`, so every torchrun
option works as usual (c10d rendezvous, --nnodes, --nproc-per-node, ...). Before that, on its own node:

a. --nproc-per-node=gpus (train.sh passes it when NPROC_PER_NODE is not set; ours, not torchrun's "gpu", which
   asks torch.cuda in the agent and fails on a CPU node) becomes this node's GPU count: SLURM_GPUS_ON_NODE, else
   SLURM_GPUS_PER_NODE ("4", "a100:4", "gpu:a100:4", "a100:2,v100:1" = 3), else CUDA_VISIBLE_DEVICES, else
   `nvidia-smi -L`, else 1 CPU process (the rules are launch/gpus.sh's `node_gpus`, shared with the shell
   launchers). Counted here, not in the batch shell, because the batch shell runs on the first node only: a job
   with 4 GPUs on one node and 2 on another gets 4 and 2 processes. torchrun's c10d rendezvous accepts a
   different number of processes per node (the ranks are numbered across them).
b. DISTGAN_EXPECT_GPUS=<this node's GPU count> (0 on a CPU node) is exported to the training processes: distgan
   refuses to start when it is above 0 but torch sees no CUDA device, or when more processes than GPUs run on
   the node, instead of training on the CPU without a word. A value the user exported is kept (=0 turns the
   check off).
c. GLOO_SOCKET_IFNAME, unless the user set it, becomes the interface that routes to the rendezvous host
   (launch/gpus.sh's `gloo_ifname`: `ip route get`; on the rendezvous host itself the interface that holds its
   address). distgan's gloo side group (small host-side agreements next to NCCL) otherwise binds to whatever
   the host name resolves to, often 127.0.1.1 or a management network on clusters: a multi-node job hangs or
   crawls. When no interface can be trusted (the lookup fails, or the rendezvous host's name resolves to
   loopback on a job of several nodes) it stays unset and one warning line says why. NCCL picks its own
   interfaces; NCCL_SOCKET_IFNAME is left to the user.

Then two changes to how torchrun behaves:

1. SIGUSR1 is ignored by this process (torchrun's agent) and, inherited, by the training processes until
   distgan installs its stop handler. SLURM delivers a signal sent to a job step (srun forwarding the batch
   shell's USR1, `scancel --signal=USR1 JOB.STEP`) to *every* process of the step, the agent included. torchrun
   does not handle USR1 by default, so the agent dies of it (measured) and leaves its ranks orphaned: they may
   still commit their checkpoint, but nobody learns their exit codes. Adding USR1 to torchrun's
   --signals-to-handle does not help either: the agent then raises on it, shuts the workers down itself and
   exits 1 with a traceback (measured), so again nobody learns whether they checkpointed. Ignored, the workers
   alone act on it (checkpoint, exit 3), and a USR1 that arrives before a worker's handler exists (while it
   imports torch) or after it removed it (while it exits) is dropped instead of killing it; train.sh repeats
   the signal until the launchers end.

2. The workers' exit code survives. torchrun exits 1 for any failed worker; this exits 3 when a worker exited 3
   (distgan exits 3 only after every rank committed the same checkpoint, see distgan/errors.py), so train.sh
   can tell "stopped with a checkpoint: requeue" from a failure. Otherwise it exits with the common distgan
   code (2, 4, 5) of the workers that ended by themselves, or 1. torchrun terminates the workers that are still
   running when the first one exits, so the codes of the others may read as a signal: those do not count.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from distgan.errors import EXIT_INTERRUPTED

GPUS_SH = Path(__file__).resolve().parent.parent / "launch" / "gpus.sh"
PER_NODE = "gpus"  # --nproc-per-node=gpus: one process per GPU of this node, counted here (see a. above)


def shell(function: str, *args: str) -> tuple[bool, str]:
    """Run one of launch/gpus.sh's functions: (succeeded, its output). A minute at most: `nvidia-smi` on a node
    whose driver is stuck would otherwise hold the whole job at its start without a word."""
    cmd = ["bash", "-c", 'source "$1" && shift && "$@"', "bash", str(GPUS_SH), function, *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False, f"{function} took more than 60 s"
    return p.returncode == 0, p.stdout.strip()


def node_gpus() -> tuple[int, str]:
    """This node's GPUs and where the number came from, e.g. (2, "SLURM_GPUS_ON_NODE=2")."""
    ok, out = shell("node_gpus")
    count, _, source = out.partition(" ")
    if not ok or not count.isdigit():
        return 0, f"cannot count GPUs ({GPUS_SH}: {out!r})"
    return int(count), source


def rendezvous_host(args) -> str:
    """The host part of --rdzv-endpoint (host:port, [v6]:port), else --master-addr."""
    endpoint = args.rdzv_endpoint or args.master_addr
    if endpoint.startswith("["):
        return endpoint[1:].partition("]")[0]
    return endpoint.rpartition(":")[0] if endpoint.count(":") == 1 else endpoint


def choose_gloo_ifname(host: str, node: str) -> str:
    """Set GLOO_SOCKET_IFNAME (see c. above) unless the user did; what to print about it."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return f"GLOO_SOCKET_IFNAME={os.environ['GLOO_SOCKET_IFNAME']} (yours)"
    machines = os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", ""))
    ok, out = shell("gloo_ifname", host, machines)
    if ok and out:
        os.environ["GLOO_SOCKET_IFNAME"] = out
        return f"GLOO_SOCKET_IFNAME={out} (route to {host})"
    print(f"distgan-slurm: warning: GLOO_SOCKET_IFNAME left unset on {node}: {out or 'no interface found'}; "
          f"gloo binds to what the host name resolves to. Export GLOO_SOCKET_IFNAME=<interface> (one the other "
          f"nodes reach) to choose", file=sys.stderr, flush=True)  # fmt: skip
    return "GLOO_SOCKET_IFNAME unset"


def prepare(args) -> str:
    """a., b. and c. above, on this node: fills in args.nproc_per_node, exports DISTGAN_EXPECT_GPUS and
    GLOO_SOCKET_IFNAME into this process's environment, which the training processes inherit (torchrun adds
    RANK, LOCAL_RANK, ... to it); returns the launcher's start line."""
    task, tasks = os.environ.get("SLURM_PROCID", "0"), os.environ.get("SLURM_NTASKS", "1")
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    gpus, source = node_gpus()
    if args.nproc_per_node == PER_NODE:
        args.nproc_per_node = str(gpus or 1)
        why = f"one per GPU: {source}" if gpus else f"no GPU: {source}; one CPU process"
    else:
        why = "NPROC_PER_NODE" if os.environ.get("NPROC_PER_NODE") else "--nproc-per-node"
    yours = os.environ.get("DISTGAN_EXPECT_GPUS")
    os.environ["DISTGAN_EXPECT_GPUS"] = expect = yours or str(gpus)
    gloo = choose_gloo_ifname(rendezvous_host(args), node)
    return (f"distgan-slurm: launcher {task} of {tasks} on {node}: {args.nproc_per_node} process(es) ({why}), "
            f"DISTGAN_EXPECT_GPUS={expect}{' (yours)' if yours else ''}, {gloo}, "
            f"rendezvous {args.rdzv_endpoint or args.master_addr}")  # fmt: skip


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # before anything starts: see (1) above

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    print(prepare(args), flush=True)
    try:
        run(args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        print(f"distgan-slurm: {len(e.failures)} training process(es) failed on this node, exit codes {codes}\n"
              f"{e.format_msg()}", file=sys.stderr, flush=True)  # fmt: skip
        if EXIT_INTERRUPTED in codes:
            return EXIT_INTERRUPTED
        # Ranks that torchrun terminated after the first one failed read as signals (negative codes): the code
        # of the ranks that ended by themselves is the job's.
        own = sorted({c for c in codes if c >= 0})
        return own[0] if len(own) == 1 and 1 < own[0] < 128 else 1
    except SignalException as e:  # SIGTERM/SIGINT/SIGHUP/SIGQUIT: torchrun already stopped its workers
        print(f"distgan-slurm: the node launcher got {e.sigval.name}; its processes were stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
