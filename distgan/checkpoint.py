"""Checkpoints: the full training state, committed atomically by every rank, verified before it is loaded.

    run_dir/checkpoints/
        ckpt-000012800/              one committed checkpoint (images seen, 9+ digits)
            state.pt                 rank 0: G, D, G_ema, optimizers, loss scalers, counters, config, W&B run id
            rank-00000.pt ...        each rank: its RNG states and its data-stream position
            generator.safetensors    rank 0: G_ema weights + the model config, for inference (distgan.export)
            manifest.json            size and sha256 of every file above
            COMMITTED                completion marker: written last, holds the manifest's own sha256
        .tmp-ckpt-000025600/         a save in progress (or a crashed one, removed by the next save)

The commit protocol (`CheckpointManager.save`, a collective):
  1. rank 0 creates the temporary folder;
  2. every rank writes its own files there (each fsynced) and reports their sizes and hashes;
  3. if any rank failed (disk full, I/O error), nothing is committed: the temporary folder is removed, every
     rank raises the same CheckpointError, and the previous checkpoints are untouched;
  4. rank 0 writes manifest.json, renames the folder into place, then writes COMMITTED (each step fsynced);
  5. only then are checkpoints beyond `keep` removed (renamed away first, so none is ever half-deleted).
A process killed at any point leaves the previous checkpoint committed and the new one either committed or
ignored. Loading takes the newest checkpoint whose marker, manifest and every file hash check out; a truncated
or corrupted one is skipped with a warning naming what is wrong. Files are read with
`torch.load(weights_only=True)`: tensors and plain containers only, no pickled code runs, whatever the manifest
says. The run dir must be on a filesystem every rank sees (every rank writes into the same folder).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

from distgan import faults
from distgan.errors import CheckpointError

_NAME = re.compile(r"^ckpt-(\d{9,})$")
_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a plain file name: no folders, no '..'
MANIFEST, MARKER = "manifest.json", "COMMITTED"
FORMAT = "distgan-checkpoint"
VERSION = 2


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int = 3, warn=None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.warn = warn or (lambda msg: None)

    # ------------------------------------------------------------------ finding
    def candidates(self) -> list[Path]:
        """Every folder named like a checkpoint, committed or not, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def committed(self) -> list[Path]:
        """Checkpoints with a completion marker, oldest first (files not verified: see `verify`)."""
        return [p for p in self.candidates() if (p / MARKER).is_file()]

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; each newer one that does not is reported through `warn`."""
        for path in reversed(self.candidates()):
            problem = verify(path)
            if problem is None:
                return path
            self.warn(f"checkpoint {path} is not usable ({problem}); trying the previous one")
        return None

    def latest_on_every_rank(self, dist) -> Path | None:
        """`latest()` chosen by rank 0 (only it verifies and warns) and given to every rank (a collective)."""
        path = self.latest() if dist.is_main else None
        path = dist.broadcast_object(str(path) if path else None)
        return Path(path) if path else None

    # ------------------------------------------------------------------ saving
    def save(self, dist, nimg: int, files: dict[str, bytes]) -> Path:
        """Commit checkpoint `nimg`: every rank passes its own files (distinct names). A collective."""
        final = self.dir / f"ckpt-{nimg:09d}"
        tmp = self.dir / f".tmp-{final.name}"
        rank = dist.rank

        status = None
        if dist.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                status = f"cannot create {tmp}: {_oserror(e)}"
        status = dist.broadcast_object(status)
        if status is not None:
            raise CheckpointError(self._not_saved(nimg, status))

        faults.kill_if("ckpt.before_files", rank=rank)
        infos: dict[str, dict] = {}
        error = None
        try:
            for name, data in files.items():
                infos[name] = _write_file(tmp / name, data, rank)
        except OSError as e:
            error = f"rank {rank} writing {tmp / name}: {_oserror(e)}"
        faults.kill_if("ckpt.after_files", rank=rank)
        reports = dist.all_gather_object((infos, error))
        errors = [err for _, err in reports if err]
        if errors:
            if dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(self._not_saved(nimg, errors[0]))
        if not dist.is_main:  # idle while rank 0 commits: a kill here is a kill during each of its phases
            for phase in ("after_manifest", "before_rename", "after_rename", "during_purge"):
                faults.kill_if(f"ckpt.{phase}", rank=rank)

        error = None
        if dist.is_main:
            all_files = {name: info for infos_r, _ in reports for name, info in infos_r.items()}
            try:
                self._commit(tmp, final, nimg, all_files)
            except OSError as e:
                error = f"committing {final}: {_oserror(e)}"
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                try:
                    self._purge(keep_also=final)
                except OSError as e:  # the new checkpoint is committed; an old one lingering is only a warning
                    self.warn(f"could not remove old checkpoints: {_oserror(e)}")
        error = dist.broadcast_object(error)
        if error:
            raise CheckpointError(self._not_saved(nimg, error))
        return final

    def _commit(self, tmp: Path, final: Path, nimg: int, files: dict[str, dict]) -> None:
        manifest = {"format": FORMAT, "version": VERSION, "nimg": nimg, "created": time.time(), "files": files}
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _write_file(tmp / MANIFEST, data, 0, fault_points=False)
        _fsync_dir(tmp)
        faults.kill_if("ckpt.after_manifest", rank=0)
        if final.exists():  # a leftover of a crashed save at this position, or one of an abandoned history
            _discard(final)
        faults.kill_if("ckpt.before_rename", rank=0)
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        faults.kill_if("ckpt.after_rename", rank=0)
        marker = {"nimg": nimg, "manifest_sha256": hashlib.sha256(data).hexdigest()}
        _write_file(final / MARKER, json.dumps(marker).encode(), 0, fault_points=False)
        _fsync_dir(final)

    def _purge(self, keep_also: Path) -> None:
        """Remove checkpoints beyond `keep`, and debris of crashed saves (after a commit, never before)."""
        committed = self.committed()
        old = [p for p in committed[: -self.keep] if p != keep_also]
        debris = [p for p in self.candidates() if p not in committed]
        debris += [p for p in self.dir.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        for i, path in enumerate(old + debris):
            _discard(path)
            if i == 0:
                faults.kill_if("ckpt.during_purge", rank=0)

    def _not_saved(self, nimg: int, why: str) -> str:
        committed = self.committed()
        kept = f"the last committed checkpoint {committed[-1]} is intact" if committed else "no checkpoint yet"
        return f"checkpoint at {nimg / 1000:.3f} kimg not saved: {why}; {kept}"


# ---------------------------------------------------------------------- verifying and reading


def read_manifest(path: Path) -> dict:
    data = (Path(path) / MANIFEST).read_bytes()
    manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError("not a distgan checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"checkpoint format version {manifest.get('version')}, this distgan reads {VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(n, str) and _SAFE_FILE.match(n) for n in files):
        raise ValueError("manifest lists files outside the checkpoint folder")
    for name, info in files.items():
        if not (isinstance(info, dict) and type(info.get("bytes")) is int and isinstance(info.get("sha256"), str)):
            raise ValueError(f"manifest entry for {name} is not a size and a sha256")
    return manifest


def verify(path: Path) -> str | None:
    """None if `path` is a committed checkpoint whose every file matches its manifest; else what is wrong."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_bytes())
    except FileNotFoundError:
        return "incomplete: no completion marker"
    except (OSError, ValueError) as e:
        return f"unreadable completion marker: {e}"
    try:
        data = (path / MANIFEST).read_bytes()
        if not isinstance(marker, dict) or hashlib.sha256(data).hexdigest() != marker.get("manifest_sha256"):
            return "manifest does not match its completion marker"
        manifest = read_manifest(path)
    except (OSError, ValueError) as e:
        return f"bad manifest: {e}"
    for name, info in manifest["files"].items():
        problem = _check_file(path / name, info)
        if problem:
            return problem
    return None


