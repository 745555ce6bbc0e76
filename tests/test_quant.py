import pytest
import torch

from qvlib.quant import (
    QuantPolicy,
    QuantSpec,
    dequantize,
    fake_quant,
    fake_quant_ste,
    fake_quant_state,
    layer_type,
    quantize,
)

C3 = QuantSpec(bits=3)


def test_three_bit_matches_hand_computed_values():
    # row absmax 3 -> scale 1; row absmax 6 -> scale 2; integers clamp to [-4, 3]
    w = torch.tensor([[3.0, -3.0, 1.4, -1.6, 0.49], [6.0, -6.0, 2.9, 1.0, -5.1]])
    expected = torch.tensor([[3.0, -3.0, 1.0, -2.0, 0.0], [6.0, -6.0, 2.0, 0.0, -6.0]])
    assert torch.equal(fake_quant(w, C3), expected)
    codes, scale = quantize(w, C3)
    assert codes.dtype == torch.int8
    assert torch.equal(scale, torch.tensor([[1.0], [2.0]]))
    assert torch.equal(codes, torch.tensor([[3, -3, 1, -2, 0], [3, -3, 1, 0, -3]], dtype=torch.int8))


def test_two_and_four_bit_values():
    w = torch.tensor([[1.0, 0.6, -0.4, -1.0, 0.2]])
    # 2 bits: qmax 1, scale 1, integers in [-2, 1]
    assert torch.equal(fake_quant(w, QuantSpec(bits=2)), torch.tensor([[1.0, 1.0, 0.0, -1.0, 0.0]]))
    # 4 bits: qmax 7, scale 1/7
    got = fake_quant(w, QuantSpec(bits=4))
    want = torch.tensor([[7, 4, -3, -7, 1]], dtype=torch.float32) * (1.0 / 7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_integer_range_of_each_bit_width():
    for bits in range(2, 9):
        spec = QuantSpec(bits=bits)
        assert (spec.qmin, spec.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        codes, _ = quantize(torch.randn(16, 32), spec)
        assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert QuantSpec(bits=3).qmin == -4 and QuantSpec(bits=3).qmax == 3


def test_idempotent_and_channel_max_representable():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    for spec in (QuantSpec(bits=3), QuantSpec(bits=4, granularity="group", group_size=16), QuantSpec(bits=2, granularity="tensor")):
        q = fake_quant(w, spec)
        torch.testing.assert_close(fake_quant(q, spec), q, rtol=1e-6, atol=0)
    codes, scale = quantize(w, C3)
    rows = w.abs().argmax(dim=1)
    # the largest |w| of each channel gets the code +-qmax and dequantizes to itself
    assert torch.equal(codes[torch.arange(64), rows].abs(), torch.full((64,), 3, dtype=torch.int8))
    torch.testing.assert_close(fake_quant(w, C3).abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6, atol=0)


def test_error_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(32, 40)
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits=bits)
        _, scale = quantize(w, spec)
        err = (fake_quant(w, spec) - w).abs()
        # inside the range [qmin*s, qmax*s] rounding moves a value by at most s/2
        assert bool((err <= scale / 2 + 1e-6).all())


def test_zero_rows_stay_zero_and_dtype_preserved():
    w = torch.randn(4, 8)
    w[2] = 0
    q = fake_quant(w, C3)
    assert torch.equal(q[2], torch.zeros(8))
    assert not torch.isnan(q).any()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert fake_quant(w.to(dtype), C3).dtype == dtype
    codes, scale = quantize(w, C3)
    torch.testing.assert_close(dequantize(codes, scale, C3), q)


def test_group_and_tensor_granularity():
    w = torch.tensor([[1.0, 3.0, 6.0, -2.0]])
    # groups of 2: [1, 3] scale 1; [6, -2] scale 2
    assert torch.equal(fake_quant(w, QuantSpec(bits=3, granularity="group", group_size=2)), torch.tensor([[1.0, 3.0, 6.0, -2.0]]))
    # per tensor: absmax 6, scale 2 -> 1/2 rounds to 0 (round half to even), 3/2 -> 2
    assert torch.equal(fake_quant(w, QuantSpec(bits=3, granularity="tensor")), torch.tensor([[0.0, 4.0, 6.0, -2.0]]))
    w2 = torch.tensor([[1.0, 2.0], [30.0, 60.0]])
    per_tensor = fake_quant(w2, QuantSpec(bits=3, granularity="tensor"))
    assert torch.equal(per_tensor[0], torch.zeros(2))  # small row lost under one scale
    with pytest.raises(ValueError, match="group_size 3 does not divide the 4 input columns"):
        fake_quant(w, QuantSpec(bits=3, granularity="group", group_size=3))


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="bits must be an integer in 2..8, got 9"):
        QuantSpec(bits=9)
    with pytest.raises(ValueError, match="bits must be an integer in 2..8, got 1"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="granularity must be one of"):
        QuantSpec(granularity="row")
    with pytest.raises(ValueError, match="needs a positive integer group_size"):
        QuantSpec(granularity="group")
    with pytest.raises(ValueError, match="only valid with granularity 'group'"):
        QuantSpec(group_size=64)
    spec = QuantSpec(bits=4, granularity="group", group_size=128)
    assert spec.tag == "w4-group128" and QuantSpec().tag == "w3-channel"
    assert QuantSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown QuantSpec keys"):
        QuantSpec.from_mapping({"bits": 3, "symmetric": True})


