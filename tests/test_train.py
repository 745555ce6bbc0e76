"""Training runs: determinism, resume after a kill, bad input, pretraining, schedule and data plan."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import BIN, env, mini_config, qv
from qvlib.config import Config
from qvlib.data.base import ArrayDataset, Preprocess
from qvlib.models import backbone_state, task_model
from qvlib.quant import QuantPolicy, QuantSpec
from qvlib.train import TrainConfig, batch_indices, metrics_path, quantized_forward, train, warmup_cosine
from qvlib.vectors import WeightVector


def tiny_run(tiny_arch, tmp_path, name, mode="ft", steps=8, data=None, **kw):
    torch.manual_seed(123)  # must not matter: training seeds itself
    model = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0)
    if data is None:
        g = torch.Generator().manual_seed(0)
        data = ArrayDataset(torch.randint(0, 255, (50, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(50) % 3)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, **kw)
    out = tmp_path / f"{name}.safetensors"
    result = train(model, data, Preprocess(img_size=16), cfg, mode, out, {"task": "t"},
                   spec=QuantSpec(bits=2) if mode == "qat" else None, progress=False)
    return WeightVector.load(out), result


def test_same_seed_same_weights_and_only_linears_move(tiny_arch, tmp_path):
    a, ra = tiny_run(tiny_arch, tmp_path, "a")
    b, _ = tiny_run(tiny_arch, tmp_path, "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0).state_dict()
    moved = {k for k in a if not torch.equal(a[k], start[k])}
    assert moved == set(QuantPolicy().select(a))
    assert ra.steps == 8 and len(ra.losses) == 8
    metrics = json.loads(metrics_path(tmp_path / "a.safetensors").read_text())
    assert metrics["steps"] == 8 and len(metrics["loss"]) == 8 and metrics["images_per_s"] > 0
    assert a.metadata["mode"] == "ft" and json.loads(a.metadata["train"])["lr"] == 1e-3
    assert not (tmp_path / "a.safetensors.state.pt").exists()


def test_qat_differs_from_ft_and_records_spec(tiny_arch, tmp_path):
    ft, _ = tiny_run(tiny_arch, tmp_path, "ft")
    qat, _ = tiny_run(tiny_arch, tmp_path, "qat", mode="qat")
    assert not torch.equal(ft["blocks.0.attn.qkv.weight"], qat["blocks.0.attn.qkv.weight"])
    assert QuantSpec.from_json(qat.metadata["quant"]) == QuantSpec(bits=2)


def test_quantized_forward_uses_fake_quant_weights(tiny_arch):
    from qvlib.quant import fake_quant_state

    model = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0).eval()
    names = QuantPolicy().select_model(model)
    x = torch.randn(2, 3, 16, 16)
    expected = torch.func.functional_call(model, fake_quant_state(dict(model.named_parameters()), QuantSpec(bits=2)), (x,))
    torch.testing.assert_close(quantized_forward(model, names, QuantSpec(bits=2), x), expected)


def test_resume_in_process_equals_uninterrupted(tiny_arch, tmp_path, monkeypatch):
    full, _ = tiny_run(tiny_arch, tmp_path, "full", steps=10, checkpoint_every=3)
    import qvlib.train as tr

    calls = {"n": 0}
    real = tr._save_state

    def save_then_die(*args, **kw):
        real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed right after the step-6 state was written

    monkeypatch.setattr(tr, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tiny_arch, tmp_path, "cut", steps=10, checkpoint_every=3)
    assert (tmp_path / "cut.safetensors.state.pt").exists() and not (tmp_path / "cut.safetensors").exists()
    monkeypatch.setattr(tr, "_save_state", real)
    resumed, result = tiny_run(tiny_arch, tmp_path, "cut", steps=10, checkpoint_every=3)
    assert result.resumed_from == 6
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_non_finite_loss_stops_with_step_and_writes_nothing(tiny_arch, tmp_path):
    model = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")  # frozen, so every step's loss is NaN
    data = ArrayDataset(torch.zeros(20, 3, 16, 16, dtype=torch.uint8), torch.zeros(20, dtype=torch.long))
    out = tmp_path / "nan.safetensors"
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 1 of 5"):
        train(model, data, Preprocess(img_size=16), TrainConfig(steps=5, batch_size=4), "ft", out, {}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_batch_plan_and_schedule():
    first = batch_indices(10, 4, seed=0, step=0)
    second = batch_indices(10, 4, seed=0, step=1)
    assert len(first) == 4 and not set(first.tolist()) & set(second.tolist())
    assert torch.equal(first, batch_indices(10, 4, 0, 0)) and not torch.equal(first, batch_indices(10, 4, 1, 0))
    assert not torch.equal(batch_indices(10, 4, 0, 2), batch_indices(10, 4, 0, 0))  # next epoch, new order
    f = warmup_cosine(2, 10)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(10) == pytest.approx(0.0) and f(6) == pytest.approx(0.5)
    assert TrainConfig(epochs=2, batch_size=10).total_steps(55) == 10
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        TrainConfig()
    with pytest.raises(ValueError, match="unknown training keys"):
        TrainConfig.from_mapping({"steps": 1, "momentum": 0.9})


def test_last_batch_keep_counts_steps_as_the_authors_and_sees_every_example():
    # an epoch of 10 examples at batch 4: two full micro-batches and, kept, a last one of 2
    epoch = [batch_indices(10, 4, seed=3, step=s, keep_last=True) for s in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert torch.equal(epoch[0], batch_indices(10, 4, seed=3, step=0))  # the permutation is the same
    assert not torch.equal(batch_indices(10, 4, 3, 3, keep_last=True), epoch[0])  # step 3 starts epoch 1
    # Flowers102's 1,020 training images at batch 128 for 147 epochs: 8 * 147 steps kept, 7 * 147 dropped
    assert TrainConfig(epochs=147, batch_size=128, last_batch="keep").total_steps(1020) == 1176
    assert TrainConfig(epochs=147, batch_size=128).total_steps(1020) == 1029
    # ViT-L as the authors run it: 64 x 2 accumulation, epochs * ceil(N / 64) // 2 optimizer steps
    assert TrainConfig(epochs=3, batch_size=64, grad_accum=2, last_batch="keep").total_steps(1000) == 3 * 16 // 2
    assert TrainConfig(epochs=2, batch_size=10, last_batch="keep").total_steps(55) == 12
    with pytest.raises(ValueError, match="last_batch must be one of drop, keep"):
        TrainConfig(steps=1, last_batch="pad")


def test_lagged_schedule_runs_the_first_step_at_the_peak_and_then_one_step_behind():
    aligned, lagged = warmup_cosine(4, 20), warmup_cosine(4, 20, lagged=True)
    assert lagged(0) == 1.0 and aligned(0) == 0.25
    assert [lagged(k) for k in range(1, 20)] == [aligned(k) for k in range(19)]
    with pytest.raises(ValueError, match="lr_schedule must be one of aligned, lagged"):
        TrainConfig(steps=1, lr_schedule="late")


def test_lagged_schedule_and_kept_last_batch_change_a_run_and_are_recorded(tiny_arch, tmp_path):
    base, _ = tiny_run(tiny_arch, tmp_path, "base", steps=3)
    lagged, _ = tiny_run(tiny_arch, tmp_path, "lagged", steps=3, lr_schedule="lagged")
    assert not torch.equal(base["blocks.0.attn.qkv.weight"], lagged["blocks.0.attn.qkv.weight"])
    assert json.loads(lagged.metadata["train"])["lr_schedule"] == "lagged"
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randint(0, 255, (20, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(20) % 3)
    model = task_model(tiny_arch, backbone_state(tiny_arch), "t", 3, seed=0)
    out = tmp_path / "kept.safetensors"
    result = train(model, data, Preprocess(img_size=16), TrainConfig(epochs=2, batch_size=8, last_batch="keep"), "ft",
                   out, {"task": "t"}, progress=False)
    assert result.steps == 6  # ceil(20 / 8) = 3 micro-batches per epoch, the last of 4 images


def test_cli_finetune_killed_midway_resumes_to_identical_weights(tmp_path):
    cfg = mini_config(tmp_path / "c.yaml", pretrain=False,
                      finetune={"steps": 400, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 20, "log_every": 100})
    args = ["finetune", "--config", cfg, "--arch", "tiny", "--task", "dots", "--mode", "qat", "--threads", "1", "--no-progress"]
    qv(*args, "-o", tmp_path / "full.safetensors")
    out = tmp_path / "cut.safetensors"
    state = Path(str(out) + ".state.pt")
    proc = subprocess.Popen([str(BIN / "qv"), *map(str, args), "-o", str(out)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert state.exists() and not out.exists()
    qv(*args, "-o", out)
    metrics = json.loads(metrics_path(out).read_text())
    assert 0 < metrics["resumed_from"] < 400
    full, cut = WeightVector.load(tmp_path / "full.safetensors"), WeightVector.load(out)
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert not state.exists()


def test_cli_refuses_bad_input_and_writes_nothing(tmp_path):
    cfg = mini_config(tmp_path / "c.yaml", pretrain=False)
    out = tmp_path / "x.safetensors"
    proc = qv("finetune", "--config", cfg, "--arch", "huge", "--task", "dots", "--mode", "ft", "-o", out, check=False)
    assert proc.returncode == 2 and "unknown arch 'huge'; this config has: tiny" in proc.stderr
    proc = qv("finetune", "--config", cfg, "--arch", "tiny", "--task", "cars", "--mode", "ft", "-o", out, check=False)
    assert proc.returncode == 2 and "unknown task 'cars'" in proc.stderr
    WeightVector({"pos_embed": torch.zeros(1, 3, 24)}).save(tmp_path / "bad_backbone.safetensors")
    cfg2 = mini_config(tmp_path / "c2.yaml", pretrain=True)
    proc = qv("finetune", "--config", cfg2, "--arch", "tiny", "--task", "dots", "--mode", "ft",
              "--backbone", tmp_path / "bad_backbone.safetensors", "-o", out, check=False)
    assert proc.returncode == 2 and "backbone does not fit arch 'tiny': it is missing tensor 'cls_token' (shape (1, 1, 24))" in proc.stderr
    assert not out.exists() and not Path(str(out) + ".state.pt").exists()


def test_cli_pretrain_writes_headless_backbone(tmp_path):
    cfg = mini_config(tmp_path / "c.yaml")
    out = tmp_path / "bb.safetensors"
    qv("pretrain", "--config", cfg, "--arch", "tiny", "--threads", "1", "--no-progress", "-o", out)
    bb = WeightVector.load(out)
    assert not any(k.startswith("head.") for k in bb)
    arch = Config.load(cfg).arch("tiny", backbone_path=out)
    start = backbone_state(arch)
    assert all(torch.equal(start[k], bb[k]) for k in bb)
    assert bb.metadata["mode"] == "pretrain" and json.loads(bb.metadata["pretrain_classes"]) == 12


def test_precision_switch_is_validated_and_the_cpu_runs_fp32():
    import contextlib

    from qvlib.evaluate import Engine
    from qvlib.precision import autocast_for
    from qvlib.train import TrainConfig

    assert TrainConfig(steps=1).precision == "bf16" and TrainConfig(steps=1, precision="fp32").precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of bf16, fp32, got 'fp16'"):
        TrainConfig(steps=1, precision="fp16")
    assert isinstance(autocast_for(torch.device("cpu"), "bf16"), contextlib.nullcontext)
    if torch.cuda.is_available():
        assert isinstance(autocast_for(torch.device("cuda"), "bf16"), torch.autocast)
        assert isinstance(autocast_for(torch.device("cuda"), "fp32"), contextlib.nullcontext)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="precision must be one of"):
        Engine(model, None, torch.device("cpu"), precision="half")
    assert isinstance(Engine(model, None, torch.device("cpu"), precision="bf16").autocast(), contextlib.nullcontext)
