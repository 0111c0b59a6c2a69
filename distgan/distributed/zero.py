"""G and D as two DeepSpeed ZeRO engines (dist.strategy=zero1|zero2): one `deepspeed.initialize` per network.

Why two engines: an engine owns one optimizer and counts one step per `step()`; G and D step alternately with
different learning rates, loss scalers and regularisation intervals, exactly like two DDP modules with their own
Adam. Each engine is built from the trainer's plain module and its torch Adam (ZeRO wraps that optimizer and
partitions its state over the ranks: zero1 the Adam moments and fp32 master weights, zero2 also the gradients,
which are reduce-scattered instead of all-reduced). DeepSpeed's own fused Adam is not used: the torch Adam needs
no compiled op and keeps the numbers of the DDP strategy.

Precision: fp32, or bf16 through DeepSpeed's `torch_autocast` section. The parameters stay fp32 (the EMA, the
penalties' double backward and BatchNorm's fp32 buffers need them) and forwards run under autocast, exactly as
with DDP; gradients are reduced in fp32, as DDP all-reduces them. Measured on 2 CPU ranks in deterministic mode:
zero1 and zero2 give bit-identical parameters to DDP after 6 steps, in fp32 and in bf16, with R1, WGAN-GP and
path-length penalties (tests/distributed/test_deepspeed.py). DeepSpeed's other bf16 mode (bf16 parameters)
breaks BatchNorm, whose buffers stay fp32; letting it reduce conv/linear gradients in bf16 (its
`lower_precision_safe_modules`) halves the bytes but moved parameters by ~lr per step against DDP. fp16 is
refused for ZeRO (distgan/launcher.py) rather than run through a loss scaler nobody here could test on a GPU.

Non-finite gradients: ZeRO 1/2 compute the gradient norm over all ranks at `step()` and skip the update on every
rank when it is not finite (fp32 parameters: always checked), so the trainer's "poison a non-finite loss into
one weight" trick (trainer.py) skips a step here exactly as under DDP.

Checkpoints go through DeepSpeed's own `save_checkpoint` / `load_checkpoint` (it decides what a ZeRO state is:
the module, every rank's optimizer partition, its step counters), with distgan doing the I/O: a checkpoint engine
of ours receives each state dict DeepSpeed would `torch.save`, serialises it into memory, and hands the bytes to
distgan's atomic, hash-manifested commit (checkpoint.py) as files named `ds-G-<DeepSpeed's file name>`. Loading
gives DeepSpeed placeholders to find and answers its reads from the verified checkpoint with
`torch.load(weights_only=True)`, allowing only the three DeepSpeed classes its files hold (a loss-scaler
record, the ZeRO stage enum, a fragment address); DeepSpeed's own engine would unpickle anything.

Elastic resume. DeepSpeed's files are one optimizer partition per rank: they resume only on as many ranks, under
ZeRO. So a ZeRO checkpoint also holds each network whole, in the layout a DDP checkpoint has (TorchNet's
state_dict: "module", and "optimizer", a torch Adam state_dict over the module's parameters in the order the
trainer's Adam lists them: step, exp_avg, exp_avg_sq), gathered at save time through DeepSpeed's own API for it
(`deepspeed.utils.safe_get_full_fp32_param` / `safe_get_full_optimizer_state`: a sum over the ranks of each
rank's fragment and zeros, exact) and written by rank 0 into state.pt. Loading:
- DeepSpeed files from as many ranks as this run has: DeepSpeed's own load_checkpoint (bit-exact resume);
- anything else (another world size, or a DDP checkpoint): the whole module, and the fp32 master weights and
  Adam's moments and step set on every rank's partition through `safe_set_full_fp32_param` /
  `safe_set_full_optimizer_state`: the same values, re-partitioned;
- under DDP (nets.py) the whole copy loads like a DDP checkpoint.
A checkpoint of a distgan from before this copy resumes only as it was saved (trainer.py says so in one line).
"""

from __future__ import annotations

import enum
import io
import logging
import os
import pickle
import shutil
import sys
import tempfile
import types

import torch

from distgan.distributed import ensure_world_of_one
from distgan.distributed.nets import Net

if "DS_ACCELERATOR" not in os.environ:  # read once, when deepspeed is imported
    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"

import deepspeed  # noqa: E402
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine  # noqa: E402

