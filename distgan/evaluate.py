"""`distgan eval`: FID, KID, Inception Score and precision/recall of a run, a checkpoint or a folder of images.

    distgan eval --run runs/default                          # its newest verified checkpoint vs its training data
    distgan eval --checkpoint runs/default/checkpoints/ckpt-000300032 --metrics fid,kid,is,pr --num 50000
    distgan eval --fake samples/ --real data/shapes-32       # images vs shards (or --real DIR: another folder)
    distgan eval --watch runs/default                        # each new checkpoint as training commits it
    distgan eval --run runs/cond --classifier torchscript:classifier.pt   # + class_match of a conditional G
    torchrun --nproc_per_node=8 -m distgan.evaluate -- --run runs/default --num 50000   # each rank its share

Under torchrun, put `--` before the arguments: torchrun's own parser takes `--run` and `--num` for abbreviations
of its `--run-path` and `--numa-binding` and stops (`--run-dir` is another name of `--run`).

Prints one line per metric. For a run (--run, --watch, or a --checkpoint inside RUN_DIR/checkpoints) it also
appends a line to RUN_DIR/metrics.jsonl (kimg, nimg, checkpoint, settings, values) and, when the run logs to
W&B, logs `Metrics/<name>` at the checkpoint's kimg into the training's own W&B run (its id is in the
checkpoint's state.pt). The reals default to the run's training data (its config's data.shards, or its
in-memory dataset); their features are cached (distgan/metrics/cache.py), so later evaluations only generate.

A class-conditional generator draws the class of each image like the data (the run's config: the data's class
frequencies, as the training drew its generated labels), else uniformly; class i is a function of --seed and i,
like the latent. `--classifier torchscript:PATH` (a TorchScript module you trust: images in [-1, 1] -> class
logits [N, K], K the generator's class count) adds `class_match`: the share of generated images the classifier
assigns to the class they were generated for. Inline evaluation (eval.*) has no classifier.

--watch polls the run dir, evaluates every newly committed checkpoint once (metrics.jsonl says which were done,
so a restarted watcher carries on) and stops when the run's newest checkpoint has reached train.total_kimg
(or after one pass with --once). It is a process of its own, launched beside the training (another GPU, or
the CPU), so training never waits for an evaluation; `eval.every_kimg` instead evaluates inside the training
loop, with every rank pausing for it.

Bad input (a missing run, no checkpoint, a bad --features, --num < 2, reals and fakes of different resolution,
Inception weights offline and not cached) is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # run as a file: import this checkout's distgan

from distgan import launcher  # noqa: E402
from distgan.errors import CheckpointError, UserError  # noqa: E402
from distgan.metrics import (  # noqa: E402
    CLASS_MATCH,
    METRICS,
    MetricsError,
    classifier_problem,
    features_problem,
    parse_metrics,
)

METRICS_FILE = "metrics.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distgan eval", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    # `--run-dir` too: the name `distgan train` uses (and one that torchrun's parser leaves alone).
    what.add_argument("--run", "--run-dir", dest="run", metavar="RUN_DIR", help="a run dir: its newest checkpoint")
    what.add_argument("--checkpoint", metavar="PATH", help="a checkpoint folder, or a generator .safetensors export")
    what.add_argument("--fake", metavar="DIR", help="a folder of generated images")
    what.add_argument("--watch", metavar="RUN_DIR", help="evaluate each new checkpoint of a (training) run")
    p.add_argument("--real", help="reference images: shards (folder or manifest.json) or an image folder "
                   "(default: the run's training data)")  # fmt: skip
    p.add_argument("--metrics", default="fid", help=f"comma-separated, of {','.join(METRICS)} (default: fid)")
    p.add_argument("--num", type=int, default=10000, help="generated images (default: 10000)")
    p.add_argument("--num-real", type=int, help="real images, at most all (default: --num)")
    p.add_argument("--features", default="inception", help="inception (default) or torchscript:PATH")
    p.add_argument("--inception-weights", metavar="PATH", help="a local copy of the FID Inception weights")
    p.add_argument("--classifier", metavar="torchscript:PATH",
                   help="a conditional generator: also report class_match, the share of its images this classifier "
                   "(a TorchScript file you trust: images in [-1, 1] -> class logits [N, K], K = the generator's "
                   "classes) assigns to the class they were generated for")  # fmt: skip
    p.add_argument("--batch", type=int, default=64, help="images per forward, per rank (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="latents and real subset (default: 0)")
    p.add_argument(
        "--cache", metavar="DIR", help="real-features cache (default: $DISTGAN_CACHE or ~/.cache/distgan/stats)"
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached real features")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets (default: 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset (default: 1000)")
    p.add_argument("--pr-k", type=int, default=3, help="precision/recall: k of the k-NN radii (default: 3)")
    p.add_argument("--tracker", choices=("auto", "none"), default="auto",
                   help="auto: log into the run's W&B run when it has one; none: metrics.jsonl only")  # fmt: skip
    p.add_argument("--once", action="store_true", help="--watch: one pass over the checkpoints, then exit")
    p.add_argument("--poll", type=float, default=30.0, help="--watch: seconds between looks (default: 30)")
    p.add_argument("--idle-timeout", type=float, default=0.0,
                   help="--watch: give up after this many seconds without a new checkpoint (0: never)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # `torchrun ... -m distgan.evaluate -- ARGS` (see the module doc) passes the `--` on
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        metrics = _check_args(args)
    except UserError as e:
        return _fail(e)
    from distgan import distributed

    try:
        dist = distributed.setup("fp32")
    except UserError as e:
        return _fail(e)
    try:
        if args.watch:
            watch(args, metrics, dist)
        else:
            evaluate_once(args, metrics, dist)
    except UserError as e:
        return _fail(e)
    finally:
        dist.close()
    return 0


def _check_args(args) -> list[str]:
    """What can be refused before torch is imported."""
    metrics = parse_metrics(args.metrics)
    problem = features_problem(args.features)
    if problem:
        raise MetricsError(problem)
    if args.classifier is not None:
        problem = classifier_problem(args.classifier)
        if problem:
            raise MetricsError(f"--classifier: {problem}")
        if args.fake:
            raise MetricsError("--classifier measures a conditional generator (--run, --checkpoint or --watch): "
                               "the images of a --fake folder were not generated for known classes")  # fmt: skip
    if args.num < 2 or (args.num_real is not None and args.num_real < 2):
        raise MetricsError(f"--num {min(args.num, args.num_real or args.num)}: the metrics need at least 2 images")
    for name in ("batch", "kid_subsets", "kid_subset_size", "pr_k"):
        if getattr(args, name) < 1:
            raise MetricsError(f"--{name.replace('_', '-')} must be >= 1")
    if args.run and not Path(args.run).is_dir():  # (--watch may start before the training makes its run dir)
        raise CheckpointError(f"--run {args.run}: no such run dir")
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise CheckpointError(f"--checkpoint {args.checkpoint}: no such checkpoint")
    return metrics


def _fail(e: UserError) -> int:
    if launcher.rank() == 0:
        print(f"distgan eval: error: {e}", file=sys.stderr)
    return e.exit_code


# ---------------------------------------------------------------------- building blocks


def run_config(run_dir: Path):
    """The run's config (RUN_DIR/config.yaml, written by the training), or None."""
    import yaml

    from distgan.config import from_dict

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    return from_dict(yaml.safe_load(path.read_text()) or {})


