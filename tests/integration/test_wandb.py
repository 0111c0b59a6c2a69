"""The W&B dashboard, read back from the offline run files of real CLI runs (tests/support.py: wandb_records).

Three runs of configs/smoke.yaml with log.tracker=wandb (12 steps of 16 images, stats every 32 images, sample
grids and checkpoints every 64), the first two side by side:
- faulted: D's loss is NaN at steps 0-1 (two skips in one log interval: one alert), and every loss at steps
  5-7 the first time through (train.max_consecutive_skips=3: a rollback to ckpt-000000064 at 128 images, then
  the same stretch trained again with other latents);
- control: the same run without faults: no alert, every stat in every row;
- resumed: the faulted run continued to 256 images, which must continue the same W&B run and its steps.
Asserted exactly: the config record (the resolved config and the launch), the metric definitions (kimg is every
group's x-axis), each history row's step, kimg and keys, the sample grids' files, the alerts, the end summary.
About 45 s on 2 cores, nearly all of it three process starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess

import pytest
import yaml

from conftest import BIN, REPO, cli_env, patience
from distgan import __version__
from distgan.tracking import GROUPS
from support import wandb_records

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMOKE = str(REPO / "configs" / "smoke.yaml")
TRAIN = ["log.tracker=wandb", "train.total_kimg=0.192", "train.max_consecutive_skips=3", "train.max_rollbacks=1"]
# nan_loss is reached twice per step (D_main, G_main): steps 5-7 are its calls 11-16 the first time only.
FAULTS = "nan_loss:step=0-1:net=D;nan_loss:step=5-7:nth=11-16"

W_AND_B = {"_step", "_runtime", "_timestamp"}  # what wandb adds to every row
STATS = {
    "Loss/D/main", "Loss/G/main", "D/real_logit", "D/fake_logit", "D/real_prob", "D/fake_prob", "D/grad_norm",
    "D/skipped", "G/grad_norm", "G/skipped", "Progress/step", "Progress/skipped_steps", "Progress/rollbacks",
    "Timing/img_per_sec", "Timing/sec_per_kimg", "Timing/eta_min", "Memory/peak_gb", "Progress/kimg", *W_AND_B,
}  # fmt: skip
IMAGE = {"Samples/fakes", "Progress/kimg", *W_AND_B}


def _start(tmp_path, name, *extra, faults=""):
    cmd = [str(BIN / "distgan"), "train", "--config", SMOKE, "--run-dir", name, *TRAIN, *extra]
    return subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(DISTGAN_FAULTS=faults), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _finish(p) -> str:
    out, _ = p.communicate(timeout=patience(300))
    assert p.returncode == 0, f"{p.args} failed ({p.returncode}):\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    faulted, control = _start(tmp, "faulted", faults=FAULTS), _start(tmp, "control")
    out = {"faulted": _finish(faulted), "control": _finish(control)}
    out["resumed"] = _finish(_start(tmp, "faulted", "train.total_kimg=0.256"))
    return tmp, out


def read_run(folder):
    """One offline run folder: its run record, config, metric definitions, history rows, alerts; exit seen."""
    [path] = folder.glob("run-*.wandb")
    out = {"file": path, "config": {}, "metrics": [], "rows": [], "alerts": [], "exit": False}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):  # the config: in the run record, and in config records after it
            out.update({"run": r.run} if kind == "run" else {})
            items = r.run.config.update if kind == "run" else r.config.update
            out["config"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in items})
        elif kind == "metric":
            out["metrics"].append((r.metric.name or r.metric.glob_name, r.metric.step_metric))
        elif kind == "history":
            row = {}
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if key.startswith("Samples/fakes/"):  # an image is a dict: path, sha256, size, ...
                    row.setdefault("Samples/fakes", {})[key.rpartition("/")[2]] = json.loads(item.value_json)
                else:
                    row[key] = json.loads(item.value_json)
            out["rows"].append(row)
        elif kind == "alert":
            out["alerts"].append((r.alert.title, r.alert.text, r.alert.level))
        elif kind == "exit":
            out["exit"] = True
    return out


def folders(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_config_record_is_the_resolved_config_and_the_launch(runs):
    tmp, _ = runs
    [first, second] = [read_run(f) for f in folders(tmp / "faulted")]
    threads = int(re.search(r"threads/rank=(\d+)", (tmp / "faulted" / "log.txt").read_text()).group(1))
    resolved = yaml.safe_load((tmp / "faulted" / "config.yaml").read_text())  # the config as the run used it
    assert resolved["dist"]["strategy"] == "ddp"  # `auto` in the YAML, resolved before W&B sees it
    launch = {"launcher": "python", "world_size": 1, "device": "cpu", "threads_per_rank": threads,
              "distgan": __version__, "wandb_mode": "offline"}  # fmt: skip
    # config.yaml is the resumed part's (train.total_kimg=0.256); the first part ran to 0.192.
    part1 = {**resolved, "train": {**resolved["train"], "total_kimg": 0.192}}
    assert {k: v for k, v in first["config"].items() if k != "_wandb"} == {**part1, "launch": launch}
    assert {k: v for k, v in second["config"].items() if k != "_wandb"} == {**resolved, "launch": launch}


def test_every_group_is_plotted_against_kimg(runs):
    tmp, _ = runs
    for f in folders(tmp / "faulted") + folders(tmp / "control"):
        assert read_run(f)["metrics"] == [
            ("Progress/kimg", ""),
            *[(f"{group}*", "Progress/kimg") for group in GROUPS],
            ("*", "Progress/kimg"),
        ]


def _table(run):
    """(step, nimg, keys) per history row."""
    return [(r["_step"], round(r["Progress/kimg"] * 1000), set(r)) for r in run["rows"]]


def test_history_rows_keys_and_steps_with_a_skip_and_a_rollback(runs):
    tmp, _ = runs
    [first, second] = [read_run(f) for f in folders(tmp / "faulted")]
    # W&B's step is images seen plus the 64 images the rollback threw away (128 -> 64): it only grows, so wandb
    # keeps every row; kimg (the x-axis) goes back to 0.064 and runs on. Grids share the row of their kimg.
    assert _table(first) == [
        (0, 0, IMAGE),
        (32, 32, STATS - {"D/grad_norm"}),  # D skipped both steps of the interval: no finite norm to report
        (64, 64, STATS | IMAGE),
        (96, 96, STATS),
        (160, 96, STATS),  # after the rollback: the interval trained again
        (192, 128, STATS | IMAGE),
        (224, 160, STATS),
        (256, 192, STATS | IMAGE),
    ]
    stats = [r for r in first["rows"] if "Loss/D/main" in r]
    assert [r["Progress/step"] for r in stats] == [2, 4, 6, 6, 8, 10, 12]
    assert [r["Progress/skipped_steps"] for r in stats] == [2, 2, 3, 5, 5, 5, 5]
    assert [r["Progress/rollbacks"] for r in stats] == [0, 0, 0, 1, 1, 1, 1]
    assert [r["D/skipped"] for r in stats] == [1, 0, 0.5, 0, 0, 0, 0]
    assert [r["G/skipped"] for r in stats] == [0, 0, 0.5, 0, 0, 0, 0]
    for r in stats:
        assert 0 < r["D/real_prob"] < 1 and 0 < r["D/fake_prob"] < 1
    # The same numbers as the run dir's stats.jsonl, row by row.
    lines = [json.loads(line) for line in (tmp / "faulted" / "stats.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in W_AND_B | {"Samples/fakes"}} for r in stats] == [
        {**{k: v for k, v in line.items() if k not in ("kimg", "nimg")}, "Progress/kimg": line["kimg"]}
        for line in lines[: len(stats)]
    ]

    # Control: no faults, every stat in every interval, steps = images seen.
    [control] = [read_run(f) for f in folders(tmp / "control")]
    assert _table(control) == [
        (0, 0, IMAGE),
        (32, 32, STATS),
        (64, 64, STATS | IMAGE),
        (96, 96, STATS),
        (128, 128, STATS | IMAGE),
        (160, 160, STATS),
        (192, 192, STATS | IMAGE),
    ]
    # Every key is in one of the dashboard's groups.
    keys = {k for run in (first, second, control) for r in run["rows"] for k in r} - W_AND_B
    assert keys and all(k.startswith(GROUPS) for k in keys), sorted(keys)


def test_sample_grids_are_in_the_run_files(runs):
    tmp, _ = runs
    for name, nimgs in (("faulted", [0, 64, 128, 192, 256]), ("control", [0, 64, 128, 192])):
        grids = [(f, round(r["Progress/kimg"] * 1000), r["Samples/fakes"]) for f in folders(tmp / name)
                 for r in read_run(f)["rows"] if "Samples/fakes" in r]  # fmt: skip
        assert [nimg for _, nimg, _ in grids] == nimgs
        for f, nimg, image in grids:
            assert image["_type"] == "image-file" and image["path"].startswith("media/images/Samples/fakes_")
            file = f / "files" / image["path"]
            # The very grid the trainer wrote: a rollback does not rewrite fakes-000000064 (it resumes after it).
            sample = tmp / name / "samples" / f"fakes-{nimg:09d}.png"
            assert hashlib.sha256(file.read_bytes()).hexdigest() == image["sha256"]
            assert file.read_bytes() == sample.read_bytes(), (file, sample)


def test_alerts_on_skips_and_rollbacks_only(runs):
    tmp, _ = runs
    [first, second] = [read_run(f) for f in folders(tmp / "faulted")]
    skipped = "Steps skipped: non-finite values"
    assert first["alerts"] == [
        (skipped, "2 step(s) skipped for non-finite losses or gradients up to 0.032 kimg (2 in this run)", "WARN"),
        (skipped, "1 step(s) skipped for non-finite losses or gradients up to 0.096 kimg (3 in this run)", "WARN"),
        (
            "Rolled back (1 of 1)",
            "3 steps in a row had non-finite losses or gradients at 0.128 kimg; rolled back to ckpt-000000064 "
            "(0.064 kimg)",
            "WARN",
        ),
        # The streak's two steps before the rollback, told at the first log after it.
        (skipped, "2 step(s) skipped for non-finite losses or gradients up to 0.096 kimg (5 in this run)", "WARN"),
    ]
    assert second["alerts"] == []  # the resumed part had no faults (and does not repeat the first part's)
    [control] = [read_run(f) for f in folders(tmp / "control")]
    assert control["alerts"] == []


def test_resumed_run_continues_the_same_run_and_its_steps(runs):
    tmp, out = runs
    [first, second] = [read_run(f) for f in folders(tmp / "faulted")]
    assert first["exit"] and second["exit"]  # both files complete
    run_id = first["run"].run_id
    assert second["run"].run_id == run_id and first["file"].name == second["file"].name == f"run-{run_id}.wandb"
    assert first["run"].resume and second["run"].resume  # `wandb sync` appends a resumed part to the run
    assert "resumed from faulted/checkpoints/ckpt-000000192 at 0.192 kimg" in out["resumed"]
    assert _table(second) == [(288, 224, STATS), (320, 256, STATS | IMAGE)]  # kimg and steps go on
    steps = [r["_step"] for run in (first, second) for r in run["rows"]]
    assert steps == sorted(set(steps))  # strictly increasing over both files: nothing for `wandb sync` to drop


def test_end_of_run_summary(runs):
    tmp, out = runs
    lines = {name: (tmp / name / "stats.jsonl").read_text().splitlines() for name in ("faulted", "control")}
    cases = {  # run: (its dir, images at the end, its stats line, sample grids by then, its W&B folder)
        "faulted": ("faulted", 192, lines["faulted"][6], 4, 0),
        "control": ("control", 192, lines["control"][-1], 4, 0),
        "resumed": ("faulted", 256, lines["faulted"][-1], 5, 1),
    }
    for name, (rel, total, line, grids, part) in cases.items():
        last = json.loads(line)
        assert last["nimg"] == total
        tail = [line for line in out[name][out[name].index("done: ") :].splitlines() if not line.startswith("wandb:")]
        assert re.fullmatch(rf"done: {total / 1000:.3f} kimg in 0m\d\ds \(\d+ img/s\)", tail[0]), tail[0]
        trouble = f"  trouble:     5 step(s) skipped for non-finite values, 1 rollback(s) (warnings in {rel}/log.txt)"
        wandb_dir = folders(tmp / rel)[part].name
        assert tail[1:] == [
            f"  losses:      Loss/D/main {last['Loss/D/main']:.4g}  Loss/G/main {last['Loss/G/main']:.4g}  "
            "(last log interval)",
            *([trouble] if name != "control" else []),  # (the resumed part counts the whole run's)
            f"  samples:     {rel}/samples/fakes-{total:09d}.png (the last of {grids} in {rel}/samples)",
            f"  checkpoint:  {rel}/checkpoints/ckpt-{total:09d}",
            f"  stats:       {rel}/stats.jsonl",
            f"  log:         {rel}/log.txt",
            f"  W&B:         {rel}/wandb/{wandb_dir} (offline; upload with `wandb sync {rel}/wandb/offline-run-*`)",
            "next:",
            f"  distgan generate --run {rel} --num 64 --out {rel}/generated.png",
            f"  distgan generate --run {rel} --progress --out {rel}/progress.gif",
            f"  distgan eval --run {rel}",
        ], name


# ---------------------------------------------------------------------- every family's panels

# What each family adds to the shared panels (STATS): its penalties in Loss/, StyleGAN2's running path length in G/,
# and the values of ramped hyper-parameters in Schedule/ (support.TINY's R3GAN ramps lr_g and r1_gamma).
FAMILY_KEYS = {
    "stylegan2": {"Loss/D/r1", "Loss/G/pl", "G/pl_mean"},
    "biggan": set(),
    "r3gan": {"Loss/D/r1", "Loss/D/r2", "Schedule/lr_g", "Schedule/r1_gamma"},
}


def test_every_family_fills_its_panels(tmp_path):
    """One short W&B run per family (4 steps, stats every 2, side by side): each family's rows hold the shared
    stats plus its own keys, all in the dashboard's groups, the config record names the family and its section,
    and the sample grids are there; a ramped value moves along its ramp from row to row."""
    from support import TINY

    procs = {
        family: _start(tmp_path, family, *TINY[family], "train.total_kimg=0.064", "train.sample_every_kimg=0.064")
        for family in FAMILY_KEYS
    }
    outs = {family: _finish(p) for family, p in procs.items()}
    for family, own in FAMILY_KEYS.items():
        assert "outside the dashboard's groups" not in outs[family]
        [run] = [read_run(f) for f in folders(tmp_path / family)]
        assert run["config"]["model"]["family"] == family and family in run["config"]["model"]
        want = STATS | own
        assert _table(run) == [(0, 0, IMAGE), (32, 32, want), (64, 64, want | IMAGE)], family
        if family == "r3gan":  # cosine from 2e-4 towards 5e-5 over 0.2 kimg: lower in each interval
            lrs = [r["Schedule/lr_g"] for r in run["rows"] if "Schedule/lr_g" in r]
            assert 5e-5 < lrs[1] < lrs[0] < 2e-4, lrs
