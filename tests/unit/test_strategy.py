"""Choosing a strategy (dist.strategy, with `auto` taken from the launcher) and the phase rules of
distgan/distributed/nets.py on the DDP strategy (the ZeRO side: tests/distributed/test_deepspeed.py)."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO, require_deepspeed
from distgan.errors import ConfigError, LaunchError, PhaseError
from distgan.launcher import resolve_strategy
from support import make_trainer

DEEPSPEED_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}


def test_auto_follows_the_launcher(monkeypatch):
    for key in DEEPSPEED_ENV:
        monkeypatch.delenv(key, raising=False)
    assert resolve_strategy("auto", "fp32") == "ddp"
    assert resolve_strategy("zero2", "bf16") == "zero2"  # explicit, under torchrun / python
    for key, value in DEEPSPEED_ENV.items():
        monkeypatch.setenv(key, value)
    assert resolve_strategy("auto", "bf16") == "zero1"  # `accelerate launch` with a ZeRO-1 DeepSpeed config
    assert resolve_strategy("zero1", "bf16") == "zero1"
    with pytest.raises(LaunchError, match="asks for ZeRO stage 1 but dist.strategy=ddp; set dist.strategy=zero1"):
        resolve_strategy("ddp", "fp32")


def test_zero3_and_fp16_under_zero_are_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(ConfigError, match="zero3 is not supported"):
        resolve_strategy("zero3", "fp32")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="zero3 is not supported"):
        resolve_strategy("auto", "fp32")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(ConfigError, match="fp16 with loss scalers runs under dist.strategy=ddp"):
        resolve_strategy("zero2", "fp16")
    assert resolve_strategy("ddp", "fp16") == "ddp"


def test_cli_refuses_zero3_in_one_line_before_importing_torch():
    code = (
        "import sys; from distgan.train import main\n"
        "rc = main(['--config', 'configs/smoke.yaml', 'dist.strategy=zero3'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert p.returncode == 2, p.stderr
    [line] = p.stderr.strip().splitlines()
    assert line.startswith("distgan: error: dist.strategy=zero3 is not supported")


# ---------------------------------------------------------------------------------------------------- phase rules


def test_phase_rules_on_ddp_nets():
    tr = make_trainer()
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(PhaseError, match=r"not frozen.*\(rule 1\)"):
        tr.D.frozen(x)  # D still trainable: G's backward would reach it
    with pytest.raises(PhaseError, match=r"penalty\(\) \(rule 2\)"):
        tr.D(x.clone().requires_grad_(True))
    tr.D.set_trainable(False)
    with pytest.raises(PhaseError, match=r"frozen\(\) \(rule 3\)"):
        tr.D(x)
    with pytest.raises(PhaseError, match="its penalty belongs to its own phase"):
        tr.D.penalty(x.clone().requires_grad_(True))
    assert tr.D.frozen(x).shape == (2,)  # the correct use
    tr.D.set_trainable(True)
    assert tr.D(x).shape == (2,) and tr.D.penalty(x.clone().requires_grad_(True)).requires_grad


def test_a_trainer_that_forgets_to_freeze_d_is_stopped():
    tr = make_trainer()
    tr.D.set_trainable = lambda flag: None
    with pytest.raises(PhaseError, match=r"\(rule 1\)"):
        tr.train_step(*tr.draw())


def test_the_deepspeed_config_is_the_same_on_cpu_and_gpu():
    """The bit-equality of ZeRO and DDP is shown on CPU; a GPU job must run that same config (it used to turn on
    overlap_comm, a reduction path no CPU test runs), and no DeepSpeed timer may synchronise the GPU."""
    require_deepspeed()
    from distgan.config import flatten
    from distgan.distributed.zero import DEVICE_KEYS, ds_config

    for stage, precision, accum in ((1, "fp32", 1), (2, "bf16", 1), (2, "fp32", 4)):
        cpu = flatten(ds_config(stage, precision, 16, numel=1000, accum=accum, device_type="cpu"))
        gpu = flatten(ds_config(stage, precision, 16, numel=1000, accum=accum, device_type="cuda"))
        differ = {k for k in cpu.keys() | gpu.keys() if cpu.get(k) != gpu.get(k)}
        assert differ <= DEVICE_KEYS and DEVICE_KEYS == frozenset()
        assert gpu["zero_optimization.overlap_comm"] is False
        assert gpu["timers.throughput.enabled"] is False and gpu["wall_clock_breakdown"] is False
        assert gpu["gradient_accumulation_steps"] == accum and gpu["train_micro_batch_size_per_gpu"] == 16


class _Stage(int, __import__("enum").Enum):
    """An int enum pickled the way some Python 3.11 releases (Debian 12's 3.11.2) pickle DeepSpeed's ZeroStageEnum:
    as getattr(class, name)."""

    A = 1

    def __reduce_ex__(self, protocol):
        return getattr, (type(self), self.name)


def test_zero_files_pickle_enums_by_value_so_weights_only_loads_them():
    """DeepSpeed's optimizer files hold ZeroStageEnum. Written by `torch.save` on such a Python they held
    `getattr`, which torch.load(weights_only=True) refuses: a ZeRO run could not resume (found in CI on Debian's
    Python). distgan's checkpoint engine pickles enums as Class(value)."""
    import io

    require_deepspeed()
    from distgan.distributed.zero import _InMemory

    io_ = _InMemory(prefix="ds-G-")
    io_.save({"zero_stage": _Stage.A, "w": torch.ones(2)}, "/scratch/optim_states.pt")
    data = io_.saved["ds-G-optim_states.pt"]
    with torch.serialization.safe_globals([_Stage]):
        loaded = torch.load(io.BytesIO(data), weights_only=True)
    assert loaded["zero_stage"] is _Stage.A and torch.equal(loaded["w"], torch.ones(2))
    # The control: plain torch.save of the same state is refused.
    buf = io.BytesIO()
    torch.save({"zero_stage": _Stage.A}, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([_Stage]), pytest.raises(Exception, match="getattr"):
        torch.load(buf, weights_only=True)


def test_channels_last_under_zero_trains_in_the_default_layout():
    """DeepSpeed broadcasts and flattens parameters through byte views that need the default layout: under ZeRO
    train.channels_last is left out (with a warning), and the step runs; under DDP the weights are NHWC."""
    require_deepspeed()
    for strategy, nhwc in (("zero2", False), ("ddp", True)):
        tr = make_trainer(f"dist.strategy={strategy}", "train.channels_last=true")
        tr.train_step(*tr.draw())
        convs = [p for p in tr.G_module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) == nhwc for p in convs), strategy
