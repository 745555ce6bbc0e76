import pytest
import torch

from qvlib.models import (
    ArchSpec,
    backbone_state,
    build_vit,
    freeze_except,
    head_seed,
    load_backbone,
    set_fixed_head,
    task_model,
)
from qvlib.quant import QuantPolicy

from conftest import TINY


def expected_block_linears(depth):
    return [f"blocks.{i}.{m}.weight" for i in range(depth) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_policy_selects_exactly_the_block_linears_of_vit_tiny():
    model = build_vit(ArchSpec("t", "vit_tiny_patch16_224"), num_classes=10)
    assert QuantPolicy().select_model(model) == expected_block_linears(12)


def test_policy_selects_exactly_the_block_linears_of_a_custom_tiny_vit(tiny_arch):
    model = build_vit(tiny_arch, num_classes=5)
    names = QuantPolicy().select_model(model)
    assert names == expected_block_linears(2)
    linears = [n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    assert sorted(names) == sorted(linears)


def test_same_factory_for_base_and_tiny(tiny_arch):
    base = build_vit(ArchSpec("b", "vit_base_patch16_224"), num_classes=0)
    tiny = build_vit(tiny_arch, num_classes=0)
    assert type(base) is type(tiny)
    assert base.embed_dim == 768 and tiny.embed_dim == 24
    assert tiny.patch_embed.img_size == (16, 16)


def test_build_is_seeded(tiny_arch):
    a, b, c = build_vit(tiny_arch, 3, seed=1), build_vit(tiny_arch, 3, seed=1), build_vit(tiny_arch, 3, seed=2)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


def test_arch_validation():
    with pytest.raises(ValueError, match="unknown override"):
        ArchSpec("x", "vit_tiny_patch16_224", overrides={"width": 3})
    with pytest.raises(ValueError, match="not a timm model name"):
        ArchSpec("x", "vit_nonexistent_model")
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        build_vit(ArchSpec("x", "resnet18"))


def test_fixed_head_is_deterministic_per_task_and_frozen(tiny_arch):
    m1, m2 = build_vit(tiny_arch, 4, seed=0), build_vit(tiny_arch, 4, seed=5)
    set_fixed_head(m1, "digits", 0)
    set_fixed_head(m2, "digits", 0)
    assert torch.equal(m1.head.weight, m2.head.weight)
    assert torch.equal(m1.head.bias, torch.zeros(4))
    assert not m1.head.weight.requires_grad
    set_fixed_head(m2, "shapes", 0)
    assert not torch.equal(m1.head.weight, m2.head.weight)
    assert head_seed("digits", 0) != head_seed("digits", 1)
    with pytest.raises(ValueError, match="no classification head"):
        set_fixed_head(build_vit(tiny_arch, 0), "digits", 0)


def test_freeze_trains_only_block_linears(tiny_arch):
    model = build_vit(tiny_arch, 3)
    trained = freeze_except(model)
    assert trained == expected_block_linears(2)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trained


def test_backbone_load_and_mismatch_errors(tiny_arch):
    state = backbone_state(tiny_arch)
    assert not any(k.startswith("head.") for k in state)
    model = task_model(tiny_arch, state, "digits", 10, seed=0)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    bad = dict(state)
    bad["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"backbone does not fit arch 'tiny': tensor 'blocks.0.attn.qkv.weight' is \(3, 3\), expected \(72, 24\)"):
        load_backbone(build_vit(tiny_arch, 2), bad, "tiny")
    missing = {k: v for k, v in state.items() if k != "pos_embed"}
    with pytest.raises(ValueError, match="backbone does not fit arch .*: it is missing tensor 'pos_embed'"):
        load_backbone(build_vit(tiny_arch, 2), missing)
    extra = {**state, "blocks.9.attn.qkv.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="backbone does not fit arch .*: it has tensor 'blocks.9.attn.qkv.weight' that the arch does not have"):
        load_backbone(build_vit(tiny_arch, 2), extra)


def test_backbone_from_file(tmp_path, tiny_arch):
    from qvlib.vectors import WeightVector

    state = backbone_state(tiny_arch)
    WeightVector(state).save(tmp_path / "bb.safetensors")
    arch = ArchSpec("tiny", "vit_tiny_patch16_224", TINY, {"source": "file", "path": "bb.safetensors"})
    loaded = backbone_state(arch, root=tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="unknown backbone source 'hub'"):
        backbone_state(ArchSpec("tiny", "vit_tiny_patch16_224", TINY, {"source": "hub"}))
