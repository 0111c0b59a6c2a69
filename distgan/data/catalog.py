"""The datasets distgan knows by name, and what classes the configured data has, known before any image is loaded.

    DATASETS          the built-in sources (data.source = shapes, mnist, fashion_mnist, cifar10): channels, class
                      names in label order, native size, and torchvision's dataset class for the downloadable ones
    DATASET_CHANNELS  {source: channels}, for config validation
    data_classes(cfg.data) -> DataClasses | None
                      the class names and frequencies of what cfg.data describes; None: the data has no classes

Run before training (to resolve model.num_classes=auto, refuse a conditional model on unlabelled data, and draw
generated labels as often as the data has them), so it reads at most a manifest: never an image, never a whole
torchvision dataset. It imports no torch, PIL or torchvision (a bad config must fail in well under a second,
before any process group starts; config.py imports this module).

Three answers, for three situations a caller must tell apart:

    None                                 no classes: shards whose manifest lists none ("classes": [])
    DataClasses(names, frequencies|None)  classes known; frequencies None when only loading the data would tell
    DataClasses(None, None)  (UNKNOWN)   shard URLs without a manifest: whether they carry labels (.cls members),
                                         and how many classes, is only known by reading them; the stream decides
                                         from their first sample, or from model.num_classes when it is set
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dataset:
    name: str  # the data.source value
    channels: int
    classes: tuple[str, ...]  # names in label order (as torchvision's .classes, so manifests of prepare agree)
    resolution: int  # native side in pixels
    torchvision: str | None = None  # class name in torchvision.datasets; None: built in (nothing to download)


_MNIST = tuple(f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split()))
_FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASETS: tuple[Dataset, ...] = (
    # Label order of distgan/data/shapes.py's CLASSES (tests check they agree; importing shapes would pull numpy).
    Dataset("shapes", 3, ("circle", "square", "triangle", "cross"), 32),
    Dataset("mnist", 1, _MNIST, 28, "MNIST"),
    Dataset("fashion_mnist", 1, _FASHION, 28, "FashionMNIST"),
    Dataset("cifar10", 3, _CIFAR10, 32, "CIFAR10"),
)
BY_NAME: dict[str, Dataset] = {d.name: d for d in DATASETS}
DATASET_CHANNELS: dict[str, int] = {d.name: d.channels for d in DATASETS}
TORCHVISION_DATASETS: dict[str, str] = {d.name: d.torchvision for d in DATASETS if d.torchvision}


@dataclass(frozen=True)
class DataClasses:
    """The classes of a dataset. names None: not known without reading the data (see UNKNOWN)."""

    names: tuple[str, ...] | None
    frequencies: tuple[float, ...] | None  # aligned with names, summing to 1; None: unknown without loading the data
    counts: tuple[int, ...] | None = None  # samples per class, when the data says so (a manifest's class_counts)

    @property
    def num_classes(self) -> int | None:
        return len(self.names) if self.names is not None else None

    @property
    def known(self) -> bool:
        return self.names is not None


UNKNOWN = DataClasses(None, None)


def data_classes(data_cfg) -> DataClasses | None:
    """What classes `data_cfg` (a config's `data` section) has, from its description or manifest alone.

    shards    the manifest that data.shards names (a folder, a local or remote manifest.json, as the stream
              resolves it): its "classes" (none: None) and, when it has them, "class_counts" (older manifests
              lack them: frequencies None). Any other shard spec (paths, brace patterns, URLs, pipes): UNKNOWN.
    shapes    4 classes; labels are drawn uniformly for each image by construction (floor(4u), u uniform from
              the image's own generator), so frequencies are 1/4 each (the counts of a given data.num_images
              differ from that by sampling noise, and would cost one generator per image to count)
    mnist, fashion_mnist, cifar10   their 10 classes; frequencies None (known only by loading the labels)

    Raises DataError where the stream would fail for the same reason (no manifest in a named folder, an
    unreadable or invalid manifest, a pipe: URL without data.allow_pipe).
    """
    source = data_cfg.source
    if source == "shards":
        from distgan.data.shards import resolve

        manifest = resolve(data_cfg.shards, data_cfg.allow_pipe).manifest
        if manifest is None:
            return UNKNOWN
        return manifest_classes(manifest)
    if source == "shapes":
        names = BY_NAME["shapes"].classes
        return DataClasses(names, tuple(1 / len(names) for _ in names))
    if source in BY_NAME:
        return DataClasses(BY_NAME[source].classes, None)
    raise ValueError(f"data.source={source!r} is not one of shards, {', '.join(BY_NAME)}")


def manifest_classes(manifest: dict) -> DataClasses | None:
    """The classes a (validated) manifest lists; None when it lists none."""
    names = tuple(manifest.get("classes") or ())
    if not names:
        return None
    counts = manifest.get("class_counts")
    if not counts:  # a manifest written before distgan counted them
        return DataClasses(names, None)
    total = sum(counts)
    return DataClasses(names, tuple(c / total for c in counts), tuple(counts))
