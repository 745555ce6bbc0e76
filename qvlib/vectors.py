"""Arithmetic over named tensors (checkpoints, task and quantization vectors) and safetensors I/O
(written through :func:`qvlib.fileio.atomic_write`).

A :class:`WeightVector` is an ordered mapping from timm parameter names to tensors. Two
operands must hold the same names with the same shapes; anything else is a ``ValueError``
that names the first offending tensor.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .fileio import atomic_write, check_output_path  # noqa: F401 - re-exported: vectors.atomic_write is fileio's


class WeightVector(Mapping[str, torch.Tensor]):
    """Named tensors with ``+``, ``-``, scalar ``*``, norms and cosine similarity."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"tensor {name!r} holds non-finite values (NaN or inf)")
        self._tensors = dict(tensors)
        self.metadata: dict[str, str] = dict(metadata or {})

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"WeightVector({len(self)} tensors, {self.numel()} values)"

    def numel(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    def check_compatible(self, other: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` unless ``other`` holds exactly our names with our shapes."""
        for name in self._tensors:
            if name not in other:
                raise ValueError(f"tensor {name!r} (shape {tuple(self[name].shape)}) is missing from the other operand")
            if tuple(other[name].shape) != tuple(self[name].shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(self[name].shape)} here but {tuple(other[name].shape)} in the other operand"
                )
        extra = [name for name in other if name not in self._tensors]
        if extra:
            raise ValueError(f"tensor {extra[0]!r} (shape {tuple(other[extra[0]].shape)}) is only in the other operand")

    def _zip(self, other: Mapping[str, torch.Tensor], op) -> "WeightVector":
        self.check_compatible(other)
        return WeightVector({name: op(t, other[name]) for name, t in self._tensors.items()})

    def __add__(self, other: Mapping[str, torch.Tensor]) -> "WeightVector":
        return self._zip(other, torch.add)

    def __sub__(self, other: Mapping[str, torch.Tensor]) -> "WeightVector":
        return self._zip(other, torch.sub)

    def __mul__(self, scalar: float) -> "WeightVector":
        if not isinstance(scalar, (int, float)) or not math.isfinite(scalar):
            raise ValueError(f"a vector can only be scaled by a finite number, got {scalar!r}")
        return WeightVector({name: t * scalar for name, t in self._tensors.items()})

    __rmul__ = __mul__

    def __neg__(self) -> "WeightVector":
        return self * -1.0

    def dot(self, other: Mapping[str, torch.Tensor]) -> float:
        self.check_compatible(other)
        return float(sum((t.double() * other[name].double()).sum() for name, t in self._tensors.items()))

    def norm(self) -> float:
        """Euclidean norm over all tensors together (computed in float64)."""
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self._tensors.values()))

    def tensor_norms(self) -> dict[str, float]:
        return {name: float(t.double().norm()) for name, t in self._tensors.items()}

    def cosine(self, other: Mapping[str, torch.Tensor]) -> float:
        other = other if isinstance(other, WeightVector) else WeightVector(other)
        denom = self.norm() * other.norm()
        if denom == 0:
            raise ValueError("cosine similarity is undefined for a zero vector")
        return self.dot(other) / denom

    def subset(self, names: Iterable[str]) -> "WeightVector":
        names = list(names)
        missing = [n for n in names if n not in self._tensors]
        if missing:
            raise ValueError(f"tensor {missing[0]!r} is not in this vector")
        return WeightVector({n: self._tensors[n] for n in names}, self.metadata)

    def to(self, device=None, dtype=None) -> "WeightVector":
        return WeightVector({n: t.to(device=device, dtype=dtype) for n, t in self._tensors.items()}, self.metadata)

    @staticmethod
    def mean(vectors: Iterable[Mapping[str, torch.Tensor]]) -> "WeightVector":
        vectors = [v if isinstance(v, WeightVector) else WeightVector(v) for v in vectors]
        if not vectors:
            raise ValueError("the mean of no vectors is undefined")
        total = vectors[0]
        for v in vectors[1:]:
            total = total + v
        return total * (1.0 / len(vectors))

    def with_metadata(self, metadata: Mapping[str, object]) -> "WeightVector":
        """The same tensors with ``metadata`` added to ours (values that are not strings become JSON)."""
        return WeightVector(self._tensors, {**self.metadata, **encode_metadata(metadata)})

    def save(self, path: str | os.PathLike, metadata: Mapping[str, object] | None = None) -> Path:
        """Write as safetensors (contiguous, CPU) with string metadata, atomically. The metadata is
        written in sorted key order, so the same tensors and metadata always give the same bytes."""
        meta = {**self.metadata, **encode_metadata(metadata or {})}
        tensors = {n: t.detach().cpu().contiguous() for n, t in self._tensors.items()}

        def write(tmp: str) -> None:
            save_file(tensors, tmp, metadata=meta)
            sort_metadata(tmp)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "WeightVector":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no safetensors file at {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a safetensors file")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
                metadata = f.metadata() or {}
        except Exception as err:  # safetensors raises its own error types (and OSError) for bad files
            raise ValueError(f"{path} is not a readable safetensors file ({describe_unreadable(path)}): {err}") from None
        try:
            return cls(tensors, metadata)
        except ValueError as err:  # non-finite values: name the file as well as the tensor
            raise ValueError(f"{path}: {err}; the file cannot be used (write it again from a finite model)") from None


def describe_unreadable(path: Path) -> str:
    """What an unreadable checkpoint file most likely is, from its bytes: names the usual mistakes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        header_bytes = f.read(header_len) if header_len < 100_000_000 else b""
    if not size:
        return "the file is empty"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "it looks like a pickled PyTorch checkpoint (torch.save); convert it with safetensors.torch.save_file"
    try:
        header = json.loads(header_bytes)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        if 0 < header_len < 100_000_000 and 8 + header_len > size:
            return f"truncated: its header announces {header_len} bytes but the file holds {size}"
        return f"{size} bytes that are not in the safetensors format"
    if 8 + header_len + end > size:
        return f"truncated: it holds {size} of the {8 + header_len + end} bytes its header announces"
    return "its header is inconsistent"


def encode_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """safetensors metadata must be str -> str: strings stay, everything else becomes JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}


def sort_metadata(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's header in place with its metadata keys in sorted order.

    safetensors keeps the metadata in a hash map whose order changes from run to run; the tensors'
    entries (and so their data) are already in a fixed order. The sorted header is written over the
    old one and padded with spaces to the old length (a multiple of 8, as safetensors pads it), so the
    tensor data never moves. It is never longer than safetensors' own header: both are compact JSON
    with the same escapes, in another key order. A header it would lengthen (one not written by
    safetensors) is a ValueError, and the file is left as it was."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise ValueError(f"{path}: its sorted safetensors header takes {len(text)} bytes, more than the {size} the "
                             "file holds, so its metadata cannot be sorted in place (was it written by safetensors?)")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces too


def quantization_vector(qat: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor], names: Iterable[str]) -> WeightVector:
    """``rho = theta_QAT - theta_FT`` over ``names`` (what the policy's vectors carry)."""
    names = list(names)
    return WeightVector({n: _get(qat, n, "QAT") for n in names}) - WeightVector({n: _get(ft, n, "FT") for n in names})


def random_direction(vector: Mapping[str, torch.Tensor], seed: int) -> WeightVector:
    """The control for a vector: same per-tensor norms, random (seeded Gaussian) direction."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in vector.items():
        g = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        out[name] = (g * (t.double().norm() / g.norm())).to(t.dtype)
    return WeightVector(out)


def patch(receiver: Mapping[str, torch.Tensor], vectors: Iterable[tuple[float, Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """``theta_R + sum(lambda_i * v_i)``: a new state dict; tensors not in any vector are shared."""
    out = dict(receiver)
    for lam, vec in vectors:
        for name, delta in vec.items():
            base = _get(receiver, name, "receiver")
            if tuple(base.shape) != tuple(delta.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(base.shape)} in the receiver but {tuple(delta.shape)} in the vector")
            out[name] = out[name] + lam * delta.to(device=base.device, dtype=base.dtype)
    return out


def _get(state: Mapping[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    if name not in state:
        raise ValueError(f"tensor {name!r} is missing from the {what} checkpoint")
    return state[name]
