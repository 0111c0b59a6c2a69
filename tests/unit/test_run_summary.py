"""The end-of-run summary (distgan.train.summary_lines) and what the trackers keep for it, without training.

The CLI's own summary after real runs, with skips and a rollback and without, is in tests/integration/test_wandb.py.
"""

from __future__ import annotations

from types import SimpleNamespace

from distgan.tracking import NullTracker
from distgan.train import summary_lines


def _outputs(run_dir, nimgs=(0, 64)):
    (run_dir / "samples").mkdir(parents=True)
    for n in nimgs:
        (run_dir / "samples" / f"fakes-{n:09d}.png").write_bytes(b"")
    ckpt = run_dir / "checkpoints" / "ckpt-000000064"
    ckpt.mkdir(parents=True)
    return ckpt


def test_summary_with_metrics_trouble_and_next_commands(tmp_path):
    ckpt = _outputs(tmp_path)
    tracker = NullTracker()
    tracker.log({"Metrics/fid": 41.25, "Metrics/kid": 0.0123}, 0.032)
    tracker.log({"Metrics/fid": 37.5}, 0.064)
    tracker.location = "https://wandb.ai/team/distgan/runs/abc"
    summary = {"kimg": 0.064, "wall_s": 3.0, "img_per_sec": 21.3, "Loss/D/main": 1.2345, "Loss/G/main": 0.75,
               "D/real_prob": 0.6, "Timing/img_per_sec": 20.0}  # fmt: skip
    trainer = SimpleNamespace(skips_total=4, rollbacks=1)
    assert summary_lines(summary, tracker, trainer, tmp_path, ckpt) == [
        "  losses:      Loss/D/main 1.234  Loss/G/main 0.75  (last log interval)",
        "  metrics:     Metrics/fid 37.5 @ 0.064 kimg  Metrics/kid 0.0123 @ 0.032 kimg",
        f"  trouble:     4 step(s) skipped for non-finite values, 1 rollback(s) (warnings in {tmp_path / 'log.txt'})",
        f"  samples:     {tmp_path / 'samples' / 'fakes-000000064.png'} (the last of 2 in {tmp_path / 'samples'})",
        f"  checkpoint:  {ckpt}",
        f"  stats:       {tmp_path / 'stats.jsonl'}",
        f"  log:         {tmp_path / 'log.txt'}",
        "  W&B:         https://wandb.ai/team/distgan/runs/abc",
        "next:",
        f"  distgan generate --run {tmp_path} --num 64 --out {tmp_path / 'generated.png'}",
        f"  distgan generate --run {tmp_path} --progress --out {tmp_path / 'progress.gif'}",
        f"  distgan eval --run {tmp_path}",
    ]


def test_summary_of_a_calm_run_and_of_one_without_checkpoints(tmp_path):
    calm = SimpleNamespace(skips_total=0, rollbacks=0)
    ckpt = _outputs(tmp_path, nimgs=(0,))
    lines = summary_lines({"kimg": 0.064, "Loss/G/main": 0.7}, NullTracker(), calm, tmp_path, ckpt)
    assert not any(line.startswith(("  metrics:", "  trouble:", "  W&B:")) for line in lines)
    assert lines[1] == f"  samples:     {tmp_path / 'samples' / 'fakes-000000000.png'}"
    assert lines[-4:] == [
        "next:",
        f"  distgan generate --run {tmp_path} --num 64 --out {tmp_path / 'generated.png'}",
        f"  distgan generate --run {tmp_path} --progress --out {tmp_path / 'progress.gif'}",
        f"  distgan eval --run {tmp_path}",
    ]
    # Nothing saved (no run dir outputs yet): no commands to suggest.
    empty = tmp_path / "empty"
    lines = summary_lines({"kimg": 0.0}, NullTracker(), calm, empty, None)
    assert lines == [
        "  samples:     (none)",
        "  checkpoint:  (none)",
        f"  stats:       {empty / 'stats.jsonl'}",
        f"  log:         {empty / 'log.txt'}",
    ]
