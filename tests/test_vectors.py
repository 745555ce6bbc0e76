import math
import os

import pytest
import torch

from qvlib.vectors import WeightVector, patch, quantization_vector


def vec(seed=0, **shapes):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a": (2, 3), "b": (4,)}
    return WeightVector({k: torch.randn(s, generator=g) for k, s in shapes.items()})


def test_difference_sum_scaling_identities():
    a, b = vec(0), vec(1)
    back = (a - b) + b
    for name in a:
        torch.testing.assert_close(back[name], a[name])
    doubled = a * 2.0
    assert torch.equal(doubled["a"], a["a"] * 2)
    assert torch.equal((0.5 * a)["b"], a["b"] * 0.5)
    assert torch.equal((-a)["a"], -a["a"])
    assert math.isclose((a * 3.0).norm(), 3 * a.norm(), rel_tol=1e-6)


def test_exact_values_norm_cosine_mean():
    a = WeightVector({"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([[4.0]])})
    b = WeightVector({"x": torch.tensor([0.0, 2.0]), "y": torch.tensor([[0.0]])})
    assert a.norm() == 5.0
    assert a.tensor_norms() == {"x": 3.0, "y": 4.0}
    assert a.cosine(b) == 0.0
    assert a.cosine(a) == pytest.approx(1.0, abs=1e-15)
    assert a.cosine(a * -2.0) == pytest.approx(-1.0, abs=1e-15)
    m = WeightVector.mean([a, b])
    assert torch.equal(m["x"], torch.tensor([1.5, 1.0])) and torch.equal(m["y"], torch.tensor([[2.0]]))
    assert a.dot(b) == 0.0 and a.dot(a) == 25.0


def test_mismatch_errors_name_the_tensor_and_both_shapes():
    a = vec(0)
    with pytest.raises(ValueError, match=r"tensor 'a' has shape \(2, 3\) here but \(3, 2\) in the other operand"):
        a + WeightVector({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"tensor 'b' \(shape \(4,\)\) is missing from the other operand"):
        a - WeightVector({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"tensor 'c' \(shape \(1,\)\) is only in the other operand"):
        a.dot({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)})
    with pytest.raises(ValueError, match="zero vector"):
        a.cosine(a * 0.0)
    with pytest.raises(ValueError, match="mean of no vectors"):
        WeightVector.mean([])
    with pytest.raises(ValueError, match="finite number"):
        a * float("nan")


def test_non_finite_values_are_refused_with_the_name():
    with pytest.raises(ValueError, match="tensor 'blocks.0.mlp.fc1.weight' holds non-finite"):
        WeightVector({"ok": torch.zeros(2), "blocks.0.mlp.fc1.weight": torch.tensor([1.0, float("inf")])})
    with pytest.raises(ValueError, match="tensor 'n' holds non-finite"):
        WeightVector({"n": torch.tensor([float("nan")])})


def test_safetensors_round_trip_with_metadata(tmp_path):
    a = vec(3)
    path = a.save(tmp_path / "sub" / "v.safetensors", {"arch": "vit_tiny", "task": "digits", "seed": 7, "quant": {"bits": 3}})
    back = WeightVector.load(path)
    assert list(back) == list(a)
    for name in a:
        assert torch.equal(back[name], a[name])
    assert back.metadata == {"arch": "vit_tiny", "task": "digits", "seed": "7", "quant": '{"bits": 3}'}
    assert os.listdir(tmp_path / "sub") == ["v.safetensors"]


def test_save_writes_through_fileio_atomic_write():
    """vectors.atomic_write and check_output_path are qvlib.fileio's (the one writer; tests/test_fileio.py)."""
    from qvlib import fileio, vectors

    assert vectors.atomic_write is fileio.atomic_write and vectors.check_output_path is fileio.check_output_path


def test_load_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no safetensors file at .*nope.safetensors"):
        WeightVector.load(tmp_path / "nope.safetensors")


def test_quantization_vector_and_patch():
    ft = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([9.0])}
    qat = {"w": torch.tensor([1.5, 1.0]), "b": torch.tensor([9.0])}
    rho = quantization_vector(qat, ft, ["w"])
    assert list(rho) == ["w"] and torch.equal(rho["w"], torch.tensor([0.5, -1.0]))
    patched = patch(ft, [(2.0, rho)])
    assert torch.equal(patched["w"], torch.tensor([2.0, 0.0]))
    assert patched["b"] is ft["b"]
    # lambda = 1 on its own vector gives back the QAT weights
    assert torch.equal(patch(ft, [(1.0, rho)])["w"], qat["w"])
    assert torch.equal(patch(ft, [(0.0, rho)])["w"], ft["w"])
    with pytest.raises(ValueError, match="tensor 'w' is missing from the QAT checkpoint"):
        quantization_vector({}, ft, ["w"])
    with pytest.raises(ValueError, match=r"tensor 'w' has shape \(2,\) in the receiver but \(3,\) in the vector"):
        patch(ft, [(1.0, {"w": torch.zeros(3)})])
    with pytest.raises(ValueError, match="tensor 'z' is missing from the receiver"):
        patch(ft, [(1.0, {"z": torch.zeros(3)})])


def test_sort_metadata_pads_in_place_and_refuses_a_header_it_would_lengthen(tmp_path):
    import json

    from qvlib.vectors import sort_metadata

    path = WeightVector({"a": torch.ones(3)}).save(tmp_path / "v.safetensors", {"z": "1", "b": "2", "m": "ü\n"})
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + size]
    assert size % 8 == 0 and list(json.loads(header)["__metadata__"]) == ["b", "m", "z"]
    assert header.rstrip(b" ").endswith(b"}") and len(raw) == 8 + size + 12
    # a header that is not safetensors' own compact JSON (no padding): 1E2 would come back as 100.0
    text = b'{"__metadata__":{"b":"1","a":"2"},"n":1E2,"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 4)
    before = odd.read_bytes()
    with pytest.raises(ValueError, match="cannot be sorted in place"):
        sort_metadata(odd)
    assert odd.read_bytes() == before
