"""Does the GAN learn? A short run on the built-in shapes must beat a calibrated quality threshold; so must a
shorter one of every other family (below); a short conditional run must draw the classes it is asked for.

Quality is the Fréchet distance (FD) between real and generated images in the feature space of a shape
classifier the test trains itself (distgan/metrics/shapes_fd.py; 100% held-out accuracy). Calibration on a 2-core CPU,
configs/default.yaml for 60 kimg (about a minute):

    correct loop, three seeds             FD 129, 143, 145
    untrained generator                   FD 2012
    D loss with its sign flipped          FD 2685
    G loss with its sign flipped          FD 3822
    G's optimizer step removed            FD 2449

The threshold of 250 sits 1.7x above the worst correct run and 8x below the best broken one.
"""

import subprocess

import pytest
import torch

from conftest import BIN, REPO, cli_env, patience
from distgan.metrics.shapes_fd import features, frechet_distance, to_float, train_classifier

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.dist]

KIMG = 60
THRESHOLD = 250.0
N = 2000


def fd_of(generator, z_dim, net, real_feats) -> float:
    z = torch.randn(N, z_dim, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        fake = torch.cat([generator(part) for part in z.split(500)])
    return frechet_distance(real_feats, features(net, fake))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The `make train` path, started in the background at one thread: the built-in set prepared into shards (where
    default.yaml looks), then streamed by `distgan train` for KIMG. The conditional test below trains beside it on
    the other core, and the test of it collects it."""
    tmp = tmp_path_factory.mktemp("short-run")
    prep = [str(BIN / "distgan"), "prepare", "shapes", "--out", "data/shapes-32", "--size", "32", "--num", "20000"]
    subprocess.run(prep, cwd=tmp, env=cli_env(), check=True, capture_output=True, timeout=patience(300))
    cmd = [
        str(BIN / "distgan"),
        "train",
        "--config",
        str(REPO / "configs" / "default.yaml"),
        "--run-dir",
        "run",
        f"train.total_kimg={KIMG}",
        f"train.ckpt_every_kimg={KIMG}",
        f"train.sample_every_kimg={KIMG}",
        "train.threads=1",
        "log.tracker=none",
    ]
    with open(tmp / "stdout.txt", "w") as out, open(tmp / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp, env=cli_env(), stdout=out, stderr=err)
    yield tmp, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- class-conditional

# Calibration on a 2-core CPU (conditional DCGAN, configs/default.yaml's networks and optimizer, the built-in
# shapes with their 4 classes, one thread beside another run): the share of generated images of class c that the
# shape classifier assigns to c, over 250 per class:
#     100 kimg: 0.93;  150 kimg: 0.96 and 0.95 (train.seed 0 and 1);  shuffled labels, 150 kimg: 0.23 (chance: 0.25)
# The test runs 100 kimg against a threshold of 0.85: 8 points below the calibrated run and far above a G that
# ignores its labels. The controls the test runs cost no training: the trained G scored against labels drawn
# independently of the ones it was given (what any G that ignores its labels scores, as the shuffled-labels run
# did: near 0.25), and the untrained G.
COND_KIMG = 100
COND_THRESHOLD = 0.85


def _conditional_run(rank, world, _) -> dict:
    """Train a conditional DCGAN on the shapes, then ask a classifier trained on other real shapes which class each
    generated image is: against the class G was asked for, against unrelated labels, and for the untrained G."""
    from distgan.metrics.shapes_fd import class_match, train_classifier
    from support import make_trainer

    tr = make_trainer(
        "data.source=shapes", "data.num_images=20000", "model.num_classes=auto", f"train.total_kimg={COND_KIMG}",
        "train.log_every_kimg=10", "train.sample_every_kimg=1000", "train.ckpt_every_kimg=1000",
        config=REPO / "configs" / "default.yaml",
    )  # fmt: skip
    n = 250
    z = torch.randn(4 * n, tr.cfg.model.z_dim, generator=torch.Generator().manual_seed(123))
    c = torch.arange(4).repeat_interleave(n)

    def draw(G):
        with torch.no_grad():
            return torch.cat([G(zp, cp) for zp, cp in zip(z.split(500), c.split(500))])

    untrained = draw(tr.G_ema.module.eval())
    tr.fit()
    fake = draw(tr.G_ema.module.eval())
    net, accuracy = train_classifier()
    match, per_class = class_match(net, fake, c)
    unrelated = c[torch.randperm(len(c), generator=torch.Generator().manual_seed(7))]
    return {
        "match": match,
        "per_class": per_class,
        "accuracy": accuracy,
        "unrelated": class_match(net, fake, unrelated)[0],
        "untrained": class_match(net, untrained, c)[0],
    }


def test_conditional_dcgan_draws_the_class_asked_for(short_run):
    """Conditional DCGAN on the built-in shapes: generated images of class c are classified as c in at least 85% of
    cases. Controls: the same images scored against labels they were not drawn for, and the untrained G, both near
    chance. (It trains beside the short run, which the `short_run` fixture has started.)"""
    from support import side_by_side

    r = side_by_side(_conditional_run, [None], timeout=patience(600))[None]
    print(f"\nclass match: {r['match']:.3f} {r['per_class']}; unrelated labels: {r['unrelated']:.3f}; "
          f"untrained G: {r['untrained']:.3f}")  # fmt: skip
    assert r["accuracy"] > 0.95  # the classifier knows the shapes
    assert r["match"] >= COND_THRESHOLD and min(r["per_class"]) > 0.7
    assert r["unrelated"] < 0.5 and r["untrained"] < 0.5


def test_short_run_learns_shapes(short_run):
    from distgan.checkpoint import CheckpointManager, load_file
    from distgan.config import from_dict
    from distgan.data import shapes
    from distgan.models import build_generator

    tmp, proc = short_run
    assert proc.wait(timeout=patience(900)) == 0, (tmp / "stderr.txt").read_text()[-3000:]

    net, accuracy = train_classifier()
    assert accuracy > 0.8  # the feature space knows the shapes
    reals, _ = shapes.generate(N, seed=0)
    real_feats = features(net, to_float(reals))

    final = CheckpointManager(tmp / "run").latest()  # the first multiple of the batch past KIMG
    state = load_file(final, "state.pt")
    assert state["progress"]["cur_nimg"] >= KIMG * 1000
    cfg = from_dict(state["config"])
    trained = build_generator(cfg.model)
    trained.load_state_dict(state["G_ema"])
    untrained = build_generator(cfg.model)  # the control: same network, no training
    fd_trained = fd_of(trained.eval(), cfg.model.z_dim, net, real_feats)
    fd_untrained = fd_of(untrained.eval(), cfg.model.z_dim, net, real_feats)
    print(f"FD trained {fd_trained:.1f}, untrained {fd_untrained:.1f}, threshold {THRESHOLD}")
    assert fd_untrained > 2 * THRESHOLD
    assert fd_trained < THRESHOLD


# ---------------------------------------------------------------------- every family

# Each family on 2048 in-memory shapes (unconditional), with `distgan bench quality`'s CPU-sized network and
# its own loss and optimiser (distgan/bench/quality.py: PRESETS), for FAMILY_KIMG, then G_ema's FD on 2000 samples.
# Calibration on the 2-core CPU (FD; seeds 0 and 1; the controls with seed 0):
#
#                 kimg   correct      untrained G   G's loss sign flipped   threshold
#     stylegan2   2      458, 565      20888         27001                   2000
#     biggan      8      1479, 2687    20395         28895                   6000
#     r3gan       2      519, 579      6286          27001                   2000
#
# (The test runs them side by side at one thread each, where the numbers shift a little: seed 0 gave stylegan2 552,
# biggan 2229, r3gan 515; untrained 27303, 20796, 7885.)
# Each threshold sits 2.2-3.5x above the worst correct run and 3x or more below every control. A family only learns
# this fast on 2 cores at a CPU size, far from its published results; what the test asks is
# that the whole path (network, loss, penalties, optimiser recipe, EMA) learns the shapes at all, which every broken
# variant above fails by an order of magnitude. The untrained G is the control the test runs (the broken runs cost a
# run each); it is also what "G's update never applied" trains.
FAMILY_KIMG = {"stylegan2": 2, "biggan": 8, "r3gan": 2}
FAMILY_THRESHOLD = {"stylegan2": 2000.0, "biggan": 6000.0, "r3gan": 2000.0}


def _family_run(rank, world, family: str) -> dict:
    from distgan import distributed
    from distgan.bench.common import bench_stream
    from distgan.bench.quality import COMMON, PRESETS
    from distgan.config import load_config
    from distgan.data import shapes
    from distgan.training import Trainer

    dist = distributed.setup("fp32", threads=1)
    cfg = load_config(None, [*COMMON, *PRESETS[family], "train.seed=0"]).validate()
    tr = Trainer(cfg, dist.configured("fp32", "ddp"), bench_stream(cfg))
    untrained = tr.sample(*_latents(cfg)).float().clamp(-1, 1)
    while tr.cur_nimg < FAMILY_KIMG[family] * 1000:
        tr.train_step(*tr.draw())
    tr.sync_buffers()
    trained = tr.sample(*_latents(cfg)).float().clamp(-1, 1)
    net, accuracy = train_classifier()
    reals, _ = shapes.generate(N, seed=4321, resolution=32)
    real_feats = features(net, to_float(reals))
    return {
        "accuracy": accuracy,
        "trained": frechet_distance(real_feats, features(net, trained)),
        "untrained": frechet_distance(real_feats, features(net, untrained)),
    }


def _latents(cfg):
    return torch.randn(N, cfg.model.z_dim, generator=torch.Generator().manual_seed(123)), None


def test_every_family_learns_shapes():
    """The three families side by side, one thread each (2 cores: 3 runs in about the time of 2)."""
    from support import side_by_side

    out = side_by_side(_family_run, sorted(FAMILY_KIMG), timeout=patience(600))
    failed = []
    for family, r in sorted(out.items()):
        print(f"\n{family}: FD trained {r['trained']:.1f}, untrained {r['untrained']:.1f}, "
              f"threshold {FAMILY_THRESHOLD[family]}")  # fmt: skip
        assert r["accuracy"] > 0.8
        assert r["untrained"] > 2 * FAMILY_THRESHOLD[family], family  # the control fails the threshold
        if not r["trained"] < FAMILY_THRESHOLD[family]:
            failed.append(family)
    assert not failed, f"did not learn the shapes: {failed}"