# The classes DeepSpeed's ZeRO 1/2 checkpoint files hold besides tensors and plain containers (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on zero1/zero2, fp32/bf16 files of DeepSpeed 0.19).
from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils import (  # noqa: E402
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


class _EnumByValue(pickle.Pickler):
    """Pickles an Enum member as `Class(value)`. Python's own reduction of an enum changed between 3.11 releases
    (some pickle it as `getattr(Class, name)`), and `torch.load(weights_only=True)` refuses `getattr`: a ZeRO
    checkpoint written by Debian 12's Python 3.11.2 could not be resumed. `Class(value)` of an allowed class is
    what weights_only accepts, on every Python."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return type(obj), (obj.value,)
        return NotImplemented


_ValuePickle = types.SimpleNamespace(Pickler=_EnumByValue, __name__="pickle")

TAG = "ds"  # DeepSpeed's checkpoint "tag" (a sub-folder name in its own layout); ours is the checkpoint folder

logging.getLogger("DeepSpeed").setLevel(logging.ERROR)  # its INFO lines per engine; skips are our own stats

if os.environ["DS_ACCELERATOR"] == "cpu":
    # DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce when it starts (65-85 s on
    # first use, and a C++ compiler on the machine); only its inference all-reduce uses it, which distgan never
    # calls (training collectives go through torch.distributed's gloo). Skipping the build changes no number.
    # (sys.modules: the package's `torch` attribute is the torch library, re-exported by `from .comm import *`)
    _ds_comm = sys.modules.get("deepspeed.comm.torch")
    if _ds_comm is not None and hasattr(_ds_comm, "build_shm_op"):
        _ds_comm.build_shm_op = lambda: None


# Elements per gradient bucket: DDP's default 25 MB of fp32, so both strategies overlap reduction with backward
# alike. (DeepSpeed's default, 5e8 elements, allocates a 2 GB bucket even for a DCGAN; under deterministic mode
# torch also fills it with NaNs at every step: 9 s per step on a CPU.)
BUCKET_ELEMENTS = 25 * 2**20 // 4


# Keys of the DeepSpeed config that may differ between a CPU and a GPU run: none. The CPU tests that show ZeRO
# equal to DDP bit for bit must run exactly the config a GPU job runs (tests/unit/test_strategy.py compares them).
DEVICE_KEYS: frozenset[str] = frozenset()


def ds_config(stage: int, precision: str, micro_batch: int, numel: int, accum: int = 1, device_type: str = "cpu"):
    """The DeepSpeed config of one engine (`numel`: its parameter count) on a device of `device_type`."""
    # DeepSpeed wants the all-gather bucket a multiple of its alignment (2 elements for 16-bit, 4 for 8-bit):
    # rounded up to 8, one bucket still holds a whole network of an odd parameter count (BigGAN's).
    bucket = -(-max(1, min(numel, BUCKET_ELEMENTS)) // 8) * 8
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer calls torch.cuda.synchronize() around every forward and step by default: a
        # host sync in every phase (distgan measures its own img/s at log intervals).
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "zero_optimization": {
            "stage": stage,
            "contiguous_gradients": True,
            # No overlap of the reduction with the backward: that path runs only on CUDA streams, so the CPU tests
            # that check ZeRO against DDP would never run it (and upstream reports wrong gradients with it); with
            # the bucket capped at the network's size there is one bucket, and nothing to overlap anyway.
            "overlap_comm": False,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "checkpoint": {"tag_validation": "FAIL"},  # every rank must save under the same tag
    }
    if precision == "bf16":
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],  # no layer's gradients reduced in bf16 (see above)
        }
    return config


class _InMemory(CheckpointEngine):
    """DeepSpeed's checkpoint I/O, redirected: saves become bytes for distgan's commit, loads read verified files."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.saved: dict[str, bytes] = {}
        self.read = None  # during a load: name -> the object in that file of the checkpoint being loaded

    def name_for(self, path: str) -> str:
        return self.prefix + os.path.basename(path)

    def create(self, info) -> None:
        pass

    def makedirs(self, path, exist_ok=False) -> None:
        os.makedirs(path, exist_ok=True)  # a scratch folder: DeepSpeed copies its zero_to_fp32 scripts there

    def save(self, state_dict, path: str) -> None:
        buf = io.BytesIO()
        torch.save(state_dict, buf, pickle_module=_ValuePickle)
        self.saved[self.name_for(path)] = buf.getvalue()

    def load(self, path: str, map_location=None):
        return self.read(self.name_for(path))

    def commit(self, info) -> bool:
        return True


class ZeroNet(Net):
    """One network as a DeepSpeed engine with ZeRO stage 1 or 2."""

    def __init__(self, name, module, optimizer, stage: int, precision: str, micro_batch: int, device, accum: int = 1):
        super().__init__(name, module, optimizer, accum=accum)
        self.strategy = f"zero{stage}"
        ensure_world_of_one(device)
        numel = sum(p.numel() for p in self.params)
        config = ds_config(stage, precision, micro_batch, numel=numel, accum=accum, device_type=device.type)
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        assert engine.module is module  # the trainer's EMA, samples and BatchNorm averaging read this module
        self.engine = engine
        self._io = _InMemory(prefix=f"ds-{name}-")
        engine.checkpoint_engine = self._io
        self._whole = None  # rank 0: the whole network gathered by files(), until state_dict() takes it

    def _train_forward(self, x, c):
        if self._fast is None:
            return self.engine(x, c)
        # DeepSpeed's own forward (its optimizer's per-forward bookkeeping, the hooks that start its backward)
        # with the compiled module in the module's place for this one call. (DeepSpeed's engine.compile() would
        # compile the module itself, in place: penalty() would then run compiled too, which it cannot.)
        modules = self.engine._modules
        modules["module"] = self._fast
        try:
            return self.engine(x, c)
        finally:
            modules["module"] = self.module

    def _penalty_forward(self, x, c, **kwargs):
        # Rule 2: a forward whose input gradient is taken (create_graph) goes through the plain module; the
        # engine's backward still reduces the gradients, through the hooks ZeRO put on the parameters.
        return self.module(x, c, **kwargs)

    def backward(self, loss):
        # DeepSpeed divides the loss by its gradient_accumulation_steps itself, and counts micro-steps: every
        # micro-batch but the last is followed by an engine step that only advances that count.
        self.engine.backward(loss)
        if not self._last:
            self.engine.step()

    def step(self):
        engine = self.engine
        skipped_before = engine.skipped_steps
        engine.step()  # reduces (zero2: reduce-scatters) the gradients, skips when their norm is not finite
        # DeepSpeed decided the skip on the host already (its overflow check reads the norm): no extra sync here.
        device = self.params[0].device
        skipped = torch.tensor(float(engine.skipped_steps != skipped_before), device=device)
        norm = engine.get_global_grad_norm()
        if not isinstance(norm, torch.Tensor):
            norm = torch.tensor(float("inf") if norm is None else float(norm), device=device)
        return norm.detach().float().reshape(()), skipped

    def files(self) -> dict[str, bytes]:
        # Two collectives: the whole copy for state.pt (kept until state_dict() on rank 0), DeepSpeed's files.
        self._whole = self.whole(keep=torch.distributed.get_rank() == 0)
        scratch = tempfile.mkdtemp(prefix="distgan-ds-")
        try:
            self._io.saved = {}
            self.engine.save_checkpoint(scratch, tag=TAG, client_state={}, save_latest=False)
            return dict(self._io.saved)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def state_dict(self) -> dict:
        """The whole network ("module", "optimizer": what TorchNet saves) gathered by files(), and the scaler."""
        whole, self._whole = self._whole, None
        return {**(whole or {}), **super().state_dict()}

    def load_state_dict(self, state, files=None) -> None:
        """Restore through DeepSpeed's load_checkpoint when the checkpoint holds DeepSpeed's files of as many ranks
        as this run has, else from the whole copy (another world size, or a DDP checkpoint). A collective."""
        from distgan.errors import CheckpointError

        super().load_state_dict(state, files)
        names = files.names if files is not None else []
        mine = [n[len(self._io.prefix) :] for n in names if n.startswith(self._io.prefix)]
        ranks = sum(n.startswith("zero_pp_rank_") for n in mine)
        if mine and ranks == self.engine.dp_world_size:
            self._load_deepspeed(files.read, mine)
        elif "module" in state:
            self._load_whole(state)
        elif mine:
            raise CheckpointError(
                f"the checkpoint holds {self.name}'s optimizer state only as DeepSpeed's partitions of {ranks} "
                f"ranks; resume it with {ranks} processes (this launch has {self.engine.dp_world_size})"
            )
        else:
            raise CheckpointError(f"the checkpoint holds no DeepSpeed state of {self.name}")

    def _load_deepspeed(self, read, mine: list[str]) -> None:
        from distgan.errors import CheckpointError

        scratch = tempfile.mkdtemp(prefix="distgan-ds-")
        try:
            # DeepSpeed globs and stats its files before reading them: empty stand-ins, answered by `read`.
            os.makedirs(os.path.join(scratch, TAG))
            for n in mine:
                open(os.path.join(scratch, TAG, n), "wb").close()
            self._io.read = lambda name: read(name, SAFE_GLOBALS)
            path, _ = self.engine.load_checkpoint(
                scratch, tag=TAG, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        finally:
            self._io.read = None
            shutil.rmtree(scratch, ignore_errors=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no state of {self.name} in the checkpoint")

    # ------------------------------------------------------------------ the whole network, world-size independent
    def _groups(self) -> list[tuple[torch.Tensor, list]]:
        """Per parameter group: (ZeRO's flat fp32 partition on this rank, the module parameters in the group)."""
        zero = self.engine.optimizer
        return list(zip(zero.single_partition_of_fp32_groups, zero.bit16_groups))

    def _link_moments(self) -> None:
        """Point each parameter's fragment at Adam's current state tensors. DeepSpeed links them only after its first
        step: its own load_checkpoint re-creates the fragments without them (safe_*_optimizer_state then fails),
        and a load_state_dict of the torch Adam replaces the tensors they point at."""
        for flat, params in self._groups():
            if self.optimizer.state.get(flat):
                lazy_init_hp_params_optimizer_state(params, flat, self.optimizer.state)

    def _order(self) -> list[torch.nn.Parameter]:
        """The module's parameters in the order the trainer's Adam lists them (a torch optimizer's state indices)."""
        order = [p for _, params in self._groups() for p in params]
        if [id(p) for p in order] != [id(p) for p in self.params]:
            raise RuntimeError(f"DeepSpeed's parameter groups of {self.name} are not the module's parameters")
        return order

    @torch.no_grad()
    def whole(self, keep: bool = True) -> dict | None:
        """This network's module and Adam state, whole, in TorchNet's layout, on the CPU. A collective: every rank
        calls it; a rank that does not `keep` it (not rank 0, at a save) holds one tensor of it at a time."""
        self._link_moments()
        opt = self.optimizer

        def gather(tensor):  # (each parameter's tensor: summed over the ranks, each its fragment and zeros)
            return tensor.cpu() if keep else None

        state: dict[int, dict] = {}
        groups, start = [], 0
        for group, (flat, params) in zip(opt.param_groups, self._groups()):
            indices = list(range(start, start + len(params)))
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
            start += len(params)
            flat_state = opt.state.get(flat)
            if not flat_state:  # before the first step: Adam creates its state then
                continue
            keys = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flat.shape]
            for i, p in zip(indices, params):
                moments = {k: gather(safe_get_full_optimizer_state(p, k)) for k in keys}
                state[i] = {"step": flat_state["step"].detach().cpu().clone(), **moments}
        module = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()} if keep else {}
        for name, p in self.module.named_parameters():  # ZeRO's fp32 master weights
            module[name] = gather(safe_get_full_fp32_param(p))
        return {"module": module, "optimizer": {"state": state, "param_groups": groups}} if keep else None

    @torch.no_grad()
    def _load_whole(self, state: dict) -> None:
        """Set the module, the fp32 master weights and Adam's step and moments from a whole copy (a DDP checkpoint,
        or a ZeRO checkpoint's state.pt), each rank its own partition of them."""
        from distgan.errors import CheckpointError

        self.module.load_state_dict(state["module"])  # (its parameters are views into DeepSpeed's flat buffer)
        for p in self.params:
            safe_set_full_fp32_param(p, p.detach())
        saved, order, opt = state["optimizer"]["state"], self._order(), self.optimizer
        if not saved:  # saved before the first step
            for flat, _ in self._groups():
                opt.state.pop(flat, None)
            return
        steps = {float(s["step"]) for s in saved.values()}
        if len(steps) != 1 or len(saved) != len(order):
            raise CheckpointError(
                f"the checkpoint's Adam state of {self.name} covers {len(saved)} of {len(order)} parameters, at "
                f"steps {sorted(steps)}; ZeRO steps all parameters of a network together: resume it under DDP"
            )
        step = steps.pop()
        keys = [k for k, v in saved[0].items() if torch.is_tensor(v) and v.dim() > 0]
        # Adam's state of each flat partition, zeros until set below, placed by torch's own load_state_dict (a
        # fused Adam keeps its step on the parameter's device).
        opt.load_state_dict({
            "state": {i: {"step": torch.tensor(step), **{k: torch.zeros_like(flat) for k in keys}}
                      for i, (flat, _) in enumerate(self._groups())},
            "param_groups": opt.state_dict()["param_groups"],
        })  # fmt: skip
        self._link_moments()
        for i, p in enumerate(order):
            for k in keys:
                safe_set_full_optimizer_state(p, saved[i][k].to(p.device, torch.float32), k)

    def state_tensors(self) -> list[torch.Tensor]:
        # The optimizer's parameters are ZeRO's fp32 partitions (master weights) of this rank.
        return super().state_tensors() + [p for g in self.optimizer.param_groups for p in g["params"]]
