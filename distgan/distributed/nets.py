"""A network as the training phases drive it: forwards named by intent, one backward-and-step per phase.

The trainer never touches a DDP wrapper or a DeepSpeed engine. It holds a `Net` for G and one for D and says
what each forward is for:

    D(x)             a forward in D's own phase: its loss is backpropagated into D's own step
    D.penalty(x)     a forward whose input gradient is taken (R1, WGAN-GP; G's path length), create_graph=True
    D.frozen(x)      a forward while the *other* network trains (D in G's phase): no gradient reaches D
    D.step(loss, scaler) -> gradient norm (non-finite: the update was skipped, identically on every rank)

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
"""

from __future__ import annotations

import torch
from torch import nn

from distgan.errors import PhaseError


class Net:
    """Base: the guards (the three rules) and the parts every strategy shares."""

    strategy = "?"

    def __init__(self, name: str, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.name = name
        self.module = module  # the plain nn.Module: EMA, samples, BatchNorm buffers, exports read it
        self.optimizer = optimizer  # the torch optimizer over the module's parameters (wrapped by ZeRO)
        self.params = list(module.parameters())

    # ------------------------------------------------------------------ forwards by intent
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
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
        return self._train_forward(x)

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            raise PhaseError(f"{self.name}.penalty() needs an input that requires its gradient")
        if not self.params[0].requires_grad:
            raise PhaseError(f"{self.name} is frozen; its penalty belongs to its own phase")
        return self._penalty_forward(x)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        if any(p.requires_grad for p in self.params):
            raise PhaseError(
                f"{self.name} is called while the other network trains but is not frozen; freeze it with "
                f"{self.name}.set_trainable(False) first, or the other network's backward reaches it (rule 1)"
            )
        return self.module(x)

    def set_trainable(self, flag: bool) -> None:
        for p in self.params:
            p.requires_grad_(flag)

    # ------------------------------------------------------------------ what strategies provide
    def _train_forward(self, x):
        raise NotImplementedError

    def _penalty_forward(self, x):
        raise NotImplementedError

    def step(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> torch.Tensor:
        """Backward (gradients synced across ranks), then the optimizer step unless a gradient is not finite.
        Returns the gradient norm over all ranks; non-finite exactly when the update was skipped."""
        raise NotImplementedError

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (learning rate and betas live there)."""
        return self.optimizer.param_groups

    def shared_state(self) -> dict:
        """What rank 0 saves of this network in state.pt (identical on every rank)."""
        return {}

    def rank_files(self) -> dict[str, bytes]:
        """This rank's own checkpoint files for this network (a collective: every rank calls it)."""
        return {}

    def load(self, shared: dict, read, names: list[str]) -> None:
        """Restore from a checkpoint: `shared` is its state.pt; `read(name, safe_globals)` loads one of its files
        (hash-checked, weights_only with those classes allowed); `names` lists its files."""
        raise NotImplementedError

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of this network's training state on this rank (checked for non-finite values)."""
        tensors = list(self.module.state_dict().values())
        tensors += [v for st in self.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        return tensors


class TorchNet(Net):
    """A plain module (one process) or a DDP-wrapped one: gradients all-reduced in backward, one loss scaler."""

    strategy = "ddp"

    def __init__(self, name, module, optimizer, wrapped: nn.Module):
        super().__init__(name, module, optimizer)
        self.wrapped = wrapped  # DDP(module), or the module itself in a world of one

    def _train_forward(self, x):
        return self.wrapped(x)

    def _penalty_forward(self, x):
        # Through DDP as well: only a forward through the wrapper arms its reducer for the coming backward.
        return self.wrapped(x)

    def step(self, loss, scaler):
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if scaler.is_enabled():  # fp16: the scaler skips exactly the non-finite steps itself and lowers its scale
            scaler.step(opt)
            scaler.update()
        elif torch.isfinite(norm):  # identical on every rank: the gradients were all-reduced
            opt.step()
        return norm

    def shared_state(self) -> dict:
        return {self.name: self.module.state_dict(), f"opt_{self.name}": self.optimizer.state_dict()}

    def load(self, shared, read, names) -> None:
        self.module.load_state_dict(shared[self.name])
        self.optimizer.load_state_dict(shared[f"opt_{self.name}"])
