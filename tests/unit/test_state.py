"""The registry of stateful parts (distgan/training/state.py): what a checkpoint saves and loads.

A part registers once; a checkpoint holds every part with its layout version. A part that a checkpoint lacks
either starts as it declares or is one clear error (never a silent reset), and a layout newer than this distgan
reads is refused. Checkpoints of distgan's previous flat layout (format 2) still resume.
"""

import copy

import pytest
import torch

from distgan.errors import CheckpointError
from distgan.training.state import StateRegistry, Values, upgrade_v2
from support import make_trainer


class Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_parts_save_and_load_with_their_versions_and_scopes():
    a, b, r = Counter(3), Counter(5), Counter(7)
    reg = StateRegistry()
    reg.register("a", a)
    reg.register("b", b, version=2)
    reg.register("r", r, scope="rank")
    shared, rank = reg.state_dict("shared"), reg.state_dict("rank")
    assert shared == {"format": 3, "versions": {"a": 1, "b": 2}, "a": {"n": 3}, "b": {"n": 5}}
    assert rank == {"format": 3, "versions": {"r": 1}, "r": {"n": 7}}
    a.n = b.n = r.n = 0
    reg.load_state_dict(shared, rank)
    assert (a.n, b.n, r.n) == (3, 5, 7)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", Counter())


def test_a_missing_part_starts_as_declared_or_is_one_clear_error():
    old = StateRegistry()
    old.register("a", Counter(3))
    saved = old.state_dict("shared")  # a checkpoint of a distgan without part "new"

    started = []
    reg = StateRegistry()
    reg.register("a", Counter())
    reg.register("new", Counter(), missing=lambda: started.append("new"))
    reg.load_state_dict(saved, None)
    assert started == ["new"]

    strict = StateRegistry()
    strict.register("a", Counter())
    strict.register("controller", Counter(9))  # no `missing`: it cannot start fresh
    with pytest.raises(CheckpointError, match="the checkpoint has no 'controller' state"):
        strict.load_state_dict(saved, None)


def test_a_newer_layout_is_refused():
    newer = StateRegistry()
    newer.register("a", Counter(3), version=2)
    reg = StateRegistry()
    reg.register("a", Counter())
    with pytest.raises(CheckpointError, match="'a' state has layout version 2, this distgan reads up to 1"):
        reg.load_state_dict(newer.state_dict("shared"), None)


def test_values_part_fills_a_value_added_since_from_its_default():
    class Obj:
        x, y = 1, 2

    obj = Obj()
    part = Values(obj, "x", "y", defaults={"y": 0})
    part.load_state_dict({"x": 5})
    assert (obj.x, obj.y) == (5, 0)
    with pytest.raises(CheckpointError, match="lacks 'x'"):
        Values(obj, "x").load_state_dict({})


def test_the_trainer_registers_every_stateful_part():
    tr = make_trainer()
    shared = ["G", "D", "G_ema", "progress", "step", "guard", "data_health", "data_position", "augment"]
    assert tr.state.names("shared") == shared
    assert tr.state.names("rank") == ["rng", "stream", "augment_sums"]


def _v2(tr) -> tuple[dict, dict]:
    """state.pt and rank-00000.pt as distgan wrote them before the registry (format 2: one flat dict each)."""
    from distgan import rng

    shared = {
        "format": 2, "strategy": "ddp", "G": tr.G_module.state_dict(), "opt_G": tr.opt_G.state_dict(),
        "D": tr.D_module.state_dict(), "opt_D": tr.opt_D.state_dict(), "G_ema": tr.G_ema.state_dict(),
        "scaler_G": {}, "scaler_D": {}, "cur_nimg": tr.cur_nimg, "step": tr.step_idx, "pl_mean": torch.tensor(0.25),
        "world_size": 1, "config": tr.cfg.to_dict(), "config_digest": tr.cfg.digest(), "tracker_run_id": "abc",
        "data_totals": {"samples": 10, "bad": 1}, "skips_total": 2, "rollbacks": 1, "nimg_discarded": 48,
    }  # fmt: skip
    rank = {"rank": 0, "world_size": 1, "rng": rng.get_state(), "stream": tr.stream.state_dict()}
    return copy.deepcopy(shared), copy.deepcopy(rank)  # (as read from a file: no tensor shared with `tr`)


def test_a_format_2_checkpoint_resumes():
    a = make_trainer()
    for _ in range(3):
        a.train_step(*a.draw())
    shared, rank = _v2(a)
    b = make_trainer()
    b.load_state_dict(shared, rank)
    for x, y in zip(
        [*a.G_module.parameters(), *a.D_module.parameters()], [*b.G_module.parameters(), *b.D_module.parameters()]
    ):
        assert torch.equal(x, y)
    assert (b.cur_nimg, b.step_idx, b.nimg_discarded) == (48, 3, 48)
    assert (b.skips_total, b.rollbacks, b.data_totals) == (2, 1, {"samples": 10, "bad": 1})
    assert b.step.pl_mean.item() == 0.25 and b.stream.state_dict() == a.stream.state_dict()
    # The two continue identically (optimizer state included).
    inputs = a.draw()
    b.draw()
    a.train_step(*inputs)
    b.train_step(*inputs)
    assert all(torch.equal(x, y) for x, y in zip(a.G_module.parameters(), b.G_module.parameters()))
    # The upgrade names every part of today's layout.
    up, up_rank = upgrade_v2(shared, rank)
    # (augmentation and the global data position came after format 2: checkpoints without them have a start)
    assert set(up) - {"format", "versions"} >= set(a.state.names("shared")) - {"augment", "data_position"}
    assert set(up_rank) >= {"rng", "stream", "rank", "world_size"}


def test_rng_states_on_another_world_size_start_from_seed_rank_and_images_seen():
    # Same world size: the saved states continue. Another: each rank seeds (seed, rank, cur_nimg), reproducibly,
    # and not the stream it started the run with (the control: a plain (seed, rank) seed).
    from distgan import rng

    tr = make_trainer()
    saved = tr.rng_state.state_dict()
    expected = torch.rand(4)
    tr.rng_state.load_state_dict(saved)
    assert torch.equal(torch.rand(4), expected)

    tr.cur_nimg, tr.rng_state.skip = 128, True
    draws = []
    for _ in range(2):
        tr.rng_state.load_state_dict(saved)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], expected)
    torch.manual_seed(rng.derive_seed(tr.cfg.train.seed, rng.FORWARD, 0))
    assert not torch.equal(torch.rand(4), draws[0])
