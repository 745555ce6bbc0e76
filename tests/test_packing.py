"""Packed export: bit streams round-trip exactly, files hold bits/32 of float32, and an unpacked
model is the fake-quantized model bit for bit (so it evaluates identically)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvlib.data.base import Preprocess
from qvlib.evaluate import Engine, Split
from qvlib.models import build_vit, set_fixed_head
from qvlib.packing import load_packed, pack_bits, pack_checkpoint, packed_sizes, unpack_bits
from qvlib.quant import QuantSpec, fake_quant, fake_quant_state
from qvlib.vectors import WeightVector

QV = str(Path(sys.executable).parent / "qv")


def test_pack_bits_exact_layout_on_a_tiny_stream():
    # 3-bit values 5, 1, 7: bits (lsb first) 101 100 111 -> byte 0 = 1,0,1,1,0,0,1,1 = 0b11001101, byte 1 = 1
    assert pack_bits(torch.tensor([5, 1, 7]), 3).tolist() == [0b11001101, 0b1]
    assert pack_bits(torch.tensor([3, 0, 2, 1]), 2).tolist() == [0b01100011]
    assert unpack_bits(torch.tensor([0b11001101, 0b1], dtype=torch.uint8), 3, 3).tolist() == [5, 1, 7]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("count", [1, 7, 13, 64, 1001])
def test_pack_unpack_round_trips_any_length(bits, count):
    values = torch.randint(0, 2 ** bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and len(packed) == -(-count * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, count), values)


def test_pack_rejects_values_out_of_range_and_short_streams():
    with pytest.raises(ValueError, match="0..3"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 4)


@pytest.mark.parametrize("spec", [QuantSpec(bits=2), QuantSpec(bits=3), QuantSpec(bits=4, granularity="group", group_size=8),
                                  QuantSpec(bits=3, granularity="tensor"), QuantSpec(bits=2, scale="mse")])
def test_unpacked_checkpoint_is_the_fake_quantized_one_bit_for_bit(spec, tmp_path, tiny_arch):
    gen = torch.Generator().manual_seed(0)
    state = {"blocks.0.attn.qkv.weight": torch.randn(24, 16, generator=gen), "blocks.0.mlp.fc1.weight": torch.randn(7, 40, generator=gen),
             "blocks.0.attn.qkv.bias": torch.randn(24, generator=gen), "head.weight": torch.randn(3, 16, generator=gen)}
    packed = pack_checkpoint(WeightVector(state, {"task": "t"}), spec)
    packed.save(tmp_path / "p.safetensors")
    back = load_packed(tmp_path / "p.safetensors")
    want = fake_quant_state(state, spec)
    assert set(back) == set(state) and back.metadata["task"] == "t"
    for name in state:
        assert back[name].dtype == torch.float32 and torch.equal(back[name], want[name]), name


def test_quantized_part_is_within_five_percent_of_bits_over_32():
    w = torch.randn(768, 768, generator=torch.Generator().manual_seed(1))  # a ViT-B sized block linear
    for bits in (2, 3, 4):
        sizes = packed_sizes(pack_checkpoint(WeightVector({"blocks.0.mlp.fc2.weight": w}), QuantSpec(bits=bits)))
        ratio = sizes["quantized_bytes"] / sizes["quantized_float32_bytes"]
        assert bits / 32 <= ratio <= bits / 32 * 1.05, (bits, ratio)


def test_unpacked_model_evaluates_exactly_like_the_fake_quantized_model(tmp_path, tiny_arch):
    model = build_vit(tiny_arch, 3, seed=0)
    set_fixed_head(model, "t", 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QuantSpec(bits=3)
    WeightVector(state, {"arch": "tiny"}).save(tmp_path / "ft.safetensors")
    subprocess.run([QV, "quantize", tmp_path / "ft.safetensors", "--bits", "3", "--packed", "-o", tmp_path / "p.safetensors"], check=True,
                   capture_output=True)
    subprocess.run([QV, "unpack", tmp_path / "p.safetensors", "-o", tmp_path / "u.safetensors"], check=True, capture_output=True)
    info = json.loads(subprocess.run([QV, "info", tmp_path / "p.safetensors", "--json"], check=True, capture_output=True,
                                     text=True).stdout)
    assert info["file_bytes"] == (tmp_path / "p.safetensors").stat().st_size and info["packed_ratio"] > 3 / 32
    unpacked = WeightVector.load(tmp_path / "u.safetensors")
    engine = Engine(model, Preprocess.from_model(model), torch.device("cpu"), batch_size=16)
    side = model.patch_embed.img_size[0]
    images = torch.randint(0, 256, (40, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    split = Split(images, torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(3)))
    names = [n for n in state if n.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")) and n.startswith("blocks.")]
    fake = {n: fake_quant(state[n], spec) for n in names}
    assert all(torch.equal(unpacked[n], fake[n]) for n in names)
    assert torch.equal(engine.correct_mask({n: unpacked[n] for n in names}, split), engine.correct_mask(fake, split))


def test_unpack_refuses_a_plain_checkpoint(tmp_path):
    WeightVector({"w": torch.zeros(2, 2)}).save(tmp_path / "plain.safetensors")
    proc = subprocess.run([QV, "unpack", tmp_path / "plain.safetensors", "-o", tmp_path / "o.safetensors"], capture_output=True, text=True)
    assert proc.returncode != 0 and "not a packed checkpoint" in proc.stderr and not (tmp_path / "o.safetensors").exists()


def test_qv_info_summary_of_a_packed_and_a_plain_checkpoint():
    from qvlib.checkpoints import describe, summary

    w = torch.arange(64, dtype=torch.float32).reshape(4, 16) / 64
    plain = WeightVector({"blocks.0.mlp.fc2.weight": w, "head.weight": torch.ones(2, 16)}, {"task": "t"})
    assert summary(plain, "p.safetensors") == describe(plain) and summary(plain, "p")["quantized_tensors"] == 1
    packed = pack_checkpoint(plain, QuantSpec(bits=3))
    sizes = packed_sizes(packed)
    info = summary(packed, "packed.safetensors")
    assert list(info) == ["quantized_bytes", "quantized_float32_bytes", "packed_ratio", "metadata"]
    assert info["quantized_bytes"] == sizes["quantized_bytes"] and info["quantized_float32_bytes"] == 4 * 64
    assert info["packed_ratio"] == round(sizes["packed_ratio"], 4) and info["metadata"] == packed.metadata
