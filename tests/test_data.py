"""Task registry: embedded tasks, real loaders on files in each dataset's own on-disk format, splits, cache."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qvlib.data import synthetic
from qvlib.data.base import Preprocess, calib_indices, materialize
from qvlib.data.cache import read_split_cache, write_split_cache
from qvlib.data.registry import DESCRIPTIONS, LoadOptions, known_tasks, load_task, pretrain_mixture

PRE = Preprocess(img_size=16)
PAPER_TASKS = ["eurosat", "dtd", "stanford_cars", "sun397", "svhn", "resisc45", "mnist", "gtsrb", "fer2013", "pcam",
               "cifar100", "flowers102", "oxford_pet", "stl10", "kmnist", "emnist", "rendered_sst2", "fashion_mnist",
               "food101", "cifar10", "imagenet", "tiny_imagenet"]
EMBEDDED = ["shapes", "orientation", "frequency", "glyphs", "numerals", "dots", "blur", "digits", "mnist5k"]


def opts(root=Path("data"), **kw):
    return LoadOptions(preprocess=PRE, root=Path(root), **kw)


def test_every_task_name_resolves():
    assert set(PAPER_TASKS + EMBEDDED) <= set(known_tasks())
    assert all(DESCRIPTIONS[t] for t in known_tasks())
    with pytest.raises(ValueError, match="unknown task 'imagenet22k'; known tasks: blur, cifar10"):
        load_task("imagenet22k", opts())


def test_calib_split_convention():
    train, calib = calib_indices(1000)
    assert len(calib) == 100 and len(train) == 900 and not set(train) & set(calib)
    assert sorted(train + calib) == list(range(1000))
    assert calib_indices(1000) == (train, calib)  # fixed seed 0
    assert len(calib_indices(100_000)[1]) == 5000  # at most 5,000


def test_calib_from_the_tail_is_what_random_split_holds_out():
    """The paper's code validates on random_split(train, [n - k, k], generator seeded 0)[1]: calib_position tail."""
    import torch
    from torch.utils.data import random_split

    n = 1234
    train, calib = calib_indices(n, position="tail")
    kept, held = random_split(range(n), [n - 123, 123], generator=torch.Generator().manual_seed(0))
    assert calib == sorted(held.indices) and train == sorted(kept.indices)
    assert calib != calib_indices(n)[1] and len(calib) == len(calib_indices(n)[1])  # same size, other images
    with pytest.raises(ValueError, match="head, tail"):
        calib_indices(n, position="middle")
    task = load_task("shapes", opts(n_train=200, n_test=50, calib_position="tail"))
    assert task.provenance["calib_position"] == "tail" and len(task.calib) == 20
    assert "calib_position" not in load_task("shapes", opts(n_train=200, n_test=50)).provenance


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_tasks_are_deterministic_and_shaped(name):
    small = dict(n_train=200, n_test=50)
    a, b = load_task(name, opts(**small)), load_task(name, opts(**small))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (3, 16, 16)
    assert len(a.calib) == len(a.train) // 9 or len(a.calib) == int((len(a.train) + len(a.calib)) * 0.1)
    assert int(a.test.labels.max()) < a.num_classes
    assert len(set(a.train.labels.tolist())) == a.num_classes  # every class appears
    other = load_task(name, opts(seed=1, **small))
    if name not in ("digits", "mnist5k"):
        assert not torch.equal(a.train.images, other.train.images)


def test_generators_differ_by_seed_and_pretraining_uses_other_seeds():
    x0, _ = synthetic.generate("shapes", 20, 0)
    x1, _ = synthetic.generate("shapes", 20, 1)
    assert not torch.equal(x0, x1)
    mix, classes = pretrain_mixture(["shapes", "dots"], 50, 0, PRE)
    assert len(mix) == 100 and len(classes) == 12 and int(mix.labels.max()) < 12
    task = load_task("shapes", opts(n_train=50, n_test=10))
    assert not any(torch.equal(mix.images[0], img) for img in task.train.images)
    with pytest.raises(ValueError, match="unknown generator 'spirals'"):
        synthetic.generate("spirals", 3, 0)


