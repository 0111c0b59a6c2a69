"""Count the host's reads of tensor values: the places where a GPU step would wait for the GPU.

On a GPU every `.item()`, `bool(t)` or `float(t)` of a device tensor, and every `.tolist()`, `.numpy()` or `.cpu()`
of one, waits until all queued kernels have run; the GPU then idles until the host has read the value and issued
the next kernels. A distgan step reads nothing (the trainer reads its counters at log intervals only), and this
module is how that is checked, on a CPU as well as on a GPU:

    with HostReads() as reads:
        trainer.train_step(*inputs)
    reads.where  # ["scalar at trainer.py:312", ...] (empty: no read)

Scalar extractions all go through `aten._local_scalar_dense`, which a TorchDispatchMode sees on any device; the
whole-tensor reads dispatch nothing on a CPU, so the three Tensor methods are wrapped while the mode is active.
Used by tests/unit/test_host_syncs.py and `distgan gpu-check` (which also asks CUDA itself:
torch.cuda.set_sync_debug_mode).
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    WRAPPED = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.where: list[str] = []
        self.on = True  # set False around code whose reads are host-side by nature (the data pipeline)
        self._saved: dict = {}

    def _record(self, what: str) -> None:
        if self.on:
            frames = [f for f in traceback.extract_stack()[:-2] if "/distgan/" in f.filename]
            place = f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else "?"
            self.where.append(f"{what} at {place}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record("scalar")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in self.WRAPPED:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def wrapper(t, *args, _name=name, _original=original, **kwargs):
                self._record(_name)
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}
        return super().__exit__(*exc)
