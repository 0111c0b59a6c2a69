"""The tracker interface as the trainer uses it, without W&B: what each tracker keeps for the end summary, the
dashboard groups of every stat, the alerts on skips, rollbacks and divergence, and W&B's step across a rollback.
The W&B files of real runs are read back in tests/integration/test_wandb.py."""

from __future__ import annotations

import pytest

from distgan.errors import Diverged
from distgan.tracking import ConsoleTracker, NullTracker, Tracker, ungrouped
from support import make_trainer


class _Console:
    def __init__(self):
        self.lines = []

    def print(self, msg):
        self.lines.append(msg)


class Recorder(Tracker):
    """What the trainer sends a tracker: keys, W&B's step of each row (nimg + step_offset), alerts."""

    def __init__(self):
        super().__init__()
        self.keys, self.steps, self.alerts = set(), [], []

    def write(self, values, kimg):
        self.keys |= set(values)
        self.steps.append((round(kimg * 1000), self.step_offset))

    def log_image(self, key, path, kimg):
        self.keys.add(key)

    def alert(self, title, text, level="WARN"):
        self.alerts.append((title, text, level))


def test_trackers_keep_the_latest_value_of_each_key_for_the_summary():
    console = _Console()
    for tracker in (NullTracker(), ConsoleTracker(console)):
        tracker.log({"Loss/D/main": 1.0, "Metrics/fid": 80.0}, 0.5)
        tracker.log({"Loss/D/main": 0.5}, 1.0)
        assert tracker.latest == {"Loss/D/main": (0.5, 1.0), "Metrics/fid": (80.0, 0.5)}
    assert console.lines == ["kimg 0.500  Loss/D/main 1  Metrics/fid 80", "kimg 1.000  Loss/D/main 0.5"]


def test_every_key_the_trainer_logs_is_in_a_dashboard_group(tmp_path):
    # Every penalty on, in the main steps, so that their stats are reported too.
    tr = make_trainer("train.total_kimg=0.032", "loss.r1_gamma=1", "loss.gp_weight=1", "loss.pl_weight=2",
                      "loss.d_reg_interval=1", "loss.g_reg_interval=1", run_dir=tmp_path)  # fmt: skip
    recorder = Recorder()
    tr.fit(recorder)
    assert {"Loss/D/r1", "Loss/D/gp", "Loss/G/pl", "G/pl_mean", "D/real_prob", "Samples/fakes"} <= recorder.keys
    assert ungrouped(recorder.keys) == []
    assert ungrouped(["loss_d", "Gradients/G", "Loss/D/main"]) == ["Gradients/G", "loss_d"]  # control


def test_alerts_and_steps_through_a_rollback_to_divergence(tmp_path, monkeypatch):
    # Checkpoint after step 3 (64 images); every loss NaN from step 5 on. The host looks at the skip counts at log
    # intervals (every 2 steps): 1 skip at 0.096 kimg, 3 in a row at 0.128 -> rollback; again, then give up.
    monkeypatch.setenv("DISTGAN_FAULTS", "nan_loss:step=5-")
    tr = make_trainer("train.max_consecutive_skips=2", "train.max_rollbacks=1", run_dir=tmp_path)
    recorder = Recorder()
    with pytest.raises(Diverged):
        tr.fit(recorder)
    skipped = "Steps skipped: non-finite values"
    assert recorder.alerts == [
        (skipped, "1 step(s) skipped for non-finite losses or gradients up to 0.096 kimg (1 in this run)", "WARN"),
        (
            "Rolled back (1 of 1)",
            "3 steps in a row had non-finite losses or gradients at 0.128 kimg; rolled back to ckpt-000000064 "
            "(0.064 kimg)",
            "WARN",
        ),
        (skipped, "3 step(s) skipped for non-finite losses or gradients up to 0.096 kimg (4 in this run)", "WARN"),
        (
            "Diverged: training stopped",
            "3 steps in a row had non-finite losses or gradients at 0.128 kimg, after 1 rollback(s) "
            "(train.max_rollbacks=1); lower the learning rates or try train.precision=fp32",
            "ERROR",
        ),
    ]
    # W&B's step (nimg + offset) grows through the rollback: the 64 images after the checkpoint are added.
    assert recorder.steps == [(32, 0), (64, 0), (96, 0), (96, 64)]
    assert tr.nimg_discarded == 64 and tr.state_dict()["progress"]["nimg_discarded"] == 64