def _write_idx(path: Path, array: np.ndarray):
    dims = array.shape
    code = 0x08  # unsigned byte
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, code, len(dims)))
        f.write(struct.pack(">" + "I" * len(dims), *dims))
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("kmnist", "KMNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_from_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    task = load_task(name, opts(tmp_path))
    assert (len(task.train), len(task.calib), len(task.test)) == (36, 4, 10)
    x, y = task.test[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 3
    assert torch.equal(x[0], x[1])  # grey became 3 channels
    assert task.num_classes == 10


def test_emnist_letters_labels_start_at_zero(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    stored = np.zeros((26, 28, 28))
    stored[0, :, 3] = 255  # a vertical bar in the file: EMNIST stores letters transposed
    for prefix, n in (("train", 30), ("test", 26)):
        _write_idx(raw / f"emnist-letters-{prefix}-images-idx3-ubyte", stored if prefix == "test" else np.zeros((n, 28, 28)))
        _write_idx(raw / f"emnist-letters-{prefix}-labels-idx1-ubyte", np.arange(n) % 26 + 1)
    task = load_task("emnist", opts(tmp_path))
    assert task.num_classes == 26 and task.classes[0] == "a"
    assert sorted(y for _, y in task.test) == list(range(26))
    image = task.test[0][0][0].float()
    assert image.mean(dim=1).max() > 4 * image.mean(dim=0).max()  # upright: the bar is now a row
    as_stored = load_task("emnist", opts(tmp_path, source={"transpose": False})).test[0][0][0].float()
    assert as_stored.mean(dim=0).max() > 4 * as_stored.mean(dim=1).max()


def test_cifar10_from_pickled_batches(tmp_path, monkeypatch):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [i % 10] * 4}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 255, (5, 3072), dtype=np.uint8), "labels": [7] * 5}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # generated batches have other md5 sums
    task = load_task("cifar10", opts(tmp_path))
    assert (len(task.train) + len(task.calib), len(task.test)) == (20, 5)
    assert task.classes[0] == "c0" and all(y == 7 for _, y in task.test)


def test_svhn_from_mat_files(tmp_path, monkeypatch):
    from scipy.io import savemat

    import torchvision.datasets.svhn as svhn

    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 6)):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8),
                                                  "y": ((np.arange(n) - 1) % 10 + 1).reshape(n, 1)})  # SVHN stores 0 as 10
    monkeypatch.setattr(svhn, "check_integrity", lambda *a, **k: True)
    task = load_task("svhn", opts(tmp_path))
    assert len(task.test) == 6 and sorted(y for _, y in task.test) == [0, 1, 2, 3, 4, 5]
    assert task.test[0][0].shape == (3, 16, 16)


def _image_folder(root: Path, classes, n=3, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.JPEG")


@pytest.mark.parametrize("name,folder,test_split", [("resisc45", "resisc45", "test"), ("imagenet", "imagenet", "val"),
                                                     ("tiny_imagenet", "tiny-imagenet-200", "val")])
def test_image_folder_layouts(tmp_path, name, folder, test_split):
    classes = ["n01", "n02", "n03"]
    _image_folder(tmp_path / folder / "train", classes, n=10)
    _image_folder(tmp_path / folder / test_split, classes, n=2)
    task = load_task(name, opts(tmp_path))
    assert task.classes == classes and len(task.test) == 6 and len(task.train) + len(task.calib) == 30
    x, y = task.test[5]
    assert x.shape == (3, 16, 16) and y == 2


@pytest.mark.parametrize("name", [t for t in PAPER_TASKS if t not in ("resisc45", "imagenet", "tiny_imagenet")])
def test_missing_real_data_names_path_and_remedy(tmp_path, name):
    with pytest.raises(FileNotFoundError) as err:
        load_task(name, opts(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value) and "To obtain it" in str(err.value)


def test_missing_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no image folder at .*resisc45/train.*Expected one folder per class"):
        load_task("resisc45", opts(tmp_path))


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.exists(), reason="Debian package dataset-fashion-mnist not installed (.ci/run installs it)")
def test_real_fashion_mnist_from_debian_package(tmp_path):
    task = load_task("fashion_mnist", opts(tmp_path, source={"kind": "idx_gz", "path": str(FASHION)}, max_train=600, max_test=100))
    assert (len(task.train), len(task.calib), len(task.test)) == (540, 60, 100)
    assert task.classes[0] == "T-shirt/top"
    full = load_task("fashion_mnist", opts(tmp_path, source={"kind": "idx_gz", "path": str(FASHION)}))
    assert len(full.train) + len(full.calib) == 60000 and len(full.test) == 10000


def test_hf_source_needs_an_id():
    with pytest.raises(ValueError, match="needs an 'id'"):
        load_task("eurosat", opts(source={"kind": "hf"}))


def test_split_cache_round_trip_and_staleness(tmp_path):
    task = load_task("dots", opts(n_train=40, n_test=12))
    fp = task.fingerprint("test", PRE)
    path = write_split_cache(task, "test", PRE, tmp_path / "dots_test.safetensors")
    images, labels, meta = read_split_cache(path, fingerprint=fp)
    assert torch.equal(images, task.test.images) and torch.equal(labels, task.test.labels)
    assert meta["n"] == "12" and meta["task"] == "dots"
    other = Preprocess(img_size=32).key()
    assert task.fingerprint("test", Preprocess(img_size=32)) != fp and other != PRE.key()
    with pytest.raises(ValueError, match="made with other preprocessing"):
        read_split_cache(path, fingerprint="0" * 16)
    with pytest.raises(FileNotFoundError, match="no cached split"):
        read_split_cache(tmp_path / "none.safetensors")


def test_materialize_generic_dataset():
    ds = [(torch.full((3, 2, 2), i, dtype=torch.uint8), i) for i in range(5)]
    x, y = materialize(ds, batch_size=2)
    assert x.shape == (5, 3, 2, 2) and y.tolist() == [0, 1, 2, 3, 4]


def test_preprocess_normalize_and_errors():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(PRE.normalize(x), torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError, match="expected 1 or 3 channels"):
        PRE.resize_batch(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))
    assert PRE.resize_batch(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)).shape == (2, 3, 16, 16)


