"""Metrics on two real gloo processes equal one process's: each rank generates and reads only its share.

The control: a rank's own share alone (what a launch without the gather would report) gives other values, so
the equality is not a given.
"""

import math

import pytest
from metrics_support import save_tinynet

from support import run_ranks, write_shards

pytestmark = pytest.mark.dist

NUM = 45  # of 60 reals in 3 shards: a seeded subset, split 22 / 23 over two ranks, batches of 8 (uneven)
METRICS = ["fid", "kid", "is", "pr"]


def _evaluate(rank, world, export, shards, net, cache):
    import torch

    from distgan import distributed
    from distgan.export import load_generator
    from distgan.metrics.compute import compute_metrics
    from distgan.metrics.evaluator import Evaluator
    from distgan.metrics.features import make_extractor
    from distgan.metrics.sources import GeneratorSource, ShardSource, select, share

    dist = distributed.setup("fp32", threads=1)
    try:
        ex = make_extractor(f"torchscript:{net}")
        real = ShardSource(shards)
        G = load_generator(export)
        ev = Evaluator(METRICS, ex, real, dist, num=NUM, batch=8, cache_dir=cache, kid_subsets=10)
        values = ev.evaluate(GeneratorSource(G, G.z_dim, seed=0))
        again = ev.evaluate(GeneratorSource(G, G.z_dim, seed=0))  # the reals kept: the same again

        # The control: this rank's share of the same images, not gathered.
        fake_idx, real_idx = share(select(None, NUM, 0), rank, world), share(select(real.count, NUM, 0), rank, world)
        fake = torch.cat([ex(b)[0] for b in GeneratorSource(G, G.z_dim, seed=0).images(fake_idx, 8)])
        reals = torch.cat([ex(b)[0] for b in real.images(real_idx, 8)])
        local = compute_metrics(["fid"], reals, fake)
        return {"values": values, "again": again, "local": local, "note": ev.real_note}
    finally:
        dist.close()


def test_two_ranks_give_one_ranks_metrics(tmp_path):
    from distgan.config import load_config
    from distgan.export import generator_bytes
    from distgan.models import build_generator

    cfg = load_config(None, ["model.z_dim=16", "model.dcgan.g_width=8"])
    export = tmp_path / "generator.safetensors"
    export.write_bytes(generator_bytes(build_generator(cfg.model).eval(), cfg.to_dict()["model"], 0))
    shards = tmp_path / "shards"
    write_shards(shards, 3, [20, 15, 25], resolution=32)
    net = save_tinynet(tmp_path / "net.pt")
    args = (str(export), str(shards), str(net))

    one = _evaluate(0, 1, *args, tmp_path / "cache1")  # this process: a world of one
    two = run_ranks(_evaluate, 2, *args, tmp_path / "cache2")
    assert two[0]["values"] == two[1]["values"]  # every rank gets rank 0's values
    for key, value in one["values"].items():
        assert math.isfinite(value)
        assert two[0]["values"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert two[0]["again"] == two[0]["values"] and one["again"] == one["values"]
    assert two[0]["note"] == "kept from the first evaluation"
    assert len(list((tmp_path / "cache2").glob("*.safetensors"))) == 1  # written once, by rank 0

    # The control: either rank's own share alone is another FID.
    for r in (0, 1):
        assert abs(two[r]["local"]["fid"] - one["values"]["fid"]) > 1e-3 * abs(one["values"]["fid"])
