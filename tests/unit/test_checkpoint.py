"""Checkpoints on one process (distgan/checkpoint.py, export.py, train.py's --resume): what a committed one
holds, that a damaged or incomplete one is never loaded (the previous one is, with a warning naming what is
wrong), keep-last-k and disk-full behaviour, non-finite state, and hostile inputs (pickled code, manifest paths
outside the folder, --resume outside the run root, YAML tags, pipe: URLs) that must never run or load.

Each damage test has its control: the untouched copy of the same checkpoint is the one chosen, and the hostile
payloads do run when loaded the unsafe way, so their canaries would appear if distgan loaded them so.
The crash-at-every-phase tests with 2 ranks are in tests/distributed/test_checkpoint_crash.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import REPO, cli_env, patience
from distgan import faults
from distgan.checkpoint import CheckpointManager, load_file, rank_file, read_manifest, verify
from distgan.errors import CheckpointError
from support import make_trainer

SMOKE = str(REPO / "configs" / "smoke.yaml")


def ckpt_name(nimg: int) -> str:
    return f"ckpt-{nimg:09d}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke config trained to the end with a run dir: checkpoints at 64 and 128 images."""
    run = tmp_path_factory.mktemp("trained") / "run"
    tr = make_trainer(run_dir=run)
    tr.fit()
    return tr, run


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run dir to damage (runs/run under tmp_path: tmp_path/runs is the run root)."""
    dst = tmp_path / "runs" / "run"
    shutil.copytree(trained[1], dst)
    return dst


def cli(tmp_path, *args, timeout=patience(120)):
    return subprocess.run(
        [sys.executable, "-m", "distgan.train", *map(str, args)],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def one_error(p) -> str:
    errors = [line for line in p.stderr.splitlines() if line.startswith("distgan: error:")]
    assert len(errors) == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    return errors[0]


# ---------------------------------------------------------------------- a committed checkpoint


def test_committed_checkpoint_has_a_matching_manifest_marker_and_state(trained):
    tr, run = trained
    ckpts = CheckpointManager(run)
    assert [p.name for p in ckpts.committed()] == [ckpt_name(64), ckpt_name(128)]
    path = run / "checkpoints" / ckpt_name(128)
    manifest = json.loads((path / "manifest.json").read_bytes())
    assert manifest["nimg"] == 128 and manifest["format"] == "distgan-checkpoint"
    assert sorted(manifest["files"]) == ["generator.safetensors", "rank-00000.pt", "state.pt"]
    for name, info in manifest["files"].items():
        data = (path / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    marker = json.loads((path / "COMMITTED").read_bytes())
    assert marker == {"nimg": 128, "manifest_sha256": hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()}
    assert sorted(p.name for p in path.iterdir()) == sorted([*manifest["files"], "manifest.json", "COMMITTED"])
    assert verify(path) is None and ckpts.latest() == path
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no debris

    state = load_file(path, "state.pt")
    assert (
        state["progress"]["cur_nimg"] == 128 == tr.cur_nimg
        and state["progress"]["step_idx"] == 8
        and state["world_size"] == 1
    )
    assert state["config"]["train"]["batch"] == 16 and state["guard"]["skips_total"] == 0
    assert all(torch.equal(v, tr.G_ema.state_dict()[k]) for k, v in state["G_ema"].items())
    assert load_file(path, rank_file(0))["rank"] == 0
    assert load_file(run / "checkpoints" / ckpt_name(64), "state.pt")["progress"]["cur_nimg"] == 64


# ---------------------------------------------------------------------- damaged checkpoints


def _truncate(path):
    f = path / "state.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(path):
    f = path / "state.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle: same size, only the hash can tell
    f.write_bytes(bytes(data))


def _unmark(path):
    (path / "COMMITTED").unlink()


DAMAGE = {
    "untouched": (None, None),
    "truncated": (_truncate, "state.pt has "),
    "flipped_byte": (_flip, "state.pt does not match its sha256"),
    "no_marker": (_unmark, "incomplete: no completion marker"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(run_copy, damage):
    damage_fn, message = DAMAGE[damage]
    newest, previous = run_copy / "checkpoints" / ckpt_name(128), run_copy / "checkpoints" / ckpt_name(64)
    size_before = (newest / "state.pt").stat().st_size
    if damage_fn:
        damage_fn(newest)
    warnings = []
    chosen = CheckpointManager(run_copy, warn=warnings.append).latest()
    if damage_fn is None:  # control: the same copy, untouched, is the one chosen, silently
        assert chosen == newest and warnings == []
        return
    assert chosen == previous and verify(previous) is None
    assert len(warnings) == 1 and str(newest) in warnings[0] and message in warnings[0], warnings
    assert verify(newest) is not None and message in verify(newest)
    if damage == "flipped_byte":
        assert (newest / "state.pt").stat().st_size == size_before
    if damage != "no_marker":  # the file itself is refused too, not only the folder
        with pytest.raises(CheckpointError, match="state.pt"):
            load_file(newest, "state.pt")


def test_every_checkpoint_damaged_means_none(run_copy):
    warnings = []
    for nimg in (64, 128):
        _unmark(run_copy / "checkpoints" / ckpt_name(nimg))
    assert CheckpointManager(run_copy, warn=warnings.append).latest() is None
    assert len(warnings) == 2 and ckpt_name(128) in warnings[0] and ckpt_name(64) in warnings[1]


def test_cli_refuses_to_start_over_when_every_checkpoint_is_corrupted(run_copy, tmp_path):
    # Starting from zero without a word would throw away a long run and, via keep-last-k, its evidence.
    for nimg in (64, 128):
        _flip(run_copy / "checkpoints" / ckpt_name(nimg))
    p = cli(tmp_path, "--config", SMOKE, "--run-dir", run_copy)
    assert p.returncode == 2
    assert "none of the 2 checkpoint(s)" in one_error(p) and "does not match its sha256" in p.stdout
    assert sorted(x.name for x in (run_copy / "checkpoints").iterdir()) == [ckpt_name(64), ckpt_name(128)]


# ---------------------------------------------------------------------- keep, disk full, non-finite


def _saves(tr, ckpts, n):
    out = []
    for _ in range(n):
        tr.train_step(*tr.draw())
        out.append(tr.save_checkpoint(ckpts))
    return out


def test_keep_last_k(tmp_path):
    tr = make_trainer()
    saved = _saves(tr, CheckpointManager(tmp_path, keep=2), 4)
    assert [p.name for p in saved] == [ckpt_name(16 * i) for i in (1, 2, 3, 4)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [ckpt_name(48), ckpt_name(64)]
    assert all(verify(p) is None for p in saved[2:])
    assert load_file(saved[-1], "state.pt")["progress"]["cur_nimg"] == 64


def test_disk_full_saves_nothing_and_purges_nothing(tmp_path, monkeypatch):
    tr = make_trainer()
    ckpts = CheckpointManager(tmp_path, keep=2)
    monkeypatch.setattr(faults, "_counts", Counter())  # `nth` counts from here
    # Each save writes rank-00000.pt, state.pt, generator.safetensors: the 8th write is the 3rd save's state.pt.
    monkeypatch.setenv("DISTGAN_FAULTS", "enospc:rank=0:nth=8")
    first = _saves(tr, ckpts, 2)  # control: the armed fault lets the first two saves through
    assert [p.name for p in first] == [ckpt_name(16), ckpt_name(32)]
    tr.train_step(*tr.draw())
    with pytest.raises(CheckpointError) as err:
        tr.save_checkpoint(ckpts)
    msg = str(err.value)
    assert "checkpoint at 0.048 kimg not saved" in msg and "state.pt" in msg and "No space left" in msg
    assert f"the last committed checkpoint {first[-1]} is intact" in msg
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [ckpt_name(16), ckpt_name(32)]  # no .tmp-*, no half checkpoint, nothing purged
    assert all(verify(p) is None for p in first)
    assert load_file(first[-1], "state.pt")["progress"]["cur_nimg"] == 32
    # With room again the same position saves, and only then is the oldest purged (keep=2).
    monkeypatch.delenv("DISTGAN_FAULTS")
    assert tr.save_checkpoint(ckpts).name == ckpt_name(48)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [ckpt_name(32), ckpt_name(48)]


def test_non_finite_state_is_never_written(tmp_path):
    tr = make_trainer()
    ckpts = CheckpointManager(tmp_path, keep=3)
    (first,) = _saves(tr, ckpts, 1)  # control: the same trainer saves while its state is finite
    assert first.name == ckpt_name(16)
    tr.train_step(*tr.draw())
    with torch.no_grad():
        next(tr.G_module.parameters()).view(-1)[3] = float("nan")
    assert tr.save_checkpoint(ckpts) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [ckpt_name(16)]


# ---------------------------------------------------------------------- hostile inputs


class _Evil:
    """Unpickling this runs a shell command that creates `canary`."""

    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _payload(canary, kind: str) -> bytes:
    obj = {"format": 2, "cur_nimg": 64, "G": _Evil(canary)}
    if kind == "pickle":
        return pickle.dumps(obj, protocol=2)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _evil_checkpoint(run, canary, kind="torch.save"):
    """A checkpoint committed by the real protocol (manifest hashes and marker correct) whose state.pt runs code."""
    tr = make_trainer()
    files = {**tr.checkpoint_files(), "state.pt": _payload(canary, kind)}
    return CheckpointManager(run).save(tr.dist, 64, files)


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_pickled_code_in_a_committed_checkpoint_never_runs(tmp_path, kind):
    canary, control = tmp_path / "canary", tmp_path / "control"
    unsafe = pickle.loads if kind == "pickle" else lambda data: torch.load(io.BytesIO(data), weights_only=False)
    unsafe(_payload(control, kind))
    assert control.exists()  # control: loaded the unsafe way, the payload does run
    path = _evil_checkpoint(tmp_path / "runs" / "evil", canary, kind)
    assert verify(path) is None  # every hash checks out: only the loader stands between it and the code
    assert CheckpointManager(path.parent.parent).latest() == path
    with pytest.raises(CheckpointError, match="cannot load .*state.pt"):
        load_file(path, "state.pt")
    assert not canary.exists()


def test_refused_pickle_error_names_what_was_refused(tmp_path):
    """The one-line error must say why (torch names the refused global at the end of a 561-character message);
    cut at 300 characters it stops at torch's advice to re-run with weights_only=False, mid-sentence."""
    path = _evil_checkpoint(tmp_path / "runs" / "evil", tmp_path / "canary")
    with pytest.raises(CheckpointError) as err:
        load_file(path, "state.pt")
    assert "posix.system" in str(err.value), str(err.value)


