"""Training scope: what trains, what QAT fake-quantizes and what a vector carries, for the paper
text's scope (linear) and the authors' code's (all)."""

import pytest
import torch

import qvlib.train as train_module
from qvlib.checkpoints import extract_vector
from qvlib.data.base import ArrayDataset, Preprocess
from qvlib.models import backbone_state, head_seed, task_model
from qvlib.quant import QuantPolicy, QuantSpec, fake_quant, quantized_patch
from qvlib.train import TrainConfig, train
from qvlib.vectors import WeightVector

ALL = QuantPolicy(scope="all")
LINEAR = QuantPolicy()
BLOCK_LINEARS = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


def test_scope_is_validated():
    with pytest.raises(ValueError, match="scope must be one of linear, all, got 'head'"):
        QuantPolicy(scope="head")


def test_what_each_scope_trains_and_carries(tiny_arch):
    state = dict(task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0).named_parameters())
    assert set(LINEAR.select(state)) == set(ALL.select(state)) == BLOCK_LINEARS
    assert set(LINEAR.select_carried(state)) == BLOCK_LINEARS
    carried = set(ALL.select_carried(state))
    assert carried == {n for n in state if not n.startswith("head.")}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.bias", "blocks.1.norm2.weight",
            "norm.bias"} <= carried
    assert not ALL.carries("blocks.0.attn.qkv.weight", torch.zeros(3, dtype=torch.int64))  # counters are not weights
    assert ALL.trains("head.weight") and not LINEAR.trains("head.weight") and not LINEAR.trains("norm.weight")


def test_scope_all_trains_every_parameter_with_timms_own_head(tiny_arch):
    linear = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0, policy=LINEAR)
    full = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0, policy=ALL)
    assert {n for n, p in linear.named_parameters() if p.requires_grad} == BLOCK_LINEARS
    assert all(p.requires_grad for p in full.parameters())
    # linear: the fixed random projection of (task, seed); all: timm's head init (small weights, zero bias)
    fixed = torch.randn(linear.head.weight.shape, generator=torch.Generator().manual_seed(head_seed("t", 0)))
    torch.testing.assert_close(linear.head.weight, fixed / linear.head.in_features**0.5)
    assert not torch.equal(full.head.weight, linear.head.weight)
    assert float(full.head.weight.detach().std()) < 0.05 and torch.count_nonzero(full.head.bias) == 0
    again = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0, policy=ALL)
    assert torch.equal(again.head.weight, full.head.weight)  # FT and QAT of a task start alike


def _run(tiny_arch, tmp_path, name, policy, mode, monkeypatch=None):
    model = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0, policy=policy)
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randint(0, 255, (40, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(40) % 3)
    out = tmp_path / f"{name}.safetensors"
    train(model, data, Preprocess(img_size=16), TrainConfig(steps=4, batch_size=8, lr=1e-3), mode, out, {"task": "t"},
          spec=QuantSpec(bits=2) if mode == "qat" else None, progress=False, quantized=policy.select_model(model))
    return WeightVector.load(out)


def test_scope_all_qat_moves_everything_but_fake_quantizes_only_block_linears(tiny_arch, tmp_path, monkeypatch):
    seen = []
    real = train_module.fake_quant_ste

    def spy(w, spec):
        seen.append(tuple(w.shape))
        return real(w, spec)

    monkeypatch.setattr(train_module, "fake_quant_ste", spy)
    start = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0, policy=ALL).state_dict()
    qat = _run(tiny_arch, tmp_path, "qat", ALL, "qat")
    assert len(seen) == 4 * len(BLOCK_LINEARS)  # 4 steps, one call per block linear weight each
    assert all(len(shape) == 2 for shape in seen)
    moved = {k for k in qat if not torch.equal(qat[k], start[k])}
    assert {"head.weight", "head.bias", "norm.weight", "pos_embed", "blocks.0.attn.qkv.bias"} | BLOCK_LINEARS <= moved


def test_qat_refuses_to_quantize_a_frozen_tensor(tiny_arch, tmp_path):
    model = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0)
    data = ArrayDataset(torch.zeros(8, 3, 16, 16, dtype=torch.uint8), torch.arange(8) % 3)
    with pytest.raises(ValueError, match="QAT would fake-quantize 'head.weight', which does not train"):
        train(model, data, Preprocess(img_size=16), TrainConfig(steps=1, batch_size=8), "qat", tmp_path / "x.safetensors",
              {}, spec=QuantSpec(bits=2), progress=False, quantized=["head.weight"])
    assert not (tmp_path / "x.safetensors").exists()


def test_vector_of_each_scope(tiny_arch, tmp_path):
    for policy in (LINEAR, ALL):
        ft = _run(tiny_arch, tmp_path, f"ft-{policy.scope}", policy, "ft")
        qat = _run(tiny_arch, tmp_path, f"qat-{policy.scope}", policy, "qat")
        rho = extract_vector(qat, ft, policy)
        expected = BLOCK_LINEARS if policy.scope == "linear" else {k for k in ft if not k.startswith("head.")}
        assert set(rho) == expected and rho.metadata["scope"] == policy.scope
        for k in rho:
            torch.testing.assert_close(rho[k], qat[k] - ft[k])
        assert policy.scope == "linear" or float(rho["norm.weight"].abs().sum()) > 0


def test_quantized_patch_by_hand():
    spec = QuantSpec(bits=2)
    base = {"w": torch.tensor([[1.0, -0.2], [0.4, 0.5]]), "b": torch.tensor([0.5, -1.0]), "other": torch.ones(2)}
    rho = {"w": torch.tensor([[0.0, 1.0], [0.0, -1.0]]), "b": torch.tensor([1.0, 2.0])}
    out = quantized_patch(base, ["w"], spec, rho, 0.5)
    assert set(out) == {"w", "b"}  # the quantized tensors and what the vector carries, nothing else
    # w + 0.5 rho = [[1, 0.3], [0.4, 0]] -> per row absmax scale 1 and 0.4, ternary codes
    assert torch.equal(out["w"], torch.tensor([[1.0, 0.0], [0.4, 0.0]]))
    assert torch.equal(out["b"], torch.tensor([1.0, 0.0]))  # unquantized: 0.5 + 0.5, -1 + 1
    assert torch.equal(quantized_patch(base, ["w"], spec)["w"], fake_quant(base["w"], spec))
    assert torch.equal(quantized_patch(base, ["w"], None, rho, 1.0)["w"], base["w"] + rho["w"])
    with pytest.raises(KeyError, match="the vector holds 'x', which the receiver does not have"):
        quantized_patch(base, ["w"], spec, {"x": torch.ones(1)}, 1.0)
