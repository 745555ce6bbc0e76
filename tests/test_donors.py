"""qvlib.donors: `qv evaluate-transfer`'s NAME=VECTOR donors and the output file of each."""

from pathlib import Path

import pytest

from qvlib.donors import donor_outputs, parse_donor, transfer_cells


def test_a_donor_is_name_equals_vector_split_at_the_first_equals():
    assert parse_donor("shapes=v/shapes.safetensors") == ("shapes", Path("v/shapes.safetensors"))
    assert parse_donor("merged-mean=a=b.safetensors") == ("merged-mean", Path("a=b.safetensors"))
    for bad in ("shapes", "=v.safetensors", "shapes=", "="):
        with pytest.raises(ValueError) as err:
            parse_donor(bad)
        assert str(err.value) == f"--donor expects NAME=VECTOR, got {bad!r}"


def test_one_output_per_donor_or_one_with_the_donor_field():
    assert donor_outputs(["a", "b"], ["x.parquet", "y.parquet"]) == ["x.parquet", "y.parquet"]
    assert donor_outputs(["a", "b"], ["cells/{donor}.parquet"]) == ["cells/a.parquet", "cells/b.parquet"]
    assert donor_outputs(["a"], ["only.parquet"]) == ["only.parquet"]
    assert donor_outputs(["a", "b"], ["{donor}/{donor}.parquet", "b.parquet"]) == ["a/a.parquet", "b.parquet"]
    with pytest.raises(ValueError) as err:
        donor_outputs(["a", "b"], ["x.parquet", "y.parquet", "z.parquet"])
    assert str(err.value) == "2 --donor values but 3 -o paths: give one per donor, or one with {donor}"
    with pytest.raises(ValueError) as err:
        donor_outputs(["a", "b", "c"], ["x.parquet", "y.parquet"])
    assert str(err.value) == "3 --donor values but 2 -o paths: give one per donor, or one with {donor}"
    same = "several donors would write the same file: give -o once per donor, or once with {donor} in it"
    for outputs in (["all.parquet"], ["x.parquet", "x.parquet"]):
        with pytest.raises(ValueError) as err:
            donor_outputs(["a", "b"], outputs)
        assert str(err.value) == same
    with pytest.raises(ValueError) as err:  # the same donor twice lands on the same file too
        donor_outputs(["a", "a"], ["{donor}.parquet"])
    assert str(err.value) == same


def test_transfer_cells_parse_every_donor_before_counting_outputs():
    assert transfer_cells(["a=va", "b=vb"], ["out-{donor}.parquet"]) == [
        ("a", Path("va"), Path("out-a.parquet")), ("b", Path("vb"), Path("out-b.parquet"))]
    with pytest.raises(ValueError) as err:  # a bad donor is named even when the counts disagree as well
        transfer_cells(["a=va", "b"], ["x", "y", "z"])
    assert str(err.value) == "--donor expects NAME=VECTOR, got 'b'"