def test_ste_passes_gradient_unchanged():
    w = torch.randn(6, 5, requires_grad=True)
    out = fake_quant_ste(w, C3)
    assert torch.equal(out.detach(), fake_quant(w, C3))
    upstream = torch.randn(6, 5)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_policy_on_state_dict_names():
    policy = QuantPolicy()
    names = {
        "blocks.0.attn.qkv.weight": True,
        "blocks.11.attn.proj.weight": True,
        "blocks.3.mlp.fc1.weight": True,
        "blocks.3.mlp.fc2.weight": True,
        "blocks.3.mlp.fc2.bias": False,
        "blocks.0.norm1.weight": False,
        "patch_embed.proj.weight": False,
        "pos_embed": False,
        "cls_token": False,
        "head.weight": False,
        "norm.weight": False,
    }
    state = {n: torch.zeros(4, 4) if n.endswith("weight") and "norm" not in n else torch.zeros(4) for n in names}
    assert policy.select(state) == [n for n, want in names.items() if want]
    assert layer_type("blocks.3.mlp.fc1.weight") == "fc1" and layer_type("head.weight") == "other"


def test_fake_quant_state_touches_only_policy_tensors():
    state = {"blocks.0.attn.qkv.weight": torch.randn(6, 4), "blocks.0.attn.qkv.bias": torch.randn(6), "head.weight": torch.randn(3, 4)}
    out = fake_quant_state(state, C3)
    assert torch.equal(out["blocks.0.attn.qkv.weight"], fake_quant(state["blocks.0.attn.qkv.weight"], C3))
    assert out["blocks.0.attn.qkv.bias"] is state["blocks.0.attn.qkv.bias"]
    assert out["head.weight"] is state["head.weight"]


def test_scale_registry_reaches_fake_quant_and_names_the_tag():
    from qvlib.quant import SCALES, register_scale

    @register_scale("half_absmax_test")
    def half(blocks, spec):  # clips every block at half its largest magnitude
        return blocks.abs().amax(dim=1, keepdim=True) / 2 / spec.qmax

    try:
        spec = QuantSpec(bits=2, scale="half_absmax_test")
        assert spec.tag == "w2-channel-half_absmax_test" and QuantSpec(bits=2).tag == "w2-channel"
        w = torch.tensor([[4.0, 1.0, -2.0, 0.4]])
        # scale 4 / 2 / 1 = 2: codes round(w / 2) clamped to [-2, 1] -> [1, 0, -1, 0] (2.0 clamps at 1)
        assert fake_quant(w, spec).tolist() == [[2.0, 0.0, -2.0, 0.0]]
        assert QuantSpec.from_json(spec.to_json()) == spec
        with pytest.raises(ValueError, match="already registered"):
            register_scale("half_absmax_test")(half)
    finally:
        SCALES.pop("half_absmax_test")
    with pytest.raises(ValueError, match="scale must be one of absmax"):
        QuantSpec(scale="nope")
    assert QuantSpec().to_json() == '{"bits": 3, "granularity": "channel", "group_size": null}'  # as before scales existed


