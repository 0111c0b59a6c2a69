"""The run's stateful parts, registered once; a checkpoint saves and loads exactly this registry.

    state = StateRegistry()
    state.register("G_ema", ema)                                  # anything with state_dict()/load_state_dict()
    state.register("guard", guard, version=1)
    state.register("stream", stream, scope="rank")                # saved by every rank in its own file
    state.register("augment", pipe, missing=lambda: None)         # a part older checkpoints lack: how it starts

    shared, per_rank = state.state_dict("shared"), state.state_dict("rank")   # {"format", "versions", <part>: ...}
    state.load_state_dict(shared, per_rank, files)                            # every part, or one clear error

Why a registry (EDM2's CheckpointIO): the list of what a checkpoint holds is written once, next to the parts
themselves, instead of a save method and a load method that must be kept in step by hand; adding a part (an
augmentation controller, a schedule) is one `register` call. Each part carries a version of its own layout. A
part that a checkpoint lacks either declares how it starts (`missing`: older checkpoints, a part added since) or
is a `CheckpointError` naming it: never a silent reset. A part saved with a newer layout than this distgan reads
is refused the same way. Loading order is registration order (the networks come before what refers to them).

A part's `load_state_dict(state, files)` may take the checkpoint's other files (a `Files`: `names` and
`read(name, safe_globals)`; DeepSpeed's partitions are read that way); parts whose method takes one argument get
the state only. `files()` of a part (optional) adds this rank's own files to the checkpoint (a collective).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distgan.errors import CheckpointError

FORMAT = 3  # of state.pt / rank-*.pt: {"format", "versions", <part>: its state, ...}; 2 was one flat dict (upgraded)
RESERVED = ("format", "versions", "strategy", "world_size", "rank", "config", "config_digest", "tracker_run_id")


@dataclass
class _Part:
    obj: Any
    version: int
    scope: str
    missing: Callable[[], None] | None


class Files:
    """The files of the checkpoint being loaded: `names`, and `read(name, safe_globals=())` of a verified file."""

    def __init__(self, names: list[str], read: Callable[..., Any]):
        self.names, self.read = names, read


class StateRegistry:
    def __init__(self):
        self._parts: dict[str, _Part] = {}

    def register(self, name: str, obj: Any, version: int = 1, scope: str = "shared", missing=None) -> None:
        """Add a part. scope: "shared" (the same on every rank: rank 0 saves it in state.pt) or "rank" (each rank's
        own: its rank file). missing: called instead of loading when a checkpoint lacks the part (None: an error)."""
        if name in self._parts or name in RESERVED:
            raise ValueError(f"state part {name!r} is registered twice or is a reserved name")
        if scope not in ("shared", "rank"):
            raise ValueError(f"scope must be shared or rank, not {scope!r}")
        self._parts[name] = _Part(obj, version, scope, missing)

    def names(self, scope: str) -> list[str]:
        return [n for n, p in self._parts.items() if p.scope == scope]

    def state_dict(self, scope: str) -> dict:
        parts = {n: p for n, p in self._parts.items() if p.scope == scope}
        return {
            "format": FORMAT,
            "versions": {n: p.version for n, p in parts.items()},
            **{n: p.obj.state_dict() for n, p in parts.items()},
        }

    def files(self) -> dict[str, bytes]:
        """This rank's extra checkpoint files from every part that has them (a collective: every rank calls it)."""
        out: dict[str, bytes] = {}
        for part in self._parts.values():
            if hasattr(part.obj, "files"):
                out.update(part.obj.files())
        return out

    def load_state_dict(self, shared: dict, rank: dict | None, files: Files | None = None, only=None) -> None:
        """Restore every part (or those named in `only`) from a checkpoint's state.pt (`shared`) and this rank's
        file (`rank`; None: the rank parts are left as they are)."""
        for name, part in self._parts.items():
            if only is not None and name not in only:
                continue
            source = shared if part.scope == "shared" else rank
            if source is None:
                continue
            if name not in source:
                if part.missing is None:
                    raise CheckpointError(
                        f"the checkpoint has no '{name}' state (it was written by a distgan without it) and this "
                        f"run cannot start it fresh; resume with the distgan that wrote it"
                    )
                part.missing()
                continue
            saved = source["versions"].get(name, 1)
            if saved > part.version:
                raise CheckpointError(
                    f"the checkpoint's '{name}' state has layout version {saved}, this distgan reads up to "
                    f"{part.version}; resume with a newer distgan"
                )
            load = part.obj.load_state_dict
            if len(inspect.signature(load).parameters) >= 2:
                load(source[name], files)
            else:
                load(source[name])


class Values:
    """A part made of plain attributes of an object: `Values(trainer, "cur_nimg", "step_idx")`."""

    def __init__(self, obj: Any, *attrs: str, defaults: dict | None = None):
        self.obj, self.attrs, self.defaults = obj, attrs, defaults or {}

    def state_dict(self) -> dict:
        return {a: getattr(self.obj, a) for a in self.attrs}

    def load_state_dict(self, state: dict) -> None:
        for a in self.attrs:
            if a in state:
                setattr(self.obj, a, state[a])
            elif a in self.defaults:  # a value added to the part after the checkpoint was written
                setattr(self.obj, a, self.defaults[a])
            else:
                raise CheckpointError(f"the checkpoint's state lacks {a!r}")


def upgrade_v2(shared: dict, rank: dict | None) -> tuple[dict, dict | None]:
    """state.pt and a rank file in distgan's format 2 (one flat dict), in today's layout."""

    def v3(parts: dict) -> dict:
        return {"format": FORMAT, "versions": dict.fromkeys(parts, 1), **parts}

    zero = str(shared.get("strategy", "ddp")).startswith("zero")
    nets = {}
    for name in ("G", "D"):
        net = {"scaler": shared.get(f"scaler_{name}", {})}
        if not zero:
            net.update(module=shared[name], optimizer=shared[f"opt_{name}"])
        nets[name] = net
    parts = {
        **nets,
        "G_ema": shared["G_ema"],
        "progress": {
            "cur_nimg": shared["cur_nimg"],
            "step_idx": shared["step"],
            "nimg_discarded": shared.get("nimg_discarded", 0),
        },  # fmt: skip
        "step": {"pl_mean": shared["pl_mean"]},
        "guard": {"skips_total": shared["skips_total"], "rollbacks": shared["rollbacks"]},
        "data_health": {"data_totals": shared["data_totals"]},
    }
    meta = {k: shared[k] for k in RESERVED if k in shared and k not in ("format", "versions", "rank")}
    out_rank = None
    if rank is not None:
        out_rank = {**v3({"rng": rank["rng"], "stream": rank["stream"]}), "rank": rank["rank"],
                    "world_size": rank["world_size"]}  # fmt: skip
    return {**v3(parts), **meta}, out_rank
