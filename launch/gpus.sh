# shellcheck shell=bash
# Sourced by launch/torchrun.sh and slurm/train.sh: how many GPUs this process may use, counted without
# importing torch (that would cost seconds before every launch).
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
