"""A network as the training phases drive it: forwards named by intent, one backward-and-step per phase.

The trainer never touches a DDP wrapper or a DeepSpeed engine. It holds a `Net` for G and one for D and says
what each forward is for:

    D(x, c)          a forward in D's own phase: its loss is backpropagated into D's own step
    D.penalty(x, c)  a forward whose input gradient is taken (R1, WGAN-GP; G's path length), create_graph=True
    D.frozen(x, c)   a forward while the *other* network trains (D in G's phase): no gradient reaches D
    G.plain(z, c)    a forward without gradients (G's fakes for D when no graph is kept)
(`x` the input whose gradient the rules are about; `c` the class labels, or None, passed through.)
    D.backward(loss) accumulate the gradients of one micro-batch (reduced across ranks with the last one)
    D.step()         -> (gradient norm, skipped): the update, skipped on the device when a gradient is not finite

A step may take several micro-batches (train.batch_per_gpu smaller than a rank's share of the batch): each one's
forwards and backward run inside `with D.micro_batch(i):`, and the gradients are reduced across ranks only in the
last (DDP's no_sync before it; DeepSpeed counts its own accumulation boundary). Each network owns its loss scaler
(fp16: G's and D's gradients overflow at different times; see precision.py).

No host sync: the skip is decided on the device, from the gradient norm (fused Adam takes it as `found_inf` and
leaves parameters and moments untouched, as GradScaler does under fp16), and the norm and the skip flag come back
as device tensors, read by the host only at log intervals (the trainer). A GPU step therefore never waits for the
host (tests/unit/test_host_syncs.py counts scalar reads during a step).

Which module each of those goes through is the strategy's business (`TorchNet` here: DDP or a plain module;
`ZeroNet` in zero.py: a DeepSpeed engine). Three rules, learned the hard way with DeepSpeed (ZeRO-2 crashes,
ZeRO-1 silently trains wrong), are enforced here for every strategy, so breaking one is an error at the call
that breaks it, never a wrong result:

    1. the network that is not training is frozen (`requires_grad_(False)`) while the other one steps;
       `frozen()` refuses a network that still wants gradients;
    2. a gradient penalty runs its own forward through `penalty()`: a plain forward with an input that requires
       its gradient is refused;
    3. a frozen network is called through `frozen()` (its plain module), never through its wrapper or engine.

A violation raises `PhaseError` (a bug in the caller: exit code 1 with a traceback).

train.compile: `compile(mode)` compiles the own-phase, frozen and plain forwards (compiled.py says which and
why); penalty() stays eager, on the same parameters.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from distgan.errors import PhaseError


class Net:
    """Base: the guards (the three rules) and the parts every strategy shares."""

    strategy = "?"

    def __init__(self, name: str, module: nn.Module, optimizer: torch.optim.Optimizer, scaler=None, accum: int = 1):
        self.name = name
        self.module = module  # the plain nn.Module: EMA, samples, BatchNorm buffers, exports read it
        self.optimizer = optimizer  # the torch optimizer over the module's parameters (wrapped by ZeRO)
        self.params = list(module.parameters())
        # The loss scaler of this network (a pass-through GradScaler unless fp16).
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.params[0].device.type, enabled=False)
        self.accum = accum  # micro-batches per step
        self._last = True  # the current micro-batch is the last of its step: its backward reduces the gradients
        self._fast = None  # train.compile: the compiled plain module (frozen and plain forwards), else None

    def compile(self, mode: str) -> None:
        """Compile this network's forwards except penalty() (train.compile; see compiled.py)."""
        from distgan.distributed.compiled import compile_forward

        self._fast = compile_forward(self.module, mode)

    @contextlib.contextmanager
    def micro_batch(self, index: int):
        """Forwards and backward of micro-batch `index` (0 .. accum-1) of a step of this network."""
        self._last = index >= self.accum - 1
        try:
            with contextlib.nullcontext() if self._last else self._accumulating():
                yield
        finally:
            self._last = True

    def loss_scale(self) -> torch.Tensor | None:
        """The factor a penalty's autograd.grad must scale by, as a device tensor (None when not loss scaling);
        `scale()` of a one reads it without a host sync (GradScaler.get_scale() would sync)."""
        if not self.scaler.is_enabled():
            return None
        return self.scaler.scale(torch.ones((), device=self.params[0].device))

    # ------------------------------------------------------------------ forwards by intent
    def __call__(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if not self.params[0].requires_grad:
            raise PhaseError(
                f"{self.name} is frozen but was called for its own phase; a frozen network is called through "
                f"{self.name}.frozen() (rule 3)"
            )
        if x.requires_grad:
            raise PhaseError(
                f"{self.name} was called with an input that requires its gradient; gradient penalties run their "
                f"own forward through {self.name}.penalty() (rule 2)"
            )
        return self._train_forward(x, c)

    def penalty(self, x: torch.Tensor, c: torch.Tensor | None = None, **kwargs):
        """A forward whose input's gradient is taken (create_graph); `kwargs` go to the module (return_ws)."""
        if not x.requires_grad:
            raise PhaseError(f"{self.name}.penalty() needs an input that requires its gradient")
        if not self.params[0].requires_grad:
            raise PhaseError(f"{self.name} is frozen; its penalty belongs to its own phase")
        return self._penalty_forward(x, c, **kwargs)

    def frozen(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if any(p.requires_grad for p in self.params):
            raise PhaseError(
                f"{self.name} is called while the other network trains but is not frozen; freeze it with "
                f"{self.name}.set_trainable(False) first, or the other network's backward reaches it (rule 1)"
            )
        return self.plain(x, c)

    def plain(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """A forward for its output only (call it under torch.no_grad()): G's fakes for D's phase."""
        return (self.module if self._fast is None else self._fast)(x, c)

    def set_trainable(self, flag: bool) -> None:
        for p in self.params:
            p.requires_grad_(flag)

    # ------------------------------------------------------------------ what strategies provide
    def _train_forward(self, x, c):
        raise NotImplementedError

    def _penalty_forward(self, x, c, **kwargs):
        raise NotImplementedError

    def _accumulating(self):
        """Context of a micro-batch that is not the last: its backward does not reduce across ranks."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss (reduced across ranks with the last micro-batch)."""
        raise NotImplementedError

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimizer step, skipped when a gradient is not finite (identically on every rank: the gradients were
        reduced). Returns (the gradient norm over all ranks, 1.0 if the update was skipped else 0.0), both 0-dim
        device tensors; the gradients are cleared for the next step."""
        raise NotImplementedError

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (learning rate and betas live there)."""
        return self.optimizer.param_groups

    # ------------------------------------------------------------------ checkpoints (a part of the run's state)
    version = 1  # of state_dict()'s layout (distgan/training/state.py)

    def state_dict(self) -> dict:
        """What rank 0 saves of this network in state.pt (identical on every rank); strategies add to it."""
        return {"scaler": self.scaler.state_dict()}

    def files(self) -> dict[str, bytes]:
        """This rank's own checkpoint files for this network (a collective: every rank calls it)."""
        return {}

    def load_state_dict(self, state: dict, files=None) -> None:
        """Restore from a checkpoint: `state` is what state_dict() gave; `files` reads the checkpoint's other files
        (`files.read(name, safe_globals)`, hash-checked, weights_only with those classes allowed; `files.names`)."""
        if state.get("scaler"):  # empty when the run that saved it did not scale
            self.scaler.load_state_dict(state["scaler"])

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of this network's training state on this rank (checked for non-finite values)."""
        tensors = list(self.module.state_dict().values())
        tensors += [v for st in self.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        return tensors


class TorchNet(Net):
    """A plain module (one process) or a DDP-wrapped one: gradients all-reduced in backward, one loss scaler."""

    strategy = "ddp"

    def __init__(self, name, module, optimizer, wrapped: nn.Module, scaler=None, accum: int = 1):
        super().__init__(name, module, optimizer, scaler, accum)
        self.wrapped = wrapped  # DDP(module), or the module itself in a world of one
        self._fast_train = None  # train.compile: the compiled wrapper

    def compile(self, mode):
        from distgan.distributed.compiled import compile_forward

        super().compile(mode)
        # torch.compile(DDP(m)): DDP's own forward (its reducer, buffer broadcast) runs as always, the module
        # inside it compiled, split at DDP's buckets. In a world of one the wrapper is the module: one compile.
        self._fast_train = self._fast if self.wrapped is self.module else compile_forward(self.wrapped, mode)

    def _train_forward(self, x, c):
        return (self.wrapped if self._fast_train is None else self._fast_train)(x, c)

    def _penalty_forward(self, x, c, **kwargs):
        # Through DDP as well: only a forward through the wrapper arms its reducer for the coming backward.
        return self.wrapped(x, c, **kwargs)

    def _accumulating(self):
        # DDP decides at the forward whether the coming backward reduces: the forwards of the micro-batch must run
        # inside no_sync too, which is why micro_batch() is a context around forwards and backward.
        return self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") else contextlib.nullcontext()

    def backward(self, loss):
        # The mean over the step's micro-batches: the same gradient as one batch of all of them.
        self.scaler.scale(loss / self.accum if self.accum > 1 else loss).backward()

    def step(self):
        opt, scaler = self.optimizer, self.scaler
        scaler.unscale_(opt)  # (a no-op unless fp16)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        skipped = (~torch.isfinite(norm)).float()  # under fp16 the same as GradScaler's found_inf
        if scaler.is_enabled():  # fp16: the scaler skips exactly the non-finite steps itself and lowers its scale
            scaler.step(opt)  # (no host sync with a fused optimizer: it takes found_inf as a tensor)
            scaler.update()
        else:
            step_unless(opt, skipped)
        opt.zero_grad(set_to_none=True)
        return norm, skipped

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), **super().state_dict()}

    def load_state_dict(self, state, files=None) -> None:
        from distgan.errors import CheckpointError

        if "module" not in state:
            raise CheckpointError(
                f"the checkpoint holds {self.name} only as DeepSpeed's per-rank partitions (a ZeRO run of an older "
                "distgan); resume it under its ZeRO strategy on its number of processes"
            )
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        # Adam's moments in their parameter's memory layout: a ZeRO checkpoint's are contiguous, a channels_last
        # run's are not, and torch's fused Adam silently updates wrong when a moment's strides differ from its
        # parameter's (measured on CPU).
        for p in self.params:
            st = self.optimizer.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p).copy_(v)
        super().load_state_dict(state, files)


def make_adam(params, lr: float, betas: tuple[float, float], eps: float, device: torch.device):
    """Adam for one network: fused (one kernel for all tensors, and a skip decided on the device through
    `found_inf`) where this torch supports it on `device`, else foreach."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an old torch, or a device without a fused kernel
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


def step_unless(opt: torch.optim.Optimizer, skipped: torch.Tensor) -> None:
    """opt.step(), or nothing where `skipped` (a 0-dim device tensor) is 1: decided on the device by a fused
    optimizer (as GradScaler does with found_inf); other optimizers need the host to look (one sync)."""
    if getattr(opt, "_step_supports_amp_scaling", False):  # torch's fused optimizers
        opt.found_inf = skipped
        try:
            opt.step()
        finally:
            del opt.found_inf
    elif not bool(skipped):
        opt.step()
