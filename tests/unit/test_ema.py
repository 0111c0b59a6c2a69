import pytest
import torch
from torch import nn

from distgan.ema import EMA, ema_beta


def test_half_life_in_images():
    # After ema_kimg thousand images (in steps of any batch size) an old value weighs one half.
    for batch in (16, 64, 256):
        steps = 10_000 // batch
        assert ema_beta(batch, 10**9, ema_kimg=10, rampup=0) ** steps == pytest.approx(0.5, rel=0.05)


def test_rampup_caps_half_life_early():
    early = ema_beta(64, cur_nimg=1000, ema_kimg=10, rampup=0.05)  # half-life min(10000, 50) images
    assert early == pytest.approx(0.5 ** (64 / 50))
    assert ema_beta(64, 10**7, 10, 0.05) == pytest.approx(0.5 ** (64 / 10000))


def test_zero_half_life_tracks_exactly():
    assert ema_beta(64, 1000, ema_kimg=0, rampup=0) == 0


def test_update_averages_parameters_and_copies_buffers():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(net)
    assert not any(p.requires_grad for p in ema.module.parameters())
    old = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.update(beta=0.75)
    for p_old, p_ema, p in zip(old, ema.module.parameters(), net.parameters()):
        torch.testing.assert_close(p_ema, 0.75 * p_old + 0.25 * p)
    assert torch.equal(ema.module[1].running_mean, torch.full([2], 3.0))
    ema.update(beta=0.0)
    for p_ema, p in zip(ema.module.parameters(), net.parameters()):
        assert torch.equal(p_ema, p)
