"""One node's launcher under slurm/train.sh: torchrun (same arguments), with two changes SLURM needs.

slurm/train.sh starts this once per node through `srun`; it runs torchrun's own `run()`, so every torchrun
option works as usual (c10d rendezvous, --nnodes, --nproc-per-node, ...). The two changes:

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
import sys

from distgan.errors import EXIT_INTERRUPTED


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # before anything starts: see (1) above

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    task, tasks = os.environ.get("SLURM_PROCID", "0"), os.environ.get("SLURM_NTASKS", "1")
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    print(f"distgan-slurm: launcher {task} of {tasks} on {node}: {args.nproc_per_node} process(es), "
          f"rendezvous {args.rdzv_endpoint}", flush=True)  # fmt: skip
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
