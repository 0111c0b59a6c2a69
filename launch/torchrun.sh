#!/usr/bin/env bash
# torchrun for distgan: picks the processes per machine, handles one machine or several, then runs
# `torchrun ... -m distgan.train "$@"`. Arguments are distgan's (--config, --run-dir, key=value overrides).
#
#   launch/torchrun.sh --config configs/default.yaml                 # this machine: one process per GPU,
#                                                                    #   or CPU_PROCS (2) without GPUs
#   NPROC_PER_NODE=4 launch/torchrun.sh --config configs/default.yaml
#
#   # Several machines, the same command on each (c10d rendezvous: node ranks are assigned as they join,
#   # and MAX_RESTARTS restarts work):
#   NNODES=2 MASTER_ADDR=10.0.0.1 launch/torchrun.sh --config configs/default.yaml
#   # ... or with fixed node ranks (static rendezvous, like accelerate's machine_rank):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh --config ...    # on 10.0.0.1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh --config ...    # on the other machine
#
#   # Elastic: between 1 and 2 machines. When a machine is lost, the others' processes fail, torchrun forms a
#   # smaller group and restarts them, and they resume from the last checkpoint on the new number of processes
#   # (train.batch, the global batch, must divide by it; docs/launching.md, "Elastic"). Start it on the
#   # MASTER_ADDR machine first: that machine hosts the rendezvous and must stay.
#   NNODES=1:2 MASTER_ADDR=10.0.0.1 launch/torchrun.sh --config configs/default.yaml      # on each machine
#
# Environment (everything is optional on one machine):
#   NPROC_PER_NODE  processes on this machine (default: the GPUs visible, else CPU_PROCS)
#   CPU_PROCS       processes without GPUs (default 2: the multi-process path, each process with half the cores)
#   NNODES          machines in the job (default 1), or MIN:MAX for an elastic job (c10d rendezvous; it goes on
#                   with as few as MIN machines)
#   NODE_RANK       this machine's rank, 0..NNODES-1: static rendezvous; unset: c10d rendezvous (not with MIN:MAX)
#   MASTER_ADDR     the rendezvous host, reachable from every machine (required when NNODES > 1 or MIN:MAX)
#   MASTER_PORT     its TCP port (default 29500 when NNODES > 1; on one machine a free port unless set)
#   RDZV_ID         the job's id, the same on its machines (c10d; default: SLURM_JOB_ID, else "distgan")
#   RDZV_CONF       torchrun's --rdzv_conf for the c10d rendezvous, e.g. "last_call_timeout=10": how long a
#                   rendezvous that has MIN machines waits for more (default 30 s), keep_alive_interval x
#                   keep_alive_max_attempt (5 s x 3): how soon a lost machine is dropped; is_host=true|false
#   MAX_RESTARTS    restarts of all processes after a failure (default 0; 3 with NNODES=MIN:MAX: every lost
#                   machine costs one); each resumes from the last checkpoint
#   TORCHRUN        the torchrun command (default: torchrun on PATH, else python3 -m torch.distributed.run)
#   TORCHRUN_ARGS   more torchrun options, e.g. "--log_dir logs"
#
# Exported to the training processes (shown at the start of the command line this prints):
#   DISTGAN_EXPECT_GPUS  the GPUs visible here (0 when none). distgan refuses to start when it is above 0 and torch
#                   sees no GPU, or when more processes than GPUs run here, instead of training on the CPU
#                   without a word. One you export is kept (0: no check).
#   GLOO_SOCKET_IFNAME   with NNODES > 1 and unless you exported one: the interface that routes to MASTER_ADDR
#                   (`ip route get`; on the MASTER_ADDR machine itself, the interface holding that address).
#                   distgan's gloo side group (small host-side agreements next to NCCL) otherwise binds to what
#                   this machine's name resolves to, often 127.0.1.1 or a management network: a multi-machine
#                   run hangs or crawls. When no interface can be trusted (MASTER_ADDR is a name that resolves to
#                   loopback here, or the lookup fails) it stays unset and a warning says why: export it yourself.
#   NCCL picks its own interfaces; export NCCL_SOCKET_IFNAME (e.g. ib0, or ^docker,lo) if it picks a wrong one.
set -euo pipefail

