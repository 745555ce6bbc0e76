"""Quantized checkpoints as packed integers: what a user deploys instead of fake-quantized float32.

Each quantized tensor is stored as its integer codes, offset to ``0 .. 2^b - 1`` and written as one
little-endian bit stream of exactly ``b`` bits per weight (``ceil(numel * b / 8)`` bytes), plus its
float32 scales; every other tensor is kept as it is. A 3-bit weight therefore takes 3/32 of its
float32 bytes (plus one scale per block), where packing whole codes into int32 words, 10 per word,
would take 3.2/32. Unpacking gives back exactly the fake-quantized float32 weights: the codes are
integers and the scales are stored bit for bit, so ``codes * scale`` repeats :func:`fake_quant`'s
arithmetic.

File layout (safetensors): ``<name>.qcodes`` (uint8 bit stream) and ``<name>.qscale`` (float32,
one per block) per quantized tensor; metadata ``format`` = :data:`PACKED_FORMAT`, ``quant`` (the
QuantSpec JSON) and ``packed`` (JSON: name -> shape), beside the checkpoint's own metadata.
"""

from __future__ import annotations

import json
import math

import torch

from .quant import DEFAULT_POLICY, QuantPolicy, QuantSpec, dequantize, quantize
from .vectors import WeightVector

PACKED_FORMAT = "qvlib-packed-1"
CODES_SUFFIX = ".qcodes"
SCALE_SUFFIX = ".qscale"


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers below ``2**bits`` (any shape) as one little-endian bit stream of ``bits`` bits
    each: a uint8 tensor of ``ceil(numel * bits / 8)`` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = values.reshape(-1).to(torch.int64)
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"values must lie in 0..{2 ** bits - 1} to pack into {bits} bits")
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)  # bit j of value i at i * bits + j
    stream = torch.nn.functional.pad(stream, (0, (-len(stream)) % 8))
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` values of a :func:`pack_bits` stream (int64)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"expected a 1-D uint8 bit stream, got {packed.dtype} {tuple(packed.shape)}")
    if len(packed) != math.ceil(count * bits / 8):
        raise ValueError(f"{count} values of {bits} bits need {math.ceil(count * bits / 8)} bytes, the stream has {len(packed)}")
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[:count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(dim=1)


def pack_checkpoint(ckpt: WeightVector, spec: QuantSpec, policy: QuantPolicy = DEFAULT_POLICY) -> WeightVector:
    """``ckpt`` with every policy tensor as packed codes and scales (see the module docstring)."""
    tensors, shapes = {}, {}
    for name, t in ckpt.items():
        if not policy.matches(name, t):
            tensors[name] = t
            continue
        codes, scale = quantize(t, spec)
        tensors[name + CODES_SUFFIX] = pack_bits(codes.to(torch.int64) - spec.qmin, spec.bits)
        tensors[name + SCALE_SUFFIX] = scale.float().contiguous()
        shapes[name] = list(t.shape)
    if not shapes:
        raise ValueError(f"no tensor matches the quantization pattern {policy.pattern!r}: nothing to pack")
    meta = {"format": PACKED_FORMAT, "quant": spec.to_json(), "packed": json.dumps(shapes)}
    return WeightVector(tensors, ckpt.metadata).with_metadata(meta)


def is_packed(ckpt: WeightVector) -> bool:
    return ckpt.metadata.get("format") == PACKED_FORMAT


def _metadata_json(packed: WeightVector, key: str, name: str):
    """A packed file's JSON metadata entry ``key``, or a ValueError naming the file and the key."""
    if key not in packed.metadata:
        raise ValueError(f"{name} is an incomplete packed checkpoint: its metadata has no {key!r}; "
                         "write it again with qv quantize --packed")
    try:
        return json.loads(packed.metadata[key])
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: metadata {key!r} of this packed checkpoint is not valid JSON ({err}); "
                         "write it again with qv quantize --packed") from None


def _packed_shapes(packed: WeightVector, name: str) -> dict[str, list[int]]:
    """The ``packed`` metadata (tensor name -> shape), checked against the tensors the file holds."""
    shapes = _metadata_json(packed, "packed", name)
    if not isinstance(shapes, dict) or not all(
            isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
            for s in shapes.values()):
        raise ValueError(f"{name}: metadata 'packed' must map tensor names to shapes (lists of sizes), "
                         f"got {packed.metadata['packed'][:80]!r}")
    for tensor in shapes:
        for suffix in (CODES_SUFFIX, SCALE_SUFFIX):
            if tensor + suffix not in packed:
                raise ValueError(f"{name} is an incomplete packed checkpoint: its metadata lists {tensor!r} but the "
                                 f"file has no tensor {tensor + suffix!r}; write it again with qv quantize --packed")
    return shapes


def unpack_checkpoint(packed: WeightVector, name: str = "the packed checkpoint") -> WeightVector:
    """The fake-quantized float32 checkpoint a packed file holds (bit-exact with ``qv quantize``).
    A file that lacks its metadata or tensors is a ValueError naming ``name`` and what is missing."""
    if not is_packed(packed):
        raise ValueError(f"{name} is not a packed checkpoint (metadata format {packed.metadata.get('format')!r}, "
                         f"expected {PACKED_FORMAT!r})")
    quant = _metadata_json(packed, "quant", name)
    if not isinstance(quant, dict) or "bits" not in quant:
        raise ValueError(f"{name}: metadata 'quant' must be a quantizer spec, a JSON object with 'bits', got "
                         f"{packed.metadata['quant'][:80]!r}; write it again with qv quantize --packed")
    try:
        spec = QuantSpec.from_mapping(quant)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: metadata 'quant' is not a quantizer spec: {err}") from None
    shapes = _packed_shapes(packed, name)
    out = {key: t for key, t in packed.items() if not key.endswith((CODES_SUFFIX, SCALE_SUFFIX))}
    for tensor, shape in shapes.items():
        try:
            codes = unpack_bits(packed[tensor + CODES_SUFFIX], spec.bits, math.prod(shape)) + spec.qmin
            out[tensor] = dequantize(codes.to(torch.int8).reshape(shape), packed[tensor + SCALE_SUFFIX], spec)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{name}: tensor {tensor!r} does not unpack to shape {tuple(shape)} with {spec.tag}: {err}") from None
    meta = {k: v for k, v in packed.metadata.items() if k not in ("format", "packed", "quant")}
    return WeightVector(out, meta).with_metadata({"fake_quantized": spec.to_json()})


def packed_sizes(packed: WeightVector, name: str = "the packed checkpoint") -> dict[str, int]:
    """Bytes of the quantized part (codes and scales), of the same weights in float32, and their ratio."""
    shapes = _packed_shapes(packed, name)
    stored = sum(packed[n + CODES_SUFFIX].numel() + 4 * packed[n + SCALE_SUFFIX].numel() for n in shapes)
    dense = 4 * sum(math.prod(s) for s in shapes.values())
    return {"quantized_bytes": stored, "quantized_float32_bytes": dense, "packed_ratio": stored / dense if dense else 0.0}


def load_packed(path) -> WeightVector:
    """A packed checkpoint file as fake-quantized float32 weights, ready for ``model.load_state_dict``."""
    return unpack_checkpoint(WeightVector.load(path), str(path))
