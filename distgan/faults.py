"""Fault injection: the reliability tests make real faults happen at exact places in a real run.

    DISTGAN_FAULTS="kill:rank=1:step=6:attempt=0"          SIGKILL rank 1 when it reaches step 6 (first attempt)
    DISTGAN_FAULTS="ckpt.mid_file:rank=0:nth=2"             SIGKILL rank 0 half-way through its 2nd checkpoint file
    DISTGAN_FAULTS="nan_loss:rank=1:step=3-"                rank 1's losses are NaN from step 3 on
    DISTGAN_FAULTS="usr1:rank=0:step=50"                    rank 0 sends itself SIGUSR1 at step 50 (a stop, on cue)
    DISTGAN_FAULTS="hang:rank=1:step=4;enospc:nth=2"        several faults: separated by ';'

A fault is a name and conditions; it fires when every condition holds. Conditions: `rank`, `step` (a number, or
`A-` for A and after, or `A-B`), `net` (G or D), `attempt` (torchrun's restart count, TORCHELASTIC_RESTART_COUNT),
and `nth` (the n-th time this process reaches the point). Points in the code call `fires(name, **where)`, or
`kill_if(name, **where)` for a SIGKILL there. Unset (the normal case) each point costs one dict lookup.
The points: kill, hang, usr1, nan_loss (trainer.py); ckpt.before_files, ckpt.mid_file, ckpt.after_files,
ckpt.after_manifest, ckpt.before_rename, ckpt.after_rename, ckpt.during_purge, enospc (checkpoint.py);
report.slow (train.py: rank 0 reports a user error 3 s late).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_ENV = "DISTGAN_FAULTS"
_parsed: tuple[str, list[tuple[str, dict[str, str]]]] | None = None
_counts: Counter = Counter()


def _faults() -> list[tuple[str, dict[str, str]]]:
    global _parsed
    raw = os.environ.get(_ENV, "")
    if _parsed is None or _parsed[0] != raw:
        faults = []
        for item in filter(None, (s.strip() for s in raw.split(";"))):
            name, *conds = item.split(":")
            faults.append((name, dict(c.split("=", 1) for c in conds)))
        _parsed = (raw, faults)
    return _parsed[1]


def _match(cond: str, value) -> bool:
    value = str(value)
    if "-" in cond and cond.replace("-", "").isdigit() and value.lstrip("-").isdigit():
        lo, _, hi = cond.partition("-")
        return int(lo) <= int(value) and (not hi or int(value) <= int(hi))
    return cond == value


def fires(name: str, **where) -> bool:
    """True when a configured fault `name` matches here (`where`: rank, step, net; attempt is read itself)."""
    faults = _faults()
    if not faults:
        return False
    _counts[name] += 1
    where = {"attempt": os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), "nth": _counts[name], **where}
    where.setdefault("rank", os.environ.get("RANK", "0"))
    for fault, conds in faults:
        if fault == name and all(k in where and _match(v, where[k]) for k, v in conds.items()):
            return True
    return False


def kill_if(name: str, **where) -> None:
    """SIGKILL this process here when the fault is configured: no handler, no cleanup, like the OOM killer."""
    if fires(name, **where):
        os.kill(os.getpid(), signal.SIGKILL)
