"""Metrics (distgan/metrics): each value against a plain reference written out here, the extractors, the cache.

The references are deliberately naive (scipy's sqrtm, double loops), independent of torchmetrics and
torch-fidelity, which compute the values distgan reports. Nothing here touches the network: the Inception
download is made to fail, and the Inception network is exercised with random weights written by the test.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from metrics_support import (
    ConstantClassifier,
    PrototypeClassifier,
    conditional_config,
    conditional_generator,
    labelled_shards,
    prototypes,
    random_inception_weights,
    save_script,
    save_tinynet,
    write_folder,
)
from torch import nn

from support import make_trainer, write_shards


def gaussian(n, dim, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.3 + torch.eye(dim, dtype=torch.float64)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix) * scale + shift  # [n, dim], correlated


# ---------------------------------------------------------------------- the values, against references


def test_fid_matches_the_scipy_reference():
    from distgan.metrics.compute import fid

    a, b = gaussian(3000, 12, 0), gaussian(3000, 12, 1, shift=0.3, scale=1.2)
    A, B = a.numpy(), b.numpy()
    s1, s2 = np.cov(A, rowvar=False), np.cov(B, rowvar=False)
    ref = ((A.mean(0) - B.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid(a, b) == pytest.approx(ref, rel=1e-9)
    assert abs(fid(a, a)) < 1e-9  # the control: identical sets are at distance 0
    assert ref > 0.5


def test_kid_matches_a_brute_force_mmd():
    from distgan.metrics.compute import kid

    a, b = gaussian(30, 5, 2), gaussian(30, 5, 3, shift=0.4)
    A, B, d = a.numpy(), b.numpy(), a.shape[1]

    def k(x, y):
        return (float(np.dot(x, y)) / d + 1) ** 3

    m = len(A)
    xx = sum(k(A[i], A[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(B[i], B[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(A[i], B[j]) for i in range(m) for j in range(m)) / (m * m)
    # One subset of every image: the subset draw only permutes, and the unbiased MMD ignores order.
    mean, std = kid(a, b, subsets=1, size=m)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    assert kid(a, b, subsets=5, size=10, seed=1) == kid(a, b, subsets=5, size=10, seed=1)  # seeded subsets
    assert kid(a, b, subsets=5, size=10, seed=1) != kid(a, b, subsets=5, size=10, seed=2)


def test_inception_score_matches_a_brute_force_reference():
    from distgan.metrics.compute import inception_score

    logits = gaussian(40, 6, 4, scale=2.0)
    p = torch.softmax(logits, 1).numpy()
    py = p.mean(0)
    kl = [sum(p[i, c] * (math.log(p[i, c]) - math.log(py[c])) for c in range(p.shape[1])) for i in range(len(p))]
    mean, _ = inception_score(logits, splits=1)
    assert mean == pytest.approx(math.exp(sum(kl) / len(kl)), rel=1e-9)


def test_precision_recall_match_brute_force_knn():
    from distgan.metrics.compute import precision_recall

    real, fake, k = gaussian(60, 4, 5).float(), gaussian(50, 4, 6, shift=0.8).float(), 3

    def radii(x):  # distance to the k-th nearest other point
        return [sorted(float(torch.dist(x[i], x[j])) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def inside(points, centers, r):
        return np.mean([any(float(torch.dist(p, c)) <= rc for c, rc in zip(centers, r)) for p in points])

    precision, recall = precision_recall(real, fake, k)
    assert precision == pytest.approx(inside(fake, real, radii(real)), abs=1e-6)
    assert recall == pytest.approx(inside(real, fake, radii(fake)), abs=1e-6)
    assert 0 < precision < 1 and 0 < recall < 1  # the sets overlap partly: both counts are really tested
    assert precision_recall(real, real, k) == (1.0, 1.0)


def test_the_global_order_does_not_depend_on_the_world_size():
    from distgan.metrics.sources import LATENT_BLOCK, GeneratorSource, select, share

    idx = select(1000, 137, seed=3)
    assert len(idx) == 137 and list(idx) == sorted(set(idx)) and idx.max() < 1000
    for world in (1, 2, 3, 8):
        assert np.concatenate([share(idx, r, world) for r in range(world)]).tolist() == idx.tolist()
    assert select(10, 50, 0).tolist() == list(range(10))  # asking for more than there is: all of them
    G = nn.Sequential(nn.Linear(4, 12), nn.Unflatten(1, (3, 2, 2)), nn.Tanh())
    src = GeneratorSource(G, 4, seed=1)
    every = np.arange(LATENT_BLOCK + 10)
    z = src.latents(every)
    assert torch.equal(src.latents(every[LATENT_BLOCK - 3 : LATENT_BLOCK + 5]), z[LATENT_BLOCK - 3 : LATENT_BLOCK + 5])
    assert (src.resolution, src.channels) == (2, 3)


# ---------------------------------------------------------------------- extractors


def test_torchscript_extractor_end_to_end(tmp_path):
    from distgan.metrics import MetricsError
    from distgan.metrics.evaluator import Evaluator
    from distgan.metrics.features import make_extractor
    from distgan.metrics.sources import FolderSource

    ex = make_extractor(f"torchscript:{save_tinynet(tmp_path / 'net.pt')}")
    assert ex.identity.startswith("torchscript:") and len(ex.identity) == len("torchscript:") + 16
    a, b = write_folder(tmp_path / "a", 30, 0), write_folder(tmp_path / "b", 30, 1, high=100)
    ev = Evaluator(["fid", "kid", "is", "pr"], ex, FolderSource(a), num=30, use_cache=False, kid_subsets=10)
    same, other = ev.evaluate(FolderSource(a)), ev.evaluate(FolderSource(b))
    assert abs(same["fid"]) < 1e-6 and (same["precision"], same["recall"]) == (1.0, 1.0)
    assert other["fid"] > 1e-3 and other["kid"] > 1e-3 and other["precision"] < 0.5
    assert all(math.isfinite(v) for v in [*same.values(), *other.values()])

    # A module that returns the wrong shape, or a file that is not TorchScript: one line each.
    with warnings.catch_warnings():  # (torch 2.14 deprecates TorchScript)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(nn.Flatten(0)).save(str(tmp_path / "flat.pt"))
    with pytest.raises(MetricsError, match=r"returned features of shape \[.*\] for 30 images; it must return"):
        Evaluator(["fid"], make_extractor(f"torchscript:{tmp_path / 'flat.pt'}"), FolderSource(a), num=30,
                  use_cache=False).evaluate(FolderSource(b))  # fmt: skip
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(MetricsError, match="not a loadable TorchScript file"):
        make_extractor(f"torchscript:{tmp_path / 'junk.pt'}")
    with pytest.raises(MetricsError, match="must be `inception` or `torchscript:PATH`"):
        make_extractor("vgg")


def test_inception_extractor_from_a_weights_file(tmp_path):
    from distgan.metrics.features import make_extractor

    ex = make_extractor("inception", "cpu", str(random_inception_weights(tmp_path / "inception.pth")))
    assert ex.identity.startswith("inception-v3-compat:")
    grey = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)  # repeated to RGB; resized to 299 inside
    feats, logits = ex(grey)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(feats).all()


def test_inception_weights_never_run_pickled_code(tmp_path):
    from distgan.metrics import MetricsError
    from distgan.metrics.features import make_extractor

    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"fc.weight": Evil()}))
    with pytest.raises(MetricsError, match="cannot load Inception weights"):
        make_extractor("inception", "cpu", str(tmp_path / "evil.pth"))
    assert not canary.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # set only while the weights load


def test_inception_offline_without_a_copy_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error

    from distgan.metrics import MetricsError
    from distgan.metrics import features as features_module

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(features_module.urllib.request, "urlopen", offline)
    with pytest.raises(MetricsError) as info:
        features_module.make_extractor("inception")
    msg = str(info.value)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert "\n" not in msg and "https://github.com/toshas/torch-fidelity/releases/" in msg
    assert "--inception-weights PATH" in msg and str(cached) in msg and "name resolution" in msg
    assert not list(cached.parent.glob("*"))  # no partial download left behind


def test_fetch_checks_the_hash_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """The download path, from a server on loopback: a file whose sha256 starts as its name says is kept, another
    is refused with one line and removed."""
    import functools
    import hashlib
    import http.server
    import threading

    from distgan.metrics import MetricsError
    from distgan.metrics.features import fetch

    served = tmp_path / "served"
    served.mkdir()
    (served / "w.pth").write_bytes(b"weights" * 1000)
    prefix = hashlib.sha256((served / "w.pth").read_bytes()).hexdigest()[:8]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    url = f"http://127.0.0.1:{server.server_address[1]}/w.pth"
    try:
        fetch(url, tmp_path / "cache" / "w.pth", prefix)
        assert (tmp_path / "cache" / "w.pth").read_bytes() == (served / "w.pth").read_bytes()
        with pytest.raises(MetricsError, match=r"does not start with 00000000\); download it where"):
            fetch(url, tmp_path / "other" / "w.pth", "00000000")
        assert not list((tmp_path / "other").iterdir())
    finally:
        server.shutdown()


# ---------------------------------------------------------------------- the real-features cache


def test_real_features_cache_hits_without_reading_and_misses_on_a_new_manifest(tmp_path):
    from distgan.errors import DataError
    from distgan.metrics.evaluator import Evaluator
    from distgan.metrics.features import make_extractor
    from distgan.metrics.sources import FolderSource, ShardSource

    shards = tmp_path / "shards"
    write_shards(shards, 3, [20, 15, 25], resolution=16)
    ex = make_extractor(f"torchscript:{save_tinynet(tmp_path / 'net.pt')}")
    fake = FolderSource(write_folder(tmp_path / "fake", 40, 0))
    cache = tmp_path / "cache"

    def evaluate(num=40):
        ev = Evaluator(["fid", "kid"], ex, ShardSource(str(shards)), num=num, cache_dir=cache, kid_subsets=10)
        return ev.evaluate(fake), ev.real_note

    first, note = evaluate()
    assert note.startswith("extracted") and len(list(cache.glob("*.safetensors"))) == 1
    for tar in shards.glob("*.tar"):  # the proof that a hit reads no image: there are none left to read
        tar.unlink()
    second, note = evaluate()
    assert note.startswith("cache hit") and second == first
    with pytest.raises(DataError, match="cannot read shard"):  # another N is another key: a miss, so it reads
        evaluate(num=30)

    # A changed manifest (e.g. re-prepared data) is a miss, even with the same files back in place.
    write_shards(shards, 3, [20, 15, 25], resolution=16)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["created"] = "another day"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    third, note = evaluate()
    assert note.startswith("extracted") and len(list(cache.glob("*.safetensors"))) == 2
    assert third == pytest.approx(first)  # the same images: the same values, recomputed


def test_the_cache_key_covers_extractor_resolution_and_data(tmp_path):
    from distgan.metrics.evaluator import Evaluator
    from distgan.metrics.features import make_extractor
    from distgan.metrics.sources import FolderSource

    real, fake = write_folder(tmp_path / "real", 10, 0), FolderSource(write_folder(tmp_path / "fake", 10, 1))
    a = make_extractor(f"torchscript:{save_tinynet(tmp_path / 'a.pt')}")
    b = make_extractor(f"torchscript:{save_tinynet(tmp_path / 'b.pt', seed=1)}")
    notes = []
    for ex in (a, b, a):
        ev = Evaluator(["fid"], ex, FolderSource(real), num=10, cache_dir=tmp_path / "cache")
        ev.evaluate(fake)
        notes.append(ev.real_note.split(" ")[0])
    shutil.copy(real / "0000.png", real / "0000-copy.png")  # a new file in the folder: another data identity
    ev = Evaluator(["fid"], a, FolderSource(real), num=10, cache_dir=tmp_path / "cache")
    ev.evaluate(fake)
    assert notes + [ev.real_note.split(" ")[0]] == ["extracted", "extracted", "cache", "extracted"]


# ---------------------------------------------------------------------- inline evaluation and config


def test_inline_evaluation_during_training(tmp_path):
    from distgan.metrics import MetricsError
    from distgan.tracking import Tracker

    class Recorder(Tracker):
        def write(self, values, kimg):
            rows.append((kimg, values))

    rows = []
    net = save_tinynet(tmp_path / "net.pt")
    overrides = ["eval.every_kimg=0.064", "eval.metrics=fid,is", "eval.num=16", f"eval.features=torchscript:{net}",
                 f"eval.cache={tmp_path / 'cache'}", "train.log_every_kimg=1"]  # fmt: skip
    trainer = make_trainer(*overrides, run_dir=tmp_path / "run")
    trainer.fit(Recorder())
    metrics = [(kimg, v) for kimg, v in rows if "Metrics/fid" in v]
    assert [kimg for kimg, _ in metrics] == [0.064, 0.128]
    assert all(math.isfinite(v[k]) for _, v in metrics for k in ("Metrics/fid", "Metrics/is", "Metrics/is_std"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["nimg"] for r in lines if "Metrics/fid" in r] == [64, 128]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    # A bad extractor stops the run before its first step, not at the first evaluation.
    bad = make_trainer("eval.every_kimg=0.064", f"eval.features=torchscript:{tmp_path / 'missing.pt'}")
    with pytest.raises(MetricsError, match="no such file"):
        bad.fit()
    assert bad.cur_nimg == 0


def test_eval_config_is_validated():
    from distgan.config import load_config
    from distgan.errors import ConfigError

    bad = ["eval.metrics=fid,lpips", "eval.features=vgg", "eval.num=1", "eval.every_kimg=-1"]
    with pytest.raises(ConfigError) as info:
        load_config(None, bad).validate()
    msg = str(info.value)
    for part in ("eval.metrics 'fid,lpips'", "eval.features 'vgg'", "eval.num=1 must be >= 2", "eval.every_kimg=-1.0"):
        assert part in msg, msg
    load_config(None, ["eval.metrics=fid,kid,is,pr", "eval.features=torchscript:x.pt"]).validate()


# ---------------------------------------------------------------------- class_match (conditional generators)

FREQ = [0.7, 0.1, 0.1, 0.1]  # the data's class frequencies in these tests
NUM_CLASS_MATCH = 200


def _classifiers(tmp_path, G) -> dict[str, str]:
    """TorchScript classifiers of a class-only G's images, whose answers the test knows: `right` (the nearest class
    prototype: every image's own class), `shifted` (always the next class: never right), `zero` (always class 0)."""
    protos = prototypes(G, 4)
    modules = {"right": PrototypeClassifier(protos), "shifted": PrototypeClassifier(protos, shift=1),
               "zero": ConstantClassifier(4, 0)}  # fmt: skip
    return {name: str(save_script(m, tmp_path / f"{name}.pt")) for name, m in modules.items()}