def _save_hf_dataset(root: Path, source: dict, n_classes: int, n_train: int = 30, n_test: int = 10) -> list:
    """A tiny dataset in a task source's on-disk format: its splits and image/label columns, written
    with save_to_disk under root/<id>. Returns the test split's original images."""
    import datasets
    from PIL import Image

    g = np.random.default_rng(0)
    image_col, label_col = source.get("image", "image"), source.get("label", "label")
    label_feature = datasets.ClassLabel(num_classes=n_classes) if label_col == "label" else datasets.Value("int64")
    features = datasets.Features({image_col: datasets.Image(), label_col: label_feature})
    splits, originals = {}, []
    for split, n in ((source.get("train", "train"), n_train), (source.get("test", "test"), n_test)):
        images = [Image.fromarray(g.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
        labels = [i % n_classes for i in range(n)]
        splits[split] = datasets.Dataset.from_dict({image_col: images, label_col: labels}, features=features)
        originals = images
    datasets.DatasetDict(splits).save_to_disk(str(root / source["id"]))
    return originals


PAPER_SOURCES = {name: task["source"] for name, task in
                 __import__("yaml").safe_load((Path(__file__).parent.parent / "config" / "paper.yaml").read_text())["tasks"].items()}


@pytest.mark.parametrize("task", sorted(PAPER_SOURCES))
def test_every_paper_source_loads_from_a_dataset_saved_in_its_format(tmp_path, task):
    source = PAPER_SOURCES[task]
    originals = _save_hf_dataset(tmp_path, source, n_classes=3)
    data = load_task(task, opts(tmp_path, source=source))
    assert (len(data.train) + len(data.calib), len(data.test)) == (30, 10) and len(data.calib) == 3
    assert data.num_classes == 3
    image, label = data.test[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == 4 % 3
    original = torch.from_numpy(np.array(originals[4])).permute(2, 0, 1)
    upright = original.transpose(1, 2) if task == "emnist" else original  # EMNIST letters are stored transposed
    assert torch.equal(image, upright)
    assert data.provenance["source"] == f"hf:{source['id']}" and data.provenance["transposed"] == (task == "emnist")


def test_hf_source_names_a_missing_column(tmp_path):
    _save_hf_dataset(tmp_path, {"id": "x/y"}, n_classes=2)
    with pytest.raises(ValueError, match="split 'train' of 'x/y' has no column 'img' \\(columns: image, label\\); set source image/label"):
        load_task("cifar10", opts(tmp_path, source={"kind": "hf", "id": "x/y", "image": "img"}))
    with pytest.raises(FileNotFoundError, match="splits 'train', 'valid'"):
        load_task("cifar10", opts(tmp_path, source={"kind": "hf", "id": "x/y", "test": "valid"}))


def test_image_cells_in_any_stored_form(tmp_path):
    import io

    from PIL import Image

    from qvlib.data.registry import _as_pil

    im = Image.new("RGB", (3, 2), (1, 2, 3))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    for cell in (im, buf.getvalue(), {"bytes": buf.getvalue(), "path": None}, str(tmp_path / "a.png")):
        assert _as_pil(cell).convert("RGB").getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(TypeError, match="cannot read an image from a int cell"):
        _as_pil(3)


def test_numerals_draw_the_ten_digits_with_the_letters_renderer():
    assert synthetic.GENERATORS["numerals"][1] == tuple("0123456789")
    images, labels = synthetic.generate("numerals", 200, 0)
    ones, eights = images[labels == 1].float().mean(0), images[labels == 8].float().mean(0)
    assert set(labels.tolist()) == set(range(10)) and (ones - eights).abs().mean() > 1.0
    letters, _ = synthetic.generate("glyphs", 200, 0)
    assert not torch.equal(images, letters)  # same renderer, other characters
