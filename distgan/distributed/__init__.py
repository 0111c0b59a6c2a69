"""Processes, devices and gradient synchronisation: the only package that knows about Accelerate, DeepSpeed and
torch.distributed.

    __init__.py   setup() -> Dist: the process group, the device, the few collectives the trainer needs
    nets.py       Net: one network as the phases drive it (the three rules); TorchNet: DDP or a plain module
    zero.py       ZeroNet: one network as a DeepSpeed ZeRO-1/2 engine (imported only for dist.strategy=zeroN)
    compiled.py   train.compile: the compiled forwards (Net.compile) and the clock of compile time

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
import dataclasses
import datetime
import gc
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distgan import launcher
from distgan.distributed import strict
from distgan.distributed.nets import TorchNet
from distgan.errors import LaunchError
from distgan.precision import Precision


@dataclass
class Dist:
    """What the trainer knows about the process group, and the only way it talks to the other ranks.

    Two groups, two kinds of agreement:
    - the default group (NCCL on GPUs, gloo on a CPU) carries tensors of the training device: gradients (inside DDP
      and DeepSpeed), the path-length mean, the stats of a log interval, BatchNorm statistics. Its tensors must be
      on `group_device` (NCCL takes CUDA tensors only): `all_reduce_sum` and `all_reduce_mean` put them there.
    - the control group (gloo, on the host) carries small host-side agreements: stop flags, Python objects
      (checkpoint reports, data errors, metric features), barriers. Agreeing on them never waits for a GPU.
    Nothing outside this package calls torch.distributed (tests/unit/test_collectives.py checks the source), and
    `DISTGAN_EMULATE_NCCL=1` makes a CPU run refuse what NCCL would refuse (strict.py).
    """

    accelerator: Any
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher_name: str
    threads: int
    control: Any = None  # the gloo group for host-side agreements (None in a world of one)
    group_device: torch.device | None = None  # where default-group tensors live: `device` under NCCL, cpu under gloo
    local_world_size: int = 1
    # Decided once at start (setup): how G and D are spread (ddp, zero1, zero2) and the precision they run in.
    strategy: str = "ddp"
    precision: Precision | None = None
    # DDP even in a world of one (`bench gpu` measures DDP's own cost on one GPU; training never wants it).
    ddp_alone: bool = False

    def __post_init__(self):
        if self.device.type == "cpu":
            # Accelerate says cpu:0 under a multi-process CPU launch; tensors say cpu. One name for one device, or
            # every `.to(device)` copies (and replaces a module's buffers).
            self.device = torch.device("cpu")
        if self.group_device is None:
            self.group_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        if self.precision is None:
            self.precision = Precision("fp32", self.device)

    def configured(self, precision: str, strategy: str) -> Dist:
        """This process group, set up for another precision and strategy (several runs in one group: tests)."""
        from distgan.errors import ConfigError

        precision = resolve_precision(precision, self.device.type == "cpu")
        problem = bf16_problem(precision, self.device)
        if problem:
            raise ConfigError(problem)
        strategy = launcher.resolve_strategy(strategy, precision)
        return dataclasses.replace(self, precision=Precision(precision, self.device), strategy=strategy)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    # -------------------------------------------------------------- models
    def make_net(self, name: str, module: nn.Module, optimizer, micro_batch: int, accum: int = 1):
        """The trainer's handle on one network under this launch's strategy and precision (see nets.py), with its
        own loss scaler. micro_batch: images per forward on this rank; accum: micro-batches per step."""
        module = module.to(self.device)
        if self.strategy.startswith("zero"):
            from distgan.distributed.zero import ZeroNet  # imports deepspeed: only when asked for

            stage, mode = int(self.strategy[4:]), self.precision.mode
            return ZeroNet(name, module, optimizer, stage, mode, micro_batch, self.device, accum)
        scaler = self.precision.make_scaler()
        return TorchNet(name, module, optimizer, self._ddp(module), scaler=scaler, accum=accum)

    def _ddp(self, module: nn.Module) -> nn.Module:
        """With several processes, wrap in DDP (gradients all-reduced in backward)."""
        if self.world_size == 1:
            # `torchrun --nproc_per_node=1` makes Accelerate start a process group of one and wrap in DDP, whose
            # all-reduces with itself cost ~10% of a CPU step for nothing.
            if not self.ddp_alone:
                return module
            ensure_world_of_one(self.device)
            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        with warnings.catch_warnings():
            # torch >= 2.14 renames DDP's broadcast_buffers (Accelerate still passes the old name); same meaning.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
            return self.accelerator.prepare_model(module)

    @staticmethod
    def no_sync(module: nn.Module):
        """Context in which a DDP module's backward does not all-reduce (a no-op for an unwrapped module)."""
        return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()

    # -------------------------------------------------------------- the default group: device tensors
    def group_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the default group's device (itself when it is there already)."""
        return strict.mark_placed(tensor.to(self.group_device, non_blocking=True))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (through the group's device); returns the tensor."""
        if self.world_size > 1:
            buf = self.group_tensor(tensor)
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
            if buf is not tensor:
                tensor.copy_(buf)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor).div_(self.world_size)

    # -------------------------------------------------------------- the control group: host agreements
    def host_sum(self, value: float) -> float:
        """Sum of a host number over ranks (control group; blocking)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=self.control)
        return float(t[0])

    def all_reduce_max_async(self, tensor: torch.Tensor):
        """Start a max over ranks of a CPU tensor on the control group; `.wait()` the returned work."""
        return torch.distributed.all_reduce(
            tensor, op=torch.distributed.ReduceOp.MAX, group=self.control, async_op=True
        )

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src, group=self.control)
        return box[0]

    def barrier(self) -> None:
        """Every rank reaches this point (the control group: the host's, never the GPU's, progress)."""
        if self.world_size > 1:
            torch.distributed.barrier(group=self.control)

    @contextlib.contextmanager
    def local_main_first(self):
        """The first process of each node runs the block first, the node's others after it."""
        yield from self._in_turns([not self.is_local_main])

    @contextlib.contextmanager
    def download_first(self):
        """A block that may download into a folder several nodes share: rank 0 alone first, then the first process
        of every other node (which finds the files if the folder is shared, else fetches its own copy), then the
        rest. Once per job on a shared file system, never several processes into one folder at once."""
        yield from self._in_turns([not self.is_main, not self.is_local_main])

    def _in_turns(self, waits: list[bool]):
        # One barrier per entry of `waits`; this rank runs the block after the barriers up to its first False entry
        # (after all of them if there is none), and meets the remaining ones after it: every rank meets every
        # barrier once, also when its block raises (the others then run theirs and fail or succeed on their own).
        turn = next((i for i, wait in enumerate(waits) if not wait), len(waits))
        for _ in range(turn):
            self.barrier()
        try:
            yield
        finally:
            for _ in range(turn, len(waits)):
                self.barrier()

    def make_store(self, timeout_s: float):
        """A small key-value store hosted by rank 0 on a free port, for the watchdog (None in a world of one)."""
        if self.world_size == 1:
            return None
        from torch.distributed import TCPStore

        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        wait = datetime.timedelta(seconds=max(30.0, timeout_s))
        if self.is_main:
            store = TCPStore("0.0.0.0", 0, self.world_size, is_master=True, timeout=wait, wait_for_workers=False)
            self.broadcast_object(store.port)
            return store
        port = self.broadcast_object(None)
        return TCPStore(host, port, self.world_size, is_master=False, timeout=wait)

    def describe(self) -> str:
        backend = torch.distributed.get_backend() if self.world_size > 1 else "none"
        strategy = "single" if self.strategy == "ddp" and self.world_size == 1 else self.strategy
        return (
            f"launcher={self.launcher_name} backend={backend} world={self.world_size} device={self.device} "
            f"threads/rank={self.threads} precision={self.precision.mode} strategy={strategy}"
        )

    def close(self) -> None:
        """End every process group while the interpreter is fully alive.

        Left to interpreter exit, a gloo group's worker threads are torn down during finalisation; a thread that
        then needs the GIL (to free a tensor it held) is ended by Python mid-C++, which aborts the process
        ("terminate called without an active exception", exit -6, after a run that had finished and saved; seen
        once in ~480 CI tests). So: drop our reference to the control group, destroy the groups, and collect the
        cycles that may still hold them (DDP wrappers), here rather than at exit.
        """
        self.control = None
        if torch.distributed.is_initialized():  # (a world of one has a group only when DeepSpeed needed one)
            torch.distributed.destroy_process_group()
        gc.collect()


