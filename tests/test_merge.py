"""Merge methods against small examples computed by hand."""

import json
from pathlib import Path

import pytest
import torch

from qvlib.merging import MERGE_METHODS, merge, merge_method
from qvlib.vectors import WeightVector


def vecs(*rows):
    return [WeightVector({"w": torch.tensor(r, dtype=torch.float32)}) for r in rows]


def test_sum_and_mean():
    a, b, c = vecs([1.0, -2.0, 3.0], [3.0, 2.0, -1.0], [2.0, 0.0, 1.0])
    assert merge([a, b, c], "sum")["w"].tolist() == [6.0, 0.0, 3.0]
    assert merge([a, b, c], "mean")["w"].tolist() == [2.0, 0.0, 1.0]


def test_ties_trims_elects_signs_and_averages_agreeing_values():
    a, b, c = vecs([4.0, -1.0, 0.5, 3.0], [-2.0, -3.0, 0.1, 1.0], [1.0, 2.0, -6.0, -3.0])
    # density 0.5 keeps each vector's 2 largest magnitudes:
    #   a -> [4, 0, 0, 3], b -> [-2, -3, 0, 0], c -> [0, 0, -6, -3]
    # elected signs of the sums [2, -3, -6, 0] -> [+, -, -, none]
    # agreeing means: [4, -3, -6, 0] (the last entry's tie elects nothing)
    assert merge([a, b, c], "ties", density=0.5)["w"].tolist() == [4.0, -3.0, -6.0, 0.0]
    # density 1 keeps everything: entry 0 sum 3 -> +, mean of (4, 1) = 2.5
    assert merge([a, b, c], "ties", density=1.0)["w"][0].item() == 2.5


def test_ties_of_one_vector_at_full_density_is_that_vector():
    (a,) = vecs([1.5, -2.0, 0.0])
    assert merge([a], "ties", density=1.0)["w"].tolist() == [1.5, -2.0, 0.0]


def test_errors_name_the_problem():
    a, b = vecs([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown merge method 'median'; known: sum, mean, ties"):
        merge([a, b], "median")
    with pytest.raises(ValueError, match=r"takes \['density'\], not \['k'\]"):
        merge([a, b], "ties", k=3)
    with pytest.raises(ValueError, match="no parameters"):
        merge([a, b], "mean", density=0.5)
    with pytest.raises(ValueError, match="density must be in"):
        merge([a, b], "ties", density=0.0)
    with pytest.raises(ValueError, match="at least one"):
        merge([], "mean")
    with pytest.raises(ValueError, match="shape"):
        merge([a, WeightVector({"w": torch.zeros(3)})], "sum")


def test_a_new_method_is_one_registered_function():
    @merge_method("max_abs_test")
    def max_abs(stack):
        return stack.gather(0, stack.abs().argmax(dim=0, keepdim=True))[0]

    try:
        a, b = vecs([1.0, -5.0], [-3.0, 2.0])
        assert merge([a, b], "max_abs_test")["w"].tolist() == [-3.0, -5.0]
        with pytest.raises(ValueError, match="already registered"):
            merge_method("max_abs_test")(max_abs)
    finally:
        MERGE_METHODS.pop("max_abs_test")


def test_leave_one_out_never_reads_the_left_out_vector():
    from qvlib.merging import merged_vector

    meta = {"arch": "vit", "quant": '{"bits": 2}'}
    vectors = {t: WeightVector({"w": torch.tensor([v])}, {**meta, "task": t, "seed": "0"})
               for t, v in (("a", [1.0, 3.0]), ("b", [3.0, -1.0]), ("c", [2.0, 4.0]))}
    poisoned = {"w": torch.full((1, 2), float("nan"))}  # the receiver's vector, poisoned
    vectors["r"] = WeightVector.__new__(WeightVector)
    vectors["r"]._tensors, vectors["r"].metadata = poisoned, {**meta, "task": "r", "seed": "0"}
    loo = merged_vector(vectors, "mean", exclude=["r"])
    assert loo["w"].tolist() == [[2.0, 2.0]]
    assert json.loads(loo.metadata["merged"]) == {"method": "mean", "tasks": ["a", "b", "c"]}
    assert (loo.metadata["arch"], loo.metadata["quant"], loo.metadata["seed"]) == ("vit", '{"bits": 2}', "0")
    with pytest.raises(ValueError, match="non-finite"):  # the poison is real: merging it in fails
        merged_vector(vectors, "mean")
    with pytest.raises(ValueError, match="nothing left to merge"):
        merged_vector({"r": vectors["r"]}, "mean", exclude=["r"])
    other = WeightVector({"w": torch.zeros(1, 2)}, {"quant": '{"bits": 3}'})
    with pytest.raises(ValueError, match="disagree on quant"):
        merged_vector({"a": vectors["a"], "x": other}, "mean")


def test_vectors_are_labelled_by_metadata_task_else_file_stem_and_each_label_once():
    from qvlib import checkpoints
    from qvlib.merging import label_vectors, merged_tasks, merged_vector, vector_label

    assert checkpoints.merged_vector is merged_vector  # still importable from checkpoints
    a = WeightVector({"w": torch.ones(2)}, {"task": "shapes"})
    b = WeightVector({"w": torch.zeros(2)})
    assert vector_label(a, "out/other.safetensors") == "shapes"
    assert vector_label(b, "out/dots.qv.safetensors") == "dots.qv"
    assert vector_label(WeightVector({"w": torch.ones(2)}, {"task": ""}), Path("x/y.safetensors")) == "y"
    labelled = label_vectors([("v/a.safetensors", a), (Path("v/dots.safetensors"), b)])
    assert list(labelled) == ["shapes", "dots"] and labelled["shapes"] is a and labelled["dots"] is b
    read = []

    def lazily():  # a duplicate is refused before the next file is read
        for path, vec in (("v/shapes.safetensors", b), ("v/a.safetensors", a), ("v/c.safetensors", b)):
            read.append(path)
            yield path, vec

    with pytest.raises(ValueError) as err:
        label_vectors(lazily())
    assert str(err.value) == "two vectors are labelled 'shapes' (by their metadata task or file name): merge each once"
    assert read == ["v/shapes.safetensors", "v/a.safetensors"]
    # the receiver is left out (and recorded) whether or not its vector is among the inputs
    merged = merged_vector(labelled, "sum", receiver="shapes")
    assert merged_tasks(merged) == ["dots"] and json.loads(merged.metadata["left_out"]) == ["shapes"]
    assert merged["w"].tolist() == [0.0, 0.0]
    merged = merged_vector(labelled, "ties", receiver="digits", density=0.5)
    assert merged_tasks(merged) == ["dots", "shapes"] and json.loads(merged.metadata["left_out"]) == ["digits"]
    assert json.loads(merged.metadata["merged"]) == {"method": "ties", "density": 0.5, "tasks": ["dots", "shapes"]}
    with pytest.raises(ValueError) as err:
        merged_vector(labelled, "mean", exclude=["shape"])
    assert str(err.value) == ("cannot exclude 'shape': no vector to merge is labelled so (labels: dots, shapes); "
                              "a vector's label is its metadata task, else its file name")
