"""train.compile on the CPU (TorchDynamo + inductor's C++ kernels, what a user's CPU run compiles): for every
family, two training steps compiled train what two eager steps train, up to rounding; a third step compiles
nothing (no recompilation in a steady run); the penalties (R1, R2, path length: every family's TINY recipe has
some) run eager beside the compiled forwards, on the same parameters.

Compiling is slow on 2 cores (cold: DCGAN 25 s, BigGAN 50 s, StyleGAN2 110 s, R3GAN 160 s of inductor writing and
gcc compiling C++ kernels), so the four families compile side by side, each in a fresh process of its own that
also runs the eager reference and the control, and they start in the background when the session begins
(tests/conftest.py calls `start_in_background`), niced: the rest of the suite leaves a core idle often enough.
"""

import os
import threading

import pytest
import torch

from conftest import patience
from support import TINY, outputs_after_two_steps, side_by_side

pytestmark = pytest.mark.slow

FAMILY_NAMES = sorted(TINY)

# Inductor fuses and reorders float sums; Adam's first steps can turn a rounding difference in a near-zero gradient
# into a step of ~lr for that weight (see test_families.LAYOUT_TOL). Measured in deterministic mode after two
# steps, as a share of the largest value: DCGAN 4e-6, StyleGAN2 8e-7, BigGAN 1.7e-3 (its images), R3GAN 2e-7.
# COMPILE_TOL is that share, with room; the control (another seed) is far outside it.
COMPILE_TOL = 0.01


def _eager_and_compiled(rank, world, family):
    from distgan.distributed.compiled import CLOCK

    os.nice(10)  # a background guest of the suite
    det = ("train.deterministic=true",)
    eager = outputs_after_two_steps(family, *det)[1:]
    other = outputs_after_two_steps(family, *det, "train.seed=1")[1]
    before = CLOCK.read()[0]
    tr, images, logits = outputs_after_two_steps(family, *det, "train.compile=default")
    compiled = CLOCK.read()[0]
    tr.train_step(*tr.draw())  # every phase ran at step 0; step 2 is a steady step
    return {"eager": eager, "compiled": (images, logits), "other": other, "compilations": compiled - before,
            "recompilations": CLOCK.read()[0] - compiled}  # fmt: skip


_RUN: dict = {}
BACKGROUND_FOR = ("test_compiled_steps_train_what_eager_steps_train_in_every_family",)  # (conftest.py)


def start_in_background() -> None:
    """Start the four families' runs (once); the test collects them."""
    if "thread" in _RUN:
        return

    def run():
        try:
            _RUN["results"] = side_by_side(_eager_and_compiled, FAMILY_NAMES, timeout=patience(3600))
        except Exception as e:  # noqa: BLE001 (raised in the test)
            _RUN["error"] = e

    _RUN["thread"] = threading.Thread(target=run, daemon=True)
    _RUN["thread"].start()


def test_compiled_steps_train_what_eager_steps_train_in_every_family():
    start_in_background()  # (a no-op when the session started it)
    _RUN["thread"].join(timeout=patience(3600))
    assert not _RUN["thread"].is_alive(), "the families' compile runs did not finish"
    if "error" in _RUN:
        raise _RUN["error"]
    results = _RUN["results"]
    for family, r in results.items():
        # At least G's and D's own-phase forwards and D frozen in G's phase. (Their backward graphs count as
        # compilations of their own only when compiled afresh: from inductor's warm cache they come with the forward.)
        assert r["compilations"] >= 3, (family, r["compilations"])
        assert r["recompilations"] == 0, family
        for got, want in zip(r["compiled"], r["eager"]):
            torch.testing.assert_close(got, want, rtol=0, atol=COMPILE_TOL * want.abs().max().item(), msg=family)
        # Control: another training seed is far outside the tolerance (the comparison can fail).
        want = r["eager"][0]
        assert (r["other"] - want).abs().max() > 5 * COMPILE_TOL * want.abs().max(), family


def test_a_compiled_run_logs_its_compile_time_and_no_recompilations(tmp_path):
    """Through fit: Compile/seconds and Compile/recompiles in every log record (the smoke config's DCGAN, the graphs
    `bench train --compile`'s test compiles too), 0 recompilations after the first step."""
    import json

    from support import make_trainer

    tr = make_trainer("train.compile=default", "train.total_kimg=0.064", "train.log_every_kimg=0.016",
                      run_dir=tmp_path)  # fmt: skip
    summary = tr.fit()
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert records[0]["Compile/seconds"] > 0 and summary["compile_s"] == records[-1]["Compile/seconds"]
    assert [r["Compile/recompiles"] for r in records] == [0, 0, 0, 0]
    # Control: an eager run logs no compile figures.
    eager = make_trainer("train.total_kimg=0.016", "train.log_every_kimg=0.016", run_dir=tmp_path / "eager")
    eager.fit()
    assert "Compile/seconds" not in json.loads((tmp_path / "eager" / "stats.jsonl").read_text().splitlines()[0])