def _start_group(use_cpu: bool, timeout_s: float, local_rank: int) -> None:
    """Start the default process group ourselves (Accelerate then finds it started and uses it).

    Why not leave it to Accelerate: NCCL must be bound to this process's GPU when it starts (`device_id`), so that
    its communicator is created for the right device and no collective or barrier ever has to guess the GPU from
    the rank; Accelerate's `InitProcessGroupKwargs` cannot say that. And under torchrun each restart attempt gets
    a store namespace of its own: torchrun keeps one store for the whole job, and after `--max-restarts` restarts
    the workers of the new attempt found the dead attempt's gloo addresses in it (measured with torch 2.14: 3-4 of
    5 restarts failed to connect or hung). Prefixing every key with the attempt number gives each attempt a clean
    namespace.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    world, rank = launcher.world_size(), launcher.rank()
    backend, device_id = "gloo", None
    if not use_cpu:
        torch.cuda.set_device(local_rank)
        backend, device_id = "nccl", torch.device("cuda", local_rank)
    store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "TORCHELASTIC_RESTART_COUNT" in os.environ:
        from torch.distributed import PrefixStore, TCPStore

        agent = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout)
        store = PrefixStore(f"distgan/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent)
    kwargs = {"device_id": device_id} if device_id is not None else {}
    if store is not None:
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                             **kwargs)  # fmt: skip
    else:
        torch.distributed.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                             timeout=timeout, **kwargs)  # fmt: skip


def expected_gpus() -> int:
    """GPUs the launcher meant this node to have: DISTGAN_EXPECT_GPUS (set by launch/torchrun.sh and
    slurm/train.sh from their own count), else the entries of CUDA_VISIBLE_DEVICES when it names devices."""
    raw = os.environ.get("DISTGAN_EXPECT_GPUS", "").strip()
    if raw:
        try:
            return max(0, int(raw))
        except ValueError:
            raise LaunchError(f"DISTGAN_EXPECT_GPUS={raw!r} is not an integer") from None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip() or visible.strip().startswith("-1") or visible == "NoDevFiles":
        return 0
    return len([v for v in visible.split(",") if v.strip()])


def device_problem(expected: int, cuda_devices: int, local_processes: int) -> str | None:
    """Why this launch cannot use the GPUs it was given (None when it can): a launcher that counted GPUs while
    this process sees none would otherwise train on the CPU without a word, and two processes on one GPU are
    refused by NCCL only once they first talk."""
    if expected > 0 and cuda_devices == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (
            f"the launcher counted {expected} GPU(s) on this machine but this process sees none "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={visible!r}): a CPU-only torch, a driver or "
            "container problem; set CUDA_VISIBLE_DEVICES= to train on the CPU on purpose"
        )
    if cuda_devices > 0 and local_processes > cuda_devices:
        return (
            f"{local_processes} processes on this machine but {cuda_devices} GPU(s) visible: NCCL runs one process "
            f"per GPU; launch at most {cuda_devices} per machine, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train "
            "on the CPU"
        )
    return None


def bf16_problem(precision: str, device: torch.device) -> str | None:
    """train.precision=bf16 on a GPU without bfloat16 arithmetic (before Ampere): a config error before step 1
    rather than an emulated, many times slower bf16 or a kernel error mid-run."""
    if precision != "bf16" or device.type != "cuda":
        return None
    try:
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.4 has no including_emulation and reports native support only
        supported = torch.cuda.is_bf16_supported()
    if supported:
        return None
    name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    return (
        f"train.precision=bf16 but {name} (compute capability {major}.{minor}) has no bfloat16 arithmetic; "
        "use train.precision=fp16 (loss-scaled) or fp32"
    )


def resolve_precision(precision: str, use_cpu: bool) -> str:
    """`train.precision=auto` made concrete: what the launcher asked for (`accelerate launch --mixed_precision
    bf16|fp16`), else bf16 on a GPU with bfloat16 arithmetic (Ampere and later: no loss scaling, half the
    activation bytes), else fp32 (older GPUs, where fp16 needs loss scaling and is asked for by name; and CPUs,
    where bf16 autocast is slower than fp32 on most cores). Any other value is returned as it is."""
    if precision != "auto":
        return precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched in ("bf16", "fp16"):
        return launched
    if use_cpu:
        return "fp32"
    return "bf16" if bf16_problem("bf16", torch.device("cuda")) is None else "fp32"


def ensure_world_of_one(device: torch.device) -> None:
    """A process group of one in memory (NCCL on a GPU, gloo on a CPU) when none was started: DeepSpeed needs one
    even for a plain `python` start, and so does DDP in a world of one (`Dist.ddp_alone`)."""
    if torch.distributed.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed asserts a launcher's variables
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)


def setup(precision: str = "auto", threads: int = 0, deterministic: bool = False, timeout_s: float = 1800,
          strategy: str = "auto") -> Dist:  # fmt: skip
    """Start or join the process group for this launch and return the `Dist` handle, which carries the strategy
    (`auto` resolved from the launcher) and precision from then on."""
    world, local_world = launcher.world_size(), launcher.local_world_size()
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_cpu = cuda_devices == 0
    precision = resolve_precision(precision, use_cpu)
    launcher.check_precision(precision)
    strategy = launcher.resolve_strategy(strategy, precision)
    problem = device_problem(expected_gpus(), cuda_devices, local_world)
    if problem:
        raise LaunchError(problem)
    if use_cpu:
        # Without this, `accelerate launch --multi_gpu` and torchrun on a CPU machine give N lone rank-0s.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if strict.enabled():
        strict.install()

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if world > 1 and not torch.distributed.is_initialized():
        _start_group(use_cpu, timeout_s, local_rank)

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
    problem = bf16_problem(precision, accelerator.device)
    if problem:
        from distgan.errors import ConfigError

        raise ConfigError(problem)

    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // local_world)
    torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif not use_cpu:
        torch.backends.cudnn.benchmark = True
    if not use_cpu:
        # TF32 tensor cores for fp32 matmuls on GPUs that have them (Ampere and later; cuDNN's convolutions use
        # TF32 by default already): the fp32 parts of a bf16 run, and fp32 runs, at tensor-core speed, with
        # 10-bit mantissas in the products. No effect on GPUs without TF32, nor on the CPU (left untouched).
        torch.set_float32_matmul_precision("high")

    # Small host-side agreements (stop flags, objects, barriers) go through a gloo group of their own, on CPU too:
    # so the CPU tests run the code path of a GPU job, where the default group is NCCL and takes CUDA tensors only.
    control = torch.distributed.new_group(backend="gloo") if world > 1 else None
    return Dist(
        control=control,
        accelerator=accelerator,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        local_rank=accelerator.local_process_index,
        device=accelerator.device,
        launcher_name=launcher.name(),
        threads=threads,
        local_world_size=local_world,
        strategy=strategy,
        precision=Precision(precision, accelerator.device),
    )
