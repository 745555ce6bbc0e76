"""A receiver's donors as ``qv evaluate-transfer`` names them: ``NAME=VECTOR`` pairs and the file each
donor's cells go to (one ``-o`` per donor, or one with ``{donor}`` in it). Pure string and path work,
checked before any model is built, so a mistake costs nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

DONOR_FIELD = "{donor}"  # in an output path: replaced by each donor's name


def parse_donor(text: str) -> tuple[str, Path]:
    """``NAME=VECTOR`` -> (name, vector path); the first ``=`` splits, and neither side may be empty."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--donor expects NAME=VECTOR, got {text!r}")
    return name, Path(path)


def donor_outputs(names: Sequence[str], outputs: Sequence[str]) -> list[str]:
    """The output file of each donor (``names``, in order): ``outputs`` holds one path per donor in the
    same order, or one path for all; ``{donor}`` in a path is replaced by the donor's name. Two donors
    that would write the same file are an error."""
    outputs = list(outputs) * len(names) if len(outputs) == 1 else list(outputs)
    if len(outputs) != len(names):
        raise ValueError(f"{len(names)} --donor values but {len(outputs)} -o paths: give one per donor, or one with {DONOR_FIELD}")
    outputs = [out.replace(DONOR_FIELD, name) for out, name in zip(outputs, names)]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"several donors would write the same file: give -o once per donor, or once with {DONOR_FIELD} in it")
    return outputs


def transfer_cells(donors: Iterable[str], outputs: Sequence[str]) -> list[tuple[str, Path, Path]]:
    """``--donor`` values and ``-o`` paths -> (donor name, vector, output) per donor, what
    :func:`qvlib.pipeline.evaluate_cells` takes; every donor is parsed before the outputs are counted."""
    pairs = [parse_donor(item) for item in donors]
    paths = donor_outputs([name for name, _ in pairs], outputs)
    return [(name, vector, Path(out)) for (name, vector), out in zip(pairs, paths)]
