"""train.compile: the main phases' forwards through torch.compile, and a clock for what compiling costs.

Which forwards are compiled (nets.py calls `compile_forward` for each):

    G(z, c), D(x, c)   a network's forward in its own phase (D_main's D, G_main's G, D_main's G when its
                       fakes are reused): through the DDP wrapper (torch.compile(DDP(m)), where TorchDynamo
                       splits the graph at DDP's buckets so reduction still overlaps backward) or, under ZeRO,
                       through DeepSpeed's own engine forward with the compiled module inside it
    D.frozen, G.plain  D in G's phase (no gradient for D's weights), G's fakes without a graph

Not compiled: penalty() forwards (R1, R2, WGAN-GP, path length). They take a gradient of a gradient
(create_graph=True), which compiled autograd does not support; they run the eager modules, which share the
parameters (and DDP's reducer) with the compiled ones, so there is one set of weights and one optimizer.

Modes: "default" is torch.compile's default; "max-autotune" is inductor's max-autotune *without* CUDA graphs
(torch's "max-autotune-no-cudagraphs"). CUDA graphs replay into the same output buffers, and distgan keeps a
forward's output past the next call of that forward (D_main's fakes wait for G_main; the path-length phase
calls G again in between), which CUDA graphs would overwrite.

The clock: TorchDynamo announces every compilation (a new graph, a recompilation, a backward compiled on its
first use) through its callback handler; `CLOCK` adds up their count and wall time for this process. The loop
logs them (`Compile/seconds`, `Compile/recompiles`) and takes the seconds out of img/s: img/s is the speed of
training, not of the compiler. A compilation after the first step is a recompilation (every phase runs at step
0, so the first step compiled each forward once); on a steady run that count stays 0.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}


class CompileClock:
    """Compilations of this process and the wall time they took (TorchDynamo's start/end callbacks)."""

    def __init__(self) -> None:
        self.count = 0  # compilations finished (graphs, recompilations, lazily compiled backwards)
        self.seconds = 0.0
        self._started: float | None = None
        self._lock = threading.Lock()
        self._installed = False

    def install(self) -> None:
        """Start counting (once per process; torch.compile's callbacks stay registered)."""
        with self._lock:
            if self._installed:
                return
            from torch._dynamo.callback import callback_handler

            callback_handler.register_start_callback(self._start)
            callback_handler.register_end_callback(self._end)
            self._installed = True

    def _start(self, _args) -> None:
        self._started = time.perf_counter()

    def _end(self, _args) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None
        self.count += 1

    def read(self) -> tuple[int, float]:
        """(compilations, seconds) so far."""
        return self.count, self.seconds


CLOCK = CompileClock()


def compile_forward(target: torch.nn.Module, mode: str):
    """`target` (a module, a DDP wrapper) compiled in train.compile's `mode` ("default" | "max-autotune")."""
    CLOCK.install()
    # Random draws inside compiled graphs (StyleGAN2's noise inputs and style mixing) through torch's own
    # generator, as in eager mode: inductor otherwise draws them from seeds of its own (the same distribution,
    # other numbers), and a compiled run would not be the eager run up to rounding, nor resume to the same draws.
    # A handful of small randn/rand calls per forward; their fusion is not worth that.
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    if not torch.cuda.is_available():  # inductor's C++ build looks for CUDA and warns on every CPU-only machine
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(target, mode=MODES[mode])