def test_cli_refuses_a_checkpoint_with_pickled_code(tmp_path):
    canary = tmp_path / "canary"
    path = _evil_checkpoint(tmp_path / "runs" / "evil", canary)
    assert path == tmp_path / "runs" / "evil" / "checkpoints" / ckpt_name(64)
    p = cli(tmp_path, "--config", SMOKE, "--run-dir", tmp_path / "runs" / "x", "--resume", path)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "cannot load" in one_error(p)
    assert not canary.exists() and "resumed from" not in p.stdout + p.stderr
    assert not (tmp_path / "runs" / "x" / "checkpoints").exists()


def _rewrite_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_bytes())
    edit(manifest)
    data = json.dumps(manifest).encode()
    (path / "manifest.json").write_bytes(data)
    marker = {"nimg": manifest["nimg"], "manifest_sha256": hashlib.sha256(data).hexdigest()}
    (path / "COMMITTED").write_text(json.dumps(marker))


def test_manifest_naming_a_file_outside_the_folder_is_refused(run_copy):
    ckpts_dir = run_copy / "checkpoints"
    newest = ckpts_dir / ckpt_name(128)
    outside = ckpts_dir / "outside"
    outside.write_bytes(b"not part of any checkpoint")
    assert "../outside" not in read_manifest(newest)["files"]
    entry = {"bytes": outside.stat().st_size, "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    _rewrite_manifest(newest, lambda m: m["files"].update({"../outside": entry}))  # hashes and marker match
    problem = verify(newest)
    assert problem is not None and problem.startswith("bad manifest") and "outside the checkpoint folder" in problem
    warnings = []
    assert CheckpointManager(run_copy, warn=warnings.append).latest() == ckpts_dir / ckpt_name(64)
    assert len(warnings) == 1 and "bad manifest" in warnings[0] and ckpt_name(128) in warnings[0]
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_file(newest, "../outside")
    with pytest.raises(CheckpointError):
        load_file(newest, "state.pt")  # the whole manifest is refused, not just its bad entry


@pytest.mark.parametrize("entry", [5, None, "abc", ["bytes", 1]], ids=["int", "null", "str", "list"])
def test_manifest_entry_that_is_not_a_file_record_is_refused(run_copy, entry):
    """A malformed (or hostile) manifest with a matching marker must be reported and skipped like any other bad
    checkpoint, not crash the search for the previous one."""
    newest = run_copy / "checkpoints" / ckpt_name(128)
    _rewrite_manifest(newest, lambda m: m["files"].update({"state.pt": entry}))
    problem = verify(newest)
    assert problem is not None and "manifest" in problem
    assert CheckpointManager(run_copy).latest() == run_copy / "checkpoints" / ckpt_name(64)
    with pytest.raises(CheckpointError):
        load_file(newest, "state.pt")


def test_resume_path_outside_the_run_root_is_refused(run_copy, tmp_path):
    from distgan.train import find_checkpoint

    good = run_copy / "checkpoints" / ckpt_name(128)
    outside = tmp_path / "outside" / ckpt_name(128)
    shutil.copytree(good, outside)
    assert verify(outside) is None  # a valid checkpoint: refused for where it is, not for what it holds
    p = cli(tmp_path, "--config", SMOKE, "--run-dir", tmp_path / "runs" / "x", "--resume", outside)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "outside the run root" in one_error(p) and str(tmp_path / "runs") in one_error(p)
    assert "resumed from" not in p.stdout + p.stderr and not (tmp_path / "runs" / "x" / "checkpoints").exists()

    # Control: the same files under the run root are accepted (trained to the end already: nothing to train).
    inside = tmp_path / "runs" / "other" / "checkpoints" / ckpt_name(128)
    shutil.copytree(outside, inside)
    p = cli(tmp_path, "--config", SMOKE, "--run-dir", tmp_path / "runs" / "x", "--resume", inside)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {inside} at 0.128 kimg" in p.stdout + p.stderr

    # The same check in-process: a file means its folder; a link or '..' cannot smuggle a folder in.
    ckpts = CheckpointManager(tmp_path / "runs" / "x")
    dist = make_trainer().dist
    assert find_checkpoint(ckpts, str(inside), dist) == inside
    assert find_checkpoint(ckpts, str(inside / "state.pt"), dist) == inside  # a file: its folder
    link = tmp_path / "runs" / "link"
    link.symlink_to(outside.parent)  # under the root by name, outside it in fact
    for path in (outside, link / ckpt_name(128), tmp_path / "runs" / ".." / "outside" / ckpt_name(128)):
        with pytest.raises(CheckpointError, match="outside the run root"):
            find_checkpoint(ckpts, str(path), dist)


def test_cli_refuses_yaml_python_tags(tmp_path):
    canary = tmp_path / "CANARY"
    config = tmp_path / "evil.yaml"
    config.write_text(f'name: !!python/object/apply:os.system ["touch {canary}"]\n')
    p = cli(tmp_path, "--config", config, "--run-dir", tmp_path / "runs" / "x")
    assert p.returncode == 2
    assert "not valid YAML" in one_error(p)
    assert not canary.exists() and not (tmp_path / "runs").exists()


def test_cli_refuses_pipe_shards_without_opt_in(tmp_path):
    canary = tmp_path / "CANARY"
    p = cli(tmp_path, "--config", SMOKE, "--run-dir", tmp_path / "runs" / "x", "data.source=shards",
            f"data.shards=pipe:touch {canary}; cat x.tar")  # fmt: skip
    assert p.returncode == 2
    assert "data.allow_pipe=true" in one_error(p)
    assert not canary.exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------- --resume none / PATH


def test_resume_none_refuses_a_run_dir_with_checkpoints(run_copy, tmp_path):
    p = cli(tmp_path, "--config", SMOKE, "--run-dir", run_copy, "--resume", "none")
    assert p.returncode == 2
    assert "already has checkpoints" in one_error(p)
    assert [p.name for p in CheckpointManager(run_copy).committed()] == [ckpt_name(64), ckpt_name(128)]


def test_resume_path_without_marker_is_refused(run_copy, tmp_path):
    path = tmp_path / "runs" / "other" / "checkpoints" / ckpt_name(128)
    shutil.copytree(run_copy / "checkpoints" / ckpt_name(128), path)
    _unmark(path)
    p = cli(tmp_path, "--config", SMOKE, "--run-dir", tmp_path / "runs" / "x", "--resume", path)
    assert p.returncode == 2
    error = one_error(p)
    assert "not a usable checkpoint" in error and "no completion marker" in error and str(path) in error
    assert "resumed from" not in p.stdout + p.stderr


def test_resume_path_into_a_run_dir_with_newer_checkpoints_is_refused(run_copy, tmp_path):
    # Going back to 64 in a run dir that holds 128 would leave the abandoned 128 there for `--resume latest`.
    old = run_copy / "checkpoints" / ckpt_name(64)
    p = cli(tmp_path, "--config", SMOKE, "--run-dir", run_copy, "--resume", old)
    assert p.returncode == 2
    assert "already has newer checkpoints" in one_error(p) and ckpt_name(128) in one_error(p)
    # Control: the same checkpoint resumed into a fresh run dir trains on.
    p = cli(tmp_path, "--config", SMOKE, "--run-dir", tmp_path / "runs" / "fresh", "--resume", old)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {old}" in p.stdout + p.stderr


def test_a_save_at_a_committed_position_replaces_it(run_copy):
    # A rollback or a resumed history that reaches an existing position must commit its own state there.
    tr = make_trainer(run_dir=run_copy)
    tr.load_checkpoint(run_copy / "checkpoints" / ckpt_name(64))
    with torch.no_grad():
        next(tr.G_module.parameters()).add_(1.0)  # this history differs from the saved one
    while tr.cur_nimg < 128:
        tr.train_step(*tr.draw())
    path = tr.save_checkpoint(CheckpointManager(run_copy))
    assert path.name == ckpt_name(128) and verify(path) is None
    saved = load_file(path, "state.pt")["G"]["module"]
    for k, v in tr.G_module.state_dict().items():
        assert torch.equal(saved[k], v), k


# ---------------------------------------------------------------------- the export


def test_export_rebuilds_g_ema_exactly(trained):
    from distgan.export import load_generator

    tr, run = trained
    newest, older = run / "checkpoints" / ckpt_name(128), run / "checkpoints" / ckpt_name(64)
    G = load_generator(newest / "generator.safetensors")
    assert not G.training and G.z_dim == 16 and G.nimg == 128
    z = torch.randn([8, 16], generator=torch.Generator().manual_seed(3))
    ema = tr.G_ema.module.eval()
    with torch.no_grad():
        expected = ema(z)
        assert torch.equal(G(z), expected)
        # Control: the export of the older checkpoint is another generator.
        assert not torch.allclose(load_generator(older / "generator.safetensors")(z), expected)
    size, full = (newest / "generator.safetensors").stat().st_size, (newest / "state.pt").stat().st_size
    assert size < full / 4, (size, full)


def test_export_refuses_other_files(trained, tmp_path):
    from safetensors.torch import save_file

    from distgan.export import load_generator

    _, run = trained
    with pytest.raises(CheckpointError, match="cannot read generator export"):
        load_generator(run / "checkpoints" / ckpt_name(128) / "state.pt")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a distgan generator export"):
        load_generator(tmp_path / "plain.safetensors")
