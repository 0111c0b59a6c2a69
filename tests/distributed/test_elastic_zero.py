"""Elastic resume: a ZeRO checkpoint on another number of ranks or under DDP, a DDP checkpoint under ZeRO.

A ZeRO checkpoint holds each network whole besides DeepSpeed's per-rank partitions (distgan/distributed/zero.py):
the module, and a torch Adam state_dict gathered through DeepSpeed's `safe_get_full_*`. Resuming on another world
size or strategy sets the module, ZeRO's fp32 master weights and Adam's step and moments from it (through
`safe_set_full_*`), or loads it like a DDP checkpoint. What must hold, on real gloo ranks:

- After loading, every parameter, every Adam exp_avg and exp_avg_sq and the step are *equal* (torch.equal) to the
  saved ones, read back on the new strategy (under ZeRO through DeepSpeed's `safe_get_full_*`, i.e. re-assembled
  from the new ranks' partitions): ZeRO-2 on 2 ranks -> ZeRO-2 on 1, DDP on 1 (channels_last: the moments take
  their parameter's memory layout), ZeRO-1 on 3; DDP on 2 ranks -> ZeRO-2 on 1 and on 3. The ZeRO run is bf16
  (autocast, fp32 parameters), the DDP run fp32.
- The moments really moved into place: on the same 2 ranks, one step after the ZeRO checkpoint was resumed under
  DDP equals, bit for bit, one step after DeepSpeed's own load of it (2-rank reductions are exact, and ZeRO trains
  exactly what DDP trains); and likewise the DDP checkpoint resumed under ZeRO-2 against under DDP.
- Training continues everywhere: one more step gives finite weights that moved, equal on every rank.
- A ZeRO checkpoint without the whole copy (an older distgan's) on another world size or under DDP: one line
  naming the world size and strategy to resume it with.
Controls: a fresh trainer's weights differ from the saved ones and the saved moments are not zeros (so equality
is not zeros against zeros); a step taken without the loaded moments differs from the resumed one.
"""

from __future__ import annotations

import pytest
import torch

from conftest import patience, require_deepspeed
from support import flat, make_trainer, run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.deepspeed]

STEPS = 3
# batch 12: divisible by 1, 2 and 3 ranks; R1 (lazy) so D's phase differs between steps
COMMON = ("train.batch=12", "loss.r1_gamma=1", "loss.d_reg_interval=2", "train.deterministic=true")
ZERO = ("dist.strategy=zero2", "train.precision=bf16")  # the ZeRO run: bf16 (autocast), fp32 parameters
DDP = ("dist.strategy=ddp", "train.precision=fp32")
AS_OTHER = {
    "zero": ("dist.strategy=ddp", "train.precision=bf16"),
    "ddp": ("dist.strategy=zero2", "train.precision=fp32"),
}
MOMENTS = ("exp_avg", "exp_avg_sq")


@pytest.fixture(autouse=True)
def _deepspeed():
    require_deepspeed()


def _read_back(tr) -> dict:
    """G's and D's parameters, Adam moments and steps as this rank's strategy holds them, on the CPU: under ZeRO
    ZeRO's fp32 master weights and the moments re-assembled from every rank's partition (a collective)."""
    out = {}
    for name, net in tr.nets.items():
        params = dict(net.module.named_parameters())
        if hasattr(net, "engine"):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            net._link_moments()
            weights = {k: safe_get_full_fp32_param(p).cpu() for k, p in params.items()}
            moments = {k: {m: safe_get_full_optimizer_state(p, m).cpu() for m in MOMENTS} for k, p in params.items()}
            steps = [float(st["step"]) for st in net.optimizer.state.values()]
        else:
            state = net.optimizer.state
            weights = {k: p.detach().cpu().clone() for k, p in params.items()}
            moments = {k: {m: state[p][m].detach().cpu().clone() for m in MOMENTS} for k, p in params.items()}
            steps = [float(state[p]["step"]) for p in params.values()]
            # (a fused Adam updates wrong when a moment's memory layout is not its parameter's: channels_last)
            assert all(state[p][m].stride() == p.stride() for p in params.values() for m in MOMENTS), name
        out[name] = {
            "weights": weights,
            "module": {k: p.detach().cpu().clone() for k, p in params.items()},  # the module's own parameters
            "buffers": {k: b.detach().cpu().clone() for k, b in net.module.named_buffers()},
            "moments": moments,
            "steps": sorted(set(steps)),
        }
    return out