def _check_file(file: Path, info: dict, data: bytes | None = None) -> str | None:
    try:
        if data is None:
            size = file.stat().st_size
            if size != info.get("bytes"):
                return f"{file.name} has {size} bytes, the manifest says {info.get('bytes')} (truncated?)"
            data = file.read_bytes()
    except OSError as e:
        return f"{file.name}: {_oserror(e)}"
    if len(data) != info.get("bytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
        return f"{file.name} does not match its sha256 in the manifest (corrupted)"
    return None


def load_file(path: Path, name: str, safe_globals=()):
    """One file of a committed checkpoint, hash-checked, read with torch.load(weights_only=True).

    safe_globals: classes (beyond tensors and plain containers) the file may hold, e.g. DeepSpeed's records in
    its ZeRO files; nothing else that a pickle names is ever constructed or called.
    """
    import torch

    path = Path(path)
    try:
        info = read_manifest(path)["files"].get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {path} has no {name}")
        data = (path / name).read_bytes()
    except (OSError, ValueError) as e:
        why = _oserror(e) if isinstance(e, OSError) else e
        raise CheckpointError(f"cannot read checkpoint {path}: {why}") from None
    problem = _check_file(path / name, info, data)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: say so in one line, never fall back
        text = " ".join(str(e).split())
        refused = re.search(r"Unsupported global: GLOBAL [^\s]+|unsupported GLOBAL [^\s]+", text, re.IGNORECASE)
        why = f"it holds pickled code, refused ({refused.group(0)})" if refused else text[:300]
        raise CheckpointError(f"cannot load {path / name}: {why}") from None


# ---------------------------------------------------------------------- files


def _write_file(file: Path, data: bytes, rank: int, fault_points: bool = True) -> dict:
    """Write, flush and fsync; returns the manifest entry. Refuses up front when the disk cannot hold it."""
    free = shutil.disk_usage(file.parent).free
    if free < len(data):
        raise OSError(errno.ENOSPC, f"{len(data)} bytes needed, {free} free", str(file))
    view = memoryview(data)
    half = len(data) // 2
    with open(file, "wb") as f:
        f.write(view[:half])
        if fault_points:
            if faults.fires("enospc", rank=rank):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            if faults.fires("ckpt.mid_file", rank=rank):
                f.flush()  # half a file reaches the disk, then the process dies
                os.kill(os.getpid(), signal.SIGKILL)
        f.write(view[half:])
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a folder so that it vanishes at once: rename it away, then delete."""
    if not path.name.startswith(".trash-"):
        trash = path.with_name(f".trash-{path.name.lstrip('.')}-{os.getpid()}")
        os.rename(path, trash)
        path = trash
    shutil.rmtree(path, ignore_errors=True)


def _oserror(e: OSError) -> str:
    return e.strerror or str(e)
