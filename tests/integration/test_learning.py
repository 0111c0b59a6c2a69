"""Does the GAN learn? A short run on the built-in shapes must beat a calibrated quality threshold.

Quality is the Fréchet distance (FD) between real and generated images in the feature space of a shape
classifier the test trains itself (tests/quality.py; 100% held-out accuracy). Calibration on a 2-core CPU,
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
from quality import features, frechet_distance, to_float, train_classifier

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KIMG = 60
THRESHOLD = 250.0
N = 2000


def fd_of(generator, z_dim, net, real_feats) -> float:
    z = torch.randn(N, z_dim, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        fake = torch.cat([generator(part) for part in z.split(500)])
    return frechet_distance(real_feats, features(net, fake))


def test_short_run_learns_shapes(tmp_path):
    from distgan.checkpoint import CheckpointManager, load_file
    from distgan.config import from_dict
    from distgan.data import shapes
    from distgan.models import build_generator

    # Like `make train`: the built-in set prepared into shards (where default.yaml looks), then streamed.
    prep = [str(BIN / "distgan"), "prepare", "shapes", "--out", "data/shapes-32", "--size", "32", "--num", "20000"]
    subprocess.run(prep, cwd=tmp_path, env=cli_env(), check=True, capture_output=True, timeout=patience(300))
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
        "log.tracker=none",
    ]
    p = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=patience(900))
    assert p.returncode == 0, p.stderr[-3000:]

    net, accuracy = train_classifier()
    assert accuracy > 0.8  # the feature space knows the shapes
    reals, _ = shapes.generate(N, seed=0)
    real_feats = features(net, to_float(reals))

    final = CheckpointManager(tmp_path / "run").latest()  # the first multiple of the batch past KIMG
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
