#!/usr/bin/env bash
# Train distgan on a SLURM cluster: one node or many, the GPUs of each node, resumed across time limits.
#
#   sbatch slurm/train.sh CONFIG [KEY=VALUE ...] [--run-dir DIR]
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=64 --time=24:00:00 slurm/train.sh configs/default.yaml
#   sbatch --nodes=2 --gres=gpu:4 slurm/train.sh configs/default.yaml   # also fine where nodes have 4 and 2
#   NPROC_PER_NODE=2 sbatch slurm/train.sh configs/smoke.yaml        # 2 CPU processes (gloo) on a CPU node
#
# Time, partition, account, nodes and GPUs are ordinary sbatch options; the #SBATCH lines below are defaults
# that any command-line option overrides. docs/slurm.md has the whole story.
#
# What it does:
#   1. finds python (DISTGAN_PYTHON, else the active virtualenv, else this repository's .venv, else python3)
#   2. sizes the job from SLURM's environment: one launcher (torchrun, slurm/launch_node.py) per task, i.e. per
#      node, each starting NPROC_PER_NODE processes, else one per GPU of ITS node, else one (a CPU node). Each
#      node's launcher counts its own GPUs (this script passes --nproc-per-node=gpus): SLURM_GPUS_ON_NODE, else
#      SLURM_GPUS_PER_NODE ("4", "a100:4", "a100:2,v100:1"), else CUDA_VISIBLE_DEVICES, else nvidia-smi. This
#      shell runs on the first node only, so its own count (in its log line) is that node's.
#   3. starts the launchers with srun; they meet in a c10d rendezvous on the first node of the job. Each launcher
#      exports to its training processes:
#        DISTGAN_EXPECT_GPUS=<its node's GPU count> (0 on a CPU node): distgan refuses to start when it is above 0
#          and torch sees no GPU, or when more processes than GPUs run on a node, rather than train on the CPU
#          without a word (a broken driver, a wrong CUDA build). Export it yourself to override (0: no check).
#        GLOO_SOCKET_IFNAME=<the interface that routes to the rendezvous host>, unless you exported one: distgan's
#          gloo side group (small host-side agreements next to NCCL) otherwise binds to what the host name
#          resolves to, often 127.0.1.1 or a management network: a multi-node job hangs or crawls. Where none can
#          be trusted it stays unset with a warning: then export GLOO_SOCKET_IFNAME=<iface> yourself (sbatch
#          passes your environment to every node). NCCL picks its own interfaces; set NCCL_SOCKET_IFNAME (e.g.
#          ib0, or ^docker,lo to exclude) if it picks a wrong one.
#   4. on SIGUSR1 (`--signal=B:USR1@120`: 120 s before the time limit, or a preemption notice) it asks the
#      trainer to checkpoint at the next step boundary, and once every rank has committed that checkpoint
#      (the trainer exits 3) it requeues the job: the requeued job resumes from it in the same run dir, appends
#      to the same log and continues the same W&B run. A job that ends any other way is not requeued.
#
# Environment it reads: NPROC_PER_NODE, DISTGAN_PYTHON, MASTER_PORT (rendezvous port; default derived from the
# job id), DISTGAN_HOME (the repository, if SLURM cannot tell), DISTGAN_DRY_RUN=1 (print the launch and exit);
# and passes on: GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, DISTGAN_EXPECT_GPUS (see 3.).
#
#SBATCH --job-name=distgan
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --cpus-per-task=8
# (one task per node: the task is that node's launcher, which starts the node's training processes itself;
#  B:USR1 goes to this script only, which relays it; append: a requeued job keeps the job id, so the log too.
#  --cpus-per-task: the CPUs of that one task are all the node's processes get: every rank wants one, plus one
#  per data loader worker (data.workers). SLURM's default is 1, which can bind a node's launcher, all its ranks
#  and their workers to one CPU. 8 suits 1-2 GPUs per node and fits nearly every GPU node; give more for more
#  GPUs (e.g. --cpus-per-task=64 on an 8-GPU node). A node with fewer CPUs refuses the job: pass a smaller one.)

set -euo pipefail

log() { echo "distgan-slurm: $(date +%H:%M:%S) $*"; }
die() {  # a mistake in how the script was called: one line, exit code 2 (distgan's code for user errors)
    echo "distgan-slurm: error: $*" >&2
    exit 2
}

