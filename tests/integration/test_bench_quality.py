"""`distgan bench quality --limited N`, the augmentation benchmark, at a size that takes seconds: so that it runs the
day someone wants its figures (docs/augmentation.md). What it measures is checked by the learning tests and ADA's
run (test_augment_run.py); here: every kind and seed trains and is measured, the table and the verdict are printed,
and a bad option is one line and exit code 2."""

import re
import subprocess
import sys

import pytest

from conftest import cli_env, patience

pytestmark = [pytest.mark.integration]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distgan.cli", "bench", "quality", *args],
        env=cli_env(), capture_output=True, text=True, timeout=patience(600),
    )  # fmt: skip


def test_limited_trains_every_kind_and_seed_and_prints_the_verdict():
    p = bench("--limited", "16", "--kimg", "0.128", "--seeds", "2", "--num", "200")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = re.findall(r"^\| (none|diffaug|ada) \| ([\d.]+), ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", p.stdout, re.M)
    assert [r[0] for r in rows] == ["none", "diffaug", "ada"], p.stdout
    for _, a, b, mean, spread in rows:
        a, b = float(a), float(b)
        assert a > 0 and b > 0 and a != b  # two seeds, two different runs
        assert float(mean) == pytest.approx((a + b) / 2, abs=0.11)  # (the figures are printed rounded)
        assert float(spread) == pytest.approx(abs(a - b), abs=0.11)  # (the figures are printed rounded)
    assert "than the largest spread between seeds" in p.stdout
    assert len(re.findall(r"^  ada +seed \d .* p \d\.\d\d$", p.stdout, re.M)) == 2  # ADA reports its p


def test_a_bad_option_is_one_line_and_exit_2():
    p = bench("--limited", "16", "--augments", "none,mixup")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "distgan: error: --augments: unknown mixup (choose from none, diffaug, ada)"
    ]
