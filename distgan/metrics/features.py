"""Feature extractors: uint8 images [N, C, H, W] in, features [N, F] and class logits [N, K] out.

    extractor = make_extractor("inception", device)                  # the FID Inception-v3
    extractor = make_extractor("torchscript:digits.pt", device)      # your own network, for your own domain
    feats, logits = extractor(images)                                # float32 [N, F], float32 [N, K] or None

inception
    torch-fidelity's port of the TensorFlow FID Inception-v3 (the network every published FID uses), with its
    TensorFlow-compatible resize to 299x299; features are the 2048-d pool layer, logits the 1008 unbiased class
    logits (what Inception Score is defined on). Grey images are repeated to 3 channels. The weights
    (`weights-inception-2015-12-05-6726825d.pth`, 91 MB) are fetched once into torch's hub cache
    (`$TORCH_HOME/hub/checkpoints`, where torch-fidelity and torchmetrics look too) and checked against the
    sha256 prefix in their name; `--inception-weights PATH` / `eval.inception_weights` reads a copy instead.
    Offline without a copy: one line naming the URL, the cache path and the option, exit code 2.
    Both ways the file is read with torch.load(weights_only=True): tensors only, a file cannot run code here
    (torch-fidelity itself would unpickle it; TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that while it loads).

torchscript:PATH
    Any TorchScript module (`torch.jit.save(torch.jit.script(net), PATH)`) mapping float images [N, C, H, W] in
    [-1, 1] at the data's resolution and channels to features [N, F], or to a tuple (features [N, F], logits
    [N, K]). For distances in a domain's own terms (a digit classifier for MNIST-like data, tests/quality.py's
    shape classifier). Inception Score then uses the logits, or the features taken as logits when the module
    returns one tensor: meaningful only if they are class logits. A TorchScript file is code: loading it runs
    what its author compiled into it, so name only files you trust (distgan never picks one by itself).

An extractor's `identity` (its name and the sha256 of its weights or file) keys the real-features cache.

Classifiers (`distgan eval --classifier torchscript:PATH`, for class_match)
    A TorchScript module mapping float images [N, C, H, W] in [-1, 1] (as above) to class logits [N, K], or to a
    tuple whose last element is those logits (so a `torchscript:` extractor that returns (features, logits) serves
    too). K and the label order must be the generator's: class k of the classifier is class k of the model.
    `make_classifier(spec, device)`; `classifier(images)` -> float32 logits [N, K]; `num_classes(C, R)` runs it
    once on two grey images to learn K before any image is generated. Trusted code, as above.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import urllib.request
import warnings
from pathlib import Path

import torch

from distgan.data.manifest import sha256_file
from distgan.metrics import MetricsError, classifier_problem, features_problem

INCEPTION_HASH_PREFIX = "6726825d"  # the sha256 prefix in the file name (torch hub's convention)


class Extractor:
    """A network that maps images to (features, logits); `input` says whether it wants uint8 or [-1, 1] floats."""

    def __init__(self, module: torch.nn.Module, name: str, identity: str, device, input: str = "float"):
        self.module, self.name, self.identity = module, name, identity
        self.device, self.input = torch.device(device), input

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images: uint8 [N, C, H, W] -> (features float32 [N, F], logits float32 [N, K] or None)."""
        x = images.to(self.device)
        if self.input == "uint8-rgb":
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey -> RGB, as FID code does
        else:
            x = x.float() / 127.5 - 1  # [-1, 1], the generator's range
        try:
            out = self.module(x)
        except RuntimeError as e:  # TorchScript's errors too: e.g. a network made for another size or channel count
            first = " ".join(str(e).split())[:200]
            raise MetricsError(f"{self.name} failed on images of shape {list(x.shape)}: {first}") from None
        feats, logits = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, out)
        for what, t in (("features", feats), ("logits", logits)):
            if not (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == len(images)):
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise MetricsError(
                    f"{self.name} returned {what} of shape {shape} for {len(images)} images; "
                    f"it must return [N, F] (or a tuple of features [N, F] and logits [N, K])"
                )
        return feats.float().cpu(), logits.float().cpu()


def make_extractor(spec: str, device="cpu", inception_weights: str | None = None) -> Extractor:
    """`inception` or `torchscript:PATH` (see the module doc); raises MetricsError with one line on any problem."""
    problem = features_problem(spec)
    if problem:
        raise MetricsError(problem)
    if spec == "inception":
        return inception(device, inception_weights or None)
    return torchscript(spec[len("torchscript:") :], device)


# ---------------------------------------------------------------------- inception


