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


def test_the_config_section_of_an_arch_gives_its_arch_spec(tiny_arch):
    """qvlib.sections.ArchSection (torch-free, what the config holds) -> the ArchSpec that builds it."""
    from qvlib.sections import ArchSection

    section = ArchSection.from_config("tiny", {"timm_name": tiny_arch.timm_name, "overrides": dict(tiny_arch.overrides),
                                               "backbone": dict(tiny_arch.backbone)})
    assert section.spec() == tiny_arch
    assert section.spec() == ArchSpec.from_config("tiny", {"timm_name": tiny_arch.timm_name, "overrides": tiny_arch.overrides,
                                                           "backbone": tiny_arch.backbone})
    with pytest.raises(ValueError, match="not a timm model name"):  # timm's question, asked by the spec
        ArchSection.from_config("x", {"timm_name": "vit_nonexistent_model"}).spec()


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


# ---------------------------------------------------------------- timm's pretrained door, strictly
def _timm_arch(file: str) -> ArchSpec:
    return ArchSpec("tiny", "vit_tiny_patch16_224", TINY, {"source": "timm", "tag": "augreg_in21k", "file": file})


def _in21k_state(seed: int = 3) -> dict:
    """The tiny arch's tensors as timm's in21k files hold them: timm names and a 21,843-class head."""
    torch.manual_seed(seed)
    return dict(build_vit(ArchSpec("t", "vit_tiny_patch16_224", TINY), num_classes=21843, seed=seed).state_dict())