# shellcheck source=launch/gpus.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"

fail() {
    echo "launch/torchrun.sh: error: $*" >&2
    exit 2
}

nnodes=${NNODES:-1}
elastic=""
if [[ "$nnodes" =~ ^([1-9][0-9]*):([1-9][0-9]*)$ ]]; then
    # Elastic: torchrun's --nnodes=MIN:MAX. Only the c10d rendezvous can re-form a group of another size.
    ((BASH_REMATCH[1] <= BASH_REMATCH[2])) || fail "NNODES=$nnodes: MIN is above MAX"
    [[ -z "${NODE_RANK:-}" ]] || fail "NNODES=$nnodes (elastic) takes no NODE_RANK: the c10d rendezvous numbers the machines"
    elastic=1
elif ! [[ "$nnodes" =~ ^[1-9][0-9]*$ ]]; then
    fail "NNODES=$nnodes is not a positive integer nor MIN:MAX"
fi

gpus=$(visible_gpus)
if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    nproc=$NPROC_PER_NODE
else
    nproc=$gpus
    [[ "$nproc" -gt 0 ]] || nproc=${CPU_PROCS:-2}
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || fail "NPROC_PER_NODE=$nproc is not a positive integer"
export DISTGAN_EXPECT_GPUS=${DISTGAN_EXPECT_GPUS:-$gpus}
exported=(DISTGAN_EXPECT_GPUS="$DISTGAN_EXPECT_GPUS")

restarts=${MAX_RESTARTS:-${elastic:+3}}
restarts=${restarts:-0}
[[ "$restarts" =~ ^[0-9]+$ ]] || fail "MAX_RESTARTS=$restarts is not a number"
args=(--nproc_per_node="$nproc" --max_restarts="$restarts")
if [[ -z "$elastic" && "$nnodes" -eq 1 ]]; then
    if [[ -n "${MASTER_PORT:-}" ]]; then
        args+=(--master_addr=127.0.0.1 --master_port="$MASTER_PORT")
    else
        args+=(--standalone) # a free port on this machine: two jobs here do not collide on 29500
    fi
else
    [[ -n "${MASTER_ADDR:-}" ]] || fail "NNODES=$nnodes needs MASTER_ADDR (the rendezvous host every machine reaches)"
    port=${MASTER_PORT:-29500}
    args+=(--nnodes="$nnodes")
    if [[ -n "${NODE_RANK:-}" ]]; then
        [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$nnodes" ]] || fail "NODE_RANK=$NODE_RANK is not in 0..$((nnodes - 1))"
        args+=(--node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$port")
    else
        args+=(--rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$port" --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-distgan}}")
        [[ -z "${RDZV_CONF:-}" ]] || args+=(--rdzv_conf="$RDZV_CONF")
    fi
    if [[ -z "${GLOO_SOCKET_IFNAME:-}" ]]; then
        if ifname=$(gloo_ifname "$MASTER_ADDR"); then
            export GLOO_SOCKET_IFNAME=$ifname
        else
            echo "launch/torchrun.sh: warning: GLOO_SOCKET_IFNAME left unset: $ifname; gloo binds to what this" \
                "machine's name resolves to. Export GLOO_SOCKET_IFNAME=<interface> (one the other machines reach)" >&2
        fi
    fi
fi

[[ -z "${GLOO_SOCKET_IFNAME:-}" ]] || exported+=(GLOO_SOCKET_IFNAME="$GLOO_SOCKET_IFNAME")

if [[ -n "${TORCHRUN:-}" ]]; then
    read -ra launcher <<<"$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then
    launcher=(torchrun)
else
    launcher=(python3 -m torch.distributed.run)
fi
read -ra extra <<<"${TORCHRUN_ARGS:-}"

cmd=("${launcher[@]}" "${args[@]}" "${extra[@]}" -m distgan.train "$@")
echo "launch/torchrun.sh: ${exported[*]} ${cmd[*]}" >&2
exec "${cmd[@]}"