def _fresh_weights(tr) -> dict:
    return {name: flat(net.module) for name, net in tr.nets.items()}


def _resume(dist, ckpt, *overrides, read=True) -> dict:
    """A fresh trainer loads `ckpt`, is read back, takes one more step."""
    tr = make_trainer(*COMMON, *overrides, dist=dist)
    fresh = _fresh_weights(tr)
    tr.load_checkpoint(ckpt)
    out = {"fresh": fresh, "loaded": _read_back(tr) if read else None, "nimg": tr.cur_nimg}
    tr.train_step(*tr.draw())
    out["after"] = _fresh_weights(tr)
    out["strategy"] = type(tr.G).__name__
    return out


def _save_and_resume_here(rank, world, run_dir):
    """On 2 ranks: train ZeRO-2 (bf16) and DDP (fp32) 3 steps each and save; resume each on the same 2 ranks both
    as saved (DeepSpeed's own load for ZeRO) and switched, one step each."""
    from pathlib import Path

    from distgan import distributed
    from distgan.checkpoint import CheckpointManager

    dist = distributed.setup("fp32", threads=1, deterministic=True)
    out = {}
    for kind, overrides in (("zero", ZERO), ("ddp", DDP)):
        tr = make_trainer(*COMMON, *overrides, dist=dist)
        for _ in range(STEPS):
            tr.train_step(*tr.draw())
        out[kind, "saved"] = _read_back(tr)
        out[kind, "ckpt"] = str(tr.save_checkpoint(CheckpointManager(Path(run_dir) / kind)))
        # The control: one more step of a fresh trainer that loads only the saved weights (its Adam starts over).
        c = make_trainer(*COMMON, *overrides, dist=dist)
        c.load_checkpoint(out[kind, "ckpt"])
        for net in (c.G, c.D):
            net.optimizer.state.clear()
        c.train_step(*c.draw())
        out[kind, "no moments"] = _fresh_weights(c)
    for kind, overrides in (("zero", ZERO), ("ddp", DDP)):
        out[kind, "as saved"] = _resume(dist, out[kind, "ckpt"], *overrides, read=False)
        out[kind, "switched"] = _resume(dist, out[kind, "ckpt"], *AS_OTHER[kind])
    return out


def _resume_elsewhere(rank, world, ckpts, cases):
    from distgan import distributed

    dist = distributed.setup("fp32", threads=1, deterministic=True)
    return {(kind, *overrides): _resume(dist, ckpts[kind], *overrides) for kind, overrides in cases}


def _old_checkpoint(rank, world, ckpt):
    """A ZeRO checkpoint as an older distgan wrote it (no whole copy): under DDP, and under ZeRO on 1 rank."""
    from distgan import distributed
    from distgan.checkpoint import load_file, rank_file, read_manifest
    from distgan.errors import CheckpointError
    from distgan.training.state import Files

    dist = distributed.setup("fp32", threads=1)
    errors = {}
    for overrides in (DDP, ZERO):
        tr = make_trainer(*COMMON, *overrides, dist=dist)
        shared = load_file(ckpt, "state.pt")
        for net in ("G", "D"):
            shared[net] = {"scaler": shared[net]["scaler"]}
        files = Files(list(read_manifest(ckpt)["files"]), lambda n, g=(): load_file(ckpt, n, g))
        try:
            tr.load_state_dict(shared, load_file(ckpt, rank_file(0)), files, same_world=False)
        except CheckpointError as e:
            errors[overrides[0]] = str(e)
    return errors


def _assert_equal_state(got: dict, want: dict, what, buffers: bool = True) -> dict:
    """Every weight, moment and step of G and D equal, and the BatchNorm statistics (rank 0's are saved; each
    rank keeps its own between syncs); returns the largest differences of the moments (all 0)."""
    diffs = {}
    for net in ("G", "D"):
        g, w = got[net], want[net]
        assert g["steps"] == w["steps"] and len(g["steps"]) == 1, (what, net, g["steps"], w["steps"])
        assert g["weights"].keys() == w["weights"].keys()
        for k in w["weights"]:
            assert torch.equal(g["weights"][k], w["weights"][k]), (what, net, k)
            assert torch.equal(g["module"][k], w["weights"][k]), (what, net, k, "module != master weights")
            for m in MOMENTS:
                assert torch.equal(g["moments"][k][m], w["moments"][k][m]), (what, net, k, m)
                d = (g["moments"][k][m] - w["moments"][k][m]).abs().max().item()
                diffs[m] = max(diffs.get(m, 0.0), d)
        for k, b in w["buffers"].items() if buffers else ():
            assert torch.equal(g["buffers"][k], b), (what, net, k)
    return diffs


