"""`make bench` (`distgan bench train`) runs on the shipped default config from a fresh clone: its step is
measured on in-memory images, so neither the config's shards (made by `make train`) nor MNIST are needed. The
figures themselves are a benchmark's business, not a test's; this checks that both parts measure something."""

import re
import subprocess

import pytest

from conftest import BIN, REPO, cli_env

pytestmark = pytest.mark.integration


def test_bench_train_measures_the_default_config_without_its_dataset(tmp_path):
    # Run from an empty folder: the config's data/shapes-32 shards do not exist there.
    config = str(REPO / "configs" / "default.yaml")
    argv = [str(BIN / "distgan"), "bench", "train", "--config", config, "--steps", "2", "--warmup", "1"]
    p = subprocess.run([*argv, "--repeats", "1"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    distgan, plain = (float(re.search(rf"{name}\s+([\d.]+) img/s", out)[1]) for name in ("distgan", "plain"))
    ratio = float(re.search(r"ratio distgan/plain: ([\d.]+)", out)[1])
    assert distgan > 0 and plain > 0 and ratio == pytest.approx(distgan / plain, abs=2e-3), out
    speedup = float(re.search(r"speed-up 2 vs 1: ([\d.]+)x", out)[1])
    assert speedup > 0, out


def test_bench_train_compile_prints_eager_and_compiled_img_s_and_the_compile_time(tmp_path):
    config = str(REPO / "configs" / "smoke.yaml")
    argv = [str(BIN / "distgan"), "bench", "train", "--compile", "--config", config, "--steps", "1", "--warmup", "1",
            "--repeats", "1"]  # fmt: skip
    p = subprocess.run(argv, cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"smoke\s+batch\s+16, fp32: eager\s+([\d.]+) img/s\s+compiled\s+([\d.]+) img/s\s+x([\d.]+)\s+"
                  r"compile\s+([\d.]+) s \((\d+) compilations\), recompiles (\d+)", p.stdout)  # fmt: skip
    assert m, p.stdout
    eager, compiled, ratio, compile_s, compilations, recompiles = (float(g) for g in m.groups())
    assert eager > 0 and compiled > 0 and ratio == pytest.approx(compiled / eager, abs=0.01)
    # (3 forwards at least: G's, D's, D frozen; backwards count apart only when not in inductor's cache)
    assert compile_s > 0 and compilations >= 3 and recompiles == 0, p.stdout