def make_evaluator(args, metrics, dist, cfg):
    from distgan.metrics.evaluator import Evaluator
    from distgan.metrics.features import make_classifier, make_extractor
    from distgan.metrics.sources import open_source, training_source

    needs_real = any(m != "is" for m in metrics)
    real = None
    if needs_real:
        if args.real:
            real = open_source(args.real)
        elif cfg is not None:
            real = training_source(cfg)
        else:
            names = ", ".join(m for m in metrics if m != "is")
            raise MetricsError(f"{names} compare with real images: give them with --real (shards or an image folder)")
    with dist.download_first():  # rank 0 fetches the Inception weights first if it must (caches may be shared)
        extractor = make_extractor(args.features, dist.device, args.inception_weights)
    classifier = make_classifier(args.classifier, dist.device) if args.classifier else None
    return Evaluator(metrics, extractor, real, dist, num=args.num, num_real=args.num_real, batch=args.batch,
                     seed=args.seed, cache_dir=args.cache, use_cache=not args.no_cache, kid_subsets=args.kid_subsets,
                     kid_subset_size=args.kid_subset_size, pr_k=args.pr_k, classifier=classifier)  # fmt: skip


def evaluate_generator(ev, export: Path, dist, args, run_dir: Path | None, checkpoint: str, tracker=None) -> dict:
    """Generate, evaluate, report (rank 0: print, metrics.jsonl, tracker); returns the record."""
    from distgan.export import load_generator
    from distgan.metrics.sources import GeneratorSource, data_class_probs

    G = load_generator(export).to(dist.device)  # (safetensors reads onto "cpu", not Accelerate's "cpu:0")
    k = int(getattr(G, "num_classes", 0) or 0)
    probs, how = None, None
    if k:  # drawn like the data: rank 0 reads the run's config (and the data's manifest), every rank the same
        if dist.is_main:
            probs, how = data_class_probs(run_config(run_dir) if run_dir is not None else None, k)
        probs, how = dist.broadcast_object((probs, how))
    start = time.time()
    values = ev.evaluate(GeneratorSource(G, G.z_dim, args.seed, name=checkpoint, num_classes=k, class_probs=probs))
    classes = {"classes": "data" if probs is not None else "uniform"} if k else {}
    record = {"kimg": G.nimg / 1000, "nimg": G.nimg, "checkpoint": checkpoint, **_settings(args, ev), **classes,
              **values, "seconds": round(time.time() - start, 3)}  # fmt: skip
    if dist.is_main:
        _report(record, ev, f"{checkpoint} ({G.nimg / 1000:.3f} kimg)", f"{k} classes drawn {how}" if k else "")
        if run_dir is not None:
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        if tracker is not None:
            # The training's W&B step numbering (tracking.py: nimg + the images its rollbacks discarded).
            tracker.step_offset = _train_state(export.parent).get("nimg_discarded", 0)
            tracker.log({f"Metrics/{k}": v for k, v in values.items()}, G.nimg / 1000)
    return record