def test_mse_scale_clips_the_outlier_when_that_reconstructs_better():
    w = torch.tensor([[4.0, 1.9, 1.9, 1.9]])
    # absmax at 2 bits: scale 4, the 1.9s round to 0 (error 3 x 1.9^2 = 10.83); the grid's best clip is
    # ratio 0.60 (scale 2.4: every weight -> 2.4, error 1.6^2 + 3 x 0.5^2 = 3.31; ratio 0.62 gives 3.32)
    assert fake_quant(w, QuantSpec(bits=2)).tolist() == [[4.0, 0.0, 0.0, 0.0]]
    assert fake_quant(w, QuantSpec(bits=2, scale="mse")) == pytest.approx(torch.full((1, 4), 2.4))
    assert QuantSpec(bits=2, scale="mse").tag == "w2-channel-mse"


def test_mse_scale_never_reconstructs_worse_than_absmax_and_is_absmax_with_ratio_one():
    from qvlib.quant import absmax_scale, clipped_scale

    torch.manual_seed(0)
    w = torch.distributions.StudentT(torch.tensor(3.0)).sample((64, 96)) * 0.02  # heavy-tailed rows
    w[5] = 0.0  # an all-zero row stays exactly zero
    for bits in (2, 3, 4):
        for block, spec_kw in ((96, {}), (32, {"granularity": "group", "group_size": 32})):
            absmax, mse = QuantSpec(bits=bits, **spec_kw), QuantSpec(bits=bits, scale="mse", **spec_kw)
            err_abs = (fake_quant(w, absmax) - w).pow(2).reshape(-1, block).sum(1)  # per block that shares a scale
            err_mse = (fake_quant(w, mse) - w).pow(2).reshape(-1, block).sum(1)
            assert (err_mse <= err_abs + 1e-12).all()
            if bits == 2:
                assert err_mse.sum() < 0.8 * err_abs.sum()
            assert (fake_quant(w, mse)[5] == 0).all()
    blocks = w.reshape(-1, 32)
    spec = QuantSpec(bits=2)
    assert torch.equal(clipped_scale(blocks, spec, [1.0]), absmax_scale(blocks, spec))
    with pytest.raises(ValueError, match="clipping grid is empty"):
        clipped_scale(blocks, spec, [])


def test_hqq_scale_is_torchaos_fit_on_the_papers_grid_and_beats_absmax_on_heavy_tails():
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    torch.manual_seed(1)
    w = torch.distributions.StudentT(torch.tensor(3.0)).sample((64, 96)) * 0.02
    w[7] = 0.0
    for bits in (2, 3, 4):
        spec = QuantSpec(bits=bits, scale="hqq")
        assert spec.tag == f"w{bits}-channel-hqq"
        codes, scale = quantize(w, spec)
        qdata, ref_scale = _choose_qparams_and_quantize_scale_only_hqq(w, [1, 96], spec.qmin, spec.qmax)
        nonzero = torch.arange(64) != 7
        assert torch.equal(scale[nonzero], ref_scale.float()[nonzero])  # the library's scale, untouched
        assert torch.equal(codes[nonzero].int(), qdata[nonzero])  # and its codes: round to nearest on [qmin, qmax]
        assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
        assert (fake_quant(w, spec)[7] == 0).all()
        err_abs = (fake_quant(w, QuantSpec(bits=bits)) - w).pow(2).sum()
        err_hqq = (fake_quant(w, spec) - w).pow(2).sum()
        assert err_hqq < err_abs  # heavy tails: a smaller scale than absmax reconstructs better