def inception(device="cpu", weights: str | None = None) -> Extractor:
    """The FID Inception-v3 from `weights` (a path), or from the hub cache, fetched there if missing."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except ImportError:
        raise MetricsError("metrics need torch-fidelity: pip install torch-fidelity") from None
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise MetricsError(f"--inception-weights {weights}: no such file")
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
        if not path.is_file():
            fetch(URL_INCEPTION_V3, path, INCEPTION_HASH_PREFIX)
    try:
        with _weights_only_loads():
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], str(path))
    except Exception as e:  # noqa: BLE001 (a wrong or damaged file: one line, never a fallback)
        raise MetricsError(f"cannot load Inception weights from {path}: {' '.join(str(e).split())[:200]}") from None
    return Extractor(net.to(device), "inception", f"inception-v3-compat:{sha256_file(path)[:16]}", device, "uint8-rgb")


def fetch(url: str, path: Path, hash_prefix: str, timeout: float = 60) -> None:
    """Download `url` to `path` (through a temporary file), checking its sha256 prefix; MetricsError if impossible."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    hint = (
        f"download it where there is internet and pass --inception-weights PATH (config: eval.inception_weights), "
        f"or put it at {path}"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as src, open(tmp, "wb") as dst:
            print(f"distgan: fetching the FID Inception weights (91 MB) into {path}", file=sys.stderr, flush=True)
            while block := src.read(1 << 20):
                h.update(block)
                dst.write(block)
        if not h.hexdigest().startswith(hash_prefix):
            raise OSError(f"sha256 {h.hexdigest()[:16]}... does not start with {hash_prefix}")
        os.replace(tmp, path)
    except OSError as e:  # URLError, timeouts, refused connections, a full disk, a wrong file
        reason = getattr(e, "reason", None) or e.strerror or e
        raise MetricsError(f"cannot fetch the Inception weights from {url} ({reason}); {hint}") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load inside is weights_only=True, whatever its call site asks (torch-fidelity asks False)."""
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


# ---------------------------------------------------------------------- torchscript


def torchscript(path: str, device="cpu") -> Extractor:
    """A user's TorchScript extractor (trusted code: see the module doc)."""
    file, module = _load_torchscript(path, device, "--features")
    return Extractor(module, f"torchscript:{file.name}", f"torchscript:{sha256_file(file)[:16]}", device)


def _load_torchscript(path: str, device, option: str) -> tuple[Path, torch.nn.Module]:
    """(the file, its module in eval mode); `option` names the flag in the error lines."""
    file = Path(path)
    if not file.is_file():
        raise MetricsError(f"{option} torchscript:{path}: no such file")
    try:
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; its files still load, and are asked for
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(file), map_location=torch.device(device))
    except Exception as e:  # noqa: BLE001 (not TorchScript, truncated, made by a newer torch)
        first = " ".join(str(e).split())[:200]
        raise MetricsError(f"{option} torchscript:{path}: not a loadable TorchScript file ({first})") from None
    return file, module.eval()


# ---------------------------------------------------------------------- classifiers (class_match)


class Classifier:
    """A network that maps images to class logits [N, K] (see the module doc); images go in as [-1, 1] floats."""

    def __init__(self, module: torch.nn.Module, name: str, identity: str, device):
        self.module, self.name, self.identity, self.device = module, name, identity, torch.device(device)
        self._k: dict[tuple[int, int], int] = {}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [N, C, H, W] -> class logits float32 [N, K] on the CPU."""
        x = images.to(self.device).float() / 127.5 - 1  # [-1, 1], the generator's range
        try:
            out = self.module(x)
        except RuntimeError as e:
            first = " ".join(str(e).split())[:200]
            raise MetricsError(f"{self.name} failed on images of shape {list(x.shape)}: {first}") from None
        logits = out[-1] if isinstance(out, (tuple, list)) and len(out) else out
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == len(images)
                and logits.shape[1] >= 1):  # fmt: skip
            shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise MetricsError(f"{self.name} returned {shape} for {len(images)} images; a classifier must return "
                               "class logits [N, K] (or a tuple ending with them)")  # fmt: skip
        return logits.float().cpu()

    def num_classes(self, channels: int, resolution: int) -> int:
        """K: the classifier run once on two mid-grey images of this shape (remembered per shape)."""
        shape = (channels, resolution)
        if shape not in self._k:
            self._k[shape] = self(torch.full([2, channels, resolution, resolution], 128, dtype=torch.uint8)).shape[1]
        return self._k[shape]


def make_classifier(spec: str, device="cpu") -> Classifier:
    """`torchscript:PATH` (see the module doc); raises MetricsError with one line on any problem."""
    problem = classifier_problem(spec)
    if problem:
        raise MetricsError(problem)
    file, module = _load_torchscript(spec[len("torchscript:") :], device, "--classifier")
    return Classifier(module, f"classifier torchscript:{file.name}", f"torchscript:{sha256_file(file)[:16]}", device)
