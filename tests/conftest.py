"""Shared test plumbing.

Skips: a test that needs something this machine lacks calls `require(ok, reason)`. On a developer's machine
that skips with the reason; in CI (CI=true) it fails, and any other skip makes the session fail too: in CI
a skipped test never counts as passing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: distgan, torchrun, accelerate
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# Tests must pass on a loaded machine too (a user runs them beside a training run): every time limit a test waits
# for a process, a job or a result is a multiple of what it takes on a quiet 2-core machine. The limits stop a
# hang from blocking the suite forever; none of them is a claim about speed (benchmarks make those).
PATIENCE = float(os.environ.get("DISTGAN_TEST_PATIENCE", "4"))


def patience(seconds: float) -> float:
    """A time limit for something that takes well under `seconds` on a quiet machine, scaled for a busy one."""
    return seconds * PATIENCE


def require(ok: bool, reason: str) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)


def pytest_configure(config):
    for marker in (
        "dist: starts several processes",
        "slow: takes more than ~20 s",
        "integration: runs the CLI",
        "slurm: needs a SLURM cluster (the tests start one; Debian's slurmctld/slurmd/munge installed)",
        "deepspeed: needs DeepSpeed (DS_ACCELERATOR=cpu on a machine without GPUs)",
        "gpu: needs a CUDA GPU (never in CI)",
    ):
        config.addinivalue_line("markers", marker)


def pytest_collection_modifyitems(session, config, items):
    """Tests marked `gpu` need CUDA: without it they are deselected (not skipped), so a CPU machine and CI, which
    never has a GPU, pass without counting them; `make gpu-check` runs them where there is one."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.hook.pytest_deselected(items=gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if IN_CI and skipped:
        terminalreporter.write_line(f"CI: {len(skipped)} test(s) skipped; skips are failures in CI", red=True)


def pytest_collection_finish(session):
    """A whole-suite run must collect every tests/**/test_*.py: pytest's default norecursedirs once hid a folder
    named tests/dist from `make test` without a word. Running a subset (`pytest tests/unit`) is not checked.

    And a test module with a `start_in_background()` gets it called now, once the session is known to run one of
    its tests named in its BACKGROUND_FOR:
    long CPU work (compiling every family) then starts at the suite's beginning, niced, on the CPU the other
    tests leave idle, and the module's test waits for its results when its turn comes."""
    for item in session.items:
        start = getattr(getattr(item, "module", None), "start_in_background", None)
        if start is not None and item.name in getattr(item.module, "BACKGROUND_FOR", ()):
            if not session.config.option.collectonly:
                start()
    opt = session.config.option
    if [Path(a).resolve() for a in session.config.args] != [REPO / "tests"] or opt.keyword or opt.markexpr:
        return
    on_disk = {p.resolve() for p in (REPO / "tests").rglob("test_*.py")}
    collected = {Path(item.fspath).resolve() for item in session.items}
    missing = sorted(str(p.relative_to(REPO)) for p in on_disk - collected)
    if missing:
        raise pytest.UsageError(f"test files not collected (renamed folder? norecursedirs?): {', '.join(missing)}")


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if IN_CI and reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = 1


def require_deepspeed() -> None:
    """DeepSpeed tests run on the CPU here (DS_ACCELERATOR=cpu, set by distgan itself when there is no GPU)."""
    import importlib.util

    require(importlib.util.find_spec("deepspeed") is not None, "DeepSpeed not installed: pip install -e '.[deepspeed]'")


@pytest.fixture
def repo() -> Path:
    return REPO


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: no W&B network, no user accelerate config, unbuffered output, no GPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(WANDB_MODE="offline", PYTHONUNBUFFERED="1", HF_HOME=str(REPO / ".pytest_cache" / "hf"))
    # The CLI tests launch CPU ranks (gloo): on a machine with a GPU too (NCCL refuses two ranks on one GPU).
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env