def _assert_trains_on(res: dict, saved: dict, what) -> None:
    for net in ("G", "D"):
        after = res["after"][net]
        before = torch.cat([p.flatten() for p in saved[net]["weights"].values()])
        assert torch.isfinite(after).all(), (what, net)
        assert not torch.equal(after, before), (what, net, "one more step did not move the weights")
        assert not torch.equal(res["fresh"][net], before), (what, net, "control: a fresh trainer has other weights")


def test_zero_and_ddp_checkpoints_resume_on_other_world_sizes_and_strategies(tmp_path):
    here = run_ranks(_save_and_resume_here, 2, str(tmp_path), timeout=patience(300))
    h0 = here[0]
    ckpts = {kind: h0[kind, "ckpt"] for kind in ("zero", "ddp")}
    saved = {kind: h0[kind, "saved"] for kind in ("zero", "ddp")}
    # The saved moments are not zeros, and both ranks read back the same whole state.
    for kind in ("zero", "ddp"):
        for net in ("G", "D"):
            assert all(v[m].abs().max() > 0 for v in saved[kind][net]["moments"].values() for m in MOMENTS)
        # Adam steps: G one per step; D one more at each lazy R1 step (0 and 2)
        assert saved[kind]["G"]["steps"] == [STEPS] and saved[kind]["D"]["steps"] == [STEPS + 2], kind
        _assert_equal_state(here[1][kind, "saved"], saved[kind], (kind, "rank 1"), buffers=False)

    # Same 2 ranks, switched strategy: equal state, and the next step equals the resume as saved, bit for bit.
    assert h0["zero", "switched"]["strategy"] == "TorchNet" and h0["ddp", "switched"]["strategy"] == "ZeroNet"
    for kind in ("zero", "ddp"):
        sw, same = h0[kind, "switched"], h0[kind, "as saved"]
        _assert_equal_state(sw["loaded"], saved[kind], (kind, "switched on 2 ranks"))
        _assert_trains_on(sw, saved[kind], (kind, "switched on 2 ranks"))
        for net in ("G", "D"):
            assert torch.equal(sw["after"][net], same["after"][net]), (kind, net, "next step differs from as-saved")
            assert torch.equal(sw["after"][net], here[1][kind, "switched"]["after"][net]), (kind, net, "ranks")
            # Control: without its moments the same step lands elsewhere.
            assert (h0[kind, "no moments"][net] - same["after"][net]).abs().max() > 1e-6, (kind, net)

    # Other world sizes (in parallel on the 2 cores would oversubscribe: one after the other).
    cases_1 = [("zero", ZERO), ("zero", (*AS_OTHER["zero"], "train.channels_last=true")), ("ddp", AS_OTHER["ddp"])]
    one = run_ranks(_resume_elsewhere, 1, ckpts, cases_1, timeout=patience(300))[0]
    cases_3 = [("zero", ("dist.strategy=zero1", "train.precision=bf16")), ("ddp", AS_OTHER["ddp"])]
    three = run_ranks(_resume_elsewhere, 3, ckpts, cases_3, timeout=patience(300))
    for world, results, cases in ((1, [one], cases_1), (3, three, cases_3)):
        for kind, overrides in cases:
            what = (kind, "->", *overrides, f"on {world}")
            res = results[0][(kind, *overrides)]
            assert res["nimg"] == STEPS * 12
            _assert_equal_state(res["loaded"], saved[kind], what)
            _assert_trains_on(res, saved[kind], what)
            for r in results[1:]:  # every rank holds the same weights after the step
                for net in ("G", "D"):
                    assert torch.equal(r[(kind, *overrides)]["after"][net], res["after"][net]), (what, net)

    # An older distgan's ZeRO checkpoint (no whole copy) on another world size: one line saying how to resume it.
    errors = run_ranks(_old_checkpoint, 1, ckpts["zero"], timeout=patience(120))[0]
    for strategy in ("dist.strategy=ddp", "dist.strategy=zero2"):
        e = errors.get(strategy)
        assert e and "\n" not in e and "resume it with 2 processes under dist.strategy=zero2" in e, (strategy, e)
