"""Train-time augmentation (timm's training transform) and the eval resize as timm computes it."""

import random

import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import Subset

from qvlib.data.augment import AugmentedDataset, augmented, raw_view, train_transform
from qvlib.data.base import ArrayDataset, Preprocess, TransformedDataset
from qvlib.models import backbone_state, task_model
from qvlib.train import TrainConfig, train
from qvlib.vectors import WeightVector


def pil_images(n=12, size=(40, 30)):
    g = torch.Generator().manual_seed(0)
    arrays = torch.randint(0, 255, (n, size[1], size[0], 3), dtype=torch.uint8, generator=g)
    return [(Image.fromarray(a.numpy()), i % 3) for i, a in enumerate(arrays)]


def test_eval_resize_is_timms():
    for size, crop in ((224, 0.9), (224, 0.875), (384, 1.0), (32, 0.9)):
        pre = Preprocess(img_size=size, crop_pct=crop)
        resize = timm.data.create_transform(size, is_training=False, crop_pct=crop, interpolation="bicubic").transforms[0]
        assert pre.resize_size() == resize.size, (size, crop)
    assert Preprocess(img_size=224, crop_pct=0.9).resize_size() == 248  # not round(248.9) = 249
    out = Preprocess(img_size=224, crop_pct=0.9).pil_transform()(Image.new("L", (300, 500)))
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)


def test_train_transform_gives_uint8_model_sized_images_from_pil_or_tensor():
    t = train_transform(Preprocess(img_size=16))
    for image in (Image.new("L", (40, 30), 128), Image.new("RGB", (20, 50)), torch.zeros(3, 16, 16, dtype=torch.uint8)):
        out = t(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    names = [type(s).__name__ for s in t.transforms]
    assert "RandomResizedCropAndInterpolation" in str(t) and "ColorJitter" in str(t) and "PILToTensor" in names


def test_raw_view_reaches_the_original_images_through_subsets():
    base = pil_images()
    eval_view = Subset(TransformedDataset(base, Preprocess(img_size=16).pil_transform()), [3, 5])
    image, label = raw_view(eval_view)[1]
    assert image is base[5][0] and label == 5 % 3
    arrays = ArrayDataset(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.arange(4))
    assert raw_view(arrays) is arrays
    with pytest.raises(TypeError, match="cannot augment a list"):
        raw_view([1, 2])


def test_augmentation_is_a_function_of_seed_step_and_index_and_leaves_rngs_alone():
    ds = augmented(TransformedDataset(pil_images(), Preprocess(img_size=16).pil_transform()), Preprocess(img_size=16), seed=0)
    assert isinstance(ds, AugmentedDataset) and len(ds) == 12
    random.seed(7)
    torch.manual_seed(7)
    before = (random.random(), float(torch.rand(1)))
    random.seed(7)
    torch.manual_seed(7)
    a, label = ds[(2, 5)]
    after = (random.random(), float(torch.rand(1)))
    assert before == after  # neither global generator moved
    assert torch.equal(a, ds[(2, 5)][0]) and label == 2
    assert not torch.equal(a, ds[(2, 6)][0])  # another step, another crop
    other_seed = augmented(TransformedDataset(pil_images(), Preprocess(img_size=16).pil_transform()), Preprocess(img_size=16), seed=1)
    assert not torch.equal(a, other_seed[(2, 5)][0])


def _train(tiny_arch, path, augment, steps=6, **kw):
    model = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0)
    ds = TransformedDataset(pil_images(), Preprocess(img_size=16).pil_transform())
    train(model, ds, Preprocess(img_size=16), TrainConfig(steps=steps, batch_size=4, lr=1e-2, augment=augment, **kw),
          "ft", path, {"task": "t"}, progress=False)
    return WeightVector.load(path)


def test_training_with_augmentation_is_deterministic_and_differs_from_without(tiny_arch, tmp_path):
    a = _train(tiny_arch, tmp_path / "a.safetensors", True)
    b = _train(tiny_arch, tmp_path / "b.safetensors", True, num_workers=2)  # workers draw the same crops
    plain = _train(tiny_arch, tmp_path / "plain.safetensors", False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], plain["blocks.0.attn.qkv.weight"])


def test_eval_transform_resizes_with_pil_before_the_tensor_as_the_authors_do():
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(1)
    image = Image.fromarray(torch.randint(0, 255, (500, 300, 3), dtype=torch.uint8, generator=g).numpy())
    out = Preprocess(img_size=224, crop_pct=0.9).pil_transform()(image)
    # PIL's own bicubic resize of the shorter side to 248 (300 x 500 -> 248 x 413), centre crop 224
    resized = image.resize((248, 413), Image.Resampling.BICUBIC)
    top = round((413 - 224) / 2)
    expected = v2.functional.pil_to_tensor(resized.crop((12, top, 12 + 224, top + 224)))
    assert out.dtype == torch.uint8 and torch.equal(out, expected)


def test_images_stored_transposed_are_augmented_as_stored_then_turned_upright(monkeypatch):
    """EMNIST: the authors flip the stored image and transpose after, so the upright letter is flipped
    vertically (a horizontal flip of the upright letter would be the other order)."""
    from torchvision.transforms import v2

    from qvlib.data import augment
    from qvlib.data.base import TransposedImages

    def always_flip(preprocess):
        return v2.Compose([v2.Lambda(augment._to_rgb_pil), v2.RandomHorizontalFlip(p=1.0), v2.PILToTensor()])

    monkeypatch.setattr(augment, "train_transform", always_flip)
    stored = pil_images(n=2, size=(20, 12))  # 20 wide, 12 high: not square, not symmetric
    pre = Preprocess(img_size=16)
    train_split = Subset(TransformedDataset(TransposedImages(stored), pre.pil_transform()), [1])
    out, label = augment.augmented(train_split, pre, seed=0)[(0, 0)]
    upright = v2.functional.pil_to_tensor(stored[1][0].transpose(Image.Transpose.TRANSPOSE))
    assert label == 1 and out.shape == (3, 20, 12)
    assert torch.equal(out, upright.flip(-2))  # a vertical flip of the upright image
    assert not torch.equal(out, upright.flip(-1))


def test_only_tasks_that_decode_image_files_are_marked_as_read_through_pil():
    from qvlib.data.registry import reads_image_files

    assert not reads_image_files("shapes") and not reads_image_files("mnist5k", {})
    assert reads_image_files("emnist") and reads_image_files("cifar10", None)
    assert reads_image_files("mytask", {"source": {"kind": "hf", "id": "x/y"}})