# ---------------------------------------------------------------- stop signals
# USR1 (our --signal, or `scancel --signal=USR1 --batch`) reaches this shell only. srun relays a USR1 to every
# process of the step; the trainer's ranks agree on it at the next step boundary, all commit one checkpoint and
# exit 3. A process that is still importing torch ignores it (launch_node.py), so the signal is repeated every
# few seconds until the launchers end. TERM means SLURM is ending the job (scancel, the time limit itself) and
# signals every process of the job itself; the trainer checkpoints if KillWait allows; no requeue.
# The traps are set before anything else: an untrapped USR1 would kill this shell.
stop=""
requeued=""
srun_pid=""
relayed_at=0
relay_stop() {  # (before srun has started there is nothing to tell yet; the loop below repeats it)
    relayed_at=$SECONDS
    if [[ -n $srun_pid ]]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi
}
# shellcheck disable=SC2317  # (called by the trap)
on_usr1() {
    [[ -n $stop ]] && return
    stop=USR1
    log "SIGUSR1 (time limit or preemption ahead): asking the trainer for a checkpoint at the next step"
    relay_stop
}
# shellcheck disable=SC2317
on_term() {
    [[ -n $requeued ]] && return  # `scontrol requeue` ends this job: expected
    [[ -n $stop ]] || stop=TERM   # a TERM after our USR1 (the time limit came first) still lets it requeue
    log "SIGTERM: SLURM is ending the job; the trainer checkpoints if it has time; the job will not be requeued"
    relay_stop
}
trap on_usr1 USR1
trap on_term TERM