def _settings(args, ev) -> dict:
    real = ev.real.name if ev.real is not None and ev.needs_real else None
    classifier = {"classifier": args.classifier} if getattr(args, "classifier", None) else {}
    return {"num": args.num, "num_real": ev.num_real if real else None, "features": args.features, "real": real,
            "seed": args.seed, **classifier}  # fmt: skip


def _report(record: dict, ev, what: str, classes: str = "") -> None:
    n_fake, n_real = getattr(ev, "last_counts", (record["num"], 0))
    real = f" vs {n_real} reals of {record['real']} ({ev.real_note})" if record["real"] else ""
    classes = f"; {classes}" if classes else ""
    print(f"eval: {what}: {n_fake} fakes{real}; features {record['features']}{classes}; {record['seconds']:.1f} s",
          flush=True)  # fmt: skip
    for name in ("fid", "kid", "is", "precision", "recall", CLASS_MATCH):
        if name in record:
            std = f"  (std {record[name + '_std']:.6g})" if f"{name}_std" in record else ""
            print(f"{name:<10} {record[name]:.6g}{std}", flush=True)


# ---------------------------------------------------------------------- one evaluation


def evaluate_once(args, metrics, dist) -> dict:
    from distgan.checkpoint import CheckpointManager
    from distgan.export import checkpoint_export

    if args.fake:
        from distgan.metrics.sources import FolderSource

        ev = make_evaluator(args, metrics, dist, None)
        fake = FolderSource(args.fake)
        start = time.time()
        values = ev.evaluate(fake)
        record = {"fake": fake.name, **_settings(args, ev), **values, "seconds": round(time.time() - start, 3)}
        if dist.is_main:
            _report(record, ev, fake.name)
        return record
    if args.run:
        run_dir = Path(args.run)
        ckpt = CheckpointManager(run_dir, warn=_warn(dist)).latest_on_every_rank(dist)
        if ckpt is None:
            raise CheckpointError(f"--run {run_dir}: no verified checkpoint in {run_dir / 'checkpoints'}")
    else:
        ckpt = Path(args.checkpoint)
        run_dir = ckpt.parent.parent if ckpt.is_dir() and ckpt.parent.name == "checkpoints" else None
    export = checkpoint_export(ckpt)
    cfg = run_config(run_dir) if run_dir is not None else None
    ev = make_evaluator(args, metrics, dist, cfg)
    tracker = open_tracker(args, cfg, ckpt, run_dir) if dist.is_main and run_dir is not None else None
    try:
        return evaluate_generator(ev, export, dist, args, run_dir, ckpt.name, tracker)
    finally:
        if tracker is not None:
            tracker.finish()