def test_class_match_is_the_share_of_images_put_in_their_own_class(tmp_path):
    from distgan.metrics import MetricsError
    from distgan.metrics.compute import class_match
    from distgan.metrics.evaluator import Evaluator
    from distgan.metrics.features import make_classifier, make_extractor
    from distgan.metrics.sources import FolderSource, GeneratorSource

    G, _ = conditional_generator(4, class_only=True)  # G(z, c) depends on c alone: a prototype per class
    ex = make_extractor(f"torchscript:{save_tinynet(tmp_path / 'net.pt')}")
    paths = _classifiers(tmp_path, G)

    def evaluate(classifier: str, probs=FREQ, source=None):
        ev = Evaluator(["is"], ex, num=NUM_CLASS_MATCH, batch=32, use_cache=False,
                       classifier=make_classifier(f"torchscript:{classifier}"))  # fmt: skip
        return ev.evaluate(source or GeneratorSource(G, G.z_dim, seed=0, num_classes=4, class_probs=probs))

    values = evaluate(paths["right"])
    assert list(values) == ["is", "is_std", "class_match"] and values["class_match"] == 1.0
    assert evaluate(paths["shifted"])["class_match"] == 0.0
    # Always class 0: the share of images generated for class 0, by hand from the documented labels; with the
    # data's frequencies that is near 0.7, drawn uniformly near 0.25.
    labels = GeneratorSource(G, G.z_dim, seed=0, num_classes=4, class_probs=FREQ).labels(np.arange(NUM_CLASS_MATCH))
    share = (labels == 0).sum().item() / NUM_CLASS_MATCH
    assert evaluate(paths["zero"])["class_match"] == share and 0.6 < share < 0.8
    assert evaluate(paths["zero"], probs=None)["class_match"] < 0.4

    assert class_match(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75
    assert class_match(torch.eye(3)[[2, 0, 1]], torch.tensor([2, 0, 0])) == 2 / 3  # logits: their argmax

    # Refusals, one line each: a classifier of another class count, an unconditional G, a folder of images, a
    # module that does not return logits [N, K].
    save_script(ConstantClassifier(3, 0), tmp_path / "three.pt")
    with pytest.raises(MetricsError, match=r"returns 3 class logits but the generator \(generator\) has 4 classes"):
        evaluate(str(tmp_path / "three.pt"))
    plain = nn.Sequential(nn.Linear(16, 3 * 32 * 32), nn.Unflatten(1, (3, 32, 32)), nn.Tanh())
    with pytest.raises(MetricsError, match=r"needs a conditional generator; generator is unconditional"):
        evaluate(paths["right"], source=GeneratorSource(plain, 16))
    with pytest.raises(MetricsError, match="were not generated for known classes"):
        evaluate(paths["right"], source=FolderSource(write_folder(tmp_path / "f", 4, 0, size=32)))
    save_script(nn.Flatten(0), tmp_path / "flat.pt")
    with pytest.raises(MetricsError, match=r"a classifier must return class logits \[N, K\]"):
        evaluate(str(tmp_path / "flat.pt"))
    with pytest.raises(MetricsError, match="must be `torchscript:PATH`"):
        make_classifier("resnet")


def test_classes_are_drawn_like_the_data_else_uniformly(tmp_path):
    from distgan.metrics.sources import data_class_probs

    shards = labelled_shards(tmp_path / "counted", [140, 20, 20, 20])
    probs, how = data_class_probs(conditional_config(4, "data.source=shards", f"data.shards={shards}"), 4)
    assert probs == pytest.approx(FREQ) and how == "like the data (its class frequencies)"
    assert data_class_probs(conditional_config(4, "data.source=shapes"), 4)[0] == [0.25] * 4  # uniform by design
    write_shards(tmp_path / "uncounted", 1, 8, num_classes=4, label=lambda i: i % 4)  # an older manifest
    cases = {
        "no run config": None,
        "does not say its class frequencies": conditional_config(4, "data.source=shards",
                                                                 f"data.shards={tmp_path / 'uncounted'}"),
        "the data has 4 classes, the generator 3": conditional_config(4, "data.source=shards", f"data.shards={shards}"),
        "unreadable": conditional_config(4, "data.source=shards", f"data.shards={tmp_path / 'moved'}"),
    }  # fmt: skip
    for why, cfg in cases.items():
        probs, how = data_class_probs(cfg, 3 if "generator 3" in why else 4)
        assert probs is None and how.startswith("uniformly (") and why in how, (why, how)
    assert data_class_probs(conditional_config(10, "data.source=mnist"), 10)[0] is None  # only the labels would say


def _class_match_ranks(rank, world, export, net, classifiers):
    from distgan import distributed
    from distgan.export import load_generator
    from distgan.metrics.evaluator import Evaluator
    from distgan.metrics.features import make_classifier, make_extractor
    from distgan.metrics.sources import GeneratorSource

    dist = distributed.setup("fp32", threads=1)
    try:
        G = load_generator(export)
        out = {}
        for name, path in classifiers.items():
            ev = Evaluator(["is"], make_extractor(f"torchscript:{net}"), None, dist, num=45, batch=8, use_cache=False,
                           classifier=make_classifier(f"torchscript:{path}"))  # fmt: skip
            source = GeneratorSource(G, G.z_dim, seed=0, num_classes=G.num_classes, class_probs=FREQ)
            out[name] = ev.evaluate(source)
        out["labels"] = GeneratorSource(G, G.z_dim, seed=0, num_classes=4, class_probs=FREQ).labels(np.arange(45))
        return out
    finally:
        dist.close()


@pytest.mark.dist
def test_class_match_on_two_ranks_is_one_ranks(tmp_path):
    """Each rank classifies its share (22 / 23 images, in uneven batches of 8); the gathered predictions meet the
    labels in the global order: a share out of place would put images against other images' classes."""
    from distgan.export import generator_bytes
    from support import run_ranks

    G, cfg = conditional_generator(4, class_only=True)
    export = tmp_path / "generator.safetensors"
    export.write_bytes(generator_bytes(G, cfg.to_dict()["model"], 0))
    args = (str(export), str(save_tinynet(tmp_path / "net.pt")), _classifiers(tmp_path, G))
    one = _class_match_ranks(0, 1, *args)
    two = run_ranks(_class_match_ranks, 2, *args)
    share = (one["labels"] == 0).float().mean().item()
    assert [one[n]["class_match"] for n in ("right", "shifted", "zero")] == [1.0, 0.0, pytest.approx(share)]
    for name in ("right", "shifted", "zero"):
        assert two[0][name] == two[1][name]  # every rank gets rank 0's values
        assert two[0][name]["class_match"] == one[name]["class_match"], name
        assert two[0][name]["is"] == pytest.approx(one[name]["is"], rel=1e-5)
