"""Processes, devices and gradient synchronisation: the only package that knows about Accelerate, DeepSpeed and
torch.distributed.

    __init__.py   setup() -> Dist: the process group, the device, the few collectives the trainer needs
    nets.py       Net: one network as the phases drive it (the three rules); TorchNet: DDP or a plain module
    zero.py       ZeroNet: one network as a DeepSpeed ZeRO-1/2 engine (imported only for dist.strategy=zeroN)

The launcher is an input. `torchrun`, `accelerate launch`, `srun` (through slurm/train.sh) and a plain `python`
all end up in `setup()`, which starts (or joins) the process group through Accelerate, checks that Accelerate
sees the world the launcher started, and returns a `Dist`: rank and world size as ints, the device, the
collectives, and `make_net()`, which turns a plain module and its optimizer into the strategy's `Net`. The rest
of distgan never imports accelerate, deepspeed or torch.distributed.

Two traps this module closes (measured, see ../shared/ENVIRONMENT.md in the team notes):
- On a machine without CUDA, Accelerate must be told to use the CPU, or every process of a multi-process launch
  believes it is rank 0 of 1 and trains alone without any error. `setup()` passes `cpu=True` there (gloo).
- If Accelerate's world size still disagrees with the launcher's WORLD_SIZE, that is an error, not a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distgan import launcher
from distgan.distributed.nets import TorchNet
from distgan.errors import LaunchError


@dataclass
class Dist:
    """What the trainer knows about the process group."""

    accelerator: Any
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher_name: str
    threads: int
    control: Any = None  # a gloo group for small CPU-side agreements (the default group itself on CPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------- models
    def make_net(self, name: str, module: nn.Module, optimizer, strategy: str, precision: str, micro_batch: int):
        """The trainer's handle on one network under `strategy` (resolved: ddp, zero1, zero2); see nets.py."""
        module = module.to(self.device)
        if strategy.startswith("zero"):
            from distgan.distributed.zero import ZeroNet  # imports deepspeed: only when asked for

            return ZeroNet(name, module, optimizer, int(strategy[4:]), precision, micro_batch, self.device)
        return TorchNet(name, module, optimizer, self._ddp(module))

    def _ddp(self, module: nn.Module) -> nn.Module:
        """With several processes, wrap in DDP (gradients all-reduced in backward)."""
        if self.world_size == 1:
            # `torchrun --nproc_per_node=1` makes Accelerate start a process group of one and wrap in DDP, whose
            # all-reduces with itself cost ~10% of a CPU step for nothing.
            return module
        with warnings.catch_warnings():
            # torch >= 2.14 renames DDP's broadcast_buffers (Accelerate still passes the old name); same meaning.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
            return self.accelerator.prepare_model(module)

    @staticmethod
    def no_sync(module: nn.Module):
        """Context in which a DDP module's backward does not all-reduce (a no-op for an unwrapped module)."""
        return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()

    # -------------------------------------------------------------- collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor).div_(self.world_size)

    def all_reduce_max_async(self, tensor: torch.Tensor):
        """Start a max over ranks of a CPU tensor on the control group; `.wait()` the returned work."""
        return torch.distributed.all_reduce(
            tensor, op=torch.distributed.ReduceOp.MAX, group=self.control, async_op=True
        )

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def local_main_first(self):
        """The first process of each node runs the block first (e.g. a download), the others after it."""
        with self.accelerator.local_main_process_first():
            yield

    def describe(self, precision: str, strategy: str = "ddp") -> str:
        backend = torch.distributed.get_backend() if self.world_size > 1 else "none"
        strategy = "single" if strategy == "ddp" and self.world_size == 1 else strategy
        return (
            f"launcher={self.launcher_name} backend={backend} world={self.world_size} device={self.device} "
            f"threads/rank={self.threads} precision={precision} strategy={strategy}"
        )

    def close(self) -> None:
        if torch.distributed.is_initialized():  # (a world of one has a group only when DeepSpeed needed one)
            torch.distributed.destroy_process_group()


def _join_elastic_attempt(use_cpu: bool, timeout_s: float) -> None:
    """Under torchrun, start the process group in a namespace of this restart attempt's own.

    torchrun keeps one store for the whole job, and after `--max-restarts` restarts the workers of the new attempt
    found the dead attempt's gloo addresses in it (measured with torch 2.14: 3-4 of 5 restarts failed to connect
    or hung). Prefixing every key with the attempt number gives each attempt a clean namespace. Accelerate then
    finds the group started and uses it. Other launchers are left to Accelerate.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return
    from torch.distributed import PrefixStore, TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    world, rank = launcher.world_size(), launcher.rank()
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    backend = "gloo" if use_cpu else "nccl"
    if not use_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(
        backend, store=PrefixStore(f"distgan/attempt_{attempt}", store), rank=rank, world_size=world, timeout=timeout
    )


def setup(precision: str = "fp32", threads: int = 0, deterministic: bool = False, timeout_s: float = 1800) -> Dist:
    """Start or join the process group for this launch and return the `Dist` handle."""
    world = launcher.world_size()
    launcher.check_precision(precision)
    use_cpu = not torch.cuda.is_available()
    if use_cpu:
        # Without this, `accelerate launch --multi_gpu` and torchrun on a CPU machine give N lone rank-0s.
        os.environ["ACCELERATE_USE_CPU"] = "true"

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if world > 1 and not torch.distributed.is_initialized():
        _join_elastic_attempt(use_cpu, timeout_s)

    # Under an `accelerate launch` DeepSpeed config Accelerate would make itself a DeepSpeed front end (one model
    # per prepare, its own config rules, transformers imported). distgan builds the two engines itself
    # (zero.py; the launcher's stage was already read into dist.strategy): Accelerate only starts the group.
    hidden = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_DEEPSPEED",) if k in os.environ}
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision="no",  # distgan runs autocast and one loss scaler per network itself (see precision.py)
        kwargs_handlers=[
            # Every parameter of G and D takes part in every backward of its phase: no search for unused ones.
            # No buffer broadcast before every forward: BatchNorm running stats do not enter training-mode
            # forwards, so Trainer averages them across ranks only when it snapshots (StyleGAN2-ADA also
            # runs DDP without it). Measured on 2 CPU ranks: 1.64x -> 1.80x over one rank, with
            # gradients kept in DDP's buckets (no copy).
            DistributedDataParallelKwargs(
                find_unused_parameters=False, broadcast_buffers=False, gradient_as_bucket_view=True
            ),
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s)),
        ],
    )
    os.environ.update(hidden)
    if accelerator.num_processes != world:
        raise LaunchError(
            f"the launcher started {world} processes but Accelerate sees {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}); each process would train alone. "
            "On CPU launch with `torchrun --nproc_per_node=N` or `accelerate launch --multi_gpu --num_processes N`"
        )

    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // launcher.local_world_size())
    torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif not use_cpu:
        torch.backends.cudnn.benchmark = True

    control = None
    if world > 1:
        # Stop-signal flags are CPU ints: on CPU the default (gloo) group carries them; next to NCCL a gloo group
        # does, so agreeing on them never waits for the GPU.
        control = None if torch.distributed.get_backend() == "gloo" else torch.distributed.new_group(backend="gloo")
    return Dist(
        control=control,
        accelerator=accelerator,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        local_rank=accelerator.local_process_index,
        device=accelerator.device,
        launcher_name=launcher.name(),
        threads=threads,
    )
