"""The plain reference loop of `distgan bench train` does each family's recipe: its steps train both networks, and
a penalty it claims to run changes what the network learns. The control keeps the penalty's phase (and its Adam
rescaling) with a weight of 1e-30: Adam's eps then makes that phase's step ~0, so only the penalty's own gradient
can tell the two apart."""

import pytest
import torch

from support import SMOKE, TINY


def _plain(family: str, *extra: str):
    from distgan.bench.common import bench_data, plain_loop
    from distgan.config import load_config

    cfg = load_config(SMOKE, [*TINY[family], "model.num_classes=4", "train.batch=8", *extra]).validate()
    images, labels = bench_data(cfg, num=64)
    return plain_loop(cfg, images, torch.device("cpu"), labels)


def _flat(net) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()


@pytest.mark.parametrize("family", list(TINY))
def test_plain_loop_trains_both_networks_of_every_family(family):
    step = _plain(family)
    g0, d0 = _flat(step.G), _flat(step.D)
    for _ in range(2):  # step 0 runs the lazy penalties, step 1 does not
        step()
    g1, d1 = _flat(step.G), _flat(step.D)
    assert torch.isfinite(g1).all() and torch.isfinite(d1).all()
    assert not torch.equal(g0, g1) and not torch.equal(d0, d1)
    assert all(p.requires_grad for p in step.D.parameters())  # D is unfrozen after G's phase


@pytest.mark.parametrize(("family", "off"), [("stylegan2", "loss.r1_gamma=1e-30"), ("r3gan", "loss.r2_gamma=0"),
                                             ("stylegan2", "loss.pl_weight=1e-30")])  # fmt: skip
def test_plain_loop_penalties_change_the_step(family, off):
    runs = []
    for extra in ((), (off,)):  # each built (seeding torch) and stepped in turn: the same draws
        step = _plain(family, *extra)
        step()  # step 0: the lazy penalties run (R3GAN's R2 runs in every D step)
        runs.append(step)
    with_penalty, without = runs
    net = "G" if "pl_weight" in off else "D"
    assert not torch.equal(_flat(getattr(with_penalty, net)), _flat(getattr(without, net)))
