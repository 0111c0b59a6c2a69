"""ADA's controller on real training: where D memorises its reals p is raised, where it cannot p stays low.

DCGAN (configs/default.yaml's networks and optimiser, with R1) on the built-in shapes with ADA, the same run on 64
shapes and on 20000, side by side at one thread each. On 64 images D soon says "real" to every training image; on
20000 it cannot know them all. Calibration on the 2-core CPU, without augmentation (ADA's statistic
r_t = E[sign(D(real))], averaged over 2.6 kimg):

    kimg           2.6   5.1   7.7   10.2  12.8  15.4  17.9  20.5  23.0  25.6  28.2
    64 shapes      0.74  0.75  0.82  0.89  0.84  0.91  0.98  0.98  0.99  1.00  1.00
    20000 shapes   0.61  0.57  0.67  0.60  0.70  0.69  0.67  0.63  0.73  0.76  0.77

DCGAN's D (BCE) is more confident on reals than StyleGAN2's, for which ADA's default target of 0.6 was chosen (at
0.6 p rose to ~0.6 on both sets here, and at 0.8 to ~0.4 on both: no separation), so the test aims at 0.85, between
the two rows. With ADA (ada_kimg 2: p moves in steps of 0.128), over the last two thirds of the run:

                   mean p   share of steps with p > 0     (30 kimg: mean p, share)
    64 shapes      0.051    0.38                           0.054, 0.41
    20000 shapes   0.002    0.02                           0.008, 0.06

A small p is enough to stop this D memorising 64 shapes (flips, turns and colour changes of a shape are still
shapes), so p settles low there too, but it is raised far more often than on the full set. The thresholds sit
between the two rows.
"""

import pytest

from conftest import REPO, patience

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.dist]

KIMG = 20
TARGET = 0.85
RAISED_TINY_MIN, RAISED_FULL_MAX = 0.25, 0.15  # share of steps with p > 0


def _ada_run(rank, world, num_images: int) -> list[float]:
    from support import make_trainer

    tr = make_trainer(
        "data.source=shapes", f"data.num_images={num_images}", "loss.r1_gamma=1", "loss.d_reg_interval=4",
        "augment.kind=ada", f"augment.ada_target={TARGET}", "augment.ada_kimg=2", f"train.total_kimg={KIMG}",
        config=REPO / "configs" / "default.yaml",
    )  # fmt: skip
    ps = []
    while tr.cur_nimg < KIMG * 1000:
        tr.train_step(*tr.draw())
        ps.append(tr.augment.p.item())
    return ps


def test_p_is_raised_where_d_memorises_and_stays_low_where_it_cannot():
    from support import side_by_side

    out = side_by_side(_ada_run, [64, 20000], timeout=patience(600))
    late = {n: ps[len(ps) // 3 :] for n, ps in out.items()}
    mean = {n: sum(ps) / len(ps) for n, ps in late.items()}
    raised = {n: sum(p > 0 for p in ps) / len(ps) for n, ps in late.items()}
    print(f"\nover the last two thirds: mean p, share of steps with p > 0: 64 shapes {mean[64]:.3f} {raised[64]:.2f}, "
          f"20000 shapes {mean[20000]:.3f} {raised[20000]:.2f}")  # fmt: skip
    assert raised[64] > RAISED_TINY_MIN and raised[20000] < RAISED_FULL_MAX
    assert mean[64] > 3 * mean[20000]
