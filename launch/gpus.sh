# shellcheck shell=bash
# Sourced by launch/torchrun.sh and slurm/train.sh, and run by slurm/launch_node.py on every node: the GPUs this
# machine may use and the network interface gloo should use, found without importing torch (that would cost
# seconds before every launch). One copy of these rules for all three launchers.
#
# visible_gpus: CUDA_VISIBLE_DEVICES when it is set (empty, "NoDevFiles" (SLURM with no GPU allocated) or
# starting with -1 hides them all), else what nvidia-smi lists, else 0.
visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == -1* || "$CUDA_VISIBLE_DEVICES" == NoDevFiles ]]; then
            echo 0
        else
            local ids
            IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
            echo "${#ids[@]}"
        fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

# gpu_count SPEC: the number of GPUs in a SLURM GPU count as a job can be given it: "4", "a100:4", "gpu:a100:4",
# or a list of types, "a100:2,v100:1" (3). Fails (prints nothing) on anything else, so that the caller falls
# back to the next source instead of trusting a number it misread.
gpu_count() {
    local total=0 part n parts
    IFS=, read -ra parts <<<"$1"
    ((${#parts[@]} > 0)) || return 1
    for part in "${parts[@]}"; do
        n=${part##*:}
        [[ "$n" =~ ^[0-9]+$ ]] || return 1
        total=$((total + 10#$n))
    done
    echo "$total"
}

# node_gpus: the GPUs this job has on THIS node, then where the number came from, e.g. "2 SLURM_GPUS_ON_NODE=2".
# SLURM_GPUS_ON_NODE is per node (SLURM sets it in every task from what it allocated there), so nodes with
# different GPU counts each get their own; SLURM_GPUS_PER_NODE is the job's request (--gpus-per-node, the same
# on every node); outside SLURM, or with GPUs SLURM does not manage, what is visible.
node_gpus() {
    local n
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]] && n=$(gpu_count "$SLURM_GPUS_ON_NODE"); then
        echo "$n SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE"
    elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]] && n=$(gpu_count "$SLURM_GPUS_PER_NODE"); then
        echo "$n SLURM_GPUS_PER_NODE=$SLURM_GPUS_PER_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        echo "$(visible_gpus) CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        echo "$(visible_gpus) nvidia-smi"
    else
        echo "0 CUDA_VISIBLE_DEVICES unset, no nvidia-smi"
    fi
}

# gloo_ifname HOST [MACHINES]: the network interface this machine reaches the rendezvous host HOST through, for
# GLOO_SOCKET_IFNAME. Prints it and succeeds, or prints why it chose none and fails.
#
# Why: distgan's gloo side group (small host-side agreements next to NCCL) binds to whatever this machine's host
# name resolves to, which on clusters is often 127.0.1.1 (Debian's /etc/hosts) or a management network: a
# multi-node job then hangs or crawls. The interface that routes to the rendezvous host is one every machine of
# the job can reach. MACHINES: the number of machines in the job when known (SLURM), else empty.
#   - `ip route get ADDR` names the interface ("... dev eth0 ...").
#   - The rendezvous host is this machine (the head node): the route is `local ... dev lo`; what the other
#     machines reach is the interface holding that address (`ip -o addr show to ADDR`), not lo.
#   - A loopback address: right when everything runs on this machine (an address given as 127.x/::1/localhost,
#     or MACHINES=1); otherwise HOST is a name that resolves to loopback here only (127.0.1.1): no choice.
gloo_ifname() {
    local host=$1 machines=${2:-} addr route dev
    command -v ip >/dev/null 2>&1 || { echo "no \`ip\` command to find the route to $host"; return 1; }
    addr=$(getent ahostsv4 "$host" 2>/dev/null | awk 'NR == 1 {print $1}') || true
    [[ -n "$addr" ]] || addr=$(getent ahosts "$host" 2>/dev/null | awk 'NR == 1 {print $1}') || true
    [[ -n "$addr" ]] || { echo "cannot resolve the rendezvous host $host"; return 1; }
    route=$(ip route get "$addr" 2>/dev/null | head -n 1) || true
    [[ "$route" =~ \ dev\ ([^ ]+) ]] || { echo "\`ip route get $addr\` names no interface"; return 1; }
    dev=${BASH_REMATCH[1]}
    if [[ "$dev" == lo ]]; then
        if [[ "$addr" == 127.* || "$addr" == ::1 ]]; then
            if [[ "$host" == "$addr" || "$host" == localhost || "$machines" == 1 ]]; then
                echo lo
                return 0
            fi
            echo "the rendezvous host $host resolves to $addr (loopback) on this machine, which the other" \
                "machines cannot reach"
            return 1
        fi
        dev=$(ip -o addr show to "$addr" 2>/dev/null | awk 'NR == 1 {print $2}') || true
        dev=${dev%%@*}
        [[ -n "$dev" && "$dev" != lo ]] || { echo "no interface holds $addr, the rendezvous host's address"; return 1; }
    fi
    echo "$dev"
}
