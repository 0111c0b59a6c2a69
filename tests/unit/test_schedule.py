"""Ramped hyper-parameters (distgan/schedule.py): the formulas, the config's checks, and a trainer that sets them."""

import math

import pytest

from distgan.config import load_config
from distgan.errors import ConfigError
from distgan.schedule import Ramp, ramp_value, values
from support import make_trainer


def test_ramp_shapes_follow_their_formulas():
    cos, lin = Ramp("cosine", end=1.0, kimg=10), Ramp("linear", end=1.0, kimg=10)
    for kimg in (0, 2.5, 5, 7.5, 10):
        t = kimg / 10
        assert ramp_value(3.0, cos, kimg, 99) == pytest.approx(1.0 + 2.0 * (1 + math.cos(math.pi * t)) / 2)
        assert ramp_value(3.0, lin, kimg, 99) == pytest.approx(3.0 - 2.0 * t)
    assert ramp_value(3.0, cos, 5, 99) == pytest.approx(2.0)  # half way: the mean
    assert ramp_value(3.0, cos, 1000, 99) == ramp_value(3.0, lin, 1000, 99) == 1.0  # flat at `end` after the ramp
    assert ramp_value(3.0, Ramp("cosine", end=1.0), 50, 100) == pytest.approx(2.0)  # kimg 0: over the whole run
    assert ramp_value(3.0, Ramp(), 50, 100) == 3.0  # constant: the start, whatever `end` says


def test_values_start_from_the_usual_config_keys():
    cfg = load_config(None, ["optim.lr_g=2e-4", "schedule.lr_g.shape=cosine", "schedule.lr_g.end=5e-5",
                             "schedule.lr_g.kimg=100", "loss.r1_gamma=0.05", "schedule.r1_gamma.shape=linear",
                             "schedule.r1_gamma.end=0.005", "schedule.r1_gamma.kimg=100"])  # fmt: skip
    at0, at50 = values(cfg, 0), values(cfg, 50_000)
    assert at0["lr_g"] == 2e-4 and at0["r1_gamma"] == 0.05 and at0["lr_d"] == cfg.optim.lr_d
    assert at50["lr_g"] == pytest.approx(1.25e-4) and at50["r1_gamma"] == pytest.approx(0.0275)
    assert at50["beta2"] == cfg.optim.beta2 and at50["ema_kimg"] == cfg.train.ema_kimg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule.beta2.shape=cosine", "schedule.beta2.end=1.5"], "schedule.beta2.end=1.5 must be in [0, 1)"),
        (["schedule.lr_d.shape=linear", "schedule.lr_d.end=0"], "schedule.lr_d.end=0.0 must be > 0"),
        (["schedule.r2_gamma.shape=cosine", "schedule.r2_gamma.end=1"], "loss.r2_gamma=0"),
        (["schedule.ema_kimg.kimg=-1"], "schedule.ema_kimg.kimg=-1.0 must be >= 0"),
        (["schedule.lr_g.shape=step"], "schedule.lr_g.shape='step' is not one of"),
    ],
)
def test_bad_ramps_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, overrides).validate()
    assert message in str(e.value)


def test_the_trainer_sets_each_steps_values_in_adam_the_penalties_and_ema():
    tr = make_trainer("schedule.lr_g.shape=cosine", "schedule.lr_g.end=1e-5", "schedule.lr_d.shape=linear",
                      "schedule.lr_d.end=1e-4", "schedule.beta2.shape=linear", "schedule.beta2.end=0.9",
                      "loss.r1_gamma=1", "loss.d_reg_interval=4", "schedule.r1_gamma.shape=linear",
                      "schedule.r1_gamma.end=0.1", "schedule.ema_kimg.shape=linear",
                      "schedule.ema_kimg.end=1")  # fmt: skip
    cfg = tr.cfg
    ratio = 4 / 5  # D is regularised lazily every 4 steps: lr and betas rescaled as without the ramp
    for _ in range(3):
        at = tr.cur_nimg
        tr.train_step(*tr.draw())
        want = values(cfg, at)
        g, d = tr.opt_G.param_groups[0], tr.opt_D.param_groups[0]
        assert g["lr"] == pytest.approx(want["lr_g"]) and d["lr"] == pytest.approx(want["lr_d"] * ratio)
        assert g["betas"] == pytest.approx((cfg.optim.beta1, want["beta2"]))
        assert d["betas"] == pytest.approx((cfg.optim.beta1**ratio, want["beta2"] ** ratio))
        assert tr.step.r1_gamma == pytest.approx(want["r1_gamma"]) and tr.ema_kimg == pytest.approx(want["ema_kimg"])
    assert tr.opt_G.param_groups[0]["lr"] < cfg.optim.lr_g  # the ramp moved it
    # Control: without ramps the trainer leaves Adam's hyper-parameters as constructed.
    plain = make_trainer("loss.r1_gamma=1", "loss.d_reg_interval=4")
    plain.train_step(*plain.draw())
    assert plain.opt_G.param_groups[0]["lr"] == cfg.optim.lr_g and not plain.scheduled
