"""`distgan eval`: folders, runs, bad input, offline Inception, and --watch beside a training run (W&B offline).

Most cases call `distgan.evaluate.main(argv)` in this process (the same code the console script runs, without
~8 s of imports per case); the offline-Inception case and the watch case run the real console script.
"""

from __future__ import annotations

import json
import math
import subprocess
import time

import pytest
from metrics_support import save_tinynet, write_folder

from conftest import BIN, REPO, cli_env, patience
from support import wandb_records

pytestmark = pytest.mark.integration
SMOKE = str(REPO / "configs" / "smoke.yaml")


def run_main(argv, capsys):
    from distgan.evaluate import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_fake_folder_against_real_folder(tmp_path, capsys):
    net = save_tinynet(tmp_path / "net.pt")
    a, b = write_folder(tmp_path / "a", 32, 0), write_folder(tmp_path / "b", 32, 1, high=90)
    common = ["--features", f"torchscript:{net}", "--num", 32, "--cache", tmp_path / "cache", "--kid-subsets", 10]
    rc, out, err = run_main(["--fake", a, "--real", a, "--metrics", "fid,kid,is,pr", *common], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"eval: {a}: 32 fakes vs 32 reals of {a} (extracted in")
    values = {line.split()[0]: float(line.split()[1]) for line in lines[1:]}
    assert list(values) == ["fid", "kid", "is", "precision", "recall"]
    assert abs(values["fid"]) < 1e-6 and values["precision"] == values["recall"] == 1.0
    rc, out, err = run_main(["--fake", b, "--real", a, *common], capsys)  # the control: other images
    assert rc == 0 and "(cache hit" in out.splitlines()[0], out + err
    assert float(out.splitlines()[1].split()[1]) > 1e-3


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    net = save_tinynet(tmp_path / "net.pt")
    a, small = write_folder(tmp_path / "a", 4, 0), write_folder(tmp_path / "small", 4, 1, size=8)
    (tmp_path / "empty_run").mkdir()
    feats = ["--features", f"torchscript:{net}", "--num", 4, "--no-cache"]
    cases = {
        "no such run dir": ["--run", tmp_path / "missing", *feats],
        "no verified checkpoint": ["--run", tmp_path / "empty_run", *feats],
        "must be `inception` or `torchscript:PATH`": ["--fake", a, "--real", a, "--features", "vgg"],
        "no such file": ["--fake", a, "--real", a, "--features", f"torchscript:{tmp_path / 'nope.pt'}"],
        "at least 2 images": ["--fake", a, "--real", a, "--num", 1],
        "are 8x8x3 but the reals": ["--fake", small, "--real", a, *feats],
        "compare with real images": ["--fake", a, *feats],
        "choose from fid, kid, is, pr": ["--fake", a, "--real", a, "--metrics", "fid,lpips"],
        "were not generated for known classes": ["--fake", a, "--real", a, *feats, "--classifier", "torchscript:c.pt"],
        "must be `torchscript:PATH`": ["--fake", a, "--real", a, *feats, "--classifier", "resnet"],
    }
    for expected, argv in cases.items():
        rc, out, err = run_main(argv, capsys)
        assert rc == 2 and expected in err and err.count("\n") == 1, (expected, err)
        assert err.startswith("distgan eval: error: ")


def test_offline_inception_is_one_line_and_exit_code_2(tmp_path):
    """The real console script, with an empty torch cache and every download refused at once (a proxy on a closed
    local port: no packet leaves the machine)."""
    a = write_folder(tmp_path / "a", 4, 0)
    proxy = "http://127.0.0.1:9"
    env = cli_env(TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY=proxy, https_proxy=proxy, NO_PROXY="", no_proxy="")
    p = subprocess.run([str(BIN / "distgan"), "eval", "--fake", str(a), "--real", str(a), "--num", "4"],
                       env=env, capture_output=True, text=True, timeout=patience(120))  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert "cannot fetch the Inception weights from https://github.com/toshas/torch-fidelity/" in lines[0]
    assert "--inception-weights PATH" in lines[0] and str(tmp_path / "torch" / "hub" / "checkpoints") in lines[0]


