"""ADA's controller (distgan/augment/controller.py): p moves by sign(r_t - target) * images / (ada_kimg * 1000) every
ada_interval steps, stays in [0, 1], and a run stopped between two moves resumes with the move it was about to make.
The pipe's own operations are tested in test_augment.py; p on 2 ranks and across real resumes in
tests/distributed/test_exact_resume.py (ddp+biggan+classes+ada); p rising on little data in
tests/integration/test_augment_run.py."""

import pytest
import torch

from distgan.augment import describe
from distgan.augment.controller import Augmentation
from distgan.config import load_config
from distgan.stats import Collector


class _World1:  # the Dist surface the controller uses, for one process
    device = torch.device("cpu")

    @staticmethod
    def all_reduce_sum(t):
        return t


def _aug(*overrides):
    cfg = load_config(None, ["train.batch=64", "augment.kind=ada", "augment.ada_interval=4",
                             "augment.ada_kimg=2.56", *overrides]).validate()  # fmt: skip
    return Augmentation(cfg, _World1(), Collector(torch.device("cpu")))


def _steps(aug, logits_per_step, start=0):
    for i, logits in enumerate(logits_per_step, start=start + 1):
        aug.observe(torch.tensor(logits))
        aug.after_step(i)
    return aug.p.item()


def test_p_moves_by_the_images_since_the_last_move_towards_the_target():
    step = 64 * 4 / 2560  # images per move / (ada_kimg * 1000) = 0.1
    aug = _aug("augment.p=0.5")
    over = [1.0, 1.0, 1.0, 1.0, 1.0, -1.0]  # signs sum to 4 of 6
    assert _steps(aug, [over] * 3) == 0.5  # no move before the 4th step
    # r_t = 16 / 24 = 0.67 > 0.6: D is overconfident on the reals, p rises
    assert _steps(aug, [over], start=3) == pytest.approx(0.5 + step)
    assert aug.stats.last("Augment/rt").item() == pytest.approx(2 / 3)
    # r_t = 0 < 0.6: p falls; r_t = 0.6 exactly: sign 0, p stays
    assert _steps(aug, [[1.0, -1.0]] * 4, start=4) == pytest.approx(0.5)
    p = aug.p.item()
    assert _steps(aug, [[1.0] * 4 + [-1.0]] * 4, start=8) == p


def test_p_stays_within_0_and_1():
    aug = _aug("augment.p=0.95", "augment.ada_kimg=0.1")
    assert _steps(aug, [[3.0]] * 8) == 1.0
    aug = _aug("augment.p=0.05", "augment.ada_kimg=0.1")
    assert _steps(aug, [[-3.0]] * 8) == 0.0


def test_fixed_and_scheduled_p_do_not_adapt():
    aug = _aug("augment.p=0.3", "augment.ada_target=0")
    assert _steps(aug, [[5.0]] * 8) == pytest.approx(0.3)
    aug.set_p(0.7)  # the trainer's schedule.augment_p
    assert aug.p.item() == pytest.approx(0.7)
    adaptive = _aug("augment.p=0.3")
    adaptive.set_p(0.7)  # an adaptive p is the controller's alone
    assert adaptive.p.item() == pytest.approx(0.3)


def test_resumed_between_two_moves_makes_the_move_it_was_about_to_make():
    # Steps 1-2 say "overfitting" strongly, steps 3-4 weakly the other way: over the interval r_t = 0.75 > 0.6.
    logits = [[1.0] * 4, [1.0] * 4, [1.0, 1.0, 1.0, -1.0], [1.0, -1.0, 1.0, 1.0]]
    straight = _aug("augment.p=0.5")
    want = _steps(straight, logits)
    assert want > 0.5
    first = _aug("augment.p=0.5")
    _steps(first, logits[:2])
    shared, rank = first.state_dict(), first.rank_part().state_dict()
    resumed = _aug("augment.p=0.5")
    resumed.load_state_dict(shared)
    resumed.rank_part().load_state_dict(rank)
    assert _steps(resumed, logits[2:], start=2) == want
    # The control: the same resume without this rank's partial sums sees only steps 3-4 (r_t = 0.5) and moves p down.
    control = _aug("augment.p=0.5")
    control.load_state_dict(shared)
    assert _steps(control, logits[2:], start=2) < 0.5


def test_a_resume_that_switches_augmentation_on_starts_from_augment_p():
    none = load_config(None, []).validate()
    off = Augmentation(none, _World1(), Collector(torch.device("cpu")))
    assert off.pipe is None and off.p is None and describe(none) is None
    aug = _aug("augment.p=0.25")
    aug.load_state_dict(off.state_dict())  # a checkpoint written without augmentation
    assert aug.p.item() == 0.25


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["augment.kind=ada", "augment.ops=xflip=1,warp=1"], "augment.ops"),
        (["augment.kind=diffaug", "augment.policy=color,blur"], "augment.policy"),
        (["augment.p=1.5"], "augment.p=1.5 must be in [0, 1]"),
        (["augment.ada_target=1"], "augment.ada_target=1"),
        (["augment.ada_interval=0"], "augment.ada_interval=0"),
        (["augment.kind=ada", "schedule.augment_p.shape=linear", "schedule.augment_p.end=0.5"],
         "needs augment.kind=ada and augment.ada_target=0"),
    ],
)  # fmt: skip
def test_bad_augment_settings_are_named(overrides, message):
    assert any(message in p for p in load_config(None, overrides).problems()), load_config(None, overrides).problems()


def test_p_follows_its_schedule_through_the_trainer():
    """schedule.augment_p (R3GAN's way): p is the ramp's value at each step's images seen, in the stats too."""
    from support import make_trainer

    tr = make_trainer("augment.kind=ada", "augment.ada_target=0", "schedule.augment_p.shape=linear",
                      "schedule.augment_p.end=1", "schedule.augment_p.kimg=0.064")  # fmt: skip
    seen = []
    for _ in range(5):  # 16 images a step: the ramp is 0, 0.25, 0.5, 0.75, 1 at the steps' starts
        tr.train_step(*tr.draw())
        seen.append(tr.augment.p.item())
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert tr.stats.last("Schedule/augment_p").item() == 1.0