def test_timm_file_is_read_through_timms_pretrained_loading_and_its_head_dropped(tmp_path):
    from safetensors.torch import save_file

    state = _in21k_state()
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    loaded = backbone_state(_timm_arch("w.safetensors"), root=tmp_path)
    assert set(loaded) == {k for k in state if not k.startswith("head.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    model = task_model(_timm_arch("w.safetensors"), loaded, "cifar10", 7, seed=1, policy=QuantPolicy(scope="all"))
    assert model.head.weight.shape == (7, 24) and model.head.weight.requires_grad  # timm's own fresh head, trained
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "w.pth")  # no head at all: fine
    assert backbone_state(_timm_arch("w.pth"), root=tmp_path).keys() == loaded.keys()


def test_timm_file_with_a_missing_or_extra_tensor_is_a_one_line_error_naming_it(tmp_path):
    from safetensors.torch import save_file

    state = _in21k_state()
    save_file({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"^backbone file \S+missing.safetensors does not fit arch 'tiny': it is missing "
                                         r"tensor 'blocks.1.mlp.fc2.bias' \(shape \(24,\)\)$"):
        backbone_state(_timm_arch("missing.safetensors"), root=tmp_path)
    save_file({**state, "blocks.2.attn.qkv.weight": torch.zeros(72, 24)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"^backbone file \S+ does not fit arch 'tiny': it has tensor "
                                         r"'blocks.2.attn.qkv.weight' that the arch does not have$"):
        backbone_state(_timm_arch("extra.safetensors"), root=tmp_path)
    save_file({**state, "pos_embed": torch.zeros(1, 5, 24, 2)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit arch 'tiny': tensor 'pos_embed' is"):
        backbone_state(_timm_arch("shape.safetensors"), root=tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a weight file")
    with pytest.raises(ValueError, match=r"^backbone file \S+junk.safetensors is unreadable as a weight file \(.*\)$"):
        backbone_state(_timm_arch("junk.safetensors"), root=tmp_path)
    with pytest.raises(FileNotFoundError, match="backbone file .*absent.safetensors does not exist"):
        backbone_state(_timm_arch("absent.safetensors"), root=tmp_path)
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"w.ckpt is not a format timm's pretrained loading reads; expected one of "
                                         r"\.safetensors, \.pth, \.pt, \.bin, \.npz"):
        backbone_state(_timm_arch("w.ckpt"), root=tmp_path)
    bad_tag = ArchSpec("tiny", "vit_tiny_patch16_224", TINY, {"source": "timm", "tag": "in42k", "file": "w.ckpt"})
    with pytest.raises(ValueError, match=r"timm has no pretrained weights 'vit_tiny_patch16_224.in42k'"):
        backbone_state(bad_tag, root=tmp_path)


def _jax_npz(state: dict, depth: int, heads: int) -> dict:
    """``state`` in the layout of the original JAX/Flax checkpoints (augreg's .npz), as timm's JAX
    loader reads it back."""
    n = lambda t: t.detach().numpy()  # noqa: E731
    out = {"embedding/kernel": n(state["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
           "embedding/bias": n(state["patch_embed.proj.bias"]), "cls": n(state["cls_token"]),
           "Transformer/posembed_input/pos_embedding": n(state["pos_embed"]),
           "Transformer/encoder_norm/scale": n(state["norm.weight"]), "Transformer/encoder_norm/bias": n(state["norm.bias"]),
           "head/kernel": n(state["head.weight"].T), "head/bias": n(state["head.bias"])}
    for i in range(depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        dim = state[b + "norm1.weight"].shape[0]
        for j, part in enumerate(("query", "key", "value")):
            w = state[b + "attn.qkv.weight"][j * dim:(j + 1) * dim]
            out[f"{p}MultiHeadDotProductAttention_1/{part}/kernel"] = n(w.T.reshape(dim, heads, -1))
            out[f"{p}MultiHeadDotProductAttention_1/{part}/bias"] = n(state[b + "attn.qkv.bias"][j * dim:(j + 1) * dim].reshape(heads, -1))
        out[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = n(state[b + "attn.proj.weight"].reshape(dim, heads, -1).permute(1, 2, 0))
        out[f"{p}MultiHeadDotProductAttention_1/out/bias"] = n(state[b + "attn.proj.bias"])
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{p}{ln}/scale"], out[f"{p}{ln}/bias"] = n(state[b + norm + ".weight"]), n(state[b + norm + ".bias"])
        for r in range(2):
            out[f"{p}MlpBlock_3/Dense_{r}/kernel"] = n(state[f"{b}mlp.fc{r + 1}.weight"].T)
            out[f"{p}MlpBlock_3/Dense_{r}/bias"] = n(state[f"{b}mlp.fc{r + 1}.bias"])
    return out


def test_jax_npz_is_read_by_timms_jax_loader_and_a_missing_array_named(tmp_path):
    import numpy as np

    state = _in21k_state()
    arrays = _jax_npz(state, TINY["depth"], TINY["num_heads"])
    np.savez(tmp_path / "w.npz", **arrays)
    loaded = backbone_state(_timm_arch("w.npz"), root=tmp_path)
    assert set(loaded) == {k for k in state if not k.startswith("head.")}
    assert all(torch.allclose(loaded[k], state[k]) for k in loaded)
    np.savez(tmp_path / "nocls.npz", **{k: v for k, v in arrays.items() if k != "cls"})
    with pytest.raises(ValueError, match=r"^backbone file \S+nocls.npz does not fit arch 'tiny' as timm's JAX checkpoint "
                                         r"loader reads it \(KeyError: cls is not a file in the archive\)$"):
        backbone_state(_timm_arch("nocls.npz"), root=tmp_path)
    np.savez(tmp_path / "noblock.npz", **{k: v for k, v in arrays.items() if "encoderblock_1/LayerNorm_2" not in k})
    with pytest.raises(ValueError, match=r"^backbone file \S+noblock.npz does not fit arch 'tiny' as timm's JAX checkpoint "
                                         r"loader reads it \(KeyError: Transformer/encoderblock_1/LayerNorm_2/scale is not a file in the archive\)$"):
        backbone_state(_timm_arch("noblock.npz"), root=tmp_path)
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match=r"^backbone file \S+foreign.npz does not fit arch 'tiny' as timm's JAX checkpoint loader reads it"):
        backbone_state(_timm_arch("foreign.npz"), root=tmp_path)