# ---------------------------------------------------------------- arguments
usage="usage: sbatch [SBATCH OPTIONS] slurm/train.sh CONFIG [KEY=VALUE ...] [--run-dir DIR]"
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    [[ $# -ge 1 ]] && { echo "$usage"; exit 0; }
    die "no CONFIG given; $usage"
fi
config=$1
shift
[[ $config != -* ]] || die "the first argument must be the config file, got '$config'; $usage"
[[ -f $config ]] || die "config file '$config' not found (relative paths start at the submit directory, $PWD)"
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM job: submit it with sbatch (or run it inside salloc)"

# ---------------------------------------------------------------- where distgan and its python are
# sbatch runs a copy of this script from the node's spool folder, so $0 says nothing about the repository when
# it runs as a batch job; SLURM records the path that was submitted. (Run by hand, e.g. inside salloc, $0 does.)
submitted=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'Command=[^ ]*' | head -n 1 | cut -d= -f2- || true)
repo=""
for candidate in "${DISTGAN_HOME:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "$(dirname "$submitted")/.."; do
    if [[ -n $candidate && -f $candidate/slurm/launch_node.py ]]; then
        repo=$(cd "$candidate" && pwd)
        break
    fi
done
[[ -n $repo ]] || die "cannot find the distgan repository (submitted: '$submitted'); set DISTGAN_HOME to it"
if [[ -n ${DISTGAN_PYTHON:-} ]]; then
    python=$DISTGAN_PYTHON
elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    python=$VIRTUAL_ENV/bin/python
elif [[ -x $repo/.venv/bin/python ]]; then
    python=$repo/.venv/bin/python
else
    python=$(command -v python3 || true)
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's distgan, even where it is not installed
if [[ -z $python ]] || ! "$python" -c "import distgan" 2>/dev/null; then
    die "python '${python:-python3}' cannot import distgan; set DISTGAN_PYTHON to the python of its venv"
fi

# ---------------------------------------------------------------- sizes
# One launcher per task of the job. The default (--ntasks-per-node=1) makes that one per node; asking for more
# tasks per node runs several launchers on one node (the tests use it to play two nodes on one machine).
# The tasks of the allocation as it is now: SLURM_TASKS_PER_NODE ("2(x3),1": 2 on each of 3 nodes, 1 on a 4th)
# and SLURM_JOB_NUM_NODES describe it. SLURM_NTASKS does not: sbatch puts its own --ntasks into the job's
# environment at submission, and a requeued job whose size was changed while it waited (`scontrol update
# JobId=N NumTasks=1 TasksPerNode=1`, or NumNodes=) still has the old value there (SLURM 22.05, measured). The
# training resumes from its checkpoint on the new number of processes (docs/slurm.md, "Fewer tasks after a requeue").
tasks_per_node() {  # "2(x3),1" -> 7; fails on anything else
    local total=0 part
    local -a parts
    IFS=, read -ra parts <<<"$1"
    ((${#parts[@]} > 0)) || return 1
    for part in "${parts[@]}"; do
        if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            total=$((total + BASH_REMATCH[1] * BASH_REMATCH[2]))
        elif [[ $part =~ ^[0-9]+$ ]]; then
            total=$((total + part))
        else
            return 1
        fi
    done
    echo "$total"
}
nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if ! launchers=$(tasks_per_node "${SLURM_TASKS_PER_NODE:-}"); then
    launchers=${SLURM_NTASKS:-$nnodes}
fi
resized=""
if [[ -n ${SLURM_NTASKS:-} && $SLURM_NTASKS != "$launchers" ]]; then
    resized="; the job was submitted with $SLURM_NTASKS task(s) and now has $launchers (SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE)"
fi

# shellcheck source=launch/gpus.sh
source "$repo/launch/gpus.sh"
# This node's GPUs ("2 SLURM_GPUS_ON_NODE=2"). This shell runs on the job's first node only, so this count is
# that node's: it is logged and checked here, but every node's launcher counts its own (--nproc-per-node=gpus,
# replaced in launch_node.py), or a job with 4 GPUs on one node and 2 on another would start 4 on both.
read -r gpus gpus_from < <(node_gpus)
if [[ -n ${NPROC_PER_NODE:-} ]]; then
    nproc=$NPROC_PER_NODE
    nproc_arg=$nproc
    why="NPROC_PER_NODE"
else
    nproc_arg=gpus
    if ((gpus > 0)); then
        nproc=$gpus
        why="one per GPU, here $gpus_from; each node's launcher counts its own"
    else
        nproc=1  # a CPU node: one process uses all the task's cores (distgan sets torch's threads to them)
        why="no GPU here, one CPU process; each node's launcher counts its own; NPROC_PER_NODE=N for N"
    fi
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "processes per node must be a positive integer, got '$nproc' ($why)"
world=$((launchers * nproc))
[[ -n ${NPROC_PER_NODE:-} || $launchers == 1 ]] || world="$world if every node is like this one"
if ((gpus > 0 && launchers > nnodes)); then
    die "$launchers tasks on $nnodes node(s): each task is one node's launcher and takes every GPU of its node; " \
        "submit with --ntasks-per-node=1 (the default of this script)"
fi

# Head node: the rendezvous is hosted by the first node of the job, reached at the address slurmctld uses
# for it (NodeAddr; on most clusters the node name itself).
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head=${nodes[0]}
head_addr=$(scontrol show node -o "$head" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
head_addr=${head_addr:-$head}
# A port of its own per job, the same in a requeued job (same id); 20000-29999 stays below Linux's ephemeral
# ports, which outgoing connections take.
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

# srun of SLURM 22.05 reads the CPUs per task from SRUN_CPUS_PER_TASK, not from the job's --cpus-per-task (its
# release notes); without it a launcher and all its processes may be bound to one CPU on a cluster with task
# binding.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
cpus=${SLURM_CPUS_PER_TASK:-}
cpus_from="--cpus-per-task"
if [[ -z $cpus ]]; then  # no --cpus-per-task at all (a site's submit filter may drop it): what the node gave us
    cpus=${SLURM_CPUS_ON_NODE:-1}
    cpus_from="SLURM_CPUS_ON_NODE"
fi

# --kill-on-bad-exit=0: a node whose ranks exit 3 first must not get the others killed while they finish;
# --wait: but once one launcher has ended, the others get 2 minutes, not the 30 a collective would wait for a
# dead peer (or train.hang_timeout_s).
launch=(
    srun --ntasks="$launchers" --kill-on-bad-exit=0 --wait=120
    "$python" -u "$repo/slurm/launch_node.py"
    --nnodes="$launchers" --nproc-per-node="$nproc_arg" --max-restarts=0
    --rdzv-backend=c10d --rdzv-endpoint="$head_addr:$port" --rdzv-id="distgan-$SLURM_JOB_ID"
    -m distgan.train --config "$config" "$@"
)
attempt=${SLURM_RESTART_COUNT:-0}
log "job $SLURM_JOB_ID attempt $attempt on ${nodes[*]}: $launchers launcher(s) x $nproc process(es) per node" \
    "($why), world $world, rendezvous $head_addr:$port$resized"
log "python $python; working directory $PWD; $cpus CPU(s) per task ($cpus_from)"
if ((cpus < nproc)); then
    # Only the ranks are counted (data.workers is in the config, not cheap to read here): a floor, not a target.
    log "warning: $cpus CPU(s) per task for $nproc process(es) per node: the ranks (and their data loader" \
        "workers) share them; submit with --cpus-per-task=N, N at least processes x (1 + data.workers)"
fi
log "running: ${launch[*]}"
if [[ -n ${DISTGAN_DRY_RUN:-} ]]; then
    log "DISTGAN_DRY_RUN is set: not started"
    exit 0
fi

# ---------------------------------------------------------------- train
"${launch[@]}" &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do
    sleep 1 &
    wait $! || true  # a trapped signal ends the wait early; the loop goes on
    if [[ -n $stop ]] && ((SECONDS - relayed_at >= 5)); then
        relay_stop
    fi
done
rc=0
wait "$srun_pid" || rc=$?

# ---------------------------------------------------------------- what next
if ((rc == 0)); then
    log "training finished (exit code 0)"
elif [[ $stop == USR1 && $rc == 3 ]]; then
    log "checkpoint committed after SIGUSR1: requeueing job $SLURM_JOB_ID (it resumes from that checkpoint)"
    requeued=1
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        log "scontrol requeue failed: resubmit the same command to resume"
    fi
elif ((rc == 3)); then
    log "stopped by a signal with a checkpoint (exit code 3); not requeued: resubmit the same command to resume"
elif [[ $stop == USR1 ]]; then
    log "SIGUSR1 came, but the launchers exited with code $rc, not 3 (no checkpoint confirmed): not requeued"
elif [[ $stop == TERM ]]; then
    log "ended by SIGTERM (exit code $rc): not requeued; the same command resumes from the last checkpoint"
else
    log "training failed (exit code $rc): not requeued"
fi
exit "$rc"