def _warn(dist):
    return (lambda msg: print(f"warning: {msg}", file=sys.stderr)) if dist.is_main else None


def _train_state(ckpt: Path) -> dict:
    """A checkpoint's state.pt (hash-checked, weights_only), or {} for a bare generator export."""
    from distgan.checkpoint import load_file

    return load_file(ckpt, "state.pt") if (ckpt / "state.pt").is_file() else {}


def open_tracker(args, cfg, ckpt: Path, run_dir: Path):
    """The training run's own W&B run, continued (its id from the checkpoint), or None."""
    from distgan.console import Console
    from distgan.tracking import make_tracker

    if args.tracker == "none" or cfg is None or cfg.log.tracker != "wandb" or not ckpt.is_dir():
        return None
    run_id = _train_state(ckpt).get("tracker_run_id")
    if not run_id:
        return None
    # A silent console: this command prints its own lines; the tracker only carries the values to W&B.
    return make_tracker("wandb", Console(False), cfg, run_dir, run_id, secondary=True)


# ---------------------------------------------------------------------- watching a run


def watch(args, metrics, dist) -> None:
    """Evaluate every new checkpoint of RUN_DIR until the run is finished (see the module doc)."""
    from distgan.checkpoint import CheckpointManager, verify
    from distgan.export import checkpoint_export

    run_dir = Path(args.watch)
    ckpts = CheckpointManager(run_dir)
    ev, tracker = None, None
    done = _done(run_dir, args) if dist.is_main else set()
    bad: set[str] = set()  # committed but failing verification: warned about once, not re-hashed every poll
    last_new = time.monotonic()
    if dist.is_main:
        print(f"eval: watching {run_dir} for checkpoints (every {args.poll:g} s)", flush=True)
    try:
        while True:
            plan = None
            if dist.is_main:  # rank 0 looks, every rank follows its plan
                cfg = run_config(run_dir)
                committed = ckpts.committed()
                pending = []
                for p in (p for p in committed if p.name not in done | bad):
                    problem = verify(p)
                    if problem:
                        bad.add(p.name)
                        print(f"warning: skipped {p}: not usable ({problem})", file=sys.stderr)
                    else:
                        pending.append(p.name)
                total = cfg.train.total_kimg * 1000 if cfg is not None else float("inf")
                finished = bool(committed) and _nimg(committed[-1]) >= total
                plan = (pending, finished)
            pending, finished = dist.broadcast_object(plan)
            for name in pending:
                ckpt = ckpts.dir / name
                if ev is None:
                    ev = make_evaluator(args, metrics, dist, run_config(run_dir))
                if tracker is None and dist.is_main:
                    tracker = open_tracker(args, run_config(run_dir), ckpt, run_dir) or False
                try:
                    export = checkpoint_export(ckpt)
                    evaluate_generator(ev, export, dist, args, run_dir, name, tracker or None)
                except CheckpointError as e:  # purged (train.keep_ckpts) between the look and the read
                    if dist.is_main:
                        print(f"warning: skipped {name}: {e}", file=sys.stderr)
                done.add(name)
                last_new = time.monotonic()
            if args.once or (finished and not pending):
                break
            if args.idle_timeout and time.monotonic() - last_new > args.idle_timeout:
                if dist.is_main:
                    print(f"eval: no new checkpoint in {run_dir} for {args.idle_timeout:.0f} s; stopping", flush=True)
                break
            time.sleep(args.poll)
    finally:
        if tracker:
            tracker.finish()
    if dist.is_main and finished:
        print(f"eval: {run_dir} has finished training; every checkpoint is evaluated", flush=True)


def _nimg(ckpt: Path) -> int:
    return int(ckpt.name.split("-", 1)[1])


def _done(run_dir: Path, args) -> set[str]:
    """Checkpoints metrics.jsonl already has with these settings and every value asked for (class_match: by the
    same --classifier)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return set()
    wanted = [v for m in parse_metrics(args.metrics) for v in METRICS[m]] + ([CLASS_MATCH] if args.classifier else [])
    done = set()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        same = (r.get("features"), r.get("num"), r.get("seed")) == (args.features, args.num, args.seed)
        same = same and (not args.classifier or r.get("classifier") == args.classifier)  # class_match: whose
        if same and all(v in r for v in wanted) and "checkpoint" in r:
            done.add(r["checkpoint"])
    return done


if __name__ == "__main__":
    sys.exit(main())
