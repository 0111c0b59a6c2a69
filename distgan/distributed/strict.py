"""NCCL's rules, enforced on a CPU: the check that keeps GPU-only collective bugs out of CI.

NCCL accepts CUDA tensors only (`Backend.backend_capability['nccl'] == ['cuda']`), while gloo, which every CPU test
runs on, takes CPU tensors. So a collective on a host tensor through the default group passes every CPU test and
crashes the first multi-GPU run ("No backend type associated with device type cpu"); an object collective or a
barrier on the default NCCL group guesses its GPU from the rank and can hang. None of that can happen for real
without a GPU, so this module emulates the rule instead: with `DISTGAN_EMULATE_NCCL=1`, `distributed.setup()`
installs a guard around torch.distributed's collectives that refuses, for calls made by distgan's own code on the
default group,

  * a tensor that `Dist` did not place on the group's device (`Dist.group_tensor`, which is `.to(group_device)`
    for real): on a CPU every tensor is a CPU tensor, so "placed by Dist" is what can be told apart, and it is
    exactly the rule: every collective goes through the distributed context, which puts its tensors where the
    group's backend needs them;
  * an object collective (all_gather_object, broadcast_object_list, ...): those belong on the gloo control group;
  * a barrier that does not name its device (NCCL would guess it).

Calls from inside torch (DDP's reducer), DeepSpeed and Accelerate are not checked: those libraries place their own
tensors. The guard raises `NcclRuleError`, naming the call and the fix. Tests turn it on for 2-rank runs of the
code paths a GPU job takes (checkpoint save, stop, rollback, stats, metrics, the scaling bench).
"""

from __future__ import annotations

import functools
import os
import sys
import weakref

import torch

ENV = "DISTGAN_EMULATE_NCCL"

_TENSOR_COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single",
)  # fmt: skip
_OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")

_placed: dict[int, weakref.ref] = {}  # id -> tensor Dist put on the group's device (by identity, not value)
_installed = False


class NcclRuleError(RuntimeError):
    """distgan code broke a rule NCCL enforces (see the module docstring)."""


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def mark_placed(tensor: torch.Tensor) -> torch.Tensor:
    """Record that Dist placed `tensor` on the default group's device (only under emulation)."""
    if _installed:
        key = id(tensor)
        _placed[key] = weakref.ref(tensor, lambda _, key=key: _placed.pop(key, None))
    return tensor


def _is_placed(tensor: torch.Tensor) -> bool:
    ref = _placed.get(id(tensor))
    return ref is not None and ref() is tensor


def install() -> None:
    """Wrap torch.distributed's collectives with the checks above (once per process)."""
    global _installed
    if _installed:
        return
    import torch.distributed as td

    for name in _TENSOR_COLLECTIVES + _OBJECT_COLLECTIVES + ("barrier",):
        original = getattr(td, name, None)
        if original is not None:
            setattr(td, name, _guarded(name, original))
    _installed = True


def _caller_is_distgan() -> bool:
    """Whether the nearest frame outside torch.distributed and this module belongs to distgan."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module.startswith("torch.distributed") or module == __name__):
            return module.startswith("distgan")
        frame = frame.f_back
    return False


def _is_default(group) -> bool:
    import torch.distributed as td

    return group is None or group is td.GroupMember.WORLD


def _guarded(name, original):
    @functools.wraps(original)
    def call(*args, **kwargs):
        group = kwargs.get("group")
        if group is None and name != "barrier":
            group = _positional_group(name, args)
        if _is_default(group) and _caller_is_distgan():
            _check(name, args, kwargs)
        return original(*args, **kwargs)

    return call


def _positional_group(name: str, args) -> object:
    # torch.distributed's signatures put `group` third for these (tensor, op/src/dst, group); the calls distgan
    # makes pass it by keyword, so this is only a fallback.
    positions = {"all_reduce": 2, "broadcast": 2, "reduce": 3, "all_gather": 2, "all_gather_into_tensor": 2}
    i = positions.get(name)
    return args[i] if i is not None and len(args) > i else None


def _check(name: str, args, kwargs) -> None:
    if name in _OBJECT_COLLECTIVES:
        raise NcclRuleError(
            f"torch.distributed.{name} on the default group: under NCCL it pickles through a CUDA tensor on a "
            "guessed device; object collectives go through Dist's gloo control group"
        )
    if name == "barrier":
        if not kwargs.get("device_ids"):
            raise NcclRuleError(
                "torch.distributed.barrier() on the default group without device_ids: NCCL would guess the GPU from "
                "the rank; use Dist.barrier() (the control group) or name the device"
            )
        return
    for t in _tensors(list(args) + list(kwargs.values())):
        if not _is_placed(t):
            raise NcclRuleError(
                f"torch.distributed.{name} on the default group got a tensor that Dist did not place on the "
                f"group's device ({t.device}, shape {list(t.shape)}); NCCL refuses host tensors: 'No backend type "
                "associated with device type cpu'. Go through Dist's collectives (Dist.group_tensor)"
            )


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)