def test_class_match_of_a_conditional_run(tmp_path, capsys):
    """A conditional G whose image depends on its class alone, in a run dir whose data (labelled shards) is 70%
    class 0: classes drawn like the data, and class_match 1.0 / 0.0 / the share of class 0 for a classifier that is
    always right / always wrong / always answers 0; reported, written to metrics.jsonl, and re-evaluated by --watch
    where a record lacks it."""
    import numpy as np
    from metrics_support import (
        ConstantClassifier,
        PrototypeClassifier,
        conditional_config,
        conditional_generator,
        labelled_shards,
        prototypes,
        save_script,
        write_run,
    )

    from distgan.export import generator_bytes
    from distgan.metrics.sources import GeneratorSource

    shards = labelled_shards(tmp_path / "shards", [140, 20, 20, 20])
    G, _ = conditional_generator(4, class_only=True)
    run = tmp_path / "run"
    ckpt = write_run(run, conditional_config(4, "data.source=shards", f"data.shards={shards}"), G)
    protos = prototypes(G, 4)
    clf = {name: save_script(m, tmp_path / f"{name}.pt") for name, m in {
        "right": PrototypeClassifier(protos), "shifted": PrototypeClassifier(protos, shift=1),
        "zero": ConstantClassifier(4, 0), "three": ConstantClassifier(3, 0)}.items()}  # fmt: skip
    net = save_tinynet(tmp_path / "net.pt")
    common = ["--metrics", "is", "--features", f"torchscript:{net}", "--num", 100, "--tracker", "none"]

    def records():
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    rc, out, err = run_main(["--run", run, *common, "--classifier", f"torchscript:{clf['right']}"], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert "ckpt-000000064 (0.064 kimg): 100 fakes; features" in lines[0], out
    assert "; 4 classes drawn like the data (its class frequencies);" in lines[0], out
    assert lines[-1].split() == ["class_match", "1"]
    r = records()[-1]
    assert (r["class_match"], r["classes"], r["classifier"]) == (1.0, "data", f"torchscript:{clf['right']}")
    assert run_main(["--run", run, *common, "--classifier", f"torchscript:{clf['shifted']}"], capsys)[0] == 0
    assert records()[-1]["class_match"] == 0.0
    # Always class 0: the share of images generated for class 0, by hand from the documented labels.
    labels = GeneratorSource(G, G.z_dim, seed=0, num_classes=4, class_probs=[0.7, 0.1, 0.1, 0.1]).labels(np.arange(100))
    share = (labels == 0).sum().item() / 100
    assert 0.6 < share < 0.8
    assert run_main(["--run", run, *common, "--classifier", f"torchscript:{clf['zero']}"], capsys)[0] == 0
    assert records()[-1]["class_match"] == share

    # The export alone: no run config, so classes drawn uniformly (control: far fewer of class 0).
    alone = tmp_path / "generator.safetensors"
    alone.write_bytes((ckpt / "generator.safetensors").read_bytes())
    rc, out, err = run_main(["--checkpoint", alone, *common, "--classifier", f"torchscript:{clf['zero']}"], capsys)
    assert rc == 0 and "4 classes drawn uniformly (no run config" in out, out + err
    uniform = GeneratorSource(G, G.z_dim, seed=0, num_classes=4).labels(np.arange(100))
    assert float(out.splitlines()[-1].split()[1]) == (uniform == 0).sum().item() / 100 < 0.4

    # --watch evaluates a checkpoint again when its record lacks class_match, and only then.
    run_main(["--run", run, *common], capsys)  # a record without class_match comes last
    n = len(records())
    watch = ["--watch", run, "--once", *common, "--classifier", f"torchscript:{clf['right']}"]
    assert run_main(watch, capsys)[0] == 0  # a record of this classifier's class_match: done
    assert len(records()) == n
    kept = [r for r in records() if r.get("classifier") != f"torchscript:{clf['right']}"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert run_main(watch, capsys)[0] == 0
    assert len(records()) == n and records()[-1]["class_match"] == 1.0

    # A classifier of another class count, or an unconditional generator: one line, exit code 2.
    rc, out, err = run_main(["--run", run, *common, "--classifier", f"torchscript:{clf['three']}"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "returns 3 class logits but the generator (ckpt-000000064) has 4 classes" in err
    from distgan.models import build_generator

    plain = conditional_config(0)
    (tmp_path / "plain.safetensors").write_bytes(
        generator_bytes(build_generator(plain.model), plain.to_dict()["model"], 0)
    )
    argv = ["--checkpoint", tmp_path / "plain.safetensors", *common, "--classifier", f"torchscript:{clf['right']}"]
    rc, out, err = run_main(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and "class_match needs a conditional generator" in err, err


@pytest.mark.slow
def test_watch_evaluates_each_checkpoint_of_a_training_run_into_its_wandb_run(tmp_path, capsys):
    """Training in the background, the watcher beside it: one metrics.jsonl line per checkpoint, finite values,
    and the watcher's own W&B offline file carries Metrics/* rows under the training run's id."""
    from distgan.checkpoint import CheckpointManager, load_file

    net = save_tinynet(tmp_path / "net.pt")
    run_dir = tmp_path / "run"
    env = cli_env(DISTGAN_CACHE=str(tmp_path / "cache"))
    train = [str(BIN / "distgan"), "train", "--config", SMOKE, "--run-dir", str(run_dir), "log.tracker=wandb",
             "train.keep_ckpts=10"]  # fmt: skip
    watch = [str(BIN / "distgan"), "eval", "--watch", str(run_dir), "--features", f"torchscript:{net}",
             "--metrics", "fid,kid,is,pr", "--num", "32", "--kid-subsets", "10", "--poll", "0.5",
             "--idle-timeout", "300"]  # fmt: skip
    start = time.time()
    trainer = subprocess.Popen(train, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watcher = subprocess.Popen(watch, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    train_out = trainer.communicate(timeout=patience(300))[0].decode()
    watch_out = watcher.communicate(timeout=patience(300))[0].decode()
    print(f"\ntraining + watching: {time.time() - start:.1f} s")
    assert trainer.returncode == 0, train_out[-3000:]
    assert watcher.returncode == 0, watch_out[-3000:]
    assert "has finished training; every checkpoint is evaluated" in watch_out, watch_out[-3000:]

    ckpts = CheckpointManager(run_dir).committed()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records] == [p.name for p in ckpts] == ["ckpt-000000064", "ckpt-000000128"]
    assert [r["nimg"] for r in records] == [64, 128]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("fid", "kid", "kid_std", "is", "is_std", "precision", "recall"))
        assert r["real"] == "data.source=shapes" and r["num"] == 32

    # W&B: the training's file and the watcher's, one run id (the checkpoint's), Metrics rows only in the latter.
    run_id = load_file(ckpts[-1], "state.pt")["tracker_run_id"]
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2, files
    metric_rows = {}
    for f in files:
        ids = {r.run.run_id for r in wandb_records(f) if r.WhichOneof("record_type") == "run"}
        assert ids == {run_id}
        for r in wandb_records(f):
            if r.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
                if "Metrics/fid" in row:
                    metric_rows.setdefault(f.parent.name, []).append(float(row["Progress/kimg"]))
    assert list(metric_rows.values()) == [[0.064, 0.128]], metric_rows

    # Watching again finds nothing new; `--run` evaluates the newest checkpoint (the reals from the cache).
    common = ["--features", f"torchscript:{net}", "--num", 32, "--cache", tmp_path / "cache", "--tracker", "none"]
    rc, out, err = run_main(["--watch", run_dir, "--once", "--metrics", "fid,kid,is,pr", *common], capsys)
    assert rc == 0 and "fid" not in out, out + err
    rc, out, err = run_main(["--run", run_dir, *common], capsys)
    assert rc == 0 and "ckpt-000000128 (0.128 kimg): 32 fakes vs 32 reals" in out and "(cache hit" in out, out + err
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3

    # The same under torchrun with two ranks, each generating and reading its half: the same values.
    two = [str(BIN / "torchrun"), "--nproc_per_node=2", "-m", "distgan.evaluate", "--", "--run", str(run_dir),
           "--no-cache", *map(str, common[:4]), "--tracker", "none"]  # fmt: skip
    start = time.time()
    p = subprocess.run(two, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=patience(300))
    print(f"torchrun, 2 ranks: {time.time() - start:.1f} s")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("eval: ") == 1 and "32 fakes vs 32 reals" in p.stdout and "(extracted in" in p.stdout
    assert p.stdout.splitlines()[1:] == out.splitlines()[1:], (p.stdout, out)
